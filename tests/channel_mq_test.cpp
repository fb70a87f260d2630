// SPDX-License-Identifier: MIT
// Message-queue channels across real processes: a dead peer ends every wait with peer_died,
// and close() never blocks nor loses its end marker.
#include "ipcoro/channel.hpp"
#include "ipcoro/io_context.hpp"
#include "ipcoro/mqueue.hpp"
#include "ipcoro/shm_ring.hpp"
#include "ipcoro/shm_segment.hpp"
#include "ipcoro/sync_wait.hpp"
#include "ipcoro/task.hpp"
#include "ipcoro/timer.hpp"
#include "ipcoro/when_all.hpp"

#include "channel_support.hpp"
#include "process.hpp"

#include <catch2/catch.hpp>

#include <fcntl.h>
#include <mqueue.h>
#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <optional>
#include <string>
#include <vector>

namespace {

using namespace std::chrono_literals;
using ipcoro::channel_receiver;
using ipcoro::channel_sender;
using ipcoro::task;
using ipcoro::test::child_process;
using ipcoro::test::contains;
using ipcoro::test::handshake;
using ipcoro::test::nothing_left_behind;
using clock_type = std::chrono::steady_clock;

/// A queue of `capacity` messages with a fresh name, removed (with its peer record) when
/// the test ends, even after a receiver was killed. Its messages of 32 bytes carry one
/// channel message each (two do not fit in one), so that `capacity` messages fill it.
struct fresh_queue {
  explicit fresh_queue(int capacity)
      : name(std::string("/").append(ipcoro::test::unique_name("mq"))),
        // Built by append: GCC 12 at -O3 warns (-Wrestrict, a false positive) on "mq:" + string.
        address(std::string("mq:")
                    .append(name)
                    .append("?capacity=")
                    .append(std::to_string(capacity))
                    .append("&message_size=32")) {}
  fresh_queue(const fresh_queue&) = delete;
  fresh_queue& operator=(const fresh_queue&) = delete;
  ~fresh_queue() {
    try {
      ipcoro::message_queue::unlink(name);
      ipcoro::shm_segment::unlink(name + ".ipcoro-mq");
    } catch (...) {
    }
  }
  std::string name;
  std::string address;
};

/// A receiver that opens `address`, says so, and then neither receives nor leaves.
int idle_receiver(const std::string& address, const handshake& ready, const handshake& never) {
  ipcoro::io_context ctx;
  channel_receiver<int> rx = ipcoro::sync_wait(ctx, ipcoro::open_receiver<int>(address));
  ready.signal();
  never.wait();
  return 0;
}

/// How long a test waits for a child that should finish at once: a hang is a failure.
constexpr auto bounded = 20s;
/// What "within one liveness_check_interval" (100 ms) may take on a loaded machine.
constexpr auto soon = 3s;

}  // namespace

TEST_CASE("a queue send waiting on a full queue ends with peer_died once its receiver is killed",
          "[channel][mq]") {
  const fresh_queue q(4);
  const std::string& address = q.address;
  handshake ready, never, waiting;
  child_process receiver([&] { return idle_receiver(address, ready, never); });
  REQUIRE(ready.wait());
  child_process sender([&]() -> int {
    ipcoro::io_context ctx;
    std::optional<channel_sender<int>> tx{ipcoro::sync_wait(ctx, ipcoro::open_sender<int>(address))};
    std::string error;
    int sent = 0;
    try {
      ipcoro::sync_wait(ctx, [](channel_sender<int>& tx, int& sent, const handshake& waiting) -> task<void> {
        for (;; ++sent) {
          if (sent == 3) waiting.signal();  // the greeting and 3 messages fill the queue
          co_await tx.send(sent);
        }
      }(*tx, sent, waiting));
    } catch (const ipcoro::peer_died& e) {
      error = e.what();
    }
    const auto before = clock_type::now();
    tx.reset();  // closes: must not wait for room in the full queue
    const auto closing = clock_type::now() - before;
    if (sent != 3 || !contains(error, q.address) || !contains(error, "died") || closing > 500ms) {
      std::fprintf(
          stderr, "sender: %d sent, error \"%s\", close took %lld ms\n", sent, error.c_str(),
          static_cast<long long>(std::chrono::duration_cast<std::chrono::milliseconds>(closing).count()));
      return 1;
    }
    return 0;
  });
  REQUIRE(waiting.wait());
  receiver.kill(SIGKILL);
  const auto killed = clock_type::now();
  CHECK(receiver.wait() == 128 + SIGKILL);
  CHECK(sender.wait(bounded) == 0);
  CHECK(clock_type::now() - killed < soon);
}

