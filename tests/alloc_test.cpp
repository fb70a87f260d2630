// Proves by counting every operator new that steady-state I/O, timers and events allocate nothing.
#include "ipcoro/event.hpp"
#include "ipcoro/fd_io.hpp"
#include "ipcoro/io_context.hpp"
#include "ipcoro/pipe.hpp"
#include "ipcoro/sync_wait.hpp"
#include "ipcoro/task.hpp"
#include "ipcoro/timer.hpp"
#include "ipcoro/when_all.hpp"

#include <catch2/catch.hpp>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <new>
#include <vector>

#include "counting_new.hpp"


namespace {

using namespace std::chrono_literals;

struct alloc_snapshot {
  std::uint64_t allocations = ipcoro::test::allocations();
  std::uint64_t deallocations = ipcoro::test::deallocations();
};

// Keeps the optimiser from eliding a new/delete pair whose result is otherwise unused.
void* volatile sink = nullptr;

struct alignas(64) over_aligned {
  std::array<std::byte, 64> bytes{};
};

ipcoro::task<int> make_answer() { co_return 42; }

constexpr int warm_up = 300;
constexpr int round_trips = 10'000;
constexpr std::size_t message_size = 64;

// The far side: echoes every message of the other side's fixed size until it sees end of
// stream, using a different operation in each position (read_exact / read / timeouts).
ipcoro::task<void> echo(ipcoro::duplex_pipe& end) {
  std::array<std::byte, message_size> buf{};
  for (std::uint64_t n = 0;; ++n) {
    std::size_t got = 0;
    switch (n % 3) {
      case 0:
        got = co_await end.read_exact(buf);
        break;
      case 1:
        // One read returns the whole message: it was written by one write of <= PIPE_BUF.
        got = co_await end.reader().read(buf);
        break;
      default:
        got = co_await end.read_exact(buf).with_timeout(30s);
        break;
    }
    if (got == 0) co_return;
    if (got != buf.size()) throw std::runtime_error("echo: short message");
    switch (n % 3) {
      case 0:
        co_await end.write_all(buf);
        break;
      case 1:
        if (co_await end.writer().write(buf) != buf.size()) throw std::runtime_error("echo: short write");
        break;
      default:
        co_await end.write_all(buf).with_deadline(std::chrono::steady_clock::now() + 30s);
        break;
    }
  }
}

struct steady_state_result {
  alloc_snapshot before;
  alloc_snapshot after;
  std::uint64_t submitted = 0;
  int mismatches = 0;
};

// A pipe kept exactly full, so that every write to it has to wait in the ring (a write the
// kernel can take at once may complete without the ring). One page out, one page in.
struct full_pipe {
  ipcoro::pipe_pair pipe = ipcoro::make_pipe();
  std::array<std::byte, 4096> page{};
};

// Woken by `ping`: frees one page of the full pipe, then answers with `pong`.
ipcoro::task<void> event_partner(ipcoro::event& ping, ipcoro::event& pong, full_pipe& full, bool& stop,
                                 int& seen) {
  std::array<std::byte, 4096> page{};
  for (;;) {
    co_await ping.wait();
    ping.reset();
    if (stop) co_return;
    if (co_await full.pipe.reader.read_exact(page) != page.size()) co_return;
    ++seen;
    pong.set();
  }
}

// Everything runs in this one frame: awaiting a sub-task would allocate its frame.
ipcoro::task<void> measured(ipcoro::io_context& ctx, ipcoro::duplex_pipe& end, ipcoro::event& ping,
                            ipcoro::event& pong, full_pipe& full, bool& stop, steady_state_result& r) {
  std::array<std::byte, message_size> out{};
  std::array<std::byte, message_size> in{};
  std::uint64_t submitted_before = 0;
  for (int i = 0; i < warm_up + round_trips; ++i) {
    // The first warm_up iterations take every path once (and anything set up lazily).
    if (i == warm_up) {
      submitted_before = ctx.stats().submitted;
      r.before = alloc_snapshot{};
    }
    for (std::size_t k = 0; k < out.size(); ++k) out[k] = static_cast<std::byte>(i * 7 + static_cast<int>(k));
    switch (i % 3) {
      case 0:
        co_await end.write_all(out);
        if (co_await end.read_exact(in) != in.size()) ++r.mismatches;
        break;
      case 1:
        if (co_await end.writer().write(out) != out.size()) ++r.mismatches;
        if (co_await end.reader().read(in) != in.size()) ++r.mismatches;
        break;
      default:
        co_await end.write_all(out).with_timeout(30s);
        if (co_await end.read_exact(in).with_timeout(30s) != in.size()) ++r.mismatches;
        break;
    }
    if (in != out) ++r.mismatches;
    if (i % 10 == 0) co_await ipcoro::sleep_for(1us);
    if (i % 10 == 5) co_await ipcoro::nop();
    // The partner only runs once this coroutine suspends, so the pipe is still full when
    // the write starts: it must wait in the ring until the partner has freed a page.
    ping.set();
    switch (i % 3) {
      case 0:
        co_await full.pipe.writer.write_all(full.page);
        break;
      case 1:
        if (co_await full.pipe.writer.write(full.page) != full.page.size()) ++r.mismatches;
        break;
      default:
        co_await full.pipe.writer.write_all(full.page).with_timeout(30s);
        break;
    }
    co_await pong.wait();
    pong.reset();
  }
  r.after = alloc_snapshot{};
  r.submitted = ctx.stats().submitted - submitted_before;
  stop = true;
  ping.set();
  end.close_write();
}

}  // namespace

