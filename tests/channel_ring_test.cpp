// SPDX-License-Identifier: MIT
// Channels over shared-memory and file rings across real processes: the last MPMC receiver
// closing tells the senders, and a link end that no living process can take any more is a
// dead peer, not an endless wait.
#include "ipcoro/channel.hpp"
#include "ipcoro/io_context.hpp"
#include "ipcoro/shm_ring.hpp"
#include "ipcoro/sync_wait.hpp"
#include "ipcoro/task.hpp"
#include "ipcoro/timer.hpp"
#include "ipcoro/when_all.hpp"

#include "channel_support.hpp"
#include "process.hpp"

#include <catch2/catch.hpp>

#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <exception>
#include <new>
#include <optional>
#include <span>
#include <string>
#include <system_error>
#include <vector>

namespace {

using namespace std::chrono_literals;
using ipcoro::channel_link;
using ipcoro::channel_receiver;
using ipcoro::channel_sender;
using ipcoro::task;
using ipcoro::test::child_process;
using ipcoro::test::contains;
using ipcoro::test::handshake;
using ipcoro::test::nothing_left_behind;
using ipcoro::test::unique_name;

/// How long a survivor may take before the test counts it as hanging: far above one peer
/// check interval (100 ms), so only a wait that does not end reaches it.
constexpr auto hang_limit = 10s;

/// A small ring of the given transport with a fresh name: few messages fill it.
std::string small_ring_address(const std::string& transport) {
  const std::string name = unique_name("ring");
  if (transport == "shm") return "shm:/" + name + "?capacity=4k";
  if (transport == "shm-mpmc") return "shm:/" + name + "?ring=mpmc&capacity=2&message_size=64";
  if (transport == "file") return "file:/tmp/" + name + "?capacity=4k";
  if (transport == "file-mpmc") return "file:/tmp/" + name + "?ring=mpmc&capacity=2&message_size=64";
  throw std::logic_error("small_ring_address: unknown transport " + transport);
}

/// Sends values until the send fails; a ring being small, the sends soon have to wait.
task<void> send_until_error(channel_sender<int>& tx) {
  for (int i = 0;; ++i) co_await tx.send(i);
}

// Exit codes of a child that reports how its wait ended.
constexpr int ended_as_expected = 0;
constexpr int error_without_address = 1;
constexpr int ended_without_error = 2;
constexpr int other_error = 3;
constexpr int handshake_failed = 4;

/// Runs `wait` and classifies how it ended: with an `Expected` naming `address`, or otherwise.
template <class Expected, class Wait>
int classify(const std::string& address, Wait&& wait) {
  try {
    wait();
  } catch (const Expected& e) {
    if (contains(e.what(), address)) return ended_as_expected;
    std::fprintf(stderr, "error without the address %s: %s\n", address.c_str(), e.what());
    return error_without_address;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "unexpected error: %s\n", e.what());
    return other_error;
  }
  return ended_without_error;
}

}  // namespace

// ---- item 5: an MPMC sender learns that its last receiver closed ----

TEST_CASE("an MPMC sender gets channel_closed naming the address once its only receiver closed",
          "[channel][ring][close]") {
  const std::string transport = GENERATE("shm-mpmc", "file-mpmc");
  const bool waiting = GENERATE(false, true);  // the send waits for room when the close comes
  const std::string address = small_ring_address(transport);
  CAPTURE(address, waiting);
  {
    channel_link link = channel_link::create(address);
    handshake about_to_wait;
    handshake closed;
    child_process receiver([&]() -> int {
      channel_receiver<int> rx = link.receiver<int>();
      link.reset();
      if (waiting && !about_to_wait.wait()) return handshake_failed;
      rx.close();
      closed.signal();
      return 0;
    });
    child_process sender([&]() -> int {
      ipcoro::io_context ctx;
      channel_sender<int> tx = link.sender<int>();
      link.reset();
      if (waiting) {
        // Two slots: the greeting and one value fill the ring, so the next send waits.
        ipcoro::sync_wait(ctx, tx.send(0));
        about_to_wait.signal();
      } else if (!closed.wait()) {
        return handshake_failed;
      }
      return classify<ipcoro::channel_closed>(address, [&] { ipcoro::sync_wait(ctx, send_until_error(tx)); });
    });
    link.reset();
    CHECK(receiver.wait() == 0);
    CHECK(sender.wait(hang_limit) == ended_as_expected);
  }
  CHECK(nothing_left_behind());
}

