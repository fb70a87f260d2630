// SPDX-License-Identifier: MIT
// SPSC and MPMC rings across real processes: streaming, wake-ups, backpressure, close, dead peers, SIGKILL,
// resume.
#include "ipcoro/shm_ring.hpp"
#include "ipcoro/error.hpp"
#include "ipcoro/futex.hpp"
#include "ipcoro/io_context.hpp"
#include "ipcoro/mapped_file.hpp"
#include "ipcoro/pipe.hpp"
#include "ipcoro/scope.hpp"
#include "ipcoro/shm_segment.hpp"
#include "ipcoro/sync_wait.hpp"
#include "ipcoro/task.hpp"
#include "ipcoro/timer.hpp"
#include "ipcoro/when_any.hpp"

#include "process.hpp"
#include "shared_memory.hpp"

#include <catch2/catch.hpp>

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <new>
#include <optional>
#include <random>
#include <span>
#include <string>
#include <system_error>
#include <vector>

// ---- allocation counting (for the steady-state test) ----

#include "counting_new.hpp"

namespace {

using namespace std::chrono_literals;
using ipcoro::task;
using ipcoro::test::child_process;

using ipcoro::test::shared_memory;

/// A file in /tmp, removed when the test ends however it ends.
class temp_file {
 public:
  explicit temp_file(const std::string& tag) : path_("/tmp/" + ipcoro::test::unique_name(tag)) {}
  ~temp_file() { ::unlink(path_.c_str()); }
  temp_file(const temp_file&) = delete;
  temp_file& operator=(const temp_file&) = delete;
  const std::string& path() const noexcept { return path_; }

