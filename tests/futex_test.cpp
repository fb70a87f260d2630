// SPDX-License-Identifier: MIT
// Futex waits and wakes through the loop: every outcome, cancellation, and wakes across processes.
#include <ipcoro/ipcoro.hpp>

#include "process.hpp"

#include <catch2/catch.hpp>

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <latch>
#include <new>
#include <stdexcept>
#include <thread>
#include <vector>

#include "counting_new.hpp"
#include "skip.hpp"

namespace {

using namespace std::chrono_literals;
using ipcoro::futex_wait_result;
using ipcoro::task;
using ipcoro::test::child_process;
using clock_type = std::chrono::steady_clock;

/// Anonymous MAP_SHARED memory holding `n` futex words, inherited by forked children.
class shared_words {
 public:
  explicit shared_words(std::size_t n) : size_(n * sizeof(std::atomic<std::uint32_t>)) {
    void* p = ::mmap(nullptr, size_, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) throw std::runtime_error("mmap of the shared words failed");
    words_ = static_cast<std::atomic<std::uint32_t>*>(p);
    for (std::size_t i = 0; i < n; ++i) new (&words_[i]) std::atomic<std::uint32_t>(0);
  }
  ~shared_words() { ::munmap(words_, size_); }
  shared_words(const shared_words&) = delete;
  shared_words& operator=(const shared_words&) = delete;

  std::atomic<std::uint32_t>& operator[](std::size_t i) noexcept { return words_[i]; }

 private:
  std::size_t size_;
  std::atomic<std::uint32_t>* words_ = nullptr;
};

/// Whether this run should be on the fallback path (the fallback test re-runs this file
/// with IPCORO_FUTEX_FALLBACK=1).
bool fallback_requested() {
  const char* v = std::getenv("IPCORO_FUTEX_FALLBACK");
  return v != nullptr && *v != '\0' && std::strcmp(v, "0") != 0;
}

/// Wakes `word` until a waiter has been reached, yielding to the loop in between so the
/// wait can be queued; returns the number of attempts, or 0 if nobody ever waited.
task<int> wake_until_woken(std::atomic<std::uint32_t>& word, std::chrono::milliseconds limit) {
  const auto give_up = clock_type::now() + limit;
  for (int attempt = 1; clock_type::now() < give_up; ++attempt) {
    if (ipcoro::futex_wake(word, 1) == 1) co_return attempt;
    co_await ipcoro::nop();
  }
  co_return 0;
}

/// Wakes `word` from outside any loop until a waiter has been reached (or `limit` passes).
bool wake_until_woken_blocking(std::atomic<std::uint32_t>& word, std::chrono::milliseconds limit) {
  const auto give_up = clock_type::now() + limit;
  while (clock_type::now() < give_up) {
    if (ipcoro::futex_wake(word, 1) == 1) return true;
    std::this_thread::yield();
  }
  return false;
}

/// A detached waiter: a plain function, since a lambda's captures would die with the
/// temporary closure while the detached coroutine still runs.
task<void> wait_detached(std::atomic<std::uint32_t>& word, bool& cancelled, bool& finished) {
  try {
    (void)co_await ipcoro::futex_wait(word, 0, 30s);
  } catch (const ipcoro::operation_cancelled&) {
    cancelled = true;
  }
  finished = true;
}

task<void> wait_into(std::atomic<std::uint32_t>& word, std::chrono::milliseconds timeout,
                     futex_wait_result& result) {
  result = co_await ipcoro::futex_wait(word, 0, timeout);
}

}  // namespace

// ---- the cases below run on whichever path is selected ([paths]), ring or fallback ----

TEST_CASE("futex waits take the path the environment selects", "[futex][paths]") {
  ipcoro::io_context ctx;
  INFO("IPCORO_FUTEX_FALLBACK is " << (fallback_requested() ? "set" : "unset") << "; kernel "
                                   << ctx.features().kernel_major << "." << ctx.features().kernel_minor);
  if (fallback_requested()) {
    CHECK_FALSE(ipcoro::futex_waits_use_ring());
  } else {
    CHECK(ipcoro::futex_waits_use_ring() == ctx.features().futex);
  }
}

