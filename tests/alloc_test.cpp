// SPDX-License-Identifier: MIT
// Proves by counting every operator new that steady-state I/O, timers and events allocate nothing.
#include "ipcoro/detail/frame_pool.hpp"
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
#include <thread>
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

// ---- the frame pool ----

namespace {

/// A pooled coroutine whose frame holds `N` bytes across a suspension point, so the frame
/// is at least that large.
template <std::size_t N>
ipcoro::task<std::size_t> frame_of(ipcoro::detail::pooled_frame, std::size_t seed) {
  std::array<unsigned char, N> local;
  local.fill(static_cast<unsigned char>(seed));
  co_await std::suspend_never{};
  std::size_t sum = 0;
  for (std::size_t i = 0; i < N; i += 4096) sum += local[i];
  co_return sum + local[N - 1];
}

ipcoro::task<std::size_t> await_frames_of_every_class(int rounds) {
  std::size_t sum = 0;
  for (int i = 0; i < rounds; ++i) {
    sum += co_await frame_of<100>({}, 1);
    sum += co_await frame_of<3000>({}, 1);
    sum += co_await frame_of<10 * 1024>({}, 1);
    sum += co_await frame_of<64 * 1024>({}, 1);
    sum += co_await frame_of<900 * 1024>({}, 1);
  }
  co_return sum;
}

ipcoro::task<std::size_t> await_oversized_frames(int rounds) {
  std::size_t sum = 0;
  for (int i = 0; i < rounds; ++i) sum += co_await frame_of<2 * 1024 * 1024>({}, 1);
  co_return sum;
}

}  // namespace

/// Each child's sum: one per 4 KiB step of its bytes, plus its last byte.
constexpr std::size_t child_sum(std::size_t n) { return (n + 4095) / 4096 + 1; }

TEST_CASE("pooled frames of every size up to 1 MiB are reused, so awaiting them allocates nothing once warm",
          "[alloc][frame_pool]") {
  ipcoro::io_context ctx;
  (void)ipcoro::sync_wait(ctx, await_frames_of_every_class(1));  // warms the pool
  const std::size_t pooled = ipcoro::detail::pooled_frames();
  CHECK(pooled >= 5);
  const alloc_snapshot before_short;
  (void)ipcoro::sync_wait(ctx, await_frames_of_every_class(1));
  const alloc_snapshot before_long;
  const std::size_t sum = ipcoro::sync_wait(ctx, await_frames_of_every_class(50));
  const alloc_snapshot after;
  CHECK(sum == 50 * (child_sum(100) + child_sum(3000) + child_sum(10 * 1024) + child_sum(64 * 1024) +
                     child_sum(900 * 1024)));
  // A run costs what sync_wait and the driving task cost, whatever the number of awaits.
  CHECK(after.allocations - before_long.allocations == before_long.allocations - before_short.allocations);
  CHECK(ipcoro::detail::pooled_frames() == pooled);
}

TEST_CASE("frames larger than 1 MiB come from the heap every time and go back to it", "[alloc][frame_pool]") {
  ipcoro::io_context ctx;
  (void)ipcoro::sync_wait(ctx, await_oversized_frames(1));
  const std::size_t pooled = ipcoro::detail::pooled_frames();
  const alloc_snapshot before_short;
  (void)ipcoro::sync_wait(ctx, await_oversized_frames(1));
  const alloc_snapshot before_long;
  (void)ipcoro::sync_wait(ctx, await_oversized_frames(11));
  const alloc_snapshot after;
  const std::uint64_t short_run = before_long.allocations - before_short.allocations;
  CHECK(after.allocations - before_long.allocations == short_run + 10);
  CHECK(after.deallocations - before_long.deallocations == after.allocations - before_long.allocations);
  CHECK(ipcoro::detail::pooled_frames() == pooled);
}

TEST_CASE("a thread's pool frees what it holds when the thread exits", "[alloc][frame_pool]") {
  std::size_t held = 0;
  const alloc_snapshot before;
  std::thread t([&] {
    ipcoro::io_context ctx;
    (void)ipcoro::sync_wait(ctx, await_frames_of_every_class(2));
    held = ipcoro::detail::pooled_frames();
  });
  t.join();
  const alloc_snapshot after;
  CHECK(held >= 5);
  // Everything the thread allocated (the pool's blocks among it) was freed by its exit.
  CHECK(after.allocations - before.allocations == after.deallocations - before.deallocations);
}