TEST_CASE("an MPMC ring stays open while one of its receivers is attached, and closes with the last",
          "[channel][ring][close]") {
  const std::string address = small_ring_address("shm-mpmc");
  CAPTURE(address);
  {
    channel_link link = channel_link::create(address);
    handshake first_closed;
    handshake second_ready;
    handshake sent;
    child_process first([&]() -> int {
      channel_receiver<int> rx = link.receiver<int>();
      link.reset();
      rx.close();
      first_closed.signal();
      return 0;
    });
    child_process second([&]() -> int {
      ipcoro::io_context ctx;
      channel_receiver<int> rx = link.receiver<int>();
      link.reset();
      second_ready.signal();
      if (!sent.wait()) return handshake_failed;
      const std::optional<int> v = ipcoro::sync_wait(ctx, rx.receive());
      return v == 42 ? 0 : 1;  // closes on return: the last receiver
    });
    child_process sender([&]() -> int {
      ipcoro::io_context ctx;
      channel_sender<int> tx = link.sender<int>();
      link.reset();
      if (!first_closed.wait() || !second_ready.wait()) return handshake_failed;
      // One receiver is left: the ring is open.
      const int first_send =
          classify<ipcoro::channel_error>(address, [&] { ipcoro::sync_wait(ctx, tx.send(42)); });
      if (first_send != ended_without_error) return 10 + first_send;
      sent.signal();
      return classify<ipcoro::channel_closed>(address, [&] { ipcoro::sync_wait(ctx, send_until_error(tx)); });
    });
    link.reset();
    CHECK(first.wait() == 0);
    CHECK(second.wait() == 0);
    CHECK(sender.wait(hang_limit) == ended_as_expected);
  }
  CHECK(nothing_left_behind());
}

// ---- item 12: a link end that no process can take any more ----

TEST_CASE("a ring link whose peer is killed before taking its end gives the survivor peer_died",
          "[channel][ring][ipc]") {
  const std::string transport = GENERATE("shm", "shm-mpmc", "file");
  const bool survivor_receives = GENERATE(true, false);
  const bool killed_before_survivor_takes = GENERATE(false, true);
  const std::string address = small_ring_address(transport);
  CAPTURE(address, survivor_receives, killed_before_survivor_takes);
  {
    channel_link link = channel_link::create(address);
    handshake victim_ready;
    handshake go;
    handshake survivor_ready;
    // Holds its copy of the link, as a forked child about to take its end, and is killed.
    child_process victim([&]() -> int {
      victim_ready.signal();
      for (;;) ::pause();
    });
    child_process survivor([&]() -> int {
      if (killed_before_survivor_takes && !go.wait()) return handshake_failed;
      ipcoro::io_context ctx;
      if (survivor_receives) {
        channel_receiver<int> rx = link.receiver<int>();
        link.reset();
        survivor_ready.signal();
        return classify<ipcoro::peer_died>(address, [&] { (void)ipcoro::sync_wait(ctx, rx.receive()); });
      }
      channel_sender<int> tx = link.sender<int>();
      link.reset();
      survivor_ready.signal();
      return classify<ipcoro::peer_died>(address, [&] { ipcoro::sync_wait(ctx, send_until_error(tx)); });
    });
    link.reset();
    REQUIRE(victim_ready.wait());
    if (!killed_before_survivor_takes) REQUIRE(survivor_ready.wait());
    victim.kill(SIGKILL);
    CHECK(victim.wait() == 128 + SIGKILL);
    const auto killed = std::chrono::steady_clock::now();
    if (killed_before_survivor_takes) go.signal();
    CHECK(survivor.wait(hang_limit) == ended_as_expected);
    // Within a peer check interval (100 ms), with room for a loaded machine.
    CHECK(std::chrono::steady_clock::now() - killed < 2s);
  }
  CHECK(nothing_left_behind());
}

