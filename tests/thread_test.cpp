// SPDX-License-Identifier: MIT
// A stop request made on another thread reaches operations and waits on the loop's thread.
#include <ipcoro/ipcoro.hpp>

#include <catch2/catch.hpp>

#include <array>
#include <atomic>
#include <chrono>
#include <latch>
#include <thread>

using namespace std::chrono_literals;
using ipcoro::task;

namespace {

/// A thread that requests stop on `source` once the loop says its waits have started.
struct remote_stopper {
  std::stop_source source;
  std::latch started{1};
  std::thread thread{[this] {
    started.wait();
    source.request_stop();
  }};
  ~remote_stopper() {
    if (!started.try_wait()) started.count_down();  // a failed test must not hang here
    thread.join();
  }
};

task<void> announce(std::latch& started) {
  started.count_down();
  co_return;
}

}  // namespace

TEST_CASE("a stop requested on another thread cancels a pipe read in flight", "[thread][cancel]") {
  ipcoro::io_context ctx;
  auto [r, w] = ipcoro::make_pipe();
  remote_stopper stopper;

  auto reader = [&]() -> task<bool> {
    std::array<std::byte, 16> buf{};
    try {
      // The timeout only bounds the test: a lost stop request shows up as timed_out.
      co_await r.read(buf).with_timeout(20s);
    } catch (const ipcoro::operation_cancelled&) {
      co_return true;
    }
    co_return false;
  };
  auto body = [&]() -> task<bool> {
    auto [cancelled, unit] = co_await ipcoro::when_all(reader().with_stop_token(stopper.source.get_token()),
                                                       announce(stopper.started));
    (void)unit;
    co_return cancelled;
  };
  const bool cancelled = ipcoro::sync_wait(ctx, body());
  CHECK(cancelled);

  // The pipe is intact: the cancelled read consumed nothing.
  auto roundtrip = [&]() -> task<std::size_t> {
    const std::array<std::byte, 3> out{std::byte{1}, std::byte{2}, std::byte{3}};
    co_await w.write_all(out);
    std::array<std::byte, 3> in{};
    co_return co_await r.read_exact(in);
  };
  CHECK(ipcoro::sync_wait(ctx, roundtrip()) == 3);
}

TEST_CASE("a stop requested on another thread cancels an event wait", "[thread][event]") {
  ipcoro::io_context ctx;
  ipcoro::event never_set;
  remote_stopper stopper;
  auto waiter = [&]() -> task<bool> {
    try {
      co_await never_set.wait();
    } catch (const ipcoro::operation_cancelled&) {
      co_return true;
    }
    co_return false;
  };
  // A long timer keeps the loop waiting in the kernel, where only the eventfd can wake it;
  // it is cancelled once the waiter has been.
  auto body = [&]() -> task<bool> {
    auto result =
        co_await ipcoro::when_any(waiter().with_stop_token(stopper.source.get_token()), [&]() -> task<void> {
          stopper.started.count_down();
          co_await ipcoro::sleep_for(20s);
        }());
    co_return result.index() == 0 && std::get<0>(result);
  };
  const bool cancelled = ipcoro::sync_wait(ctx, body());
  CHECK(cancelled);
}

TEST_CASE("many cross-thread stop requests racing with completions leave the loop consistent",
          "[thread][stress]") {
  ipcoro::io_context ctx;
  constexpr int rounds = 200;
  int cancelled = 0;
  int completed = 0;
  for (int i = 0; i < rounds; ++i) {
    auto [r, w] = ipcoro::make_pipe();
    remote_stopper stopper;
    auto reader = [&]() -> task<void> {
      std::array<std::byte, 1> buf{};
      try {
        co_await r.read(buf).with_timeout(20s);
        ++completed;
      } catch (const ipcoro::operation_cancelled&) {
        ++cancelled;
      }
    };
    auto writer = [&]() -> task<void> {
      stopper.started.count_down();
      // Races the stop request: either outcome is fine, but exactly one must happen.
      const std::array<std::byte, 1> one{std::byte{7}};
      co_await w.write_all(one);
    };
    ipcoro::sync_wait(ctx, ipcoro::when_all(reader().with_stop_token(stopper.source.get_token()), writer()));
  }
  CHECK(cancelled + completed == rounds);
}