TEST_CASE("a wait on a word that no longer holds the expected value returns value_changed",
          "[futex][paths]") {
  ipcoro::io_context ctx;
  std::atomic<std::uint32_t> word{7};
  const auto t0 = clock_type::now();
  const auto r = ipcoro::sync_wait(ctx, [&]() -> task<futex_wait_result> {
    co_return co_await ipcoro::futex_wait(word, 6, 10s, ipcoro::futex_scope::process_private);
  }());
  CHECK(r == futex_wait_result::value_changed);
  CHECK(clock_type::now() - t0 < 5s);
}

TEST_CASE("a wait nobody wakes returns timed_out once its timeout has passed", "[futex][paths]") {
  ipcoro::io_context ctx;
  shared_words words(1);
  const auto t0 = clock_type::now();
  const auto r = ipcoro::sync_wait(
      ctx, [&]() -> task<futex_wait_result> { co_return co_await ipcoro::futex_wait(words[0], 0, 30ms); }());
  const auto elapsed = clock_type::now() - t0;
  CHECK(r == futex_wait_result::timed_out);
  CHECK(elapsed >= 30ms);
  CHECK(elapsed < 5s);
}

TEST_CASE("futex_wake returns 0 when nobody waits on the word", "[futex][paths]") {
  shared_words words(1);
  CHECK(ipcoro::futex_wake(words[0], 1) == 0);
  std::atomic<std::uint32_t> local{0};
  CHECK(ipcoro::futex_wake(local, 10, ipcoro::futex_scope::process_private) == 0);
}

TEST_CASE("a wake from another coroutine ends a wait with woken, the word unchanged", "[futex][paths]") {
  ipcoro::io_context ctx;
  shared_words words(1);
  const auto [r, attempts] = ipcoro::sync_wait(ctx, [&]() -> task<std::tuple<futex_wait_result, int>> {
    auto waiter = [&]() -> task<futex_wait_result> {
      co_return co_await ipcoro::futex_wait(words[0], 0, 20s);
    };
    co_return co_await ipcoro::when_all(waiter(), wake_until_woken(words[0], 10s));
  }());
  CHECK(attempts > 0);
  CHECK(r == futex_wait_result::woken);
  // Nothing is left waiting on the word.
  CHECK(ipcoro::futex_wake(words[0], 1) == 0);
}

TEST_CASE("a process-private wait is woken by a process-private wake", "[futex][paths]") {
  ipcoro::io_context ctx;
  std::atomic<std::uint32_t> word{0};
  const auto [r, woken] = ipcoro::sync_wait(ctx, [&]() -> task<std::tuple<futex_wait_result, bool>> {
    auto waiter = [&]() -> task<futex_wait_result> {
      co_return co_await ipcoro::futex_wait(word, 0, 20s, ipcoro::futex_scope::process_private);
    };
    auto waker = [&]() -> task<bool> {
      const auto give_up = clock_type::now() + 10s;
      while (clock_type::now() < give_up) {
        if (ipcoro::futex_wake(word, 1, ipcoro::futex_scope::process_private) == 1) co_return true;
        co_await ipcoro::nop();
      }
      co_return false;
    };
    co_return co_await ipcoro::when_all(waiter(), waker());
  }());
  CHECK(woken);
  CHECK(r == futex_wait_result::woken);
}

TEST_CASE("a stop request cancels a futex wait with operation_cancelled", "[futex][paths]") {
  ipcoro::io_context ctx;
  std::atomic<std::uint32_t> word{0};
  std::stop_source source;
  const auto t0 = clock_type::now();
  bool cancelled = false;
  ipcoro::sync_wait(ctx, [&]() -> task<void> {
    auto waiter = [&]() -> task<void> {
      try {
        (void)co_await ipcoro::futex_wait(word, 0, 30s, ipcoro::futex_scope::process_private);
      } catch (const ipcoro::operation_cancelled&) {
        cancelled = true;
      }
    };
    auto stopper = [&]() -> task<void> {
      co_await ipcoro::nop();
      source.request_stop();
    };
    co_await ipcoro::when_all(waiter().with_stop_token(source.get_token()), stopper());
  }());
  CHECK(cancelled);
  CHECK(clock_type::now() - t0 < 10s);
  // The cancelled wait left nothing queued on the word.
  CHECK(ipcoro::futex_wake(word, 1, ipcoro::futex_scope::process_private) == 0);
}

