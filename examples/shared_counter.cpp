// SPDX-License-Identifier: MIT
// shared_counter: N processes increment one counter in shared memory under an async
// cross-process mutex (ipcoro::shared_object<T>, a T in a shm segment behind an
// ipcoro::process_mutex); the parent exits 0 only if the final count is exactly
// N × increments.
//
// Each process runs two coroutines on its own io_context. An increment reads the counter,
// suspends while still holding the lock (as real work would, e.g. waiting for I/O), then
// writes it back: without the mutex, updates would be lost. One more process takes the
// lock, starts an update and is killed with SIGKILL in the middle of it: the mutex does
// not stay held forever. A waiter notices the death within one liveness check, takes the
// lock over and learns that the data may be inconsistent (`inconsistent()`); it rolls the
// half-done update back and marks the data consistent. The victim's increment never
// counts, so the expected total stays N × increments.
//
// Usage: shared_counter [--processes N] [--increments M]
// Run:   ./build/examples/shared_counter --processes 4 --increments 20000
#include <ipcoro/ipcoro.hpp>

#include <fmt/core.h>
#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>
#include <string_view>
#include <vector>

namespace {

using ipcoro::task;
using namespace std::chrono_literals;

/// What lives in the segment, behind the mutex: plain data, no pointers.
struct counter_data {
  std::uint64_t count;
  std::uint64_t before;   // the count when the update in progress began
  std::uint32_t pending;  // 1 while an update is half done
  std::uint32_t repairs;  // half-done updates rolled back after their process died
};

constexpr ipcoro::shared_object_options object_options{
    .type_tag = 0x4354'5253,  // "SRTC"
    .version = 1,
    .mode = 0600,
    .mutex = {.liveness_check_interval = 50ms, .spin = 100},
};

using shared_counter = ipcoro::shared_object<counter_data>;

/// Rolls back an update its process did not finish.
void repair(counter_data& c) {
  if (c.pending != 0) {
    c.count = c.before;
    c.pending = 0;
    ++c.repairs;
  }
}

task<void> increment(const shared_counter& counter, std::uint32_t times) {
  for (std::uint32_t i = 0; i < times; ++i) {
    auto value = co_await counter.lock();
    if (value.inconsistent()) {
      repair(*value);
      value.mark_consistent();
    }
    value->before = value->count;
    value->pending = 1;
    co_await ipcoro::nop();  // the lock stays held across suspension
    value->count = value->before + 1;
    value->pending = 0;
  }
}

task<void> die_mid_update(const shared_counter& counter) {
  auto value = co_await counter.lock();
  value->before = value->count;
  value->pending = 1;
  value->count += 1000;  // half-done garbage that must never be seen as the count
  ::kill(::getpid(), SIGKILL);
}

std::uint32_t parse_number(std::string_view flag, const char* text) {
  char* end = nullptr;
  const unsigned long v = std::strtoul(text, &end, 10);
  if (end == text || *end != '\0' || v == 0 || v > 1'000'000'000ul) {
    fmt::print(stderr, "{}: expected a positive number, got '{}'\n", flag, text);
    std::exit(2);
  }
  return static_cast<std::uint32_t>(v);
}

}  // namespace

int main(int argc, char** argv) try {
  std::uint32_t processes = 4;
  std::uint32_t increments = 20'000;
  for (int i = 1; i < argc; ++i) {
    const std::string_view arg = argv[i];
    if ((arg == "--processes" || arg == "--increments") && i + 1 < argc) {
      (arg == "--processes" ? processes : increments) = parse_number(arg, argv[++i]);
    } else {
      fmt::print(stderr, "usage: {} [--processes N] [--increments M]\n", argv[0]);
      return 2;
    }
  }

  // The parent creates the segment and removes it when `counter` goes out of scope.
  const std::string name = fmt::format("ipcoro-shared-counter-{}", ::getpid());
  shared_counter counter = shared_counter::create(name, object_options);
  const auto t0 = std::chrono::steady_clock::now();

  // Each child opens the segment by name, as an unrelated program would, on a loop of its own.
  std::vector<ipcoro::process> workers;
  for (std::uint32_t p = 0; p < processes; ++p) {
    workers.push_back(ipcoro::process::fork(
        [&] {
          ipcoro::io_context ctx;
          const shared_counter mine = shared_counter::open(name, object_options);
          const std::uint32_t half = increments / 2;
          ipcoro::sync_wait(ctx, ipcoro::when_all(increment(mine, half), increment(mine, increments - half)));
          return 0;
        },
        {.name = "worker"}));
  }
  ipcoro::process victim = ipcoro::process::fork(
      [&] {
        ipcoro::io_context ctx;
        const shared_counter mine = shared_counter::open(name, object_options);
        ipcoro::sync_wait(ctx, die_mid_update(mine));
        return 0;
      },
      {.name = "victim"});

  ipcoro::io_context ctx;
  bool ok = true;
  for (ipcoro::process& worker : workers) {
    if (!ipcoro::sync_wait(ctx, worker.wait()).success()) {
      fmt::print(stderr, "{} failed\n", worker.describe());
      ok = false;
    }
  }
  if (ipcoro::sync_wait(ctx, victim.wait()).signal != SIGKILL) {
    fmt::print(stderr, "{}, but was expected to die of SIGKILL\n", victim.describe());
    ok = false;
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();

  // Every process is gone: read the final state under the lock all the same (it may need
  // one last repair if the victim died after everyone else had finished).
  const counter_data final_state = ipcoro::sync_wait(ctx, [&]() -> task<counter_data> {
    auto value = co_await counter.lock();
    if (value.inconsistent()) {
      repair(*value);
      value.mark_consistent();
    }
    co_return *value;
  }());

  const std::uint64_t expected = std::uint64_t{processes} * increments;
  const bool exact = final_state.count == expected;
  fmt::print("{} processes x {} increments: count {} (expected {}) in {:.2f} s, {:.0f} locks/s\n", processes,
             increments, final_state.count, expected, seconds, static_cast<double>(expected) / seconds);
  fmt::print(
      "a process killed while holding the lock: lock taken over {} time(s), {} half-done update(s) "
      "rolled back\n",
      counter.mutex().takeovers(), final_state.repairs);
  ok = ok && exact && counter.mutex().takeovers() == 1 && final_state.repairs == 1;
  fmt::print("shared_counter: {}\n", ok ? "exact" : "FAILED");
  return ok ? 0 : 1;
} catch (const std::exception& e) {
  // Whatever nothing above caught (no io_uring, say): the message and status 1, not an abort.
  fmt::print(stderr, "{}: {}\n", argv[0], e.what());
  return 1;
}
