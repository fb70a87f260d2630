// SPDX-License-Identifier: MIT
// Coalesced byte streams: messages of one loop turn go out in few writes, a lone one at once,
// close and abort write what is held, a dead receiver is reported, and backpressure is bounded.
#include "ipcoro/channel.hpp"
#include "ipcoro/io_context.hpp"
#include "ipcoro/pipe.hpp"
#include "ipcoro/sync_wait.hpp"
#include "ipcoro/task.hpp"
#include "ipcoro/when_all.hpp"

#include "channel_support.hpp"
#include "process.hpp"
#include "skip.hpp"

#include <limits.h>
#include <signal.h>
#include <catch2/catch.hpp>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace {

using namespace std::chrono_literals;
using ipcoro::channel_link;
using ipcoro::channel_receiver;
using ipcoro::channel_sender;
using ipcoro::task;
using ipcoro::test::child_process;
using ipcoro::test::contains;
using ipcoro::test::fresh_address;
using ipcoro::test::nothing_left_behind;

std::uint64_t writes_so_far() { return ipcoro::detail::stream_counts().writes; }

/// Receives ints until the end; returns 0 when they are 0..count-1 in order, then a clean end.
int expect_in_order(channel_receiver<int>& rx, int count) {
  ipcoro::io_context ctx;
  int next = 0;
  try {
    for (;;) {
      std::optional<int> v = ipcoro::sync_wait(ctx, rx.receive());
      if (!v) break;
      if (*v != next) return 2;
      ++next;
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "receiver: %s after %d\n", e.what(), next);
    return 3;
  }
  return next == count ? 0 : 4;
}

}  // namespace

TEST_CASE("messages sent in one loop turn reach the kernel in few writes, every one received",
          "[channel][ipc][coalesce]") {
  const std::string transport = GENERATE("pipe", "fifo");
  const std::string address = fresh_address(transport);
  CAPTURE(address);
  constexpr int count = 1000;
  {
    channel_link link = channel_link::create(address);
    child_process child([&]() -> int {
      channel_receiver<int> rx = link.receiver<int>();
      link.reset();
      return expect_in_order(rx, count);
    });
    ipcoro::io_context ctx;
    channel_sender<int> tx = link.sender<int>();
    link.reset();
    const std::uint64_t before = writes_so_far();
    ipcoro::sync_wait(ctx, [](channel_sender<int>& tx) -> task<void> {
      for (int i = 0; i < count; ++i) co_await tx.send(i);  // no wait: one turn of the loop
    }(tx));
    ipcoro::sync_wait(ctx, tx.flush());
    const std::uint64_t writes = writes_so_far() - before;
    // 12-byte frames, whole frames per write of at most PIPE_BUF, one more for the greeting.
    constexpr std::uint64_t frame = 8 + sizeof(int);
    constexpr std::uint64_t most = (count * frame + (PIPE_BUF - frame) - 1) / (PIPE_BUF - frame) + 1;
    CAPTURE(writes, most);
    CHECK(writes >= 1);
    CHECK(writes <= most);
    tx.close();
    CHECK(child.wait() == 0);
  }
  CHECK(nothing_left_behind());
}

TEST_CASE("a lone message goes out at the end of its loop turn: round trips never wait for a flush",
          "[channel][ipc][coalesce]") {
  const std::string transport = GENERATE("pipe", "fifo");
  CAPTURE(transport);
  constexpr int rounds = 300;
  {
    channel_link there = channel_link::create(fresh_address(transport));
    channel_link back = channel_link::create(fresh_address(transport));
    child_process child([&]() -> int {
      ipcoro::io_context ctx;
      channel_receiver<int> rx = there.receiver<int>();
      channel_sender<int> tx = back.sender<int>();
      there.reset();
      back.reset();
      return ipcoro::sync_wait(ctx, [](channel_receiver<int>& rx, channel_sender<int>& tx) -> task<int> {
        while (std::optional<int> v = co_await rx.receive()) co_await tx.send(*v + 1);
        co_return 0;
      }(rx, tx));
    });
    ipcoro::io_context ctx;
    channel_sender<int> tx = there.sender<int>();
    channel_receiver<int> rx = back.receiver<int>();
    there.reset();
    back.reset();
    const std::uint64_t before = writes_so_far();
    int answered = 0;
    ipcoro::sync_wait(ctx,
                      [](channel_sender<int>& tx, channel_receiver<int>& rx, int& answered) -> task<void> {
                        for (int i = 0; i < rounds; ++i) {
                          co_await tx.send(i);
                          // Bounded, so that a message held back fails the test instead of hanging it.
                          std::optional<int> reply = co_await rx.receive().with_timeout(10s);
                          if (!reply || *reply != i + 1) co_return;
                          ++answered;
                        }
                      }(tx, rx, answered));
    CHECK(answered == rounds);
    // Each lone message went out in its own write (the first with the greeting): none was
    // held for a later turn, and none needed more than one write.
    CHECK(writes_so_far() - before == static_cast<std::uint64_t>(rounds));
    tx.close();
    CHECK(child.wait() == 0);
  }
  CHECK(nothing_left_behind());
}