TEST_CASE("a futex wait whose task is already stopped throws at once", "[futex][paths]") {
  ipcoro::io_context ctx;
  std::atomic<std::uint32_t> word{0};
  std::stop_source source;
  source.request_stop();
  const auto t0 = clock_type::now();
  CHECK_THROWS_AS(ipcoro::sync_wait(ctx,
                                    [&]() -> task<void> { (void)co_await ipcoro::futex_wait(word, 0, 30s); }()
                                                 .with_stop_token(source.get_token())),
                  ipcoro::operation_cancelled);
  CHECK(clock_type::now() - t0 < 10s);
}

TEST_CASE("a stop requested on another thread cancels a futex wait", "[futex][paths][thread]") {
  ipcoro::io_context ctx;
  std::atomic<std::uint32_t> word{0};
  std::stop_source source;
  std::latch started{1};
  std::thread stopper([&] {
    started.wait();
    source.request_stop();
  });
  const auto t0 = clock_type::now();
  bool cancelled = false;
  ipcoro::sync_wait(ctx, [&]() -> task<void> {
    auto waiter = [&]() -> task<void> {
      try {
        (void)co_await ipcoro::futex_wait(word, 0, 30s);
      } catch (const ipcoro::operation_cancelled&) {
        cancelled = true;
      }
    };
    auto announce = [&]() -> task<void> {
      started.count_down();
      co_return;
    };
    co_await ipcoro::when_all(waiter().with_stop_token(source.get_token()), announce());
  }());
  stopper.join();
  CHECK(cancelled);
  CHECK(clock_type::now() - t0 < 10s);
}

TEST_CASE("destroying the io_context ends a detached task's futex wait", "[futex][paths]") {
  std::atomic<std::uint32_t> word{0};
  bool cancelled = false;
  bool finished = false;
  const auto t0 = clock_type::now();
  {
    ipcoro::io_context ctx;
    ctx.spawn(wait_detached(word, cancelled, finished));
    // Let the wait reach the kernel (or the fallback) before shutting down.
    ipcoro::sync_wait(ctx, []() -> task<void> {
      co_await ipcoro::nop();
      co_await ipcoro::nop();
    }());
    CHECK_FALSE(finished);
  }
  CHECK(finished);
  CHECK(cancelled);
  CHECK(clock_type::now() - t0 < 10s);
}

TEST_CASE("hundreds of concurrent waits each end by their own wake or timeout", "[futex][paths]") {
  ipcoro::io_context ctx;
  constexpr std::size_t n = 300;
  shared_words words(n);
  std::vector<futex_wait_result> results(n, futex_wait_result::value_changed);
  int woken_by_waker = 0;
  ipcoro::sync_wait(ctx, ipcoro::with_scope([&](ipcoro::scope& s) -> task<void> {
                      for (std::size_t i = 0; i < n; ++i) {
                        // Odd words are never woken: they must time out; even words are woken one by one.
                        const auto timeout =
                            i % 2 == 0 ? std::chrono::milliseconds(20s) : std::chrono::milliseconds(200ms);
                        s.spawn(wait_into(words[i], timeout, results[i]));
                      }
                      for (std::size_t i = 0; i < n; i += 2) {
                        if (co_await wake_until_woken(words[i], 10s) > 0) ++woken_by_waker;
                      }
                    }));
  CHECK(woken_by_waker == static_cast<int>(n / 2));
  for (std::size_t i = 0; i < n; ++i) {
    INFO("word " << i);
    CHECK(results[i] == (i % 2 == 0 ? futex_wait_result::woken : futex_wait_result::timed_out));
  }
}

TEST_CASE("steady-state futex waits and wakes allocate nothing", "[futex][paths][alloc]") {
  ipcoro::io_context ctx;
  std::atomic<std::uint32_t> word{0};
  // Helpers, queues and vectors grow until the most waits ever parked at once are served;
  // the warm-up gets there (in this ping-pong: two), the rest must not allocate at all.
  constexpr std::uint32_t rounds = 4000;
  constexpr std::uint32_t warm_up = 1000;
  std::uint64_t at_start = 0;
  std::uint64_t at_end = 0;
  std::uint32_t timeouts = 0;
  // Two coroutines hand the word back and forth: `side` moves it from even to odd or back.
  auto player = [&](std::uint32_t side) -> task<void> {
    for (;;) {
      std::uint32_t v = word.load();
      while (v < rounds && v % 2 != side) {
        if (co_await ipcoro::futex_wait(word, v, 10s, ipcoro::futex_scope::process_private) ==
            futex_wait_result::timed_out) {
          ++timeouts;
        }
        v = word.load();
      }
      if (v == warm_up) at_start = ipcoro::test::allocations();
      if (v >= rounds) {
        if (at_end == 0) at_end = ipcoro::test::allocations();
        co_return;
      }
      word.store(v + 1);
      ipcoro::futex_wake(word, 1, ipcoro::futex_scope::process_private);
    }
  };
  ipcoro::sync_wait(ctx, ipcoro::when_all(player(0), player(1)));
  CHECK(timeouts == 0);
  CHECK(word.load() == rounds);
  CHECK(at_start > 0);
  CHECK(at_end - at_start == 0);
}