TEST_CASE("a queue receive waiting on an empty queue ends with peer_died once every sender is killed",
          "[channel][mq]") {
  const int senders = GENERATE(1, 2);
  CAPTURE(senders);
  const fresh_queue q(8);
  handshake ready, sent, never, drained;
  child_process receiver([&]() -> int {
    ipcoro::io_context ctx;
    channel_receiver<int> rx = ipcoro::sync_wait(ctx, ipcoro::open_receiver<int>(q.address));
    ready.signal();
    int got = 0;
    std::string error;
    try {
      for (;;) {
        std::optional<int> v = ipcoro::sync_wait(ctx, rx.receive());
        if (!v) break;
        if (++got == 2 * senders) drained.signal();
      }
    } catch (const ipcoro::peer_died& e) {
      error = e.what();
    }
    if (got != 2 * senders || !contains(error, q.address) || !contains(error, "died")) {
      std::fprintf(stderr, "receiver: %d received, error \"%s\"\n", got, error.c_str());
      return 1;
    }
    return 0;
  });
  REQUIRE(ready.wait());
  std::vector<child_process> children;
  for (int i = 0; i < senders; ++i) {
    children.emplace_back([&]() -> int {
      ipcoro::io_context ctx;
      channel_sender<int> tx = ipcoro::sync_wait(ctx, ipcoro::open_sender<int>(q.address));
      ipcoro::sync_wait(ctx, [](channel_sender<int>& tx) -> task<void> {
        co_await tx.send(1);
        co_await tx.send(2);
      }(tx));
      sent.signal();
      never.wait();
      return 0;
    });
  }
  for (int i = 0; i < senders; ++i) REQUIRE(sent.wait());
  // The receiver has taken every message and waits on the empty queue.
  REQUIRE(drained.wait());
  for (child_process& c : children) c.kill(SIGKILL);
  const auto killed = clock_type::now();
  for (child_process& c : children) CHECK(c.wait() == 128 + SIGKILL);
  CHECK(receiver.wait(bounded) == 0);
  CHECK(clock_type::now() - killed < soon);
}

