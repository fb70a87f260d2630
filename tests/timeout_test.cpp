// SPDX-License-Identifier: MIT
// with_timeout and with_deadline, one meaning for every kind of awaitable: an io_uring
// operation, a futex wait, a process_mutex lock, an in-process wait (event, semaphore,
// mutex), an mq_demux receive, and a task (every channel operation). Each kind times out
// with timed_out having done nothing, completes when it can in time, and completes on its
// fast path even with a timeout of zero.
#include "ipcoro/channel.hpp"
#include "ipcoro/error.hpp"
#include "ipcoro/event.hpp"
#include "ipcoro/fd_io.hpp"
#include "ipcoro/futex.hpp"
#include "ipcoro/io_context.hpp"
#include "ipcoro/mqueue.hpp"
#include "ipcoro/mutex.hpp"
#include "ipcoro/pipe.hpp"
#include "ipcoro/process_mutex.hpp"
#include "ipcoro/semaphore.hpp"
#include "ipcoro/sync_wait.hpp"
#include "ipcoro/task.hpp"
#include "ipcoro/timer.hpp"
#include "ipcoro/when_all.hpp"

#include "process.hpp"

#include <catch2/catch.hpp>

#include <sys/mman.h>
#include <unistd.h>

#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>

namespace {

using namespace std::chrono_literals;
using ipcoro::task;
using clock_type = std::chrono::steady_clock;

/// The two ways of bounding a wait, both 30 ms from now.
enum class bound { timeout, deadline };

template <class Op>
decltype(auto) bounded(Op&& op, bound how) {
  if (how == bound::timeout) return std::forward<Op>(op).with_timeout(30ms);
  return std::forward<Op>(op).with_deadline(clock_type::now() + 30ms);
}

/// Runs `body`, which must throw timed_out, and checks that it took about the bound: at
/// least the 30 ms, and not the minute a wrong bound would wait.
template <class Body>
void expect_timed_out(ipcoro::io_context& ctx, Body body) {
  const auto start = clock_type::now();
  CHECK_THROWS_AS(ipcoro::sync_wait(ctx, body()), ipcoro::timed_out);
  const auto took = clock_type::now() - start;
  CHECK(took >= 29ms);
  CHECK(took < 20s);
}

std::span<const std::byte> bytes_of(const std::uint32_t& v) { return std::as_bytes(std::span{&v, 1}); }

}  // namespace

TEST_CASE("an io_uring operation: a read times out taking nothing, and reads in time", "[timeout]") {
  const bound how = GENERATE(bound::timeout, bound::deadline);
  ipcoro::io_context ctx;
  auto [reader, writer] = ipcoro::make_pipe();
  std::array<std::byte, 4> buf{};
  expect_timed_out(ctx, [&]() -> task<void> {
    ipcoro::read_operation op = reader.read(buf);
    (void)co_await bounded(op, how);
  });
  const std::uint32_t v = 42;
  REQUIRE(::write(writer.native_handle(), &v, sizeof v) == sizeof v);
  // The data written after the timeout is all there: the timed-out read took none of it.
  const std::size_t n = ipcoro::sync_wait(ctx, [&]() -> task<std::size_t> {
    ipcoro::read_operation op = reader.read(buf);
    co_return co_await bounded(op, how);
  }());
  CHECK(n == 4);
  std::uint32_t got = 0;
  std::memcpy(&got, buf.data(), 4);
  CHECK(got == 42);
}

