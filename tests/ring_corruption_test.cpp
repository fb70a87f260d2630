// SPDX-License-Identifier: MIT
// MPMC rings a hostile process scribbles on: a corrupt position or slot word is an EBADMSG, never a stall.
#include "ipcoro/error.hpp"
#include "ipcoro/io_context.hpp"
#include "ipcoro/shm_ring.hpp"
#include "ipcoro/sync_wait.hpp"
#include "ipcoro/task.hpp"

#include "process.hpp"
#include "shared_memory.hpp"

#include <catch2/catch.hpp>

#include <fcntl.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <array>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <new>
#include <optional>
#include <random>
#include <span>
#include <string>
#include <system_error>
#include <vector>

namespace {

using namespace std::chrono_literals;
using ipcoro::task;
using ipcoro::test::child_process;

using ipcoro::test::shared_memory;

/// A one-way "go" over a pipe, with a bound on the wait (a child that died never signals).
class signal_pipe {
 public:
  signal_pipe() {
    if (::pipe2(fds_, O_CLOEXEC) != 0) throw std::system_error(errno, std::system_category(), "pipe2");
  }
  ~signal_pipe() {
    ::close(fds_[0]);
    ::close(fds_[1]);
  }
  signal_pipe(const signal_pipe&) = delete;
  signal_pipe& operator=(const signal_pipe&) = delete;
  void signal() const noexcept { [[maybe_unused]] const ssize_t n = ::write(fds_[1], "x", 1); }
  bool wait(std::chrono::milliseconds timeout) const noexcept {
    ::pollfd p{fds_[0], POLLIN, 0};
    if (::poll(&p, 1, static_cast<int>(timeout.count())) != 1) return false;
    char c;
    return ::read(fds_[0], &c, 1) == 1;
  }