TEST_CASE("a futex wait in another process is woken through a MAP_SHARED word", "[futex][paths][process]") {
  shared_words words(2);
  child_process child([&] {
    ipcoro::io_context ctx;
    const auto r = ipcoro::sync_wait(
        ctx, [&]() -> task<futex_wait_result> { co_return co_await ipcoro::futex_wait(words[0], 0, 20s); }());
    // 0: woken without the word changing; anything else names the outcome.
    return r == futex_wait_result::woken ? 0 : 10 + static_cast<int>(r);
  });
  // futex_wake's count proves the child was parked when the wake arrived.
  CHECK(wake_until_woken_blocking(words[0], 10s));
  CHECK(child.wait(20s) == 0);
}

TEST_CASE("a waiter in another process sees the new value after a change and a wake",
          "[futex][paths][process]") {
  shared_words words(1);
  child_process child([&] {
    ipcoro::io_context ctx;
    return ipcoro::sync_wait(ctx, [&]() -> task<int> {
      // The usual protocol: re-check the word after every wake-up, whatever the outcome.
      std::uint32_t seen = words[0].load();
      while (seen == 0) {
        const auto r = co_await ipcoro::futex_wait(words[0], 0, 20s);
        if (r == futex_wait_result::timed_out) co_return 2;
        seen = words[0].load();
      }
      co_return seen == 42 ? 0 : 3;
    }());
  });
  words[0].store(42);
  ipcoro::futex_wake(words[0], 1);
  CHECK(child.wait(20s) == 0);
}

// ---- the fallback path, and lost wake-ups across processes on both paths ----

