// SPDX-License-Identifier: MIT
// The wire protocol of examples/fifo_echo_server and fifo_echo_client: one header, shared
// by both programs so that they cannot drift apart.
#pragma once

#include <ipcoro/fifo.hpp>

#include <array>
#include <cstddef>
#include <cstdint>
#include <span>

namespace fifo_echo {

constexpr std::uint32_t protocol_magic = 0x45435049;  // "IPCE"
enum message_type : std::uint16_t { hello = 1, welcome = 2, echo = 3, bye = 4 };

struct message_header {
  std::uint32_t magic;
  std::uint16_t type;
  std::uint16_t length;  ///< payload bytes after the header
  std::uint32_t client;  ///< the client's pid
  std::uint32_t seq;
};
static_assert(sizeof(message_header) == 16);
constexpr std::size_t max_payload = ipcoro::fifo_message_max - sizeof(message_header);

/// One message, header and payload contiguous, as written in one piece.
struct message {
  message_header header;
  std::array<std::byte, max_payload> payload;
  std::span<const std::byte> bytes() const noexcept {
    return std::as_bytes(std::span(this, 1)).first(sizeof header + header.length);
  }
};

}  // namespace fifo_echo