 private:
  int fds_[2] = {-1, -1};
};

// The ring under test, and where lib/ring/layout.hpp keeps its words (asserted there).
constexpr std::size_t slots = 8;
constexpr std::size_t max_message = 64;
constexpr std::size_t slot_stride = 128;  // mpmc_stride(64): a 16-byte slot header and 64 bytes, in lines
constexpr std::size_t tail_offset = 192;
constexpr std::size_t head_offset = 256;
constexpr std::size_t data_event_offset = 320;   // receivers sleep on this futex word
constexpr std::size_t space_event_offset = 384;  // senders sleep on this one

constexpr auto check_interval = 50ms;
// One liveness check interval, and slack for a loaded machine (sanitizers, two CPUs).
constexpr auto bound = check_interval + 950ms;

std::atomic<std::uint64_t>& tail_of(const shared_memory& m) {
  return m.at<std::atomic<std::uint64_t>>(tail_offset);
}
std::atomic<std::uint64_t>& head_of(const shared_memory& m) {
  return m.at<std::atomic<std::uint64_t>>(head_offset);
}
std::atomic<std::uint64_t>& slot_word(const shared_memory& m, std::uint64_t pos) {
  return m.at<std::atomic<std::uint64_t>>(ipcoro::ring_header_size + (pos % slots) * slot_stride);
}

ipcoro::ring_options options() {
  ipcoro::ring_options o;
  o.liveness_check_interval = check_interval;
  return o;
}

/// Runs `t` on a fresh io_context (for children).
template <class T>
T run(task<T> t) {
  ipcoro::io_context ctx;
  return ipcoro::sync_wait(ctx, std::move(t));
}

enum class field { tail, head, slot };
enum class pattern { ahead, behind, random };

const char* name_of(field f) { return f == field::tail ? "tail" : (f == field::head ? "head" : "slot"); }
const char* name_of(pattern p) {
  return p == pattern::ahead ? "far ahead" : (p == pattern::behind ? "behind" : "random");
}

/// A new, impossible value for the position `pos` (tail or head), or for the word of the
/// slot of position `pos`.
std::uint64_t garbage(field f, pattern p, std::uint64_t pos, std::mt19937_64& rng) {
  if (f != field::slot) {
    if (p == pattern::ahead) return pos + 1000 * slots + 3;
    if (p == pattern::behind) return pos - (5 * slots + 3);
    return rng();
  }
  // The sequence of a slot free for a position many laps away, unclaimed: every residue
  // check passes; only the positions tell that it is impossible.
  if (p == pattern::ahead) return static_cast<std::uint32_t>(pos + 1000 * slots);
  if (p == pattern::behind) return static_cast<std::uint32_t>(pos - 3 * slots);
  return rng();
}

/// What a victim process saw (its exit code).
enum verdict : int { reported = 0, hung = 1, other_error = 2, unnamed = 3, no_error = 4 };

/// Whether `e` reports the corruption of `f`; prints what it got otherwise.
verdict judge(const std::system_error& e, field f, const char* who) {
  const std::string what = e.what();
  if (dynamic_cast<const ipcoro::timed_out*>(&e) != nullptr) {
    std::fprintf(stderr, "%s: no error within the bound: the ring stalled\n", who);
    return hung;
  }
  if (e.code().value() != EBADMSG) {
    std::fprintf(stderr, "%s: unexpected error: %s\n", who, what.c_str());
    return other_error;
  }
  const bool named = f == field::slot ? what.find("mpmc slot ") != std::string::npos
                                      : what.find("mpmc tail ") != std::string::npos &&
                                            what.find(" head ") != std::string::npos;
  if (!named || what.find("shm ring is corrupt: ") == std::string::npos) {
    std::fprintf(stderr, "%s: EBADMSG does not name the %s: %s\n", who, name_of(f), what.c_str());
    return unnamed;
  }
  return reported;
}

/// Moves the ring's positions away from 0 (and out of step with the slot indices).
void advance(const shared_memory& mem, std::uint64_t messages) {
  run([&]() -> task<int> {
    ipcoro::mpmc_ring_sender tx(mem.bytes());
    ipcoro::mpmc_ring_receiver rx(mem.bytes());
    std::array<std::byte, max_message> buf{};
    for (std::uint64_t i = 0; i < messages; ++i) {
      co_await tx.send(std::span(buf).first(8));
      (void)co_await rx.receive(buf);
    }
    co_return 0;
  }());
}

/// Waits (bounded) until a sleeper announced itself on the futex word at `offset`.
bool sleeper_announced(const shared_memory& mem, std::size_t offset) {
  const auto give_up = std::chrono::steady_clock::now() + 20s;
  while ((mem.at<std::atomic<std::uint32_t>>(offset).load() & 1u) == 0) {
    if (std::chrono::steady_clock::now() > give_up) return false;
    ::sched_yield();
  }
  return true;
}

}  // namespace

TEST_CASE("a corrupt MPMC tail, head or slot word wakes a sleeping side with EBADMSG naming it",
          "[ring_corruption][asleep]") {
  const field f = GENERATE(field::tail, field::head, field::slot);
  const pattern p = GENERATE(pattern::ahead, pattern::behind, pattern::random);
  const bool sender_sleeps = GENERATE(true, false);
  INFO(name_of(f) << " " << name_of(p) << ", the " << (sender_sleeps ? "sender" : "receiver") << " asleep");
  shared_memory mem(ipcoro::mpmc_ring_region_size(slots, max_message));
  ipcoro::format_mpmc_ring(mem.bytes(), max_message);
  advance(mem, 37 * slots + 3);

  child_process victim([&] {
    return run([&]() -> task<int> {
      std::array<std::byte, max_message> buf{};
      verdict v = no_error;
      try {
        if (sender_sleeps) {
          ipcoro::mpmc_ring_sender tx(mem.bytes(), options());
          for (std::size_t i = 0; i < slots; ++i) co_await tx.send(buf);  // full: the next send sleeps
          co_await tx.send(buf).with_timeout(bound);
        } else {
          ipcoro::mpmc_ring_receiver rx(mem.bytes(), options());
          (void)co_await rx.receive(buf).with_timeout(bound);
        }
      } catch (const std::system_error& e) {
        v = judge(e, f, "the sleeping side");
      }
      co_return v;
    }());
  });
  // The scribbler waits until the victim sleeps (its futex word announces it), then strikes.
  child_process hostile([&] {
    if (!sleeper_announced(mem, sender_sleeps ? space_event_offset : data_event_offset)) return 1;
    std::mt19937_64 rng(0x5eed + static_cast<int>(f) * 3 + static_cast<int>(p));
    if (f == field::tail) {
      tail_of(mem).store(garbage(f, p, tail_of(mem).load(), rng));
    } else if (f == field::head) {
      head_of(mem).store(garbage(f, p, head_of(mem).load(), rng));
    } else {
      const std::uint64_t pos = sender_sleeps ? tail_of(mem).load() : head_of(mem).load();
      slot_word(mem, pos).store(garbage(f, p, pos, rng));
    }
    return 0;
  });
  REQUIRE(hostile.wait(30s) == 0);
  REQUIRE(victim.wait(30s) == reported);
}