TEST_CASE("close and abort write the messages still held; close then ends the stream cleanly",
          "[channel][ipc][coalesce][close]") {
  const std::string transport = GENERATE("pipe", "fifo");
  const bool abort = GENERATE(false, true);
  // More than the pipe and the sender hold together: the close must go on writing after it returns.
  const std::string address = fresh_address(transport, "capacity=4096");
  CAPTURE(address, abort);
  constexpr int count = 500;  // 6 KB: more than the pipe takes, within what pipe and sender hold
  {
    channel_link link = channel_link::create(address);
    ipcoro::test::handshake closed;
    child_process child([&]() -> int {
      ipcoro::io_context ctx;
      channel_sender<int> tx = link.sender<int>();
      link.reset();
      ipcoro::sync_wait(ctx, [](channel_sender<int>& tx, bool abort) -> task<void> {
        for (int i = 0; i < count; ++i) co_await tx.send(i);
        if (abort) {
          tx.abort();
        } else {
          tx.close();
        }
      }(tx, abort));
      closed.signal();
      return 0;  // the io_context's shutdown writes the rest, waiting for the reader
    });
    channel_receiver<int> rx = link.receiver<int>();
    link.reset();
    REQUIRE(closed.wait());
    ipcoro::io_context ctx;
    int next = 0;
    std::string error;
    try {
      for (;;) {
        std::optional<int> v = ipcoro::sync_wait(ctx, rx.receive());
        if (!v) break;
        if (*v != next) break;
        ++next;
      }
    } catch (const ipcoro::channel_error& e) {
      error = e.what();
    }
    CHECK(next == count);
    if (abort) {
      CHECK(contains(error, "without closing"));
    } else {
      CHECK(error.empty());
    }
    CHECK(child.wait() == 0);
  }
  CHECK(nothing_left_behind());
}

TEST_CASE("a close outside the loop, after sync_wait left a write in the loop, writes all and ends cleanly",
          "[channel][ipc][coalesce][close]") {
  const std::string transport = GENERATE("pipe", "fifo");
  // The pipe fills while the receiver waits, so sync_wait returns with a write still in the
  // loop; nothing turns that loop again before the sender waits for the receiver.
  const std::string address = fresh_address(transport, "capacity=4096");
  CAPTURE(address);
  constexpr int count = 500;  // 6 KB: more than the pipe takes, within what pipe and sender hold
  {
    channel_link link = channel_link::create(address);
    ipcoro::test::handshake go;
    child_process child([&]() -> int {
      channel_receiver<int> rx = link.receiver<int>();
      link.reset();
      if (!go.wait()) return 5;
      return expect_in_order(rx, count);
    });
    ipcoro::io_context ctx;
    channel_sender<int> tx = link.sender<int>();
    link.reset();
    ipcoro::sync_wait(ctx, [](channel_sender<int>& tx) -> task<void> {
      for (int i = 0; i < count; ++i) co_await tx.send(i);
    }(tx));
    go.signal();
    tx.close();  // outside any loop: must not leave the rest to a loop nobody turns
    CHECK(child.wait() == 0);
  }
  CHECK(nothing_left_behind());
}

TEST_CASE("a receiver that dies while messages are held is reported by the next send, flush or close",
          "[channel][ipc][coalesce]") {
  const std::string transport = GENERATE("pipe", "fifo");
  const int reporter = GENERATE(0, 1, 2);  // send, flush, close
  const std::string address = fresh_address(transport);
  CAPTURE(address, reporter);
  {
    channel_link link = channel_link::create(address);
    ipcoro::test::handshake ready;
    child_process child([&]() -> int {
      channel_receiver<int> rx = link.receiver<int>();
      link.reset();
      ready.signal();
      for (;;) ::pause();
    });
    ipcoro::io_context ctx;
    channel_sender<int> tx = link.sender<int>();
    link.reset();
    REQUIRE(ready.wait());
    child.kill(SIGKILL);
    REQUIRE(child.wait() == 128 + SIGKILL);
    // Taken at once: held until the loop's turn ends, when the write finds no reader.
    ipcoro::sync_wait(ctx, tx.send(1));
    if (reporter == 0) {
      const std::string error =
          ipcoro::test::what_of<ipcoro::channel_closed>([&] { ipcoro::sync_wait(ctx, tx.send(2)); });
      CHECK(contains(error, "the receiver has gone"));
    } else if (reporter == 1) {
      const std::string error =
          ipcoro::test::what_of<ipcoro::channel_closed>([&] { ipcoro::sync_wait(ctx, tx.flush()); });
      CHECK(contains(error, "the receiver has gone"));
    } else {
      tx.close();  // never throws, never waits: there is nobody to write to
      CHECK_FALSE(tx);
    }
  }
  CHECK(nothing_left_behind());
}