// A miss of the pool (more frames of one size alive at once than ever before on the
// thread) keeps spares: the next such high, reached later in a steady stream, allocates
// nothing. The frames are allocated straight from the pool, on a thread of their own.
TEST_CASE("a pool miss keeps spares, so one more frame alive at once later allocates nothing",
          "[alloc][frame_pool]") {
  std::uint64_t at_first_miss = 0;
  std::uint64_t at_next_highs = 0;
  std::thread([&] {
    constexpr std::size_t size = 3000;  // a class no one else on this thread uses
    std::uint64_t before = ipcoro::test::allocations();
    void* a = ipcoro::detail::allocate_frame(size, true);
    at_first_miss = ipcoro::test::allocations() - before;
    before = ipcoro::test::allocations();
    void* b = ipcoro::detail::allocate_frame(size, true);  // two alive: a new high
    void* c = ipcoro::detail::allocate_frame(size, true);  // three
    at_next_highs = ipcoro::test::allocations() - before;
    for (void* p : {a, b, c}) ipcoro::detail::deallocate_frame(p);
  }).join();
  CHECK(at_first_miss >= 1);
  CHECK(at_next_highs == 0);
}

// A class holds at most its list's limit plus its hot block: frames freed beyond that go
// back to the heap, and exactly that many can be made again without allocating.
TEST_CASE("a size class keeps its hot block and its list's limit, no more", "[alloc][frame_pool]") {
  namespace fp = ipcoro::detail::frame_pool;
  constexpr std::size_t kept = fp::per_small_class + 1;
  std::size_t held = 0;
  std::uint64_t refill_allocations = 0;
  std::uint64_t past_kept_allocations = 0;
  std::thread([&] {
    constexpr std::size_t size = 2000;  // a class no one else on this thread uses
    std::vector<void*> frames;
    for (std::size_t i = 0; i < 3 * kept; ++i) frames.push_back(ipcoro::detail::allocate_frame(size, true));
    for (void* p : frames) ipcoro::detail::deallocate_frame(p);
    held = ipcoro::detail::pooled_frames();
    frames.clear();
    const std::uint64_t before = ipcoro::test::allocations();
    for (std::size_t i = 0; i < kept; ++i) frames.push_back(ipcoro::detail::allocate_frame(size, true));
    refill_allocations = ipcoro::test::allocations() - before;
    frames.push_back(ipcoro::detail::allocate_frame(size, true));
    past_kept_allocations = ipcoro::test::allocations() - before - refill_allocations;
    for (void* p : frames) ipcoro::detail::deallocate_frame(p);
  }).join();
  CHECK(held == kept);
  CHECK(refill_allocations == 0);
  CHECK(past_kept_allocations >= 1);
}

// A frame may end on another thread than the one that made it: the freeing thread's pool
// keeps it, and that thread's exit frees it (here from the hot block, where it went when
// it was freed a second time).
TEST_CASE("a frame freed on another thread is kept by that thread's pool and freed at its exit",
          "[alloc][frame_pool]") {
  const alloc_snapshot before;
  void* frame = nullptr;
  std::thread([&] { frame = ipcoro::detail::allocate_frame(1000, true); }).join();
  std::size_t held_after_free = 0;
  std::uint64_t reuse_allocations = 0;
  bool same_block = false;
  std::thread([&] {
    ipcoro::detail::deallocate_frame(frame);
    held_after_free = ipcoro::detail::pooled_frames();
    const std::uint64_t at = ipcoro::test::allocations();
    void* again = ipcoro::detail::allocate_frame(1000, true);
    reuse_allocations = ipcoro::test::allocations() - at;
    same_block = again == frame;
    ipcoro::detail::deallocate_frame(again);
  }).join();
  const alloc_snapshot after;
  CHECK(held_after_free == 1);
  CHECK(reuse_allocations == 0);
  CHECK(same_block);
  CHECK(after.allocations - before.allocations == after.deallocations - before.deallocations);
}