TEST_CASE("a queue receiver keeps waiting while one of its senders lives, and ends cleanly when it closes",
          "[channel][mq]") {
  const fresh_queue q(8);
  handshake ready, sent, never, go_on, drained;
  child_process receiver([&]() -> int {
    ipcoro::io_context ctx;
    channel_receiver<int> rx = ipcoro::sync_wait(ctx, ipcoro::open_receiver<int>(q.address));
    ready.signal();
    std::vector<int> got;
    try {
      for (;;) {
        std::optional<int> v = ipcoro::sync_wait(ctx, rx.receive());
        if (!v) break;
        got.push_back(*v);
        if (got.size() == 1) drained.signal();
      }
    } catch (const std::exception& e) {
      std::fprintf(stderr, "receiver: %s\n", e.what());
      return 1;
    }
    return got == std::vector<int>{1, 2} ? 0 : 2;
  });
  REQUIRE(ready.wait());
  child_process doomed([&]() -> int {
    ipcoro::io_context ctx;
    channel_sender<int> tx = ipcoro::sync_wait(ctx, ipcoro::open_sender<int>(q.address));
    ipcoro::sync_wait(ctx, tx.send(1));
    sent.signal();
    never.wait();
    return 0;
  });
  handshake opened;
  child_process survivor([&]() -> int {
    ipcoro::io_context ctx;
    channel_sender<int> tx = ipcoro::sync_wait(ctx, ipcoro::open_sender<int>(q.address));
    opened.signal();
    go_on.wait();
    ipcoro::sync_wait(ctx, tx.send(2));
    tx.close();
    return 0;
  });
  REQUIRE(sent.wait());
  REQUIRE(opened.wait());
  REQUIRE(drained.wait());
  doomed.kill(SIGKILL);
  CHECK(doomed.wait() == 128 + SIGKILL);
  // Several check intervals pass with one sender dead and one alive: no peer_died.
  ipcoro::io_context ctx;
  ipcoro::sync_wait(ctx, []() -> task<void> { co_await ipcoro::sleep_for(500ms); }());
  go_on.signal();
  CHECK(survivor.wait(bounded) == 0);
  CHECK(receiver.wait(bounded) == 0);
}

TEST_CASE("a queue sender's close on a full queue returns at once and its end marker is not lost",
          "[channel][mq]") {
  const fresh_queue q(4);
  handshake ready, closed;
  child_process receiver([&]() -> int {
    ipcoro::io_context ctx;
    channel_receiver<int> rx = ipcoro::sync_wait(ctx, ipcoro::open_receiver<int>(q.address));
    ready.signal();
    closed.wait();  // the sender has filled the queue and closed
    std::vector<int> got;
    try {
      for (;;) {
        std::optional<int> v = ipcoro::sync_wait(ctx, rx.receive());
        if (!v) break;
        got.push_back(*v);
      }
    } catch (const std::exception& e) {
      std::fprintf(stderr, "receiver: %s\n", e.what());
      return 1;
    }
    return got == std::vector<int>{0, 1, 2} ? 0 : 2;
  });
  REQUIRE(ready.wait());
  child_process sender([&]() -> int {
    ipcoro::io_context ctx;
    channel_sender<int> tx = ipcoro::sync_wait(ctx, ipcoro::open_sender<int>(q.address));
    ipcoro::sync_wait(ctx, [](channel_sender<int>& tx) -> task<void> {
      for (int i = 0; i < 3; ++i) co_await tx.send(i);  // with the greeting: full
    }(tx));
    const auto before = clock_type::now();
    tx.close();
    const auto closing = clock_type::now() - before;
    closed.signal();
    return closing < 500ms ? 0 : 1;
  });
  CHECK(sender.wait(bounded) == 0);
  CHECK(receiver.wait(bounded) == 0);
  CHECK(nothing_left_behind());
}

TEST_CASE("a queue sender closing a full queue whose receiver runs on the same loop ends the stream",
          "[channel][mq]") {
  // Without SINGLE_ISSUER / DEFER_TASKRUN (kernels before 6.1) as well as with them.
  const bool single_issuer = GENERATE(true, false);
  CAPTURE(single_issuer);
  const fresh_queue q(4);
  child_process tester([&]() -> int {
    ipcoro::io_context ctx(ipcoro::io_context::options{.single_issuer = single_issuer});
    channel_receiver<int> rx = ipcoro::sync_wait(ctx, ipcoro::open_receiver<int>(q.address));
    channel_sender<int> tx = ipcoro::sync_wait(ctx, ipcoro::open_sender<int>(q.address));
    std::vector<int> got;
    ipcoro::sync_wait(ctx, ipcoro::when_all(
                               [](channel_sender<int>& tx) -> task<void> {
                                 for (int i = 0; i < 3; ++i) co_await tx.send(i);
                                 tx.close();  // the queue is full and its receiver is on this thread
                               }(tx),
                               [](channel_receiver<int>& rx, std::vector<int>& got) -> task<void> {
                                 for (;;) {
                                   std::optional<int> v = co_await rx.receive();
                                   if (!v) break;
                                   got.push_back(*v);
                                 }
                               }(rx, got)));
    return got == std::vector<int>{0, 1, 2} ? 0 : 2;
  });
  CHECK(tester.wait(bounded) == 0);
  CHECK(nothing_left_behind());
}