TEST_CASE("a slow receiver holds the sender back: it never holds more than the pipe's capacity unwritten",
          "[channel][ipc][coalesce]") {
  const std::string transport = GENERATE("pipe", "fifo");
  const std::string address = fresh_address(transport, "capacity=16384");
  CAPTURE(address);
  constexpr int count = 2000;  // 2 MB of 1 KiB messages
  {
    channel_link link = channel_link::create(address);
    child_process child([&]() -> int {
      ipcoro::io_context ctx;
      channel_receiver<std::string> rx = link.receiver<std::string>();
      link.reset();
      int got = 0;
      while (std::optional<std::string> v = ipcoro::sync_wait(ctx, rx.receive())) {
        if (v->size() != 1024 || (*v)[0] != static_cast<char>('a' + got % 26)) return 2;
        ++got;
      }
      return got == count ? 0 : 3;
    });
    ipcoro::io_context ctx;
    channel_sender<std::string> tx = link.sender<std::string>();
    link.reset();
    ipcoro::sync_wait(ctx, [](channel_sender<std::string>& tx) -> task<void> {
      for (int i = 0; i < count; ++i) {
        std::string v(1024, static_cast<char>('a' + i % 26));
        co_await tx.send(std::move(v));
      }
      co_await tx.flush();
    }(tx));
    const std::uint64_t peak = ipcoro::detail::stream_counts().peak_buffered;
    CAPTURE(peak);
    CHECK(peak > 0);
    CHECK(peak <= 16384);
    tx.close();
    CHECK(child.wait() == 0);
  }
  CHECK(nothing_left_behind());
}

TEST_CASE("flush is a no-op where nothing is held back", "[channel][coalesce]") {
  ipcoro::io_context ctx;
  auto [tx, rx] = ipcoro::make_channel<int>(4);
  ipcoro::sync_wait(ctx, tx.send(1));
  ipcoro::sync_wait(ctx, tx.flush());
  CHECK(ipcoro::sync_wait(ctx, rx.receive()) == 1);
  tx.close();
  CHECK_THROWS_AS(ipcoro::sync_wait(ctx, tx.flush()), ipcoro::channel_closed);
}

// A pipe or FIFO whose address names no capacity= gets 256 KiB (the kernel's default is
// 64 KiB, less than one 64 KiB message and its frame head): three such messages are in
// the kernel before the receiver reads any. With 64 KiB, the flush would wait for the
// receiver and time out.
TEST_CASE("a channel's pipe or FIFO holds 256 KiB unless the address says otherwise",
          "[channel][ipc][coalesce]") {
  const std::size_t max = ipcoro::pipe_max_size();
  if (max < std::size_t{256} * 1024) {
    IPCORO_SKIP("/proc/sys/fs/pipe-max-size is " + std::to_string(max) +
                ", below the 256 KiB a channel asks for");
  }
  const std::string transport = GENERATE("pipe", "fifo");
  const std::string address = fresh_address(transport);
  CAPTURE(address);
  {
    channel_link link = channel_link::create(address);
    channel_receiver<std::vector<std::byte>> rx = link.receiver<std::vector<std::byte>>();
    channel_sender<std::vector<std::byte>> tx = link.sender<std::vector<std::byte>>();
    ipcoro::io_context ctx;
    ipcoro::sync_wait(ctx,
                      [](channel_sender<std::vector<std::byte>>& tx)
                          -> task<void> {
                        for (int i = 0; i < 3; ++i) {
                          std::vector<std::byte> v(64 * 1024, static_cast<std::byte>(i + 1));
                          co_await tx.send(std::move(v));
                        }
                        co_await tx.flush();
                      }(tx)
                                 .with_timeout(10s));  // nobody reads yet: only the pipe's room lets this end
    tx.close();
    for (int i = 0; i < 3; ++i) {
      const std::optional<std::vector<std::byte>> v = ipcoro::sync_wait(ctx, rx.receive());
      REQUIRE(v);
      CHECK(v->size() == 64 * 1024);
      CHECK(v->front() == static_cast<std::byte>(i + 1));
    }
    CHECK_FALSE(ipcoro::sync_wait(ctx, rx.receive()));
  }
  CHECK(nothing_left_behind());
}