namespace {

/// What one side of a ping-pong saw.
struct side_stats {
  std::atomic<std::uint64_t> waits{0};
  std::atomic<std::uint64_t> woken{0};
  std::atomic<std::uint64_t> value_changed{0};
  std::atomic<std::uint64_t> timed_out{0};
  std::atomic<std::uint64_t> lost{0};  ///< timed out although the word had changed: a lost wake-up
  std::atomic<std::uint32_t> used_ring{2};
};

/// Hands a counter back and forth: side `parity` moves it from even to odd (0) or odd to
/// even (1), then wakes the other side, until it reaches `handoffs`. Every wait that ends
/// with timed_out although the word changed is a wake-up the futex layer lost.
task<void> ping_pong_side(std::atomic<std::uint32_t>& counter, std::uint32_t parity, std::uint32_t handoffs,
                          side_stats& stats) {
  stats.used_ring.store(ipcoro::futex_waits_use_ring() ? 1 : 0);
  for (;;) {
    std::uint32_t v = counter.load(std::memory_order_acquire);
    while (v < handoffs && v % 2 != parity) {
      stats.waits.fetch_add(1, std::memory_order_relaxed);
      const auto r = co_await ipcoro::futex_wait(counter, v, 5s);
      const std::uint32_t now = counter.load(std::memory_order_acquire);
      switch (r) {
        case futex_wait_result::woken:
          stats.woken.fetch_add(1, std::memory_order_relaxed);
          break;
        case futex_wait_result::value_changed:
          stats.value_changed.fetch_add(1, std::memory_order_relaxed);
          break;
        case futex_wait_result::timed_out:
          stats.timed_out.fetch_add(1, std::memory_order_relaxed);
          if (now != v) stats.lost.fetch_add(1, std::memory_order_relaxed);
          break;
      }
      v = now;
    }
    if (v >= handoffs) co_return;
    counter.store(v + 1, std::memory_order_release);
    ipcoro::futex_wake(counter, 1);
  }
}

struct ping_pong_area {
  std::atomic<std::uint32_t> counter{0};
  side_stats sides[2];
};

/// Runs a ping-pong of `handoffs` between two forked processes, each on the path chosen.
void run_ping_pong(bool fallback_a, bool fallback_b, std::uint32_t handoffs) {
  void* mem =
      ::mmap(nullptr, sizeof(ping_pong_area), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  REQUIRE(mem != MAP_FAILED);
  auto* area = new (mem) ping_pong_area;
  const auto t0 = clock_type::now();
  {
    std::vector<child_process> sides;
    for (std::uint32_t parity = 0; parity < 2; ++parity) {
      const bool fallback = parity == 0 ? fallback_a : fallback_b;
      sides.emplace_back([=] {
        // Read at this process's first wait: the child chooses its own path.
        ::setenv("IPCORO_FUTEX_FALLBACK", fallback ? "1" : "0", 1);
        ipcoro::io_context ctx;
        ipcoro::sync_wait(ctx, ping_pong_side(area->counter, parity, handoffs, area->sides[parity]));
        return 0;
      });
    }
    for (auto& s : sides) CHECK(s.wait(120s) == 0);
  }
  const double seconds = std::chrono::duration<double>(clock_type::now() - t0).count();
  for (int i = 0; i < 2; ++i) {
    const side_stats& s = area->sides[i];
    INFO("side " << i << ": " << s.waits << " waits, " << s.woken << " woken, " << s.value_changed
                 << " value_changed, " << s.timed_out << " timed out, " << s.lost << " lost");
    CHECK(s.used_ring.load() == ((i == 0 ? fallback_a : fallback_b) ? 0u : 1u));
    CHECK(s.lost.load() == 0);
    // Real wait/wake handoffs happened, not just spinning past each other.
    CHECK(s.woken.load() > 0);
  }
  CHECK(area->counter.load() == handoffs);
  WARN(handoffs << " handoffs (fallback " << fallback_a << "/" << fallback_b << ") in " << seconds << " s, "
                << area->sides[0].woken + area->sides[1].woken << " woken waits");
  ::munmap(mem, sizeof(ping_pong_area));
}

/// The number of handoffs for the stress tests: a million in an optimised build, fewer in
/// an unoptimised or sanitized one (to stay well under a minute); IPCORO_STRESS_SCALE (a
/// factor, e.g. 0.1 or 4) scales it.
std::uint32_t stress_handoffs() {
#if defined(__SANITIZE_ADDRESS__) || !defined(__OPTIMIZE__)
  double n = 200'000;
#else
  double n = 1'000'000;
#endif
  if (const char* s = std::getenv("IPCORO_STRESS_SCALE")) n *= std::strtod(s, nullptr);
  return static_cast<std::uint32_t>(std::max(1000.0, n));
}

}  // namespace

TEST_CASE("no wake-up is lost in a long ping-pong between two processes, through the ring",
          "[futex][stress][process]") {
  ipcoro::io_context ctx;
  if (!ctx.features().futex) {
    IPCORO_SKIP("this kernel has no IORING_OP_FUTEX_WAIT (Linux 6.7): the ring path cannot be tested");
  }
  run_ping_pong(false, false, stress_handoffs());
}

TEST_CASE("no wake-up is lost in a long ping-pong between two processes, through the fallback",
          "[futex][stress][process]") {
  run_ping_pong(true, true, stress_handoffs());
}

TEST_CASE("a ring waiter and a fallback waiter hand a counter back and forth without losing a wake-up",
          "[futex][stress][process]") {
  ipcoro::io_context ctx;
  if (!ctx.features().futex) {
    IPCORO_SKIP("this kernel has no IORING_OP_FUTEX_WAIT (Linux 6.7): only the fallback can be tested");
  }
  run_ping_pong(false, true, stress_handoffs() / 4);
}

TEST_CASE("every [paths] case passes again with the fallback selected by IPCORO_FUTEX_FALLBACK=1",
          "[futex][fallback][process]") {
  // This very program, run again in a child with the variable set, restricted to the cases
  // that exercise whichever path is selected; its report goes to the same output.
  child_process rerun([] {
    ::setenv("IPCORO_FUTEX_FALLBACK", "1", 1);
    std::fflush(nullptr);
    ::execl("/proc/self/exe", "futex_test", "[paths]", static_cast<char*>(nullptr));
    std::perror("exec /proc/self/exe");
    return 127;
  });
  CHECK(rerun.wait(120s) == 0);
}