TEST_CASE("a ring link end that the last holder of the link lets go untaken reads as a dead peer",
          "[channel][ring][ipc]") {
  const std::string transport = GENERATE("shm", "shm-mpmc", "file");
  const bool survivor_receives = GENERATE(true, false);
  const std::string address = small_ring_address(transport);
  CAPTURE(address, survivor_receives);
  {
    channel_link link = channel_link::create(address);
    child_process survivor([&]() -> int {
      ipcoro::io_context ctx;
      if (survivor_receives) {
        channel_receiver<int> rx = link.receiver<int>();
        link.reset();
        return classify<ipcoro::peer_died>(address, [&] { (void)ipcoro::sync_wait(ctx, rx.receive()); });
      }
      channel_sender<int> tx = link.sender<int>();
      link.reset();
      return classify<ipcoro::peer_died>(address, [&] { ipcoro::sync_wait(ctx, send_until_error(tx)); });
    });
    // The parent destroys its link without taking the other end: nobody can take it now.
    link.reset();
    CHECK(survivor.wait(hang_limit) == ended_as_expected);
  }
  CHECK(nothing_left_behind());
}

TEST_CASE("a ring link end taken late, by a process that still holds the link, is no dead peer",
          "[channel][ring][ipc]") {
  const std::string transport = GENERATE("shm", "shm-mpmc", "file");
  const std::string address = small_ring_address(transport);
  CAPTURE(address);
  {
    channel_link link = channel_link::create(address);
    handshake waiting;
    child_process receiver([&]() -> int {
      ipcoro::io_context ctx;
      channel_receiver<int> rx = link.receiver<int>();
      link.reset();
      waiting.signal();
      try {
        const std::optional<int> v = ipcoro::sync_wait(ctx, rx.receive());
        const std::optional<int> end = ipcoro::sync_wait(ctx, rx.receive());
        return v == 7 && !end ? 0 : 1;
      } catch (const std::exception& e) {
        std::fprintf(stderr, "receiver: %s\n", e.what());
        return other_error;
      }
    });
    REQUIRE(waiting.wait());
    // Several peer check intervals pass while the sender is not yet taken: "not yet" must
    // not be taken for "never" while this process can still take it.
    ipcoro::io_context ctx;
    ipcoro::sync_wait(ctx, []() -> task<void> { co_await ipcoro::sleep_for(500ms); }());
    channel_sender<int> tx = link.sender<int>();
    link.reset();
    ipcoro::sync_wait(ctx, tx.send(7));
    tx.close();
    CHECK(receiver.wait(hang_limit) == 0);
  }
  CHECK(nothing_left_behind());
}

// ---- issue 12: an SPSC ring sender publishes a loop turn's messages together ----

namespace {

/// What the sender of send_held_turn does at the end of its turn of held messages.
enum class turn_end { returns, flush, close, abort, killed };

/// A sender in a child process: -1 in a turn of its own, then 0..n-1 in one turn, in
/// which it then flushes, closes or aborts (per `how`), signals `sent` and waits for `go`.
/// So the parent looks at the ring while the turn that sent 0..n-1 has not ended.
int send_held_turn(const std::string& address, int n, turn_end how, const handshake& sent,
                   const handshake& go) {
  ipcoro::io_context ctx;
  channel_sender<int> tx = ipcoro::sync_wait(ctx, ipcoro::open_sender<int>(address));
  ipcoro::sync_wait(ctx, tx.send(-1));
  ipcoro::sync_wait(ctx,
                    [](channel_sender<int>& tx, int n, turn_end how, const handshake& sent,
                       const handshake& go) -> task<void> {
                      for (int i = 0; i < n; ++i) co_await tx.send(i);
                      if (how == turn_end::flush) co_await tx.flush();
                      if (how == turn_end::close) tx.close();
                      if (how == turn_end::abort) tx.abort();
                      sent.signal();
                      (void)go.wait();  // blocks the loop: the turn does not end meanwhile
                    }(tx, n, how, sent, go));
  tx.close();  // nothing after a close or an abort
  return 0;
}

std::optional<int> receive_bounded(channel_receiver<int>& rx) {
  return ipcoro::sync_wait(ipcoro::io_context::current(), rx.receive().with_timeout(hang_limit));
}

/// Whether a receive finds nothing for 50 ms: what the sender holds is not in the ring.
bool nothing_published(channel_receiver<int>& rx) {
  try {
    (void)ipcoro::sync_wait(ipcoro::io_context::current(), rx.receive().with_timeout(50ms));
  } catch (const ipcoro::timed_out&) {
    return true;
  }
  return false;
}

}  // namespace