TEST_CASE("a process polling try_send or try_receive on a corrupt MPMC ring gets EBADMSG, not 'full' forever",
          "[ring_corruption][poll]") {
  const field f = GENERATE(field::tail, field::head, field::slot);
  const pattern p = GENERATE(pattern::ahead, pattern::behind, pattern::random);
  const bool sender_polls = GENERATE(true, false);
  INFO(name_of(f) << " " << name_of(p) << ", the " << (sender_polls ? "sender" : "receiver") << " polling");
  shared_memory mem(ipcoro::mpmc_ring_region_size(slots, max_message));
  ipcoro::format_mpmc_ring(mem.bytes(), max_message);
  advance(mem, 37 * slots + 3);
  signal_pipe polling;

  child_process victim([&] {
    return run([&]() -> task<int> {
      std::array<std::byte, max_message> buf{};
      verdict v = no_error;
      try {
        // Never waits: a polling loop, bounded by its own clock.
        std::optional<ipcoro::mpmc_ring_sender> tx;
        std::optional<ipcoro::mpmc_ring_receiver> rx;
        if (sender_polls) {
          tx.emplace(mem.bytes(), options());
          for (std::size_t i = 0; i < slots; ++i) co_await tx->send(buf);  // full
        } else {
          rx.emplace(mem.bytes(), options());
        }
        polling.signal();
        const auto give_up = std::chrono::steady_clock::now() + 2 * bound;
        v = hung;
        while (v == hung && std::chrono::steady_clock::now() < give_up) {
          if (sender_polls ? tx->try_send(buf) : !rx->try_receive(buf).would_block) v = no_error;
        }
        std::fprintf(stderr, "the polling side: %s\n", v == hung ? "still full (empty)" : "no error");
      } catch (const std::system_error& e) {
        v = judge(e, f, "the polling side");
      }
      co_return v;
    }());
  });
  REQUIRE(polling.wait(30s));
  child_process hostile([&] {
    std::mt19937_64 rng(0xf00 + static_cast<int>(f) * 3 + static_cast<int>(p));
    if (f == field::tail) {
      tail_of(mem).store(garbage(f, p, tail_of(mem).load(), rng));
    } else if (f == field::head) {
      head_of(mem).store(garbage(f, p, head_of(mem).load(), rng));
    } else {
      const std::uint64_t pos = sender_polls ? tail_of(mem).load() : head_of(mem).load();
      slot_word(mem, pos).store(garbage(f, p, pos, rng));
    }
    return 0;
  });
  REQUIRE(hostile.wait(30s) == 0);
  REQUIRE(victim.wait(30s) == reported);
}

