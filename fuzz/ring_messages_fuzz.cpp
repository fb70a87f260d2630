// SPDX-License-Identifier: MIT
// Fuzzes the message decoder behind shm: and file: channels: a raw ring sender puts the
// input's messages into the ring of a channel receiver, which must deliver, end or refuse
// them with channel_error or decode_error.
//
// Input: one byte choosing the ring (bit 0: MPMC), then messages, each a 16-bit
// little-endian length followed by that many bytes (cut short at the end of the input).
#include "fuzz_support.hpp"

#include "ipcoro/channel.hpp"
#include "ipcoro/error.hpp"
#include "ipcoro/shm_ring.hpp"
#include "ipcoro/shm_segment.hpp"

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>

namespace {

using namespace std::chrono_literals;

struct input {
  std::span<const std::byte> rest;

  std::optional<std::span<const std::byte>> next_message() {
    if (rest.size() < 2) return std::nullopt;
    std::size_t n = std::to_integer<std::size_t>(rest[0]) | std::to_integer<std::size_t>(rest[1]) << 8;
    rest = rest.subspan(2);
    if (n > rest.size()) n = rest.size();
    const std::span<const std::byte> m = rest.first(n);
    rest = rest.subspan(n);
    return m;
  }
};

/// Puts the messages into the ring until the input ends or the ring is full (nobody
/// receives yet), then closes the sending side.
template <class Sender>
ipcoro::task<void> send_all(Sender& tx, input in) {
  while (std::optional<std::span<const std::byte>> m = in.next_message()) {
    if (m->size() > tx.max_message_size()) continue;
    try {
      co_await tx.send(*m).with_timeout(0ns);
    } catch (const ipcoro::timed_out&) {
      break;
    }
  }
  tx.close();
}

ipcoro::task<void> drain(ipcoro::channel_receiver<std::string>& rx) {
  for (;;) {
    std::optional<std::string> v = co_await rx.receive();
    if (!v) break;
  }
}

template <class Sender>
ipcoro::task<void> round(std::string address, std::string segment, std::uint32_t tag, input in) {
  ipcoro::channel_receiver<std::string> rx = co_await ipcoro::open_receiver<std::string>(std::move(address));
  ipcoro::shm_segment seg =
      ipcoro::shm_segment::open(segment, ipcoro::region_layout{tag, ipcoro::ring_layout_version, 0});
  ipcoro::ring_options o;
  o.spin = 0ns;
  Sender tx(seg.payload(), o);
  co_await send_all(tx, in);
  co_await drain(rx);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size < 1) return -1;
  const bool mpmc = (data[0] & 1) != 0;
  const input in{std::as_bytes(std::span{data + 1, size - 1})};
  const std::string segment = "/" + ipcoro::fuzz::unique_name("ring");
  try {
    if (mpmc) {
      ipcoro::fuzz::run(
          round<ipcoro::mpmc_ring_sender>("shm:" + segment + "?ring=mpmc&capacity=64&message_size=1k",
                                          segment, ipcoro::mpmc_ring_type_tag, in));
    } else {
      ipcoro::fuzz::run(round<ipcoro::spsc_ring_sender>("shm:" + segment + "?capacity=64k", segment,
                                                        ipcoro::spsc_ring_type_tag, in));
    }
  } catch (const ipcoro::channel_error&) {
  } catch (const ipcoro::decode_error&) {
  }
  return 0;
}
