// SPDX-License-Identifier: MIT
// The rings' shared-memory ABI: the header, record and slot layouts, and their assertions.
#pragma once

#include "ipcoro/hash.hpp"
#include "ipcoro/shm_ring.hpp"

#include <sys/types.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <span>

namespace ipcoro::detail {

inline constexpr std::uint64_t ring_magic = 0x31474e4952435049ull;  // "IPCRING1" in memory order
// 2: the futex word carries the "a sleeper waits on this value" bit (was: a waiter count).
inline constexpr std::uint32_t ring_version = 2;
// 3: version 2 plus ring_config::features. Written only for a ring with a feature, so that a
// ring without one stays readable by an ipcoro that reads version 2 alone, and an older
// ipcoro refuses a ring whose records it would misread.
inline constexpr std::uint32_t ring_version_features = 3;
// ring_config::features: SPSC records carry an XXH3-64 check (record_check_header), and
// the end of stream carries one in ring_header::end_check.
inline constexpr std::uint32_t feature_xxh3 = 1;
inline constexpr std::uint32_t kind_spsc = 1;
inline constexpr std::uint32_t kind_mpmc = 2;
inline constexpr std::size_t participant_count = 64;
inline constexpr std::size_t min_spsc_capacity = 4096;
inline constexpr std::size_t max_spsc_capacity = spsc_ring_max_capacity;
inline constexpr std::size_t max_mpmc_slots = mpmc_ring_max_slots;
inline constexpr std::size_t max_mpmc_message = mpmc_ring_max_message;
inline constexpr std::size_t slot_header_size = 16;

// The immutable description of a ring, written by format_*() and copied out on attach.
struct ring_config {
  std::uint64_t magic;
  std::uint32_t version;
  std::uint32_t kind;
  std::uint64_t region_size;
  std::uint64_t capacity;  // SPSC: data bytes; MPMC: slots
  std::uint32_t slot_stride;
  std::uint32_t max_message;
  std::uint32_t header_size;
  std::uint32_t participants;
  std::uint64_t check;      // FNV-1a of the fields above (version 3: and of features)
  std::uint32_t features;   // version 3 only (feature_*); 0 in a version 2 ring
  std::uint32_t reserved_;  // 0
};
static_assert(offsetof(ring_config, check) == 48 && sizeof(ring_config) == 64,
              "a version 2 ring has its check word at 48 and zeros after it");

// The futex word of one direction. Bit 0 set: a sleeper announced that it waits on this
// value. A waker that finds the bit clears it by adding 1 (which also changes the value)
// and issues one futex_wake: one syscall per sleep, not per message.
struct event_count {
  std::atomic<std::uint32_t> seq;
  std::uint32_t reserved;
};
inline constexpr std::uint32_t sleeper_bit = 1;

// ring_header::fence_required. Off: publishers issue no fence; each sleeper orders their
// publications with membarrier(). Requested: every publisher fences its publication from
// now on (set by a process that cannot issue membarrier, or by a side that sleeps so often
// that a syscall per sleep costs more than a fence per message); a publication already
// under way may still be unfenced. In force: requested, and a membarrier() has run since,
// so no unfenced publication is left and sleepers need no barrier of their own. Only ever
// moves up: a ring that once slept often stays in fence mode.
enum fence_mode : std::uint32_t { fence_off = 0, fence_requested = 1, fence_in_force = 2 };

// An attached process, packed into one word so that it is claimed, read and released
// atomically: pid (24 bits; pid_max is at most 2^22), role (2 bits), start time (38 bits of
// clock ticks since boot, 87 years at 100 Hz). 0: free.
using participant_word = std::atomic<std::uint64_t>;
inline constexpr std::uint32_t role_sender = 1;
inline constexpr std::uint32_t role_receiver = 2;

struct ring_header {
  ring_config config;
  alignas(64) std::atomic<std::uint32_t> sender_closed;  // SPSC: end of stream; MPMC: ring closed
  std::atomic<std::uint32_t> receiver_closed;            // sends fail with EPIPE (MPMC: no receiver is left)
  std::atomic<std::uint32_t> fence_required;             // sticky fence_mode: publishers fence per message
  std::atomic<std::uint64_t> end_check;  // feature_xxh3: end_mark(tail) of the close, before sender_closed
  alignas(64) std::atomic<std::int32_t> cpu[2];  // CPU a sender [0] / receiver [1] last ran on, + 1
  alignas(64) std::atomic<std::uint64_t> tail;   // SPSC: bytes written; MPMC: next send position
  alignas(64)
      std::atomic<std::uint64_t> head;  // SPSC: bytes released (acknowledged); MPMC: next receive position
  alignas(64) event_count data;         // receivers sleep here
  alignas(64) event_count space;        // senders sleep here
  alignas(64) participant_word participants[participant_count];  // SPSC: [0] sender, [1] receiver
};
static_assert(sizeof(ring_header) <= ring_header_size);
static_assert(offsetof(ring_header, fence_required) == 72,
              "tests/shm_ring_test.cpp reads the fence mode here");
static_assert(offsetof(ring_header, end_check) == 80 && offsetof(ring_header, cpu) == 128,
              "end_check uses padding that version 2 rings keep zero");
static_assert(offsetof(ring_header, tail) == 192 && offsetof(ring_header, head) == 256 &&
                  offsetof(ring_header, data) == 320 && offsetof(ring_header, space) == 384,
              "tests/ring_corruption_test.cpp writes the MPMC positions, and watches the sleepers, here");
static_assert(std::atomic<std::uint64_t>::is_always_lock_free &&
                  std::atomic<std::uint32_t>::is_always_lock_free,
              "the ring's words must be address-free lock-free atomics to live in shared memory");

// SPSC: every record starts 8-aligned with this header.
struct record_header {
  std::uint32_t length;
  std::uint32_t type;
};
// SPSC with feature_xxh3: the record header is followed by the record's check,
// record_check(position, length, type, payload), before the payload.
struct record_check_header {
  std::uint32_t length;
  std::uint32_t type;
  std::uint64_t check;
};
static_assert(sizeof(record_check_header) == 16);
inline constexpr std::uint32_t record_data = 0x44;
inline constexpr std::uint32_t record_padding = 0x50;

// MPMC: a slot is this header followed by the payload. The word holds the slot's sequence
// (low 32 bits), the pid of a process that has claimed it (bits 32-62), and a flag marking a
// message abandoned by a sender that died while writing it (bit 63).
struct slot_header {
  std::atomic<std::uint64_t> word;
  std::atomic<std::uint32_t> size;
  std::uint32_t reserved;
};
static_assert(sizeof(slot_header) == slot_header_size);
inline constexpr std::uint64_t abandoned_bit = std::uint64_t{1} << 63;

constexpr std::uint64_t make_slot_word(std::uint32_t seq, std::uint32_t owner,
                                       bool abandoned = false) noexcept {
  return std::uint64_t{seq} | (std::uint64_t{owner & 0x7fffffffu} << 32) | (abandoned ? abandoned_bit : 0);
}
constexpr std::uint32_t slot_seq(std::uint64_t w) noexcept { return static_cast<std::uint32_t>(w); }
constexpr std::uint32_t slot_owner(std::uint64_t w) noexcept {
  return static_cast<std::uint32_t>(w >> 32) & 0x7fffffffu;
}
constexpr bool slot_abandoned(std::uint64_t w) noexcept { return (w & abandoned_bit) != 0; }

constexpr std::uint64_t align8(std::uint64_t n) noexcept { return (n + 7) & ~std::uint64_t{7}; }
constexpr std::size_t mpmc_stride(std::size_t max_message) noexcept {
  return (slot_header_size + align8(max_message) + 63) & ~std::size_t{63};
}

inline std::uint64_t config_check(const ring_config& c) noexcept {
  const std::uint64_t h = fnv1a(std::as_bytes(std::span{&c, 1}).first(offsetof(ring_config, check)));
  if (c.version < ring_version_features) return h;
  return fnv1a(std::as_bytes(std::span{&c.features, 1}), h);
}

// The start time a participant word keeps (see participant_word).
inline constexpr std::uint64_t start_mask = (std::uint64_t{1} << 38) - 1;

constexpr std::uint64_t pack_participant(pid_t pid, std::uint32_t role, std::uint64_t start) noexcept {
  return (static_cast<std::uint64_t>(pid) & 0xffffffu) | (std::uint64_t{role & 3u} << 24) |
         ((start & start_mask) << 26);
}
constexpr pid_t participant_pid(std::uint64_t v) noexcept { return static_cast<pid_t>(v & 0xffffffu); }
constexpr std::uint32_t participant_role(std::uint64_t v) noexcept {
  return static_cast<std::uint32_t>(v >> 24) & 3u;
}
constexpr std::uint64_t participant_start(std::uint64_t v) noexcept { return v >> 26; }

}  // namespace ipcoro::detail