TEST_CASE("a corrupt MPMC tail, head or slot word mid-stream stops the sender and the receiver with EBADMSG",
          "[ring_corruption][traffic]") {
  const field f = GENERATE(field::tail, field::head, field::slot);
  const pattern p = GENERATE(pattern::ahead, pattern::behind, pattern::random);
  INFO(name_of(f) << " " << name_of(p) << ", while messages flow");
  shared_memory mem(ipcoro::mpmc_ring_region_size(slots, max_message));
  ipcoro::format_mpmc_ring(mem.bytes(), max_message);
  shared_memory finished(sizeof(std::atomic<std::uint32_t>));
  signal_pipe flowing;

  const auto victim = [&](bool sender) {
    return child_process([&, sender] {
      const int v = run([&]() -> task<int> {
        std::array<std::byte, max_message> buf{};
        verdict got = no_error;
        try {
          if (sender) {
            ipcoro::mpmc_ring_sender tx(mem.bytes(), options());
            for (;;) co_await tx.send(std::span(buf).first(16)).with_timeout(bound);
          } else {
            ipcoro::mpmc_ring_receiver rx(mem.bytes(), options());
            for (std::uint64_t n = 1;; ++n) {
              (void)co_await rx.receive(buf).with_timeout(bound);
              if (n == 1000) flowing.signal();
            }
          }
        } catch (const std::system_error& e) {
          got = judge(e, f, sender ? "the sender" : "the receiver");
        }
        co_return got;
      }());
      finished.at<std::atomic<std::uint32_t>>(0).fetch_add(1);
      return v;
    });
  };
  child_process sender = victim(true);
  child_process receiver = victim(false);
  REQUIRE(flowing.wait(30s));
  child_process hostile([&] {
    std::mt19937_64 rng(0xbad + static_cast<int>(f) * 3 + static_cast<int>(p));
    if (f == field::tail) {
      tail_of(mem).store(garbage(f, p, tail_of(mem).load(), rng));
      return 0;
    }
    if (f == field::head) {
      head_of(mem).store(garbage(f, p, head_of(mem).load(), rng));
      return 0;
    }
    // A slot word is also written with plain stores by the process that holds the slot, which
    // may undo one scribble: keep scribbling over the slots at the tail and at the head until
    // both victims are done.
    const auto give_up = std::chrono::steady_clock::now() + 30s;
    for (bool at_tail = true; finished.at<std::atomic<std::uint32_t>>(0).load() < 2; at_tail = !at_tail) {
      if (std::chrono::steady_clock::now() > give_up) return 1;
      const std::uint64_t pos = at_tail ? tail_of(mem).load() : head_of(mem).load();
      slot_word(mem, pos).store(garbage(f, p, pos, rng));
      ::sched_yield();
    }
    return 0;
  });
  CHECK(sender.wait(30s) == reported);
  CHECK(receiver.wait(30s) == reported);
  REQUIRE(hostile.wait(30s) == 0);
}