TEST_CASE(
    "an SPSC ring sender publishes a loop turn's first message at once and holds the turn's others "
    "until it ends, flushes, closes or aborts; a kill loses only what it held",
    "[channel][ring][ipc]") {
  const std::string transport = GENERATE("shm", "file");
  const turn_end how =
      GENERATE(turn_end::returns, turn_end::flush, turn_end::close, turn_end::abort, turn_end::killed);
  const std::string name = unique_name("held");
  const std::string address =
      transport == "shm" ? "shm:/" + name + "?capacity=64k" : "file:/tmp/" + name + "?capacity=64k";
  constexpr int n = 100;  // 2400 bytes of records: under the 4 KiB a sender holds at most
  CAPTURE(address, static_cast<int>(how));
  {
    ipcoro::io_context ctx;
    channel_receiver<int> rx = ipcoro::sync_wait(ctx, ipcoro::open_receiver<int>(address));
    handshake sent, go;
    child_process sender([&] { return send_held_turn(address, n, how, sent, go); });
    REQUIRE(sent.wait());
    CHECK(receive_bounded(rx) == -1);
    CHECK(receive_bounded(rx) == 0);  // the turn's first message went at once
    std::vector<int> rest;
    if (how == turn_end::returns || how == turn_end::killed) {
      CHECK(nothing_published(rx));  // 1..n-1 are held while the turn goes on
      if (how == turn_end::killed) {
        sender.kill(SIGKILL);
        CHECK(sender.wait(hang_limit) == 128 + SIGKILL);
        CHECK_THROWS_AS(receive_bounded(rx), ipcoro::peer_died);  // what it held is lost
      } else {
        go.signal();
        CHECK(sender.wait(hang_limit) == 0);
      }
    } else {
      // Published by the flush, the close or the abort, before the turn ends.
      for (int i = 1; i < n; ++i) rest.push_back(receive_bounded(rx).value_or(-2));
      go.signal();
      CHECK(sender.wait(hang_limit) == 0);
    }
    if (how != turn_end::killed) {
      while (rest.size() < n - 1) {
        const std::optional<int> v = receive_bounded(rx);
        if (!v) break;
        rest.push_back(*v);
      }
      std::vector<int> expected;
      for (int i = 1; i < n; ++i) expected.push_back(i);
      CHECK(rest == expected);
      if (how == turn_end::abort) {
        CHECK_THROWS_AS(receive_bounded(rx), ipcoro::peer_died);
      } else {
        CHECK(receive_bounded(rx) == std::nullopt);  // the end, after every message
      }
    }
  }
  CHECK(nothing_left_behind());
}

TEST_CASE("a durable file channel's sender publishes every message at once", "[channel][ring][ipc]") {
  const std::string path = "/tmp/" + unique_name("durable-held");
  const std::string address = "file:" + path + "?capacity=64k&durable=1";
  constexpr int n = 100;
  // A durable channel's file is kept on purpose: removed here, also when a check throws.
  struct remove_at_exit {
    const std::string& path;
    ~remove_at_exit() { ::unlink(path.c_str()); }
  } remove{path};
  {
    ipcoro::io_context ctx;
    channel_receiver<int> rx = ipcoro::sync_wait(ctx, ipcoro::open_receiver<int>(address));
    handshake sent, go;
    child_process sender([&] { return send_held_turn(address, n, turn_end::returns, sent, go); });
    REQUIRE(sent.wait());
    // All of them while the sender's turn goes on: a durable queue holds nothing back.
    std::vector<int> got;
    for (int i = -1; i < n; ++i) got.push_back(receive_bounded(rx).value_or(-2));
    std::vector<int> expected;
    for (int i = -1; i < n; ++i) expected.push_back(i);
    CHECK(got == expected);
    go.signal();
    CHECK(sender.wait(hang_limit) == 0);
    CHECK(receive_bounded(rx) == std::nullopt);
  }
  ::unlink(path.c_str());
  CHECK(nothing_left_behind());
}