TEST_CASE("a futex wait times out, and one woken in time is not", "[timeout]") {
  const bound how = GENERATE(bound::timeout, bound::deadline);
  ipcoro::io_context ctx;
  void* mem = ::mmap(nullptr, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  REQUIRE(mem != MAP_FAILED);
  struct unmapper {
    void* p;
    ~unmapper() { ::munmap(p, 4096); }
  } unmap{mem};
  auto& word = *new (mem) std::atomic<std::uint32_t>(0);
  expect_timed_out(ctx, [&]() -> task<void> {
    ipcoro::futex_wait_operation op = ipcoro::futex_wait(word, 0, 1min);
    (void)co_await bounded(op, how);
  });
  // A child changes the word and wakes: the bounded wait sees it, well before its bound.
  ipcoro::test::child_process child([&] {
    word.store(1);
    ipcoro::futex_wake(word, 1);
    return 0;
  });
  const auto result = ipcoro::sync_wait(ctx, [&]() -> task<ipcoro::futex_wait_result> {
    ipcoro::futex_wait_operation op = ipcoro::futex_wait(word, 0, 1min);
    co_return co_await op.with_timeout(20s);
  }());
  CHECK((result == ipcoro::futex_wait_result::woken || result == ipcoro::futex_wait_result::value_changed));
  CHECK(child.wait(30s) == 0);
}

TEST_CASE("a process_mutex lock held by another process times out without the lock", "[timeout]") {
  const bound how = GENERATE(bound::timeout, bound::deadline);
  ipcoro::io_context ctx;
  const std::string name = ipcoro::test::unique_name("timeout-mutex");
  auto obj = ipcoro::shared_object<std::uint64_t>::create(name);
  obj.segment().unlink();
  ipcoro::test::handshake held;
  ipcoro::test::handshake release;
  ipcoro::test::child_process holder([&] {
    ipcoro::io_context child_ctx;
    ipcoro::sync_wait(child_ctx, [&]() -> task<void> {
      auto v = co_await obj.lock();
      held.signal();
      (void)release.wait();
    }());
    return 0;
  });
  REQUIRE(held.wait());
  expect_timed_out(ctx, [&]() -> task<void> {
    auto op = obj.lock();
    auto v = co_await bounded(op, how);
  });
  CHECK(obj.mutex().holder_pid() == holder.pid());
  // Uncontended, the lock takes its fast path: a zero timeout reads no clock and succeeds.
  release.signal();
  REQUIRE(holder.wait(30s) == 0);
  ipcoro::sync_wait(ctx, [&]() -> task<void> {
    auto op = obj.lock();
    auto v = co_await op.with_timeout(0ns);
    ++*v;
  }());
  CHECK(obj.unsafe_value() == 1);
}

TEST_CASE("in-process waits time out holding nothing, and take what comes in time", "[timeout]") {
  const bound how = GENERATE(bound::timeout, bound::deadline);
  ipcoro::io_context ctx;
  SECTION("event") {
    ipcoro::event ev;
    expect_timed_out(ctx, [&]() -> task<void> {
      auto op = ev.wait();
      co_await bounded(op, how);
    });
    ev.set();
    ipcoro::sync_wait(ctx, [&]() -> task<void> {
      auto op = ev.wait();
      co_await op.with_timeout(0ns);  // set: the fast path, no wait
    }());
  }
  SECTION("semaphore") {
    ipcoro::semaphore sem(0);
    expect_timed_out(ctx, [&]() -> task<void> {
      auto op = sem.acquire();
      co_await bounded(op, how);
    });
    // The timed-out acquire holds no permit: the one released goes to the next.
    sem.release();
    CHECK(sem.available() == 1);
    ipcoro::sync_wait(ctx, [&]() -> task<void> {
      auto op = sem.acquire();
      co_await op.with_timeout(0ns);
    }());
    CHECK(sem.available() == 0);
    // Released while a bounded acquire waits: it gets the permit, not timed_out.
    ipcoro::sync_wait(ctx, [&]() -> task<void> {
      auto waiter = [&]() -> task<void> {
        auto op = sem.acquire();
        co_await bounded(op, how);
      };
      auto releaser = [&]() -> task<void> {
        co_await ipcoro::sleep_for(1ms);
        sem.release();
      };
      co_await ipcoro::when_all(waiter(), releaser());
    }());
    CHECK(sem.available() == 0);
  }
  SECTION("mutex") {
    ipcoro::mutex m;
    ipcoro::sync_wait(ctx, [&]() -> task<void> {
      auto held = co_await m.lock();
      auto op = m.lock();
      CHECK_THROWS_AS(co_await bounded(op, how), ipcoro::timed_out);
      CHECK(m.locked());
    }());
    CHECK_FALSE(m.locked());  // the timed-out lock did not keep it
  }
}

TEST_CASE("an mq_demux receive times out taking no message", "[timeout]") {
  const bound how = GENERATE(bound::timeout, bound::deadline);
  ipcoro::io_context ctx;
  const std::string name = std::string("/").append(ipcoro::test::unique_name("timeout-demux"));
  auto q = ipcoro::message_queue::create(name, {8, 32});
  struct unlinker {
    std::string n;
    ~unlinker() { ipcoro::message_queue::unlink(n); }
  } guard{name};
  ipcoro::mq_demux demux(q, 2, 8);
  std::optional<std::uint32_t> got;
  ipcoro::sync_wait(ctx, [&]() -> task<void> {
    auto consumer = [&]() -> task<void> {
      std::array<std::byte, 28> buf{};
      auto op = demux.receive(1, buf);
      CHECK_THROWS_AS(co_await bounded(op, how), ipcoro::timed_out);
      // Sent after the timeout: the next receive has it, whole.
      const std::uint32_t v = 9;
      co_await q.send_labelled(1, bytes_of(v));
      auto again = demux.receive(1, buf);
      if (auto m = co_await again.with_timeout(20s)) {
        std::uint32_t x = 0;
        std::memcpy(&x, buf.data(), 4);
        got = x;
      }
      demux.close();
    };
    co_await ipcoro::when_all(demux.run(), consumer());
  }());
  CHECK(got == 9u);
}

TEST_CASE("a task, so every channel operation, times out leaving the message", "[timeout]") {
  const bound how = GENERATE(bound::timeout, bound::deadline);
  ipcoro::io_context ctx;
  auto [tx, rx] = ipcoro::make_channel<int>(4);
  expect_timed_out(ctx, [&]() -> task<void> { (void)co_await bounded(rx.receive(), how); });
  std::optional<int> got = ipcoro::sync_wait(ctx, [&]() -> task<std::optional<int>> {
    co_await tx.send(5);
    co_return co_await bounded(rx.receive(), how);
  }());
  CHECK(got == 5);
}