TEST_CASE("a queue sender blocked on a full queue is told when its receiver closes", "[channel][mq]") {
  const fresh_queue q(4);
  handshake ready, waiting, closed;
  child_process receiver([&]() -> int {
    ipcoro::io_context ctx;
    channel_receiver<int> rx = ipcoro::sync_wait(ctx, ipcoro::open_receiver<int>(q.address));
    ready.signal();
    waiting.wait();
    rx.close();
    return 0;
  });
  REQUIRE(ready.wait());
  child_process sender([&]() -> int {
    ipcoro::io_context ctx;
    channel_sender<int> tx = ipcoro::sync_wait(ctx, ipcoro::open_sender<int>(q.address));
    std::string error;
    try {
      ipcoro::sync_wait(ctx, [](channel_sender<int>& tx, const handshake& waiting) -> task<void> {
        for (int i = 0;; ++i) {
          if (i == 3) waiting.signal();
          co_await tx.send(i);
        }
      }(tx, waiting));
    } catch (const ipcoro::channel_closed& e) {
      error = e.what();
    }
    if (!contains(error, q.address) || !contains(error, "closed")) {
      std::fprintf(stderr, "sender: error \"%s\"\n", error.c_str());
      return 1;
    }
    return 0;
  });
  CHECK(receiver.wait(bounded) == 0);
  CHECK(sender.wait(bounded) == 0);
  CHECK(nothing_left_behind());
}

TEST_CASE("an aborted queue sender reads as a dead peer once its process has exited", "[channel][mq]") {
  const fresh_queue q(8);
  handshake ready;
  child_process receiver([&]() -> int {
    ipcoro::io_context ctx;
    channel_receiver<int> rx = ipcoro::sync_wait(ctx, ipcoro::open_receiver<int>(q.address));
    ready.signal();
    int got = 0;
    std::string error;
    try {
      while (ipcoro::sync_wait(ctx, rx.receive())) ++got;
    } catch (const ipcoro::peer_died& e) {
      error = e.what();
    }
    if (got != 2 || !contains(error, "died")) {
      std::fprintf(stderr, "receiver: %d received, error \"%s\"\n", got, error.c_str());
      return 1;
    }
    return 0;
  });
  REQUIRE(ready.wait());
  child_process sender([&]() -> int {
    ipcoro::io_context ctx;
    channel_sender<int> tx = ipcoro::sync_wait(ctx, ipcoro::open_sender<int>(q.address));
    ipcoro::sync_wait(ctx, [](channel_sender<int>& tx) -> task<void> {
      co_await tx.send(1);
      co_await tx.send(2);
    }(tx));
    tx.abort();
    return 0;
  });
  CHECK(sender.wait(bounded) == 0);
  CHECK(receiver.wait(bounded) == 0);
  CHECK(nothing_left_behind());
}

TEST_CASE("a queue sender killed before its first message reads as a dead peer", "[channel][mq]") {
  const fresh_queue q(8);
  handshake ready, opened, never;
  child_process receiver([&]() -> int {
    ipcoro::io_context ctx;
    channel_receiver<int> rx = ipcoro::sync_wait(ctx, ipcoro::open_receiver<int>(q.address));
    ready.signal();
    try {
      std::optional<int> v = ipcoro::sync_wait(ctx, rx.receive());
      std::fprintf(stderr, "receiver: %s\n", v ? "a value" : "a clean end");
      return 1;
    } catch (const ipcoro::peer_died& e) {
      return contains(e.what(), q.address) ? 0 : 2;
    }
  });
  REQUIRE(ready.wait());
  child_process sender([&]() -> int {
    ipcoro::io_context ctx;
    channel_sender<int> tx = ipcoro::sync_wait(ctx, ipcoro::open_sender<int>(q.address));
    opened.signal();
    never.wait();
    return 0;
  });
  REQUIRE(opened.wait());
  sender.kill(SIGKILL);
  CHECK(sender.wait() == 128 + SIGKILL);
  CHECK(receiver.wait(bounded) == 0);
  CHECK(nothing_left_behind());
}