 private:
  std::string path_;
};

// ---- messages that check themselves ----

std::uint64_t mix(std::uint64_t x) noexcept {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

/// Size of message `seq`: varied, with empty (or `floor`-sized) and maximal ones mixed in.
std::size_t message_size(std::uint64_t seq, std::size_t max, std::size_t floor = 0) noexcept {
  if (seq % 89 == 5) return floor;
  if (seq % 97 == 7) return max;
  const std::size_t n = mix(seq) % (max + 1);
  return std::max(floor, seq % 3 == 0 ? n : n % 512);  // mostly small, sometimes large
}

/// Message `seq` of stream `seed`: its number in the first 8 bytes (when there is room),
/// then the pattern.
std::span<const std::byte> make_message(std::vector<std::byte>& buf, std::uint64_t seed, std::uint64_t seq,
                                        std::size_t max, std::size_t floor = 0) {
  const std::size_t n = message_size(seq, max, floor);
  buf.resize(std::max<std::size_t>(buf.size(), n));
  auto out = std::span(buf).first(n);
  ipcoro::test::fill_pattern(out, seed ^ seq, 0);
  if (n >= 8) std::memcpy(out.data(), &seq, 8);
  return out;
}

bool is_message(std::span<const std::byte> got, std::uint64_t seed, std::uint64_t seq, std::size_t max,
                std::size_t floor = 0) {
  std::vector<std::byte> expected;
  const auto want = make_message(expected, seed, seq, max, floor);
  return got.size() == want.size() && std::equal(got.begin(), got.end(), want.begin());
}

std::uint64_t seq_of(std::span<const std::byte> msg) {
  std::uint64_t seq = ~0ull;
  if (msg.size() >= 8) std::memcpy(&seq, msg.data(), 8);
  return seq;
}

/// Waits up to `timeout` for one byte on `fd`; true when it came.
bool wait_byte(int fd, std::chrono::milliseconds timeout) {
  ::pollfd p{fd, POLLIN, 0};
  if (::poll(&p, 1, static_cast<int>(timeout.count())) != 1) return false;
  char c;
  return ::read(fd, &c, 1) == 1;
}
void send_byte(int fd) {
  const char c = 1;
  [[maybe_unused]] ssize_t n = ::write(fd, &c, 1);
}

/// Runs `t` on a fresh io_context (for children).
template <class T>
T run(task<T> t) {
  ipcoro::io_context ctx;
  return ipcoro::sync_wait(ctx, std::move(t));
}

template <class F>
int error_of(F&& f) {
  try {
    f();
  } catch (const std::system_error& e) {
    return e.code().value();
  }
  return 0;
}

constexpr std::uint64_t seed = 0x5eed;

}  // namespace

// ---- SPSC ----

TEST_CASE(
    "messages of varying sizes stream across processes in order and intact, wrapping the ring many times",
    "[shm_ring][spsc]") {
  // A named segment: the producer opens it by name, as an unrelated process would.
  const std::string name = ipcoro::test::unique_name("ring-stream");
  const auto layout = ipcoro::spsc_ring_layout(64 * 1024);
  auto segment =
      ipcoro::shm_segment::create(name, layout, {.mode = 0600, .initialize = &ipcoro::format_spsc_ring});
  const std::size_t max = 64 * 1024 / 2 - 8;  // what a 64 KiB ring carries
  constexpr std::uint64_t count = 6000;

  child_process producer([&] {
    auto opened = ipcoro::shm_segment::open(name, layout);
    return run([&]() -> task<int> {
      ipcoro::spsc_ring_sender tx(opened.payload());
      if (tx.max_message_size() != max) co_return 2;
      std::vector<std::byte> buf;
      for (std::uint64_t seq = 0; seq < count; ++seq) co_await tx.send(make_message(buf, seed, seq, max));
      tx.close();
      co_return 0;
    }());
  });

  ipcoro::io_context ctx;
  std::uint64_t bytes = 0;
  const std::uint64_t received = ipcoro::sync_wait(ctx, [&]() -> task<std::uint64_t> {
    ipcoro::spsc_ring_receiver rx(segment.payload());
    std::vector<std::byte> buf(max);
    std::uint64_t seq = 0;
    while (auto n = co_await rx.receive(buf).with_timeout(30s)) {
      if (!is_message(std::span(buf).first(*n), seed, seq, max)) {
        FAIL("message " << seq << " (" << *n << " bytes) is not what was sent");
      }
      bytes += *n;
      ++seq;
    }
    // End of stream stays end of stream.
    if (co_await rx.receive(buf)) FAIL("a message after end of stream");
    co_return seq;
  }());
  REQUIRE(received == count);
  REQUIRE(bytes > 16 * 64 * 1024);  // wrapped around many times
  REQUIRE(producer.wait(30s) == 0);
}

namespace {
/// `rounds` round trips with a child echo: pings through an SPSC ring, pongs through an
/// SPSC or an MPMC ring. No periodic wake-up hides a lost one: a lost wake-up shows as a
/// timeout.
/// The ring's fence mode (ring_header::fence_required in lib/shm_ring.cpp, at byte 72):
/// 0 off, 1 requested, 2 in force.
std::uint32_t fence_mode(std::span<std::byte> ring) {
  return std::atomic_ref<std::uint32_t>(*reinterpret_cast<std::uint32_t*>(ring.data() + 72)).load();
}

void ping_pong(int spin_us, bool mpmc_pong, int rounds, bool echo_without_membarrier = false,
               bool adaptive_fences = true) {
  const std::size_t ping_size = ipcoro::spsc_ring_region_size(4096);
  const std::size_t pong_size = mpmc_pong ? ipcoro::mpmc_ring_region_size(8, 64) : ping_size;
  shared_memory mem(ping_size + pong_size);
  auto ping = mem.bytes().first(ping_size);
  auto pong = mem.bytes().subspan(ping_size, pong_size);
  ipcoro::format_spsc_ring(ping);
  if (mpmc_pong)
    ipcoro::format_mpmc_ring(pong, 64);
  else
    ipcoro::format_spsc_ring(pong);
  ipcoro::ring_options opts;
  opts.liveness_check_interval = 1h;
  opts.spin = std::chrono::microseconds(spin_us);
  opts.adaptive_fences = adaptive_fences;

  child_process echo([&] {
    if (echo_without_membarrier) ::setenv("IPCORO_RING_NO_MEMBARRIER", "1", 1);
    return run([&]() -> task<int> {
      ipcoro::spsc_ring_receiver rx(ping, opts);
      ipcoro::spsc_ring_sender spsc_tx;
      ipcoro::mpmc_ring_sender mpmc_tx;
      if (mpmc_pong)
        mpmc_tx = ipcoro::mpmc_ring_sender(pong, opts);
      else
        spsc_tx = ipcoro::spsc_ring_sender(pong, opts);
      std::array<std::byte, 64> buf{};
      while (auto n = co_await rx.receive(buf).with_timeout(20s)) {
        co_await (mpmc_pong ? mpmc_tx.send(std::span(buf).first(*n))
                            : spsc_tx.send(std::span(buf).first(*n)));
      }
      co_return 0;
    }());
  });

  ipcoro::io_context ctx;
  ipcoro::sync_wait(ctx, [&]() -> task<void> {
    ipcoro::spsc_ring_sender tx(ping, opts);
    ipcoro::spsc_ring_receiver spsc_rx;
    ipcoro::mpmc_ring_receiver mpmc_rx;
    if (mpmc_pong)
      mpmc_rx = ipcoro::mpmc_ring_receiver(pong, opts);
    else
      spsc_rx = ipcoro::spsc_ring_receiver(pong, opts);
    std::array<std::byte, 64> out{};
    std::array<std::byte, 64> in{};
    for (int i = 0; i < rounds; ++i) {
      std::memcpy(out.data(), &i, sizeof i);
      co_await tx.send(out);
      const auto n = co_await (mpmc_pong ? mpmc_rx.receive(in) : spsc_rx.receive(in)).with_timeout(20s);
      REQUIRE(n == out.size());
      REQUIRE(std::memcmp(in.data(), &i, sizeof i) == 0);
    }
    tx.close();
  }());
  REQUIRE(echo.wait(30s) == 0);
  if (spin_us == 0 && !echo_without_membarrier) {
    // Sleeping after every message switches both rings to fences, unless told not to.
    CHECK(fence_mode(ping) == (adaptive_fences ? 2u : 0u));
    CHECK(fence_mode(pong) == (adaptive_fences ? 2u : 0u));
  }
}
}  // namespace

TEST_CASE("a ping-pong between two processes loses no wake-up, sleeping or spinning, SPSC or MPMC",
          "[shm_ring][wakeup]") {
  const int spin_us = GENERATE(0, 20);
  const bool mpmc_pong = GENERATE(false, true);
  // With adaptive fences the rings switch to a fence per message after a few sleeps;
  // without, every sleep pairs with the publishers through membarrier().
  const bool adaptive_fences = GENERATE(true, false);
  ping_pong(spin_us, mpmc_pong, 3000, false, adaptive_fences);
}

TEST_CASE("a ping-pong loses no wake-up when one process cannot use membarrier (every sender then fences)",
          "[shm_ring][wakeup]") {
  const int spin_us = GENERATE(0, 2);
  const bool mpmc_pong = GENERATE(false, true);
  ping_pong(spin_us, mpmc_pong, 2000, true);
}

TEST_CASE(
    "bursts of messages, each ended by a pause for the receiver's answer, lose no wake-up at the burst's end",
    "[shm_ring][wakeup]") {
  // Each burst's end meets a receiver that is spinning, about to sleep or asleep, at
  // varied points; the sender publishes without a fence (the sleeper's membarrier pairs
  // with it) and wakes only announced sleepers. The sender then waits for the receiver's
  // answer, so a wake-up lost at a burst's end shows as a timeout.
  const std::size_t ring_size = ipcoro::spsc_ring_region_size(64 * 1024);
  shared_memory mem(2 * ring_size);
  auto data = mem.bytes().first(ring_size);
  auto answers = mem.bytes().subspan(ring_size, ring_size);
  ipcoro::format_spsc_ring(data);
  ipcoro::format_spsc_ring(answers);
  ipcoro::ring_options opts;
  opts.liveness_check_interval = 1h;
  if (GENERATE(false, true)) opts.spin = std::chrono::nanoseconds::zero();  // else the default spin
  constexpr int bursts = 3000;

  child_process receiver([&] {
    return run([&]() -> task<int> {
      ipcoro::spsc_ring_receiver rx(data, opts);
      ipcoro::spsc_ring_sender tx(answers, opts);
      std::array<std::byte, 64> buf{};
      std::uint64_t expected = 0;
      for (;;) {
        const auto n = co_await rx.receive(buf).with_timeout(20s);
        if (!n) break;
        std::uint64_t seq = 0;
        std::memcpy(&seq, buf.data(), sizeof seq);
        if (*n != buf.size() || seq != expected) co_return 3;
        ++expected;
        if (buf[8] == std::byte{1})
          co_await tx.send(std::span(buf).first(sizeof expected));  // end of a burst
      }
      co_return 0;
    }());
  });

  ipcoro::io_context ctx;
  const std::uint64_t sent = ipcoro::sync_wait(ctx, [&]() -> task<std::uint64_t> {
    ipcoro::spsc_ring_sender tx(data, opts);
    ipcoro::spsc_ring_receiver rx(answers, opts);
    std::array<std::byte, 64> out{};
    std::array<std::byte, 64> in{};
    std::uint64_t seq = 0;
    for (int b = 0; b < bursts; ++b) {
      const std::uint64_t length = 1 + mix(static_cast<std::uint64_t>(b)) % 48;
      for (std::uint64_t i = 0; i < length; ++i, ++seq) {
        std::memcpy(out.data(), &seq, sizeof seq);
        out[8] = i + 1 == length ? std::byte{1} : std::byte{0};
        co_await tx.send(out);
        // A few hundred nanoseconds of work now and then, so that the bursts' ends fall
        // at varied points of the receiver's spin.
        for (std::uint64_t w = mix(seq) % 4 == 0 ? mix(seq + 1) % 400 : 0; w > 0; --w) {
          std::atomic_signal_fence(std::memory_order_seq_cst);
        }
      }
      const auto n = co_await rx.receive(in).with_timeout(20s);
      if (n != sizeof seq) throw std::runtime_error("no answer to a burst");
    }
    tx.close();
    co_return seq;
  }());
  REQUIRE(sent > bursts);
  REQUIRE(receiver.wait(30s) == 0);
}

// Run by the test below in a fresh process whose futex waits take the fallback path.
TEST_CASE("ring ping-pong through the futex fallback (run in a child)", "[.ring-fallback-body]") {
  REQUIRE_FALSE(ipcoro::futex_waits_use_ring());
  ping_pong(0, false, 2000);
  ping_pong(0, true, 2000);
}

TEST_CASE("rings work the same when futex waits take the fallback path", "[shm_ring][wakeup][fallback]") {
  child_process child([] {
    ::setenv("IPCORO_FUTEX_FALLBACK", "1", 1);
    ::execl("/proc/self/exe", "shm_ring_test", "[.ring-fallback-body]", "--reporter", "compact",
            static_cast<char*>(nullptr));
    std::perror("execl /proc/self/exe");
    return 98;
  });
  REQUIRE(child.wait(60s) == 0);
}

TEST_CASE("a sender facing a full ring waits for space and goes on once the receiver drains it",
          "[shm_ring][spsc][backpressure]") {
  shared_memory mem(ipcoro::spsc_ring_region_size(4096));
  ipcoro::format_spsc_ring(mem.bytes());
  auto [full_r, full_w] = ipcoro::make_pipe();
  constexpr std::uint64_t count = 200;  // 200 x 256 bytes: more than 12 times the ring
  constexpr std::size_t size = 256;

  child_process producer([&, &full_w = full_w] {
    return run([&]() -> task<int> {
      ipcoro::spsc_ring_sender tx(mem.bytes());
      std::array<std::byte, size> msg{};
      std::uint64_t seq = 0;
      // Fill the ring until a send cannot complete (a timer proves it is waiting).
      for (;; ++seq) {
        std::memcpy(msg.data(), &seq, 8);
        try {
          co_await tx.send(msg).with_timeout(50ms);
        } catch (const ipcoro::timed_out&) {
          break;
        }
      }
      if (seq == 0 || seq * (size + 8) > 4096) co_return 2;  // it must have filled the ring, no more
      send_byte(full_w.native_handle());
      for (; seq < count; ++seq) {
        std::memcpy(msg.data(), &seq, 8);
        co_await tx.send(msg).with_timeout(20s);  // waits for the receiver each time the ring fills
      }
      tx.close();
      co_return 0;
    }());
  });

  REQUIRE(wait_byte(full_r.native_handle(), 20s));
  ipcoro::io_context ctx;
  const std::uint64_t got = ipcoro::sync_wait(ctx, [&]() -> task<std::uint64_t> {
    ipcoro::spsc_ring_receiver rx(mem.bytes());
    std::array<std::byte, size> buf{};
    std::uint64_t seq = 0;
    while (auto n = co_await rx.receive(buf).with_timeout(20s)) {
      REQUIRE(*n == size);
      REQUIRE(seq_of(buf) == seq);
      ++seq;
    }
    co_return seq;
  }());
  REQUIRE(got == count);
  REQUIRE(producer.wait(30s) == 0);
}

TEST_CASE("close ends the stream after every message; a closed receiver makes sends fail with EPIPE",
          "[shm_ring][spsc][close]") {
  shared_memory mem(ipcoro::spsc_ring_region_size(4096));
  ipcoro::format_spsc_ring(mem.bytes());

  SECTION("the receiver gets every message, then end of stream, again and again") {
    child_process producer([&] {
      return run([&]() -> task<int> {
        ipcoro::spsc_ring_sender tx(mem.bytes());
        for (std::uint64_t seq = 0; seq < 100; ++seq) co_await tx.send(std::as_bytes(std::span(&seq, 1)));
        co_return 0;  // the destructor closes
      }());
    });
    ipcoro::io_context ctx;
    ipcoro::sync_wait(ctx, [&]() -> task<void> {
      ipcoro::spsc_ring_receiver rx(mem.bytes());
      std::array<std::byte, 8> buf{};
      for (std::uint64_t seq = 0; seq < 100; ++seq) {
        {
          const auto got = co_await rx.receive(buf).with_timeout(20s);
          REQUIRE(got == 8u);
        }
        REQUIRE(seq_of(buf) == seq);
      }
      {
        const auto got = co_await rx.receive(buf).with_timeout(20s);
        REQUIRE_FALSE(got);
      }
      {
        const auto got = co_await rx.receive(buf).with_timeout(20s);
        REQUIRE_FALSE(got);
      }
    }());
    REQUIRE(producer.wait(30s) == 0);
  }

  SECTION("a sender waiting for space learns that the receiver closed") {
    auto [full_r, full_w] = ipcoro::make_pipe();
    child_process producer([&, &full_w = full_w] {
      return run([&]() -> task<int> {
        ipcoro::spsc_ring_sender tx(mem.bytes());
        std::array<std::byte, 1000> msg{};
        co_await tx.send(msg);
        co_await tx.send(msg);  // the ring (4096) now has room for one more, not two
        co_await tx.send(msg);
        send_byte(full_w.native_handle());
        try {
          co_await tx.send(msg).with_timeout(20s);
          co_await tx.send(msg).with_timeout(20s);
        } catch (const std::system_error& e) {
          co_return e.code().value() == EPIPE ? 0 : 3;
        }
        co_return 2;
      }());
    });
    ipcoro::spsc_ring_receiver rx(mem.bytes());
    REQUIRE(wait_byte(full_r.native_handle(), 20s));
    rx.close();
    REQUIRE(producer.wait(30s) == 0);
  }
}

TEST_CASE("a receive on an empty ring times out, can be cancelled, and the ring still works afterwards",
          "[shm_ring][spsc]") {
  shared_memory mem(ipcoro::spsc_ring_region_size(4096));
  ipcoro::format_spsc_ring(mem.bytes());
  ipcoro::io_context ctx;
  ipcoro::sync_wait(ctx, [&]() -> task<void> {
    ipcoro::spsc_ring_sender tx(mem.bytes());
    ipcoro::spsc_ring_receiver rx(mem.bytes());
    std::array<std::byte, 16> buf{};
    const auto t0 = std::chrono::steady_clock::now();
    {
      bool threw = false;
      try {
        (void)co_await rx.receive(buf).with_timeout(30ms);
      } catch (const ipcoro::timed_out&) {
        threw = true;
      }
      REQUIRE(threw);
    }
    REQUIRE(std::chrono::steady_clock::now() - t0 >= 30ms);

    auto receive_one = [&]() -> task<std::optional<std::size_t>> { co_return co_await rx.receive(buf); };
    auto nap = []() -> task<int> {
      co_await ipcoro::sleep_for(20ms);
      co_return 1;
    };
    auto first = co_await ipcoro::when_any(receive_one(), nap());
    REQUIRE(first.index() == 1);  // the receive was cancelled

    const std::array<std::byte, 3> msg{std::byte{1}, std::byte{2}, std::byte{3}};
    co_await tx.send(msg);
    {
      const auto got = co_await rx.receive(buf);
      REQUIRE(got == 3u);
    }
    REQUIRE(buf[2] == std::byte{3});
  }());
}

TEST_CASE("oversized messages are refused and a too-small buffer leaves the message in the ring",
          "[shm_ring][spsc]") {
  shared_memory mem(ipcoro::spsc_ring_region_size(4096));
  ipcoro::format_spsc_ring(mem.bytes());
  ipcoro::io_context ctx;
  ipcoro::sync_wait(ctx, [&]() -> task<void> {
    ipcoro::spsc_ring_sender tx(mem.bytes());
    ipcoro::spsc_ring_receiver rx(mem.bytes());
    REQUIRE(tx.max_message_size() == 4096 / 2 - 8);
    std::vector<std::byte> big(tx.max_message_size() + 1);
    int err = 0;
    try {
      co_await tx.send(big);
    } catch (const std::system_error& e) {
      err = e.code().value();
    }
    REQUIRE(err == EMSGSIZE);
    co_await tx.send(std::span(big).first(100));
    std::array<std::byte, 99> small{};
    err = 0;
    try {
      (void)co_await rx.receive(small);
    } catch (const std::system_error& e) {
      err = e.code().value();
    }
    REQUIRE(err == EMSGSIZE);
    {
      const auto got = co_await rx.receive(big);
      REQUIRE(got == 100u);
    }
  }());
}

TEST_CASE("a second live sender is refused, and the place of a dead one is taken over", "[shm_ring][spsc]") {
  shared_memory mem(ipcoro::spsc_ring_region_size(4096));
  ipcoro::format_spsc_ring(mem.bytes());
  {
    ipcoro::spsc_ring_sender first(mem.bytes());
    REQUIRE(error_of([&] { ipcoro::spsc_ring_sender second(mem.bytes()); }) == EBUSY);
    first.detach();
  }
  child_process dies([&] {
    ipcoro::spsc_ring_sender tx(mem.bytes());
    ::raise(SIGKILL);
    return 1;
  });
  REQUIRE(dies.wait(20s) == 128 + SIGKILL);
  REQUIRE(error_of([&] { ipcoro::spsc_ring_sender replacement(mem.bytes()); }) == 0);
}

TEST_CASE("a waiter learns that its peer was killed instead of waiting forever",
          "[shm_ring][spsc][dead-peer]") {
  shared_memory mem(ipcoro::spsc_ring_region_size(4096));
  ipcoro::format_spsc_ring(mem.bytes());
  auto [ready_r, ready_w] = ipcoro::make_pipe();
  ipcoro::ring_options opts;
  opts.liveness_check_interval = 20ms;

  SECTION("the receiver, after the messages sent before the death") {
    child_process producer([&, &ready_w = ready_w] {
      ipcoro::spsc_ring_sender tx(mem.bytes());
      run([&]() -> task<void> {
        for (std::uint64_t seq = 0; seq < 3; ++seq) co_await tx.send(std::as_bytes(std::span(&seq, 1)));
      }());
      send_byte(ready_w.native_handle());
      ::pause();  // killed here, without closing
      return 1;
    });
    REQUIRE(wait_byte(ready_r.native_handle(), 20s));
    producer.kill(SIGKILL);  // not reaped yet: a zombie counts as dead
    ipcoro::io_context ctx;
    ipcoro::sync_wait(ctx, [&]() -> task<void> {
      ipcoro::spsc_ring_receiver rx(mem.bytes(), opts);
      std::array<std::byte, 8> buf{};
      for (std::uint64_t seq = 0; seq < 3; ++seq) {
        const auto got = co_await rx.receive(buf);
        REQUIRE(got == 8u);
      }
      pid_t dead = 0;
      std::string what;
      try {
        (void)co_await rx.receive(buf).with_timeout(20s);
      } catch (const ipcoro::peer_died& e) {
        dead = e.pid();
        what = e.what();
      }
      REQUIRE(dead == producer.pid());
      REQUIRE_THAT(what, Catch::Contains("peer process " + std::to_string(producer.pid()) + " died"));
    }());
  }

  SECTION("the sender, waiting for space") {
    child_process consumer([&, &ready_w = ready_w] {
      ipcoro::spsc_ring_receiver rx(mem.bytes());
      send_byte(ready_w.native_handle());
      ::pause();
      return 1;
    });
    REQUIRE(wait_byte(ready_r.native_handle(), 20s));
    consumer.kill(SIGKILL);
    ipcoro::io_context ctx;
    ipcoro::sync_wait(ctx, [&]() -> task<void> {
      ipcoro::spsc_ring_sender tx(mem.bytes(), opts);
      std::array<std::byte, 1000> msg{};
      pid_t dead = 0;
      try {
        for (int i = 0; i < 10; ++i) co_await tx.send(msg).with_timeout(20s);
      } catch (const ipcoro::peer_died& e) {
        dead = e.pid();
      }
      REQUIRE(dead == consumer.pid());
    }());
  }
}

TEST_CASE("a sender destroyed by an exception unwinding leaves the stream open: the receiver gets peer_died",
          "[shm_ring][spsc][dead-peer]") {
  shared_memory mem(ipcoro::spsc_ring_region_size(4096));
  ipcoro::format_spsc_ring(mem.bytes());
  ipcoro::ring_options opts;
  opts.liveness_check_interval = 20ms;
  child_process producer([&] {
    try {
      ipcoro::spsc_ring_sender tx(mem.bytes());
      run([&]() -> task<void> {
        for (std::uint64_t seq = 0; seq < 3; ++seq) co_await tx.send(std::as_bytes(std::span(&seq, 1)));
      }());
      throw std::runtime_error("the producer failed");  // tx goes while this unwinds
    } catch (const std::runtime_error&) {
      return 0;
    }
  });
  REQUIRE(producer.wait() == 0);
  ipcoro::io_context ctx;
  ipcoro::sync_wait(ctx, [&]() -> task<void> {
    ipcoro::spsc_ring_receiver rx(mem.bytes(), opts);
    std::array<std::byte, 8> buf{};
    for (std::uint64_t seq = 0; seq < 3; ++seq) {
      const auto got = co_await rx.receive(buf);
      REQUIRE(got == 8u);
    }
    bool died = false;
    bool ended = false;
    try {
      ended = !(co_await rx.receive(buf).with_timeout(20s));
    } catch (const ipcoro::peer_died&) {
      died = true;
    }
    CHECK(died);
    CHECK_FALSE(ended);
  }());
}

TEST_CASE("SIGKILL of the producer at random points: the consumer gets an intact prefix, then peer_died",
          "[shm_ring][spsc][sigkill]") {
  std::mt19937_64 rng(std::random_device{}());
  for (int round = 0; round < 4; ++round) {
    shared_memory mem(ipcoro::spsc_ring_region_size(16 * 1024));
    ipcoro::format_spsc_ring(mem.bytes());
    const std::size_t max = 16 * 1024 / 2 - 8;
    const std::uint64_t kill_after = 50 + rng() % 2000;
    auto [progress_r, progress_w] = ipcoro::make_pipe();
    ipcoro::ring_options opts;
    opts.liveness_check_interval = 20ms;

    child_process producer([&] {
      return run([&]() -> task<int> {
        ipcoro::spsc_ring_sender tx(mem.bytes());
        std::vector<std::byte> buf;
        for (std::uint64_t seq = 0;; ++seq) co_await tx.send(make_message(buf, seed, seq, max));
      }());
    });
    const pid_t producer_pid = producer.pid();
    child_process consumer([&, &progress_w = progress_w] {
      return run([&]() -> task<int> {
        ipcoro::spsc_ring_receiver rx(mem.bytes(), opts);
        std::vector<std::byte> buf(max);
        std::uint64_t seq = 0;
        try {
          for (;; ++seq) {
            const auto n = co_await rx.receive(buf).with_timeout(20s);
            if (!n) co_return 2;  // nobody closed
            if (!is_message(std::span(buf).first(*n), seed, seq, max)) co_return 3;
            if (seq == kill_after) send_byte(progress_w.native_handle());
          }
        } catch (const ipcoro::peer_died& e) {
          co_return e.pid() == producer_pid&& seq > kill_after ? 0 : 4;
        }
      }());
    });
    REQUIRE(wait_byte(progress_r.native_handle(), 20s));
    producer.kill(SIGKILL);
    REQUIRE(consumer.wait(30s) == 0);
    REQUIRE(producer.wait(5s) == 128 + SIGKILL);
  }
}

TEST_CASE(
    "SIGKILL of the consumer at random points: nothing acknowledged comes again, nothing unacknowledged is "
    "lost",
    "[shm_ring][spsc][sigkill][resume]") {
  std::mt19937_64 rng(std::random_device{}());
  for (int round = 0; round < 3; ++round) {
    temp_file file("ring-resume");
    const auto layout = ipcoro::spsc_ring_layout(8192);
    (void)ipcoro::mapped_file::create(file.path(), layout, 0600, &ipcoro::format_spsc_ring);
    // What the first consumer did, kept outside the ring: the message it was about to
    // acknowledge, and the last one it had acknowledged (the kill can fall between).
    shared_memory notes(4096);
    auto& intent = notes.at<std::atomic<std::int64_t>>(0);
    auto& done = notes.at<std::atomic<std::int64_t>>(64);
    intent = -1;
    done = -1;
    const std::size_t max = 512;
    constexpr std::uint64_t count = 20000;
    const std::uint64_t kill_after = 100 + rng() % 4000;
    auto [progress_r, progress_w] = ipcoro::make_pipe();
    ipcoro::ring_options opts;
    opts.liveness_check_interval = 20ms;
    opts.manual_ack = true;

    child_process producer([&] {
      auto m = ipcoro::mapped_file::open(file.path(), layout);
      return run([&]() -> task<int> {
        ipcoro::spsc_ring_sender tx(m.payload(), opts);
        std::vector<std::byte> buf;
        for (std::uint64_t seq = 0; seq < count;) {
          try {
            co_await tx.send(make_message(buf, seed, seq, max)).with_timeout(20s);
            ++seq;
          } catch (const ipcoro::peer_died&) {
            // The consumer died; its successor will attach. Send the same message again.
          }
        }
        tx.close();
        co_return 0;
      }());
    });
    child_process first([&, &progress_w = progress_w] {
      auto m = ipcoro::mapped_file::open(file.path(), layout);
      return run([&]() -> task<int> {
        ipcoro::spsc_ring_receiver rx(m.payload(), opts);
        std::vector<std::byte> buf(max);
        for (std::uint64_t seq = 0;; ++seq) {
          const auto n = co_await rx.receive(buf).with_timeout(20s);
          if (!n) co_return 0;  // finished before the kill
          if (!is_message(std::span(buf).first(*n), seed, seq, max)) co_return 3;
          if (seq % 7 != 3) {  // acknowledge most messages, not all: some must come again
            intent = static_cast<std::int64_t>(seq);
            rx.ack();
            done = static_cast<std::int64_t>(seq);
          }
          if (seq == kill_after) send_byte(progress_w.native_handle());
        }
      }());
    });
    REQUIRE(wait_byte(progress_r.native_handle(), 20s));
    first.kill(SIGKILL);
    const int first_status = first.wait(20s);
    REQUIRE((first_status == 128 + SIGKILL || first_status == 0));

    child_process second([&] {
      auto m = ipcoro::mapped_file::open(file.path(), layout);
      return run([&]() -> task<int> {
        ipcoro::spsc_ring_receiver rx(m.payload(), opts);
        std::vector<std::byte> buf(max);
        auto n = co_await rx.receive(buf).with_timeout(20s);
        if (!n) co_return done.load() == static_cast<std::int64_t>(count - 1) ? 0 : 5;
        // The first message is the one after the last acknowledged one.
        std::uint64_t seq = static_cast<std::uint64_t>(done.load() + 1);
        if (!is_message(std::span(buf).first(*n), seed, seq, max)) {
          const std::uint64_t alt = static_cast<std::uint64_t>(intent.load() + 1);
          if (alt == seq || !is_message(std::span(buf).first(*n), seed, alt, max)) co_return 6;
          seq = alt;  // killed between ack() and the note of it
        }
        rx.ack();
        for (++seq;; ++seq) {
          n = co_await rx.receive(buf).with_timeout(20s);
          if (!n) break;
          if (!is_message(std::span(buf).first(*n), seed, seq, max)) co_return 7;
          rx.ack();
        }
        co_return seq == count ? 0 : 8;
      }());
    });
    REQUIRE(second.wait(30s) == 0);
    REQUIRE(producer.wait(30s) == 0);
  }
}

TEST_CASE("a receiver restarted on a mapped file resumes after the last acknowledged message",
          "[shm_ring][spsc][resume]") {
  temp_file file("ring-file");
  const auto layout = ipcoro::spsc_ring_layout(4096);
  ipcoro::ring_options opts;
  opts.manual_ack = true;
  {
    auto m = ipcoro::mapped_file::create(file.path(), layout, 0600, &ipcoro::format_spsc_ring);
    ipcoro::io_context ctx;
    ipcoro::sync_wait(ctx, [&]() -> task<void> {
      ipcoro::spsc_ring_sender tx(m.payload());
      for (std::uint64_t seq = 0; seq < 10; ++seq) co_await tx.send(std::as_bytes(std::span(&seq, 1)));
    }());
  }
  // Receives 0..9, acknowledges up to 7, then dies.
  child_process crashes([&] {
    auto m = ipcoro::mapped_file::open(file.path(), layout);
    ipcoro::spsc_ring_receiver rx(m.payload(), opts);
    return run([&]() -> task<int> {
      std::array<std::byte, 8> buf{};
      for (std::uint64_t seq = 0; seq < 10; ++seq) {
        if (co_await rx.receive(buf) != 8u || seq_of(buf) != seq) co_return 2;
        if (seq == 7) rx.ack();
      }
      ::raise(SIGKILL);
      co_return 1;
    }());
  });
  REQUIRE(crashes.wait(20s) == 128 + SIGKILL);

  auto drain = [&] {
    auto m = ipcoro::mapped_file::open(file.path(), layout);
    ipcoro::spsc_ring_receiver rx(m.payload(), opts);
    return run([&]() -> task<std::vector<std::uint64_t>> {
      std::vector<std::uint64_t> got;
      std::array<std::byte, 8> buf{};
      while (co_await rx.receive(buf).with_timeout(20s)) got.push_back(seq_of(buf));
      rx.ack();
      co_return got;
    }());
  };
  REQUIRE(drain() == std::vector<std::uint64_t>{8, 9});
  REQUIRE(drain().empty());  // acknowledged: never again
}

TEST_CASE("a corrupt or foreign ring header is refused", "[shm_ring][validation]") {
  shared_memory mem(ipcoro::spsc_ring_region_size(4096));

  // Never formatted.
  REQUIRE(error_of([&] { ipcoro::spsc_ring_receiver rx(mem.bytes()); }) == EINVAL);

  ipcoro::format_spsc_ring(mem.bytes());
  REQUIRE(error_of([&] { ipcoro::mpmc_ring_receiver rx(mem.bytes()); }) == EINVAL);  // wrong kind
  REQUIRE(error_of([&] { ipcoro::spsc_ring_receiver rx(mem.bytes().first(mem.bytes().size() - 64)); }) ==
          EINVAL);                                                                              // truncated
  REQUIRE(error_of([&] { ipcoro::spsc_ring_receiver rx(mem.bytes().subspan(8)); }) == EINVAL);  // misaligned

  // Every byte of the ring's description is covered: flipping any one is noticed.
  for (std::size_t i = 0; i < 56; ++i) {
    mem.bytes()[i] ^= std::byte{0x10};
    INFO("byte " << i << " flipped");
    REQUIRE(error_of([&] { ipcoro::spsc_ring_receiver rx(mem.bytes()); }) == EINVAL);
    mem.bytes()[i] ^= std::byte{0x10};
  }
  std::string what;
  mem.bytes()[0] ^= std::byte{1};
  try {
    ipcoro::spsc_ring_sender tx(mem.bytes());
  } catch (const std::system_error& e) {
    what = e.what();
  }
  REQUIRE_THAT(what, Catch::Contains("magic"));
  mem.bytes()[0] ^= std::byte{1};
  REQUIRE(error_of([&] { ipcoro::spsc_ring_receiver rx(mem.bytes()); }) == 0);
}

TEST_CASE("a peer scribbling over the ring cannot make this process touch memory outside it",
          "[shm_ring][validation]") {
  // Run under AddressSanitizer, an access outside the region would abort; here every
  // outcome must be a message, end of stream, a timeout, or a clear error.
  std::mt19937_64 rng(42);
  int detected = 0;
  for (const bool mpmc : {false, true}) {
    shared_memory mem(mpmc ? ipcoro::mpmc_ring_region_size(8, 256) : ipcoro::spsc_ring_region_size(4096));
    for (int round = 0; round < 100; ++round) {
      if (mpmc)
        ipcoro::format_mpmc_ring(mem.bytes(), 256);
      else
        ipcoro::format_spsc_ring(mem.bytes());
      {
        ipcoro::io_context ctx;
        ipcoro::sync_wait(ctx, [&]() -> task<void> {
          std::array<std::byte, 100> msg{};
          if (mpmc) {
            ipcoro::mpmc_ring_sender tx(mem.bytes());
            for (int i = 0; i < 5; ++i) co_await tx.send(msg);
          } else {
            ipcoro::spsc_ring_sender tx(mem.bytes());
            for (int i = 0; i < 5; ++i) co_await tx.send(msg);
            tx.detach();
          }
        }());
      }
      // Scribble over positions, flags, participants and data; keep the description.
      auto bytes = mem.bytes();
      const std::size_t scribbles = 1 + rng() % 16;
      for (std::size_t k = 0; k < scribbles; ++k) {
        // Half into the live part of the header (positions, flags, futex words, table).
        const std::size_t at = rng() % 2 ? 64 + rng() % 960 : 64 + rng() % (bytes.size() - 64 - 8);
        const std::uint64_t v = (rng() % 2) ? rng() : rng() % 8192;
        std::memcpy(bytes.data() + at - at % 8, &v, 8);
      }
      ipcoro::io_context ctx;
      ipcoro::sync_wait(ctx, [&]() -> task<void> {
        std::array<std::byte, 300> buf{};
        for (int i = 0; i < 8; ++i) {
          try {
            if (mpmc) {
              ipcoro::mpmc_ring_receiver rx(mem.bytes());
              (void)co_await rx.receive(buf).with_timeout(1ms);
              ipcoro::mpmc_ring_sender tx(mem.bytes());
              co_await tx.send(std::span(buf).first(rng() % 256)).with_timeout(1ms);
            } else {
              ipcoro::spsc_ring_receiver rx(mem.bytes());
              (void)co_await rx.receive(buf).with_timeout(1ms);
              rx.detach();
              ipcoro::spsc_ring_sender tx(mem.bytes());
              co_await tx.send(std::span(buf).first(rng() % 1000)).with_timeout(1ms);
              tx.detach();
            }
          } catch (const ipcoro::timed_out&) {
          } catch (const std::system_error& e) {
            const int err = e.code().value();
            if (err == EBADMSG) ++detected;
            if (err != EBADMSG && err != EMSGSIZE && err != EPIPE && err != EBUSY && err != EUSERS &&
                err != ECONNRESET) {
              FAIL("unexpected error: " << e.what());
            }
          }
        }
      }());
    }
  }
  REQUIRE(detected > 0);  // corruption was seen and reported, not just survived
}

// ---- MPMC ----

TEST_CASE("several producer and consumer processes deliver every message exactly once", "[shm_ring][mpmc]") {
  constexpr int producers = 3;
  constexpr int consumers = 3;
  constexpr std::uint64_t per_producer = 4000;
  constexpr std::size_t max = 200;
  const std::size_t region_size = ipcoro::mpmc_ring_region_size(32, max);
  shared_memory mem(region_size);
  ipcoro::format_mpmc_ring(mem.bytes(), max);
  // One delivery counter per message, in shared memory.
  shared_memory counts(producers * per_producer);

  std::vector<child_process> children;
  for (int p = 0; p < producers; ++p) {
    children.emplace_back([&, p] {
      return run([&]() -> task<int> {
        ipcoro::mpmc_ring_sender tx(mem.bytes());
        std::vector<std::byte> buf;
        for (std::uint64_t i = 0; i < per_producer; ++i) {
          const std::uint64_t seq = static_cast<std::uint64_t>(p) * per_producer + i;
          co_await tx.send(make_message(buf, seed, seq, max, 8)).with_timeout(20s);
        }
        co_return 0;
      }());
    });
  }
  std::vector<child_process> receivers;
  for (int c = 0; c < consumers; ++c) {
    receivers.emplace_back([&] {
      return run([&]() -> task<int> {
        ipcoro::mpmc_ring_receiver rx(mem.bytes());
        std::vector<std::byte> buf(max);
        std::array<std::int64_t, producers> last;
        last.fill(-1);
        while (auto n = co_await rx.receive(buf).with_timeout(20s)) {
          const auto msg = std::span(buf).first(*n);
          const std::uint64_t seq = seq_of(msg);
          if (seq >= producers * per_producer || !is_message(msg, seed, seq, max, 8)) co_return 3;
          counts.at<std::atomic<std::uint8_t>>(seq).fetch_add(1);
          // From one producer, one consumer sees increasing numbers (the ring is FIFO).
          const auto p = static_cast<std::size_t>(seq / per_producer);
          if (static_cast<std::int64_t>(seq) <= last[p]) co_return 4;
          last[p] = static_cast<std::int64_t>(seq);
        }
        co_return 0;
      }());
    });
  }
  for (auto& child : children) REQUIRE(child.wait(60s) == 0);
  ipcoro::mpmc_ring_sender(mem.bytes()).close();  // every producer is done: end of stream
  for (auto& child : receivers) REQUIRE(child.wait(60s) == 0);
  std::uint64_t once = 0;
  for (std::uint64_t s = 0; s < producers * per_producer; ++s) {
    once += counts.at<std::atomic<std::uint8_t>>(s).load() == 1 ? 1 : 0;
  }
  REQUIRE(once == producers * per_producer);
}

TEST_CASE("MPMC receivers learn that every sender died, and senders that every receiver died",
          "[shm_ring][mpmc][dead-peer]") {
  shared_memory mem(ipcoro::mpmc_ring_region_size(4, 64));
  ipcoro::format_mpmc_ring(mem.bytes(), 64);
  auto [ready_r, ready_w] = ipcoro::make_pipe();
  ipcoro::ring_options opts;
  opts.liveness_check_interval = 20ms;
  const bool senders_die = GENERATE(true, false);

  std::vector<child_process> peers;
  for (int i = 0; i < 2; ++i) {
    peers.emplace_back([&, &ready_w = ready_w] {
      std::optional<ipcoro::mpmc_ring_sender> tx;
      std::optional<ipcoro::mpmc_ring_receiver> rx;
      if (senders_die)
        tx.emplace(mem.bytes());
      else
        rx.emplace(mem.bytes());
      send_byte(ready_w.native_handle());
      ::pause();
      return 1;
    });
    // One after the other, so that peers[1] holds the later entry of the table (the pid
    // checked below is the one of the last entry found dead).
    REQUIRE(wait_byte(ready_r.native_handle(), 20s));
  }
  peers[0].kill(SIGKILL);
  REQUIRE(peers[0].wait(20s) == 128 + SIGKILL);
  ipcoro::io_context ctx;
  // One peer of the other side is still alive: a wait goes on (until its own timeout).
  ipcoro::sync_wait(ctx, [&]() -> task<void> {
    std::array<std::byte, 64> buf{};
    if (senders_die) {
      ipcoro::mpmc_ring_receiver rx(mem.bytes(), opts);
      {
        bool threw = false;
        try {
          (void)co_await rx.receive(buf).with_timeout(100ms);
        } catch (const ipcoro::timed_out&) {
          threw = true;
        }
        REQUIRE(threw);
      }
    } else {
      ipcoro::mpmc_ring_sender tx(mem.bytes(), opts);
      for (int i = 0; i < 4; ++i) co_await tx.send(buf);
      {
        bool threw = false;
        try {
          (void)co_await tx.send(buf).with_timeout(100ms);
        } catch (const ipcoro::timed_out&) {
          threw = true;
        }
        REQUIRE(threw);
      }
    }
  }());
  peers[1].kill(SIGKILL);
  ipcoro::sync_wait(ctx, [&]() -> task<void> {
    std::array<std::byte, 64> buf{};
    pid_t dead = 0;
    try {
      if (senders_die) {
        ipcoro::mpmc_ring_receiver rx(mem.bytes(), opts);
        (void)co_await rx.receive(buf).with_timeout(20s);
      } else {
        ipcoro::mpmc_ring_sender tx(mem.bytes(), opts);
        co_await tx.send(buf).with_timeout(20s);
      }
    } catch (const ipcoro::peer_died& e) {
      dead = e.pid();
    }
    REQUIRE(dead == peers[1].pid());
  }());
}

TEST_CASE("an MPMC endpoint attaching after the whole other side was killed learns that it died",
          "[shm_ring][mpmc][dead-peer]") {
  // The dead peer's entry in the participants table is the only trace of it: attaching must
  // not take it over, or the newcomer would wait for a peer it believes has not come yet.
  shared_memory mem(ipcoro::mpmc_ring_region_size(4, 64));
  ipcoro::format_mpmc_ring(mem.bytes(), 64);
  auto [ready_r, ready_w] = ipcoro::make_pipe();
  ipcoro::ring_options opts;
  opts.liveness_check_interval = 20ms;
  const bool sender_dies = GENERATE(true, false);

  child_process peer([&, &ready_w = ready_w] {
    std::optional<ipcoro::mpmc_ring_sender> tx;
    std::optional<ipcoro::mpmc_ring_receiver> rx;
    if (sender_dies)
      tx.emplace(mem.bytes());
    else
      rx.emplace(mem.bytes());
    send_byte(ready_w.native_handle());
    ::pause();
    return 1;
  });
  REQUIRE(wait_byte(ready_r.native_handle(), 20s));
  peer.kill(SIGKILL);
  REQUIRE(peer.wait(20s) == 128 + SIGKILL);
  ipcoro::io_context ctx;
  ipcoro::sync_wait(ctx, [&]() -> task<void> {
    std::array<std::byte, 64> buf{};
    pid_t dead = 0;
    try {
      if (sender_dies) {
        ipcoro::mpmc_ring_receiver rx(mem.bytes(), opts);
        (void)co_await rx.receive(buf).with_timeout(20s);
      } else {
        ipcoro::mpmc_ring_sender tx(mem.bytes(), opts);
        for (std::size_t i = 0; i < tx.capacity(); ++i) co_await tx.send(buf).with_timeout(20s);
        co_await tx.send(buf).with_timeout(20s);
      }
    } catch (const ipcoro::peer_died& e) {
      dead = e.pid();
    }
    REQUIRE(dead == peer.pid());
  }());
}

TEST_CASE(
    "SIGKILL of MPMC senders at random points: every message whose send completed is received once, intact",
    "[shm_ring][mpmc][sigkill]") {
  // The test below makes a process die inside a send or receive on purpose; here the
  // kills fall wherever the senders happen to be.
  constexpr std::size_t size = 32 * 1024;
  constexpr int senders = 2;
  constexpr int receivers = 2;
  constexpr std::uint64_t max_seq = 1 << 16;
  std::mt19937_64 rng(std::random_device{}());
  for (int round = 0; round < 5; ++round) {
    shared_memory mem(ipcoro::mpmc_ring_region_size(8, size));
    ipcoro::format_mpmc_ring(mem.bytes(), size);
    // Per sender: how many of its sends completed, and how often each message arrived.
    shared_memory notes(4096 + senders * max_seq);
    auto completed = [&](int p) -> std::atomic<std::uint64_t>& {
      return notes.at<std::atomic<std::uint64_t>>(64 * p);
    };
    auto arrivals = [&](int p, std::uint64_t seq) -> std::atomic<std::uint8_t>& {
      return notes.at<std::atomic<std::uint8_t>>(4096 + static_cast<std::size_t>(p) * max_seq + seq);
    };
    const std::uint64_t kill_after = 20 + rng() % 300;
    auto [progress_r, progress_w] = ipcoro::make_pipe();
    ipcoro::ring_options opts;
    opts.liveness_check_interval = 20ms;

    std::vector<child_process> producers;
    for (int p = 0; p < senders; ++p) {
      producers.emplace_back([&, p] {
        return run([&]() -> task<int> {
          ipcoro::mpmc_ring_sender tx(mem.bytes());
          std::vector<std::byte> msg(size);
          ipcoro::test::fill_pattern(msg, seed + static_cast<std::uint64_t>(p), 0);
          for (std::uint64_t seq = 0; seq < max_seq; ++seq) {
            // The sender and number at both ends: a torn message would not match.
            const std::uint64_t tag = (static_cast<std::uint64_t>(p) << 56) | seq;
            std::memcpy(msg.data(), &tag, 8);
            std::memcpy(msg.data() + size - 8, &tag, 8);
            co_await tx.send(msg).with_timeout(20s);
            completed(p).store(seq + 1);
          }
          co_return 0;
        }());
      });
    }
    std::vector<child_process> consumers;
    for (int c = 0; c < receivers; ++c) {
      consumers.emplace_back([&, c, &progress_w = progress_w] {
        return run([&]() -> task<int> {
          ipcoro::mpmc_ring_receiver rx(mem.bytes(), opts);
          std::vector<std::byte> buf(size);
          std::array<std::vector<std::byte>, senders> expected;
          for (int p = 0; p < senders; ++p) {
            expected[p].resize(size);
            ipcoro::test::fill_pattern(expected[p], seed + static_cast<std::uint64_t>(p), 0);
          }
          std::uint64_t received = 0;
          try {
            for (;;) {
              const auto n = co_await rx.receive(buf).with_timeout(20s);
              if (!n || *n != size) co_return 2;
              std::uint64_t head = 0;
              std::uint64_t tail = 0;
              std::memcpy(&head, buf.data(), 8);
              std::memcpy(&tail, buf.data() + size - 8, 8);
              const auto p = static_cast<int>(head >> 56);
              const std::uint64_t seq = head & ((std::uint64_t{1} << 56) - 1);
              if (head != tail || p >= senders || seq >= max_seq) co_return 3;
              // Checking every byte of every message would make the receivers the slow side.
              if (seq % 16 == 0 && !std::equal(buf.begin() + 8, buf.end() - 8, expected[p].begin() + 8))
                co_return 3;
              arrivals(p, seq).fetch_add(1);
              if (++received == kill_after && c == 0) send_byte(progress_w.native_handle());
            }
          } catch (const ipcoro::peer_died&) {
          }
          co_return 0;
        }());
      });
    }
    REQUIRE(wait_byte(progress_r.native_handle(), 20s));
    for (auto& p : producers) p.kill(SIGKILL);
    for (auto& c : consumers) REQUIRE(c.wait(30s) == 0);
    for (int p = 0; p < senders; ++p) {
      const std::uint64_t done = completed(p).load();
      std::uint64_t once = 0;
      std::uint64_t more = 0;
      for (std::uint64_t seq = 0; seq < max_seq; ++seq) {
        const unsigned n = arrivals(p, seq).load();
        if (seq < done) once += n == 1 ? 1 : 0;
        more += n > 1 ? 1 : 0;
      }
      INFO("sender " << p << " completed " << done << " sends");
      REQUIRE(once == done);  // every completed send arrived exactly once
      REQUIRE(more == 0);     // nothing arrived twice
    }
  }
}

namespace {
/// Memory whose second page faults: a copy that runs into it dies there, in the middle of a
/// send or receive, by SIGKILL (the child turns the fault into one).
class half_mapped {
 public:
  half_mapped() {
    void* p = ::mmap(nullptr, 2 * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) throw std::system_error(errno, std::system_category(), "mmap");
    data_ = static_cast<std::byte*>(p);
    ::mprotect(data_ + page, page, PROT_NONE);
  }
  ~half_mapped() { ::munmap(data_, 2 * page); }
  half_mapped(const half_mapped&) = delete;
  half_mapped& operator=(const half_mapped&) = delete;
  /// `size` bytes of which the last `size - 64` are unmapped... from byte 64 on they fault.
  std::span<std::byte> crossing(std::size_t size) const noexcept { return {data_ + page - 64, size}; }
  static void die_on_fault() {
    struct sigaction sa {};
    sa.sa_handler = [](int) { ::kill(::getpid(), SIGKILL); };
    ::sigaction(SIGSEGV, &sa, nullptr);
  }