// ---- issue 12: a message that fits is written into the ring in one call ----

namespace {

/// A value whose encoding fails for a negative number, with an error that a transport's
/// own (EPIPE: the receiver has gone) would be mistaken for.
struct picky {
  int n = 0;
};

}  // namespace

template <>
struct ipcoro::codec<picky> {
  static std::string type_name() { return "picky"; }
  static constexpr std::uint32_t version = 1;
  static std::size_t size(const picky&) noexcept { return sizeof(int); }
  static void encode(const picky& v, std::span<std::byte> out) {
    if (v.n < 0) throw std::system_error(EPIPE, std::system_category(), "picky: negative numbers refused");
    std::memcpy(out.data(), &v.n, sizeof v.n);
  }
  static picky decode(std::span<const std::byte> in) {
    picky v;
    std::memcpy(&v.n, in.data(), sizeof v.n);
    return v;
  }
};

// The encoder writes straight into the ring (after the first send, which greets): when it
// throws, its own error reaches the sender, not channel_closed, and nothing is published;
// the next message takes the room it had.
TEST_CASE("an encoder that throws while writing into the ring fails only its own send",
          "[channel][ring][ipc]") {
  const std::string transport = GENERATE("shm", "file");
  const std::string name = unique_name("picky");
  const std::string address = transport == "shm" ? "shm:/" + name : "file:/tmp/" + name;
  CAPTURE(address);
  {
    ipcoro::io_context ctx;
    channel_receiver<picky> rx = ipcoro::sync_wait(ctx, ipcoro::open_receiver<picky>(address));
    child_process sender([&] {
      ipcoro::io_context ctx;
      channel_sender<picky> tx = ipcoro::sync_wait(ctx, ipcoro::open_sender<picky>(address));
      // Awaited directly in one coroutine, as sends that can go at once take the direct
      // path (a send made a task, as sync_wait makes it, goes through the coroutine path).
      return ipcoro::sync_wait(ctx, [](channel_sender<picky>& tx) -> task<int> {
        co_await tx.send(picky{1});
        int outcome = 10;
        try {
          co_await tx.send(picky{-1});
        } catch (const ipcoro::channel_closed&) {
          outcome = 11;  // the encoder's error taken for the transport's
        } catch (const std::system_error& e) {
          outcome = contains(e.what(), "negative numbers refused") && e.code().value() == EPIPE ? 0 : 12;
        }
        co_await tx.send(picky{3});
        tx.close();
        co_return outcome;
      }(tx));
    });
    const auto next = [&]() -> std::optional<int> {
      const std::optional<picky> v = ipcoro::sync_wait(ctx, rx.receive().with_timeout(hang_limit));
      return v ? std::optional<int>{v->n} : std::nullopt;
    };
    CHECK(next() == 1);
    CHECK(next() == 3);
    CHECK(next() == std::nullopt);
    CHECK(sender.wait(hang_limit) == 0);
  }
  CHECK(nothing_left_behind());
}