TEST_CASE("queue channel links record their ends: a killed receiver fails the blocked send",
          "[channel][mq]") {
  const std::string name = std::string("/").append(ipcoro::test::unique_name("mq"));
  ipcoro::channel_link link = ipcoro::channel_link::create("mq:" + name + "?capacity=4");
  handshake ready, waiting, never;
  child_process receiver([&]() -> int {
    channel_receiver<int> rx = link.receiver<int>();
    link.reset();
    ready.signal();
    never.wait();
    return 0;
  });
  REQUIRE(ready.wait());
  child_process sender([&]() -> int {
    ipcoro::io_context ctx;
    channel_sender<int> tx = link.sender<int>();
    link.reset();
    try {
      ipcoro::sync_wait(ctx, [](channel_sender<int>& tx, const handshake& waiting) -> task<void> {
        for (int i = 0;; ++i) {
          if (i == 3) waiting.signal();
          co_await tx.send(i);
        }
      }(tx, waiting));
    } catch (const ipcoro::peer_died&) {
      return 0;
    }
    return 1;
  });
  link.reset();
  REQUIRE(waiting.wait());
  receiver.kill(SIGKILL);
  CHECK(receiver.wait() == 128 + SIGKILL);
  CHECK(sender.wait(bounded) == 0);
  CHECK(nothing_left_behind());
}

TEST_CASE("a queue link end that no process can take any more fails the peer waiting for it",
          "[channel][mq]") {
  const bool waiting_sender = GENERATE(true, false);
  CAPTURE(waiting_sender);
  const std::string name = std::string("/").append(ipcoro::test::unique_name("mq"));
  ipcoro::channel_link link = ipcoro::channel_link::create("mq:" + name + "?capacity=4");
  handshake held, waiting, never;
  // Holds the link, so it could still take the end the other side waits for, then is killed.
  child_process holder([&]() -> int {
    held.signal();
    never.wait();
    return 0;
  });
  REQUIRE(held.wait());
  child_process peer([&]() -> int {
    ipcoro::io_context ctx;
    std::string error;
    try {
      if (waiting_sender) {
        channel_sender<int> tx = link.sender<int>();
        link.reset();
        ipcoro::sync_wait(ctx, [](channel_sender<int>& tx, const handshake& waiting) -> task<void> {
          for (int i = 0;; ++i) {
            if (i == 3) waiting.signal();
            co_await tx.send(i);
          }
        }(tx, waiting));
      } else {
        channel_receiver<int> rx = link.receiver<int>();
        link.reset();
        waiting.signal();
        (void)ipcoro::sync_wait(ctx, rx.receive());
      }
    } catch (const ipcoro::peer_died& e) {
      error = e.what();
    }
    if (!contains(error, name) || !contains(error, "never taken")) {
      std::fprintf(stderr, "peer: error \"%s\"\n", error.c_str());
      return 1;
    }
    return 0;
  });
  link.reset();
  REQUIRE(waiting.wait());
  holder.kill(SIGKILL);
  const auto killed = clock_type::now();
  CHECK(holder.wait() == 128 + SIGKILL);
  CHECK(peer.wait(bounded) == 0);
  CHECK(clock_type::now() - killed < soon);
  CHECK(nothing_left_behind());
}

