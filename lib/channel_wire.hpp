// SPDX-License-Identifier: MIT
// channel_wire: the channel layer's frames and greeting, and the helpers every adapter shares.
#pragma once

#include "ipcoro/channel_address.hpp"
#include "ipcoro/shm_ring.hpp"

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <system_error>

namespace ipcoro::detail {

/// The smallest message_size a queue or MPMC ring channel can work with: a message's frame
/// head and a greeting (checked against the wire structs below).
constexpr std::size_t min_message_size = 32;

constexpr std::uint32_t greeting_magic = 0x48435049;  // "IPCH"
constexpr std::uint16_t wire_protocol = 1;

struct greeting_head {
  std::uint32_t magic;
  std::uint16_t protocol;
  std::uint16_t name_size;
  std::uint32_t version;
  std::uint32_t reserved;
  std::uint64_t fingerprint;
};
static_assert(sizeof(greeting_head) == 24);

/// A frame on a byte stream: {payload length, kind} then the payload.
struct stream_head {
  std::uint32_t length;
  std::uint32_t kind;
};
/// A frame on a message transport (queue, ring): {kind, short fingerprint} then the payload.
struct message_head {
  std::uint32_t kind;
  std::uint32_t fingerprint;
};
static_assert(sizeof(stream_head) == 8 && sizeof(message_head) == 8);
static_assert(min_message_size == sizeof(message_head) + sizeof(greeting_head));
constexpr std::size_t head_size = 8;
constexpr std::size_t max_stream_payload = std::size_t{1} << 30;

inline std::uint32_t short_fingerprint(std::uint64_t f) noexcept {
  return static_cast<std::uint32_t>(f ^ (f >> 32));
}

/// Storage that grows without zero-filling and keeps its contents.
class byte_buffer {
 public:
  std::byte* data() noexcept { return data_.get(); }
  std::size_t size() const noexcept { return size_; }
  void grow(std::size_t need, std::size_t keep) {
    if (need <= size_) return;
    std::size_t n = std::max<std::size_t>(need, size_ * 2);
    auto fresh = std::make_unique_for_overwrite<std::byte[]>(n);
    if (keep > 0) std::memcpy(fresh.get(), data_.get(), keep);
    data_ = std::move(fresh);
    size_ = n;
  }

 private:
  std::unique_ptr<std::byte[]> data_;
  std::size_t size_ = 0;
};

template <class Head>
Head read_head(const std::byte* p) noexcept {
  Head h;
  std::memcpy(&h, p, sizeof h);
  return h;
}

/// `e` again, its message prefixed with the channel's address (and without the errno
/// text that system_error appends, which the new one appends again).
[[noreturn]] void rethrow_for(const channel_address& a, const std::system_error& e);
bool has_errno(const std::system_error& e, int err) noexcept;
/// channel_error "no channel at ...: nobody has opened its receiver", for a sender.
[[noreturn]] void no_channel(const channel_address& a, const std::system_error& e);
/// A transport's peer_died, rethrown with the channel's address in front.
[[noreturn]] void throw_peer_died(const std::string& address, const peer_died& e);

}  // namespace ipcoro::detail