// Sends of a value's bytes and receives of a value that is there go straight to the ring
// without the end's lock, only when no other operation holds it: one that waits keeps its
// place. The second operation here starts once the first's wait is over in the ring (room
// made, or its message arrived) but before the first has run again, when a direct path
// that ignored the lock would overtake it.
TEST_CASE("a send or loan started while a send waits for room goes after it", "[channel][ring][ipc]") {
  const std::string transport = GENERATE("shm", "file");
  const bool loan = GENERATE(false, true);
  const std::string address = small_ring_address(transport);
  CAPTURE(address, loan);
  struct seen {
    int before_marker = -2;
    int out_of_order = -1;
  };
  auto* log = static_cast<seen*>(
      ::mmap(nullptr, sizeof(seen), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0));
  REQUIRE(log != MAP_FAILED);
  new (log) seen{};
  constexpr int total = 1000;  // far more than the 4 KiB ring holds
  int pending = -1;
  {
    const handshake opened, go, drained;
    child_process receiver([&] {
      ipcoro::io_context ctx;
      channel_receiver<int> rx = ipcoro::sync_wait(ctx, ipcoro::open_receiver<int>(address));
      opened.signal();
      if (!go.wait()) return 1;
      return ipcoro::sync_wait(
          ctx, [](channel_receiver<int>& rx, const handshake& drained, seen& log) -> task<int> {
            int last = -1;
            log.out_of_order = 0;
            bool first = true;
            while (std::optional<int> v = co_await rx.receive()) {
              if (first) drained.signal();  // room for the next message now
              first = false;
              if (*v == -1) {
                log.before_marker = last;
                continue;
              }
              if (*v != last + 1) ++log.out_of_order;
              last = *v;
            }
            co_return last == total - 1 ? 0 : 2;
          }(rx, drained, *log));
    });
    REQUIRE(opened.wait());
    ipcoro::io_context ctx;
    channel_sender<int> tx = ipcoro::sync_wait(ctx, ipcoro::open_sender<int>(address));
    int completed = 0;
    ipcoro::sync_wait(ctx, ipcoro::when_all(
                               [](channel_sender<int>& tx, int& completed) -> task<void> {
                                 for (int i = 0; i < total; ++i) {
                                   co_await tx.send(i);
                                   completed = i + 1;
                                 }
                               }(tx, completed),
                               [](channel_sender<int>& tx, const int& completed, int& pending,
                                  const handshake& go, const handshake& drained, bool loan) -> task<void> {
                                 pending = completed;  // the first coroutine waits to send this one
                                 go.signal();
                                 // Blocks this thread, so the first coroutine cannot run before this send.
                                 if (!drained.wait()) co_return;
                                 if (!loan) {
                                   co_await tx.send(-1);
                                 } else {
                                   // loan() awaited directly: the path that lends at once.
                                   ipcoro::channel_loan l = co_await tx.loan(sizeof(int));
                                   const int marker = -1;
                                   std::memcpy(l.bytes().data(), &marker, sizeof marker);
                                   l.commit();
                                 }
                               }(tx, completed, pending, go, drained, loan)));
    tx.close();
    CHECK(receiver.wait(hang_limit) == 0);
  }
  CHECK(pending > 0);
  CHECK(pending < total);
  CHECK(log->out_of_order == 0);
  CHECK(log->before_marker == pending);
  ::munmap(log, sizeof(seen));
  CHECK(nothing_left_behind());
}

TEST_CASE("a receive started while another waits gets the message after the one the first waits for",
          "[channel][ring][ipc]") {
  const std::string transport = GENERATE("shm", "file");
  const std::string name = unique_name("order");
  const std::string address = transport == "shm" ? "shm:/" + name : "file:/tmp/" + name;
  CAPTURE(address);
  {
    ipcoro::io_context ctx;
    channel_receiver<int> rx = ipcoro::sync_wait(ctx, ipcoro::open_receiver<int>(address));
    const handshake go, sent;
    child_process sender([&] {
      ipcoro::io_context ctx;
      channel_sender<int> tx = ipcoro::sync_wait(ctx, ipcoro::open_sender<int>(address));
      ipcoro::sync_wait(ctx, [](channel_sender<int>& tx, const handshake& go) -> task<void> {
        co_await tx.send(0);  // with the greeting, which the receiver takes with it
        co_await tx.flush();
        if (!go.wait()) co_return;
        co_await tx.send(1);
        co_await tx.send(2);
        co_await tx.flush();
      }(tx, go));
      sent.signal();
      tx.close();
      return 0;
    });
    REQUIRE(ipcoro::sync_wait(ctx, rx.receive().with_timeout(hang_limit)) == 0);
    std::optional<int> first, second;
    ipcoro::sync_wait(ctx, ipcoro::when_all([](channel_receiver<int>& rx, std::optional<int>& out)
                                                -> task<void> { out = co_await rx.receive(); }(rx, first),
                                            [](channel_receiver<int>& rx, std::optional<int>& out,
                                               const handshake& go, const handshake& sent) -> task<void> {
                                              go.signal();
                                              // Blocks this thread: the first receive cannot run before this
                                              // one.
                                              if (sent.wait()) out = co_await rx.receive();
                                            }(rx, second, go, sent)));
    CHECK(first == 1);
    CHECK(second == 2);
    CHECK(sender.wait(hang_limit) == 0);
  }
  CHECK(nothing_left_behind());
}