namespace {

/// How many messages the queue `name` holds now.
long queued(const std::string& name) {
  const mqd_t q = ::mq_open(name.c_str(), O_RDONLY | O_CLOEXEC);
  if (q == static_cast<mqd_t>(-1)) return -1;
  struct mq_attr attr {};
  const long n = ::mq_getattr(q, &attr) == 0 ? attr.mq_curmsgs : -1;
  ::mq_close(q);
  return n;
}

/// A sender in a child process that sends 0..n-1 in one loop turn, then, with `flush`,
/// flushes and signals `sent` and waits for `go`, and then closes.
int send_in_one_turn(const std::string& address, int n, bool flush, const handshake& sent,
                     const handshake& go) {
  ipcoro::io_context ctx;
  channel_sender<int> tx = ipcoro::sync_wait(ctx, ipcoro::open_sender<int>(address));
  ipcoro::sync_wait(ctx, [](channel_sender<int>& tx, int n, bool flush) -> task<void> {
    for (int i = 0; i < n; ++i) co_await tx.send(i);
    if (flush) co_await tx.flush();
  }(tx, n, flush));
  if (flush) {
    sent.signal();
    go.wait();
  }
  tx.close();  // posts what is still held first
  return 0;
}

std::vector<int> receive_all(channel_receiver<int>& rx) {
  ipcoro::io_context& ctx = ipcoro::io_context::current();
  std::vector<int> got;
  while (std::optional<int> v = ipcoro::sync_wait(ctx, rx.receive().with_timeout(bounded))) got.push_back(*v);
  return got;
}

std::vector<int> count_to(int n) {
  std::vector<int> v(static_cast<std::size_t>(n));
  for (int i = 0; i < n; ++i) v[static_cast<std::size_t>(i)] = i;
  return v;
}

}  // namespace

TEST_CASE(
    "a queue with one receiver carries a loop turn's messages as one queue message, and a close "
    "posts what the sender held first",
    "[channel][mq]") {
  const std::string name = std::string("/").append(ipcoro::test::unique_name("mq"));
  const std::string address = std::string("mq:").append(name);  // the default 10 messages of 8192 bytes
  {
    ipcoro::io_context ctx;
    channel_receiver<int> rx = ipcoro::sync_wait(ctx, ipcoro::open_receiver<int>(address));
    handshake sent, go;
    child_process sender([&] { return send_in_one_turn(address, 200, false, sent, go); });
    REQUIRE(sender.wait(bounded) == 0);
    // The turn's first message (the greeting) alone, the 200 messages in one queue
    // message, then the end marker.
    CHECK(queued(name) == 3);
    CHECK(receive_all(rx) == count_to(200));
  }
  CHECK(nothing_left_behind());
}

TEST_CASE("a queue with a second receiver carries each message alone, so that the receivers share them",
          "[channel][mq]") {
  const std::string name = std::string("/").append(ipcoro::test::unique_name("mq"));
  const std::string address = std::string("mq:").append(name);
  {
    ipcoro::io_context ctx;
    channel_receiver<int> rx = ipcoro::sync_wait(ctx, ipcoro::open_receiver<int>(address));
    handshake ready, never;
    // A second receiver: this one, inherited, attaches in the child with its first receive.
    child_process second([&]() -> int {
      ipcoro::io_context child_ctx;
      try {
        (void)ipcoro::sync_wait(child_ctx, rx.receive().with_timeout(1ms));
      } catch (const ipcoro::timed_out&) {
      }
      ready.signal();
      never.wait();
      return 0;
    });
    REQUIRE(ready.wait());
    handshake sent, go;
    child_process sender([&] { return send_in_one_turn(address, 8, true, sent, go); });
    REQUIRE(sent.wait());
    CHECK(queued(name) == 9);  // the greeting and 8 messages, each alone
    go.signal();
    REQUIRE(sender.wait(bounded) == 0);
    CHECK(receive_all(rx) == count_to(8));
    second.kill(SIGKILL);
    CHECK(second.wait() == 128 + SIGKILL);
  }
  CHECK(nothing_left_behind());
}