TEST_CASE("heavy MPMC traffic between several producer and consumer processes raises no false EBADMSG",
          "[ring_corruption][load]") {
  constexpr int producers = 2;
  constexpr int consumers = 2;
  constexpr std::uint64_t messages = 1'000'000;
  constexpr std::size_t ring_slots = 4;  // small: full and empty, and so the checks, all the time
  shared_memory mem(ipcoro::mpmc_ring_region_size(ring_slots, 16));
  ipcoro::format_mpmc_ring(mem.bytes(), 16);
  shared_memory counts(messages);  // deliveries per message
  ipcoro::ring_options opts;
  opts.liveness_check_interval = 1ms;  // sleepers wake, and look at the ring, often
  // Without spinning, every wait sleeps, and every sleep looks at the ring first.
  opts.spin = GENERATE(ipcoro::ring_options{}.spin, std::chrono::nanoseconds::zero());

  std::vector<child_process> senders;
  for (int p = 0; p < producers; ++p) {
    senders.emplace_back([&, p] {
      return run([&]() -> task<int> {
        ipcoro::mpmc_ring_sender tx(mem.bytes(), opts);
        for (std::uint64_t seq = static_cast<std::uint64_t>(p); seq < messages; seq += producers) {
          co_await tx.send(std::as_bytes(std::span(&seq, 1))).with_timeout(20s);
        }
        co_return 0;
      }());
    });
  }
  std::vector<child_process> receivers;
  for (int c = 0; c < consumers; ++c) {
    receivers.emplace_back([&] {
      return run([&]() -> task<int> {
        ipcoro::mpmc_ring_receiver rx(mem.bytes(), opts);
        std::array<std::byte, 16> buf{};
        while (const auto n = co_await rx.receive(buf).with_timeout(20s)) {
          std::uint64_t seq = 0;
          if (*n != sizeof seq) co_return 3;
          std::memcpy(&seq, buf.data(), sizeof seq);
          if (seq >= messages) co_return 4;
          counts.at<std::atomic<std::uint8_t>>(seq).fetch_add(1);
        }
        co_return 0;
      }());
    });
  }
  // A child that throws (EBADMSG included) prints the error and exits with 99.
  for (auto& child : senders) REQUIRE(child.wait(120s) == 0);
  ipcoro::mpmc_ring_sender(mem.bytes()).close();  // every producer is done: end of stream
  for (auto& child : receivers) REQUIRE(child.wait(120s) == 0);
  std::uint64_t once = 0;
  for (std::uint64_t s = 0; s < messages; ++s) once += counts.at<std::atomic<std::uint8_t>>(s).load() == 1;
  REQUIRE(once == messages);
}

TEST_CASE("a receiver killed between claiming a slot and moving the head is not taken for corruption",
          "[ring_corruption][recovery]") {
  // Such a kill leaves the slot at the head claimed by a dead pid and the head not moved.
  // The sender frees the slot at its next liveness check; the head must move past it too,
  // or the tail laps the head and the next receive reads the ring as corrupt (EBADMSG).
  shared_memory mem(ipcoro::mpmc_ring_region_size(slots, max_message));
  ipcoro::format_mpmc_ring(mem.bytes(), max_message);
  advance(mem, 37 * slots + 3);
  const std::uint64_t base = head_of(mem).load();
  ipcoro::test::handshake attached;
  child_process dead([&] {
    ipcoro::mpmc_ring_receiver rx(mem.bytes(), options());
    attached.signal();
    for (;;) ::pause();
    return 0;
  });
  REQUIRE(attached.wait());
  const auto dead_pid = static_cast<std::uint32_t>(dead.pid());
  dead.kill(SIGKILL);
  REQUIRE(dead.wait() != 0);

  const int result = run([&]() -> task<int> {
    ipcoro::mpmc_ring_receiver rx(mem.bytes(), options());  // alive, so the sender goes on waiting
    ipcoro::mpmc_ring_sender tx(mem.bytes(), options());
    std::array<std::byte, max_message> buf{};
    for (std::size_t i = 0; i < slots; ++i) {  // full
      buf[0] = static_cast<std::byte>(i);
      co_await tx.send(std::span(buf).first(8));
    }
    // The dead receiver's claim of the message at the head: sequence base + 1, its pid.
    slot_word(mem, base).store(std::uint64_t{static_cast<std::uint32_t>(base + 1)} |
                               (std::uint64_t{dead_pid} << 32));
    buf[0] = static_cast<std::byte>(slots);
    co_await tx.send(std::span(buf).first(8)).with_timeout(bound);  // after one check: the freed slot
    if (head_of(mem).load() != base + 1) co_return 1;
    // Message 0 went with the dead receiver; 1 .. slots arrive, in order, and nothing else.
    for (std::size_t i = 1; i <= slots; ++i) {
      const std::optional<std::size_t> n = co_await rx.receive(buf).with_timeout(bound);
      if (!n || *n != 8 || buf[0] != static_cast<std::byte>(i)) co_return static_cast<int>(10 + i);
    }
    co_return tail_of(mem).load() == head_of(mem).load() ? 0 : 2;
  }());
  CHECK(result == 0);
}
