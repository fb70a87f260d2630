// SPDX-License-Identifier: MIT
// The peer record of a message-queue channel: who holds the queue's ends, in a small shm
// segment beside the queue (the layout only; mq_peers.hpp reads and writes it).
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <type_traits>

namespace ipcoro::detail {

/// Type tag and layout version of the shm segment that holds an mq_peer_record.
inline constexpr std::uint32_t mq_peer_type_tag = 0x5250514d;  // "MQPR"
inline constexpr std::uint32_t mq_peer_layout_version = 1;
/// How many endpoints (processes holding an end) one queue records.
inline constexpr std::size_t mq_peer_entries = 64;

/// The role in the low byte of an entry's word.
inline constexpr std::uint64_t mq_peer_claiming = 1;  ///< being written by the pid in the word
inline constexpr std::uint64_t mq_peer_sender = 2;
inline constexpr std::uint64_t mq_peer_receiver = 3;

/// One endpoint: `word` is 0 (free) or pid << 8 | role. The process's start time and boot
/// (detail::process_identity) are stored before the word is published with its role.
struct mq_peer_entry {
  std::atomic<std::uint64_t> word;
  std::atomic<std::uint64_t> start_time;
  std::atomic<std::uint64_t> boot_id;
};

/// The whole payload; all zero when created.
struct mq_peer_record {
  /// The queue this record belongs to (st_dev / st_ino of its descriptor), stored by the
  /// receiver that created both once the queue exists; 0 until then.
  std::atomic<std::uint64_t> queue_dev;
  std::atomic<std::uint64_t> queue_ino;
  /// Set by a sender's close(): receivers end the stream once the queue is empty, so the
  /// end needs no room in a full queue.
  std::atomic<std::uint32_t> ended;
  /// How many receivers and senders ever attached: "none alive" means "not yet" while 0.
  std::atomic<std::uint32_t> receivers_seen;
  std::atomic<std::uint32_t> senders_seen;
  std::uint32_t reserved;
  mq_peer_entry entries[mq_peer_entries];
};

static_assert(std::atomic<std::uint64_t>::is_always_lock_free &&
              std::atomic<std::uint32_t>::is_always_lock_free);
static_assert(std::is_standard_layout_v<mq_peer_record> && sizeof(mq_peer_entry) == 24);
static_assert(sizeof(mq_peer_record) == 32 + mq_peer_entries * sizeof(mq_peer_entry));

}  // namespace ipcoro::detail
