// SPDX-License-Identifier: MIT
// Ring operations take with_timeout / with_deadline from the one implementation every awaitable uses.
#include "ipcoro/error.hpp"
#include "ipcoro/io_context.hpp"
#include "ipcoro/shm_ring.hpp"
#include "ipcoro/sync_wait.hpp"
#include "ipcoro/task.hpp"
#include "ipcoro/timer.hpp"
#include "ipcoro/when_all.hpp"

#include "shared_memory.hpp"

#include <sys/mman.h>

#include <catch2/catch.hpp>

#include <array>
#include <cerrno>
#include <chrono>
#include <cstddef>
#include <optional>
#include <span>
#include <system_error>

namespace {

using namespace std::chrono_literals;
using ipcoro::task;

using ipcoro::test::shared_memory;

}  // namespace

TEST_CASE("a ring receive with the longest timeout waits for its message instead of timing out",
          "[shm_ring][timeout]") {
  // The timeout saturates instead of overflowing when it is turned into nanoseconds.
  shared_memory mem(ipcoro::spsc_ring_region_size(4096));
  ipcoro::format_spsc_ring(mem.bytes());
  ipcoro::ring_options opts;
  opts.spin = 0ns;  // straight to sleep
  ipcoro::spsc_ring_sender tx(mem.bytes(), opts);
  ipcoro::spsc_ring_receiver rx(mem.bytes(), opts);
  ipcoro::io_context ctx;
  std::array<std::byte, 16> buf{};
  auto receive = [&]() -> task<std::optional<std::size_t>> {
    co_return co_await rx.receive(buf).with_timeout(std::chrono::hours::max());
  };
  auto send_later = [&]() -> task<void> {
    co_await ipcoro::sleep_for(20ms);  // lets the receive go to sleep first
    const std::array<std::byte, 3> msg{std::byte{1}, std::byte{2}, std::byte{3}};
    co_await tx.send(msg).with_deadline(std::chrono::steady_clock::time_point::max());
  };
  const auto [got, sent] = ipcoro::sync_wait(ctx, ipcoro::when_all(receive(), send_later()));
  CHECK(got == 3u);
}

TEST_CASE("a ring send bounded by a timeout and a deadline gives up at the earlier, sending nothing",
          "[shm_ring][timeout]") {
  shared_memory mem(ipcoro::mpmc_ring_region_size(2, 8));
  ipcoro::format_mpmc_ring(mem.bytes(), 8);
  ipcoro::mpmc_ring_sender tx(mem.bytes());
  ipcoro::mpmc_ring_receiver rx(mem.bytes());
  ipcoro::io_context ctx;
  ipcoro::sync_wait(ctx, [&]() -> task<void> {
    const std::array<std::byte, 8> msg{};
    for (std::size_t i = 0; i < tx.capacity(); ++i) co_await tx.send(msg);
    const auto t0 = std::chrono::steady_clock::now();
    bool threw = false;
    try {
      auto op = tx.send(msg);
      (void)op.with_timeout(1h);
      co_await op.with_deadline(t0 + 30ms);
    } catch (const ipcoro::timed_out&) {
      threw = true;
    }
    CHECK(threw);
    CHECK(std::chrono::steady_clock::now() - t0 >= 30ms);
    std::array<std::byte, 8> in{};
    std::size_t drained = 0;
    for (std::size_t i = 0; i < tx.capacity(); ++i) {
      const auto n = co_await rx.receive(in);
      drained += n == 8u;
    }
    CHECK(drained == tx.capacity());
    tx.close();
    const auto after = co_await rx.receive(in);
    CHECK_FALSE(after);  // the timed-out send left nothing behind
  }());
}