TEST_CASE("the counting operator new sees every form of allocation", "[alloc]") {
  {
    const alloc_snapshot before;
    std::vector<int> v(100, 1);
    sink = v.data();
    const alloc_snapshot after;
    REQUIRE(after.allocations - before.allocations == 1);
  }
  {
    const alloc_snapshot before;
    sink = new int(3);
    delete static_cast<int*>(sink);
    sink = new (std::nothrow) int[5];
    delete[] static_cast<int*>(sink);
    auto aligned = std::make_unique<over_aligned>();
    sink = aligned.get();
    const bool is_aligned = reinterpret_cast<std::uintptr_t>(aligned.get()) % 64 == 0;
    aligned.reset();
    sink = new (std::nothrow) over_aligned[3];
    delete[] static_cast<over_aligned*>(sink);
    const alloc_snapshot after;
    REQUIRE(after.allocations - before.allocations == 4);
    REQUIRE(after.deallocations - before.deallocations == 4);
    REQUIRE(is_aligned);
  }
}

TEST_CASE("a coroutine frame goes through the counted operator new", "[alloc]") {
  // The zero below is meaningful only if a task frame per operation would have shown up.
  ipcoro::io_context ctx;
  const alloc_snapshot before;
  ipcoro::task<int> t = make_answer();
  const alloc_snapshot after;
  REQUIRE(after.allocations - before.allocations >= 1);
  REQUIRE(ipcoro::sync_wait(ctx, std::move(t)) == 42);
}

TEST_CASE("steady-state pipe round trips, timeouts, timers and events allocate nothing", "[alloc]") {
  ipcoro::io_context ctx;
  auto [near, far] = ipcoro::make_duplex_pipe();
  full_pipe full;
  {
    // Whole pages, so each page read out frees exactly one page for the next write.
    const std::size_t capacity = ipcoro::pipe_capacity(full.pipe.writer.native_handle());
    REQUIRE(capacity % full.page.size() == 0);
    const std::vector<std::byte> fill(capacity);
    ipcoro::sync_wait(ctx, [&]() -> ipcoro::task<void> { co_await full.pipe.writer.write_all(fill); }());
  }
  ipcoro::event ping;
  ipcoro::event pong;
  bool stop = false;
  int events_seen = 0;
  steady_state_result r;
  ipcoro::sync_wait(ctx, ipcoro::when_all(measured(ctx, near, ping, pong, full, stop, r), echo(far),
                                          event_partner(ping, pong, full, stop, events_seen)));
  REQUIRE(r.mismatches == 0);
  REQUIRE(events_seen == warm_up + round_trips);
  // The operations really went through the ring: per round trip at least the two reads that
  // wait for the echo, the write to the full pipe and the partner's read.
  REQUIRE(r.submitted >= 4u * round_trips);
  CHECK(r.after.deallocations - r.before.deallocations == 0);
  REQUIRE(r.after.allocations - r.before.allocations == 0);
}