 private:
  static constexpr std::size_t page = 4096;
  std::byte* data_;
};
}  // namespace

TEST_CASE("a slot left half-written or half-read by a process that died is released",
          "[shm_ring][mpmc][dead-peer]") {
  shared_memory mem(ipcoro::mpmc_ring_region_size(2, 1024));
  ipcoro::format_mpmc_ring(mem.bytes(), 1024);
  ipcoro::ring_options opts;
  opts.liveness_check_interval = 20ms;
  ipcoro::io_context ctx;

  SECTION("a sender that died while copying in: receivers skip its slot") {
    child_process dies([&] {
      half_mapped source;
      half_mapped::die_on_fault();
      return run([&]() -> task<int> {
        ipcoro::mpmc_ring_sender tx(mem.bytes());
        const std::uint64_t zero = 0;
        co_await tx.send(std::as_bytes(std::span(&zero, 1)));
        co_await tx.send(source.crossing(1024));  // claims slot 1, dies copying
        co_return 1;
      }());
    });
    REQUIRE(dies.wait(20s) == 128 + SIGKILL);
    ipcoro::sync_wait(ctx, [&]() -> task<void> {
      ipcoro::mpmc_ring_receiver rx(mem.bytes(), opts);
      ipcoro::mpmc_ring_sender tx(mem.bytes(), opts);  // a live sender: no peer_died
      std::array<std::byte, 1024> buf{};
      const auto first = co_await rx.receive(buf).with_timeout(20s);
      REQUIRE(first == 8u);
      REQUIRE(seq_of(buf) == 0);
      // Published after the abandoned slot; blocked behind it until it is released.
      const std::uint64_t two = 2;
      co_await tx.send(std::as_bytes(std::span(&two, 1))).with_timeout(20s);
      const auto next = co_await rx.receive(buf).with_timeout(20s);
      REQUIRE(next == 8u);
      REQUIRE(seq_of(buf) == 2);
    }());
  }

  SECTION("a receiver that died while copying out: senders reuse its slot") {
    ipcoro::sync_wait(ctx, [&]() -> task<void> {
      ipcoro::mpmc_ring_sender tx(mem.bytes(), opts);
      std::array<std::byte, 1024> msg{};
      co_await tx.send(msg);  // slot 0, taken by the receiver below
    }());
    child_process dies([&] {
      half_mapped target;
      half_mapped::die_on_fault();
      return run([&]() -> task<int> {
        ipcoro::mpmc_ring_receiver rx(mem.bytes());
        (void)co_await rx.receive(target.crossing(1024));  // claims slot 0, dies copying
        co_return 1;
      }());
    });
    REQUIRE(dies.wait(20s) == 128 + SIGKILL);
    ipcoro::sync_wait(ctx, [&]() -> task<void> {
      ipcoro::mpmc_ring_receiver rx(mem.bytes(), opts);  // a live receiver: no peer_died
      ipcoro::mpmc_ring_sender tx(mem.bytes(), opts);
      for (std::uint64_t seq = 1; seq <= 2; ++seq) {
        co_await tx.send(std::as_bytes(std::span(&seq, 1))).with_timeout(20s);  // 2 waits for slot 0
      }
      std::array<std::byte, 1024> buf{};
      for (std::uint64_t seq = 1; seq <= 2; ++seq) {
        const auto n = co_await rx.receive(buf).with_timeout(20s);
        REQUIRE(n == 8u);
        REQUIRE(seq_of(buf) == seq);
      }
    }());
  }
}

TEST_CASE("MPMC close ends the stream for every receiver after the ring is drained, and refuses sends",
          "[shm_ring][mpmc][close]") {
  shared_memory mem(ipcoro::mpmc_ring_region_size(8, 32));
  ipcoro::format_mpmc_ring(mem.bytes(), 32);
  ipcoro::io_context ctx;
  ipcoro::sync_wait(ctx, [&]() -> task<void> {
    ipcoro::mpmc_ring_sender tx(mem.bytes());
    ipcoro::mpmc_ring_receiver a(mem.bytes());
    ipcoro::mpmc_ring_receiver b(mem.bytes());
    for (std::uint64_t seq = 0; seq < 5; ++seq) co_await tx.send(std::as_bytes(std::span(&seq, 1)));
    tx.close();
    int err = 0;
    try {
      co_await tx.send(std::span<const std::byte>{});
    } catch (const std::system_error& e) {
      err = e.code().value();
    }
    REQUIRE(err == EPIPE);
    std::array<std::byte, 32> buf{};
    for (std::uint64_t seq = 0; seq < 5; ++seq) {
      {
        const auto got = co_await (seq % 2 ? a : b).receive(buf);
        REQUIRE(got == 8u);
      }
      REQUIRE(seq_of(buf) == seq);
    }
    {
      const auto got = co_await a.receive(buf).with_timeout(5s);
      REQUIRE_FALSE(got);
    }
    {
      const auto got = co_await b.receive(buf).with_timeout(5s);
      REQUIRE_FALSE(got);
    }
  }());
}

// ---- steady state ----

TEST_CASE("steady-state sends and receives allocate nothing, sleeps included", "[shm_ring][alloc]") {
  shared_memory spsc(ipcoro::spsc_ring_region_size(4096));
  shared_memory mpmc(ipcoro::mpmc_ring_region_size(8, 64));
  ipcoro::format_spsc_ring(spsc.bytes());
  ipcoro::format_mpmc_ring(mpmc.bytes(), 64);
  ipcoro::io_context ctx;
  ipcoro::spsc_ring_sender ping_tx(spsc.bytes());
  ipcoro::spsc_ring_receiver ping_rx(spsc.bytes());
  ipcoro::mpmc_ring_sender pong_tx(mpmc.bytes());
  ipcoro::mpmc_ring_receiver pong_rx(mpmc.bytes());
  std::uint64_t measured = ~0ull;
  constexpr int warm_up = 50;
  constexpr int rounds = 500;

  // Each side finds its ring empty and sleeps before every message: the other side wakes it.
  auto echo = [&]() -> task<void> {
    std::array<std::byte, 64> buf{};
    while (auto n = co_await ping_rx.receive(buf).with_timeout(20s))
      co_await pong_tx.send(std::span(buf).first(*n));
  };
  auto ask = [&]() -> task<void> {
    std::array<std::byte, 64> out{};
    std::array<std::byte, 64> in{};
    std::uint64_t before = 0;
    for (int i = 0; i < warm_up + rounds; ++i) {
      if (i == warm_up) before = ipcoro::test::allocations();
      co_await ping_tx.send(out);
      if (co_await pong_rx.receive(in).with_timeout(20s) != out.size())
        throw std::runtime_error("short reply");
    }
    measured = ipcoro::test::allocations() - before;
    ping_tx.close();
  };
  ipcoro::sync_wait(ctx, [&]() -> task<void> {
    co_await ipcoro::with_scope([&](ipcoro::scope& s) -> task<void> {
      s.spawn(echo());
      s.spawn(ask());
      co_return;
    });
  }());
  REQUIRE(measured == 0);
}

TEST_CASE("try_send and try_receive move what fits without waiting, across processes, SPSC and MPMC",
          "[ring]") {
  const bool mpmc = GENERATE(false, true);
  CAPTURE(mpmc);
  const std::size_t size = mpmc ? ipcoro::mpmc_ring_region_size(8, 64) : ipcoro::spsc_ring_region_size(4096);
  shared_memory mem(size);
  if (mpmc) {
    ipcoro::format_mpmc_ring(mem.bytes(), 64);
  } else {
    ipcoro::format_spsc_ring(mem.bytes());
  }
  ipcoro::test::handshake filled;
  ipcoro::test::handshake drained;
  // The child fills the ring with try_send until it says "full", then (once the parent
  // has drained it) sends one more and closes; the exit code tells how many went in.
  auto fill = [&](auto tx) {
    std::array<std::byte, 40> m{};
    int sent = 0;
    for (; sent < 1000; ++sent) {
      m[0] = static_cast<std::byte>(sent);
      if (!tx.try_send(m)) break;
    }
    filled.signal();
    if (!drained.wait() || !tx.try_send(m)) return 255;  // drained: room again
    tx.close();
    return sent;
  };
  ipcoro::test::child_process child([&] {
    if (mpmc) return fill(ipcoro::mpmc_ring_sender(mem.bytes()));
    return fill(ipcoro::spsc_ring_sender(mem.bytes()));
  });
  auto drain = [&](auto& rx) {
    std::array<std::byte, 64> buf{};
    REQUIRE(filled.wait());
    int got = 0;
    for (;;) {
      const ipcoro::ring_try_result r = rx.try_receive(buf);
      if (r.would_block) break;
      REQUIRE(r.size == std::optional<std::size_t>(40));
      CHECK(buf[0] == static_cast<std::byte>(got));
      ++got;
    }
    drained.signal();
    const int sent = child.wait();
    CHECK(sent == got);
    CHECK(got > 1);
    // The last message, then the end of the stream: both without waiting.
    CHECK(rx.try_receive(buf).size == std::optional<std::size_t>(40));
    const ipcoro::ring_try_result end = rx.try_receive(buf);
    CHECK_FALSE(end.would_block);
    CHECK_FALSE(end.size.has_value());
  };
  if (mpmc) {
    ipcoro::mpmc_ring_receiver rx(mem.bytes());
    drain(rx);
  } else {
    ipcoro::spsc_ring_receiver rx(mem.bytes());
    drain(rx);
  }
}

TEST_CASE("an SPSC sender that holds publication shows nothing until publish, 4 KiB, a full ring or close",
          "[ring]") {
  const int how = GENERATE(0, 1, 2, 3);  // publish, 4 KiB held, ring full, close
  CAPTURE(how);
  // What the ring holds in the end: 85, one more, as many as fit (16384 / 48), 85.
  const int expected = how == 1 ? 86 : how == 2 ? 341 : 85;
  shared_memory mem(ipcoro::spsc_ring_region_size(16384));
  ipcoro::format_spsc_ring(mem.bytes());
  ipcoro::test::handshake held;
  ipcoro::test::handshake looked;
  // The child sends under hold_publication and says how many went in; the parent looks
  // at the ring between the sends and what ends the hold.
  ipcoro::test::child_process child([&] {
    ipcoro::spsc_ring_sender tx(mem.bytes());
    std::array<std::byte, 40> m{};  // 48-byte records
    tx.hold_publication();
    int sent = 0;
    const int before_limit = 4096 / 48;  // 85 records (4080 bytes) stay under 4 KiB
    for (; sent < before_limit; ++sent) {
      m[0] = static_cast<std::byte>(sent);
      if (!tx.try_send(m)) return 255;
    }
    held.signal();
    if (!looked.wait()) return 254;
    if (how == 0) tx.publish();
    if (how == 1) {  // the next record reaches 4 KiB held: published with the others
      m[0] = static_cast<std::byte>(sent++);
      if (!tx.try_send(m)) return 253;
    }
    if (how == 2) {  // fill the ring: the send that finds it full publishes what is held
      tx.hold_publication();
      for (; sent < 1000; ++sent) {
        m[0] = static_cast<std::byte>(sent);
        if (!tx.try_send(m)) break;
      }
    }
    if (how == 3) tx.close();
    held.signal();
    if (!looked.wait()) return 252;
    tx.close();
    return sent == expected ? 0 : 1;
  });
  ipcoro::spsc_ring_receiver rx(mem.bytes());
  std::array<std::byte, 64> buf{};
  REQUIRE(held.wait());
  CHECK(rx.try_receive(buf).would_block);  // 85 records written, none published
  looked.signal();
  REQUIRE(held.wait());
  int got = 0;
  for (;;) {
    const ipcoro::ring_try_result r = rx.try_receive(buf);
    if (r.would_block || !r.size) break;
    CHECK(buf[0] == static_cast<std::byte>(got));
    ++got;
  }
  CHECK(got == expected);  // all of them, once what ends the hold came
  looked.signal();
  CHECK(child.wait() == 0);
  for (;;) {
    const ipcoro::ring_try_result r = rx.try_receive(buf);
    if (r.would_block) continue;
    if (!r.size) break;
    ++got;
  }
  CHECK(got == expected);  // and nothing more before the end
}
