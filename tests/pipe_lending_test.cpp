// SPDX-License-Identifier: MIT
// pipe: and fifo: links lend large frames to the pipe (vmsplice) instead of copying them in:
// the sender writes lent memory again only once the reader has read it, a killed sender's
// lent frames still arrive, and a sender closed partway through lending a frame finishes
// it. A FIFO opened by name, which any program may read, copies.
#include "ipcoro/channel.hpp"
#include "ipcoro/io_context.hpp"
#include "ipcoro/sync_wait.hpp"
#include "ipcoro/task.hpp"
#include "ipcoro/when_all.hpp"

#include "channel_support.hpp"
#include "process.hpp"

#include <signal.h>
#include <catch2/catch.hpp>

#include <array>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <optional>
#include <stop_token>
#include <string>

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

constexpr std::size_t big = std::size_t{64} * 1024;  // lent: larger than lent_pages::min_frame
/// Three times the 64 KiB pipe of the tests that cut or close a lent frame (under
/// lent_pages::max_frame): its send waits with part of it in the pipe.
constexpr std::size_t large = std::size_t{200} * 1024;

/// Message `i` of `size` bytes: every byte depends on `i`, so a message overwritten by a
/// later one before it was read is told apart.
std::string message(int i, std::size_t size = big) {
  std::string m(size, '\0');
  for (std::size_t j = 0; j < size; ++j)
    m[j] = static_cast<char>((static_cast<std::size_t>(i) * 131 + j) & 0xff);
  return m;
}

/// Receives `count` messages (message(0) ...) and then the end: 0 when all came intact.
int expect_messages(channel_receiver<std::string>& rx, int count) {
  ipcoro::io_context ctx;
  for (int i = 0; i < count; ++i) {
    std::optional<std::string> m = ipcoro::sync_wait(ctx, rx.receive());
    if (!m) return 2;
    if (*m != message(i)) {
      std::fprintf(stderr, "receiver: message %d came changed\n", i);
      return 3;
    }
  }
  return ipcoro::sync_wait(ctx, rx.receive()) ? 4 : 0;
}

/// Sends `first` and writes it, then `cut`, which the link's pipe cannot take whole; the
/// sender is killed while that send waits for room (nobody reads). The receiver gets
/// `first`, then reports the frame cut short: never a message or a clean end.
template <class T>
void check_cut_frame(const std::string& address, const T& first, const T& cut) {
  {
    channel_link link = channel_link::create(address);
    ipcoro::test::handshake waiting;
    child_process child([&]() -> int {
      ipcoro::io_context ctx;
      channel_sender<T> tx = link.sender<T>();
      link.reset();
      ipcoro::sync_wait(ctx,
                        [](channel_sender<T>& tx, const T& first, const T& cut,
                           const ipcoro::test::handshake& waiting) -> task<void> {
                          co_await tx.send(first);
                          co_await tx.flush();
                          co_await ipcoro::when_all(
                              [](channel_sender<T>& tx, const T& cut) -> task<void> {
                                co_await tx.send(cut);  // never completes: nobody reads
                              }(tx, cut),
                              [](const ipcoro::test::handshake& waiting) -> task<void> {
                                waiting.signal();  // the send above has put in what fits and waits for room
                                co_return;
                              }(waiting));
                        }(tx, first, cut, waiting));
      return 1;  // not reached
    });
    channel_receiver<T> rx = link.receiver<T>();
    link.reset();
    REQUIRE(waiting.wait());
    child.kill(SIGKILL);
    REQUIRE(child.wait() == 128 + SIGKILL);
    ipcoro::io_context ctx;
    std::optional<T> got = ipcoro::sync_wait(ctx, rx.receive());
    REQUIRE(got);
    CHECK(*got == first);
    const std::string error =
        ipcoro::test::what_of<ipcoro::channel_error>([&] { ipcoro::sync_wait(ctx, rx.receive()); });
    CHECK(contains(error, "the stream ended inside a message"));
  }
  CHECK(nothing_left_behind());
}

/// Sends "hello" and writes it: the sender has greeted, so the frames after it are lent.
task<void> greet(channel_sender<std::string>& tx) {
  co_await tx.send(std::string("hello"));
  co_await tx.flush();
}

}  // namespace

TEST_CASE("a pipe or FIFO link writes the memory it lent a frame from again only once the frame was read",
          "[channel][ipc][lending]") {
  // A 1 MiB pipe holds as much as the sender's 1 MiB of lent memory: with nobody reading,
  // the sender comes round to memory whose frames are still in the pipe, and must copy.
  const std::string scheme = GENERATE("pipe", "fifo");
  const std::string address = fresh_address(scheme, "capacity=1048576");
  constexpr int count = 40;
  {
    channel_link link = channel_link::create(address);
    ipcoro::test::handshake go;
    child_process child([&]() -> int {
      channel_receiver<std::string> rx = link.receiver<std::string>();
      link.reset();
      if (!go.wait()) return 5;
      return expect_messages(rx, count);
    });
    ipcoro::io_context ctx;
    channel_sender<std::string> tx = link.sender<std::string>();
    link.reset();
    // Sends until the full pipe holds a send back: nothing reads yet.
    int sent = 0;
    for (bool full = false; !full && sent < count;) {
      try {
        ipcoro::sync_wait(ctx, tx.send(message(sent)).with_timeout(200ms));
        ++sent;
      } catch (const ipcoro::timed_out&) {
        full = true;
      }
    }
    INFO("sent before the pipe was full: " << sent);
    CHECK(sent > 15);  // a 1 MiB pipe takes fifteen frames of 64 KiB, and one in part
    CHECK(sent < count);
    go.signal();
    ipcoro::sync_wait(ctx, [](channel_sender<std::string>& tx, int from) -> task<void> {
      for (int i = from; i < count; ++i) co_await tx.send(message(i));
      tx.close();
    }(tx, sent));
    ctx.run();
    CHECK(child.wait() == 0);
  }
  CHECK(nothing_left_behind());
}

TEST_CASE("a pipe or FIFO link's lent frames arrive intact after their sender was killed",
          "[channel][ipc][lending][death]") {
  const std::string scheme = GENERATE("pipe", "fifo");
  const std::string address = fresh_address(scheme, "capacity=1048576");
  constexpr int count = 12;  // 12 frames of 64 KiB fit in the 1 MiB pipe: every send completes
  {
    channel_link link = channel_link::create(address);
    ipcoro::test::handshake sent;
    child_process child([&]() -> int {
      ipcoro::io_context ctx;
      channel_sender<std::string> tx = link.sender<std::string>();
      link.reset();
      ipcoro::sync_wait(ctx, [](channel_sender<std::string>& tx) -> task<void> {
        for (int i = 0; i < count; ++i) co_await tx.send(message(i));
        co_await tx.flush();  // the first frame, which greets, is copied and held till then
      }(tx));
      sent.signal();
      for (;;) ::pause();  // killed here, without closing: its memory goes with it
    });
    channel_receiver<std::string> rx = link.receiver<std::string>();
    link.reset();
    REQUIRE(sent.wait());
    child.kill(SIGKILL);
    REQUIRE(child.wait() == 128 + SIGKILL);
    ipcoro::io_context ctx;
    for (int i = 0; i < count; ++i) {
      std::optional<std::string> m = ipcoro::sync_wait(ctx, rx.receive());
      REQUIRE(m);
      CHECK(*m == message(i));
    }
    const std::string error =
        ipcoro::test::what_of<ipcoro::channel_error>([&] { ipcoro::sync_wait(ctx, rx.receive()); });
    CHECK(contains(error, "went away without closing"));
  }
  CHECK(nothing_left_behind());
}

TEST_CASE("a pipe or FIFO link closed while a send waits partway through lending a frame finishes that frame",
          "[channel][ipc][lending][close]") {
  // A 64 KiB pipe takes part of a 200 KiB frame; the send waits for room, and the sender
  // is closed meanwhile. The frame is partly in the pipe, so the send completes and the
  // rest is written before the end of the stream: the receiver gets it whole, then the end.
  const std::string scheme = GENERATE("pipe", "fifo");
  const std::string address = fresh_address(scheme, "capacity=65536");
  {
    channel_link link = channel_link::create(address);
    ipcoro::test::handshake go;
    child_process child([&]() -> int {
      channel_receiver<std::string> rx = link.receiver<std::string>();
      link.reset();
      if (!go.wait()) return 5;
      ipcoro::io_context ctx;
      std::optional<std::string> first = ipcoro::sync_wait(ctx, rx.receive());
      if (!first || *first != "hello") return 2;
      std::optional<std::string> second = ipcoro::sync_wait(ctx, rx.receive());
      if (!second || *second != message(1, large)) return 3;
      return ipcoro::sync_wait(ctx, rx.receive()) ? 4 : 0;
    });
    ipcoro::io_context ctx;
    channel_sender<std::string> tx = link.sender<std::string>();
    link.reset();
    ipcoro::sync_wait(ctx, greet(tx));
    bool completed = false;
    std::string failure;
    ipcoro::sync_wait(
        ctx, ipcoro::when_all(
                 [](channel_sender<std::string>& tx, bool& completed, std::string& failure) -> task<void> {
                   try {
                     co_await tx.send(message(1, large));
                     completed = true;
                   } catch (const std::exception& e) {
                     failure = e.what();
                   }
                 }(tx, completed, failure),
                 [](channel_sender<std::string>& tx) -> task<void> {
                   tx.close();  // the send above waits for room in the pipe
                   co_return;
                 }(tx)));
    INFO(failure);
    CHECK(completed);
    go.signal();
    ctx.run();  // writes the rest of the frame and the end, as the receiver reads
    CHECK(child.wait() == 0);
  }
  CHECK(nothing_left_behind());
}

TEST_CASE("a pipe or FIFO link's sender killed partway through lending a frame is reported as a cut frame",
          "[channel][ipc][lending][death]") {
  // A 64 KiB pipe takes part of a 200 KiB lent frame; the part in the pipe outlives its
  // sender (the pipe holds the pages).
  const std::string scheme = GENERATE("pipe", "fifo");
  check_cut_frame(fresh_address(scheme, "capacity=65536"), std::string("hello"), message(1, large));
}

TEST_CASE("pipe and FIFO links lend large frames; a FIFO opened by name copies them",
          "[channel][ipc][lending]") {
  // The sender's count of frames lent whole tells the two paths apart (both deliver).
  const std::string scheme = GENERATE("pipe", "fifo", "named fifo");
  const bool named = scheme == "named fifo";
  const std::string address = fresh_address(named ? "fifo" : scheme);
  constexpr int count = 3;  // three frames of 64 KiB fit in the 256 KiB pipe of a channel
  {
    std::optional<channel_link> link;
    if (!named) link.emplace(channel_link::create(address));
    ipcoro::test::handshake opened;
    child_process child([&]() -> int {
      ipcoro::io_context ctx;
      channel_receiver<std::string> rx =
          named ? ipcoro::sync_wait(ctx, ipcoro::open_receiver<std::string>(address))
                : link->receiver<std::string>();
      link.reset();
      opened.signal();
      std::optional<std::string> first = ipcoro::sync_wait(ctx, rx.receive());
      if (!first || *first != "hello") return 2;
      for (int i = 0; i < count; ++i) {
        std::optional<std::string> m = ipcoro::sync_wait(ctx, rx.receive());
        if (!m || *m != message(i)) return 3;
      }
      return ipcoro::sync_wait(ctx, rx.receive()) ? 4 : 0;
    });
    ipcoro::io_context ctx;
    REQUIRE(opened.wait());
    channel_sender<std::string> tx = named ? ipcoro::sync_wait(ctx, ipcoro::open_sender<std::string>(address))
                                           : link->sender<std::string>();
    link.reset();
    ipcoro::sync_wait(ctx, greet(tx));
    const std::uint64_t before = ipcoro::detail::stream_counts().lent_frames;
    ipcoro::sync_wait(ctx, [](channel_sender<std::string>& tx) -> task<void> {
      for (int i = 0; i < count; ++i) co_await tx.send(message(i));
      tx.close();
    }(tx));
    ctx.run();
    CHECK(child.wait() == 0);
    CHECK(ipcoro::detail::stream_counts().lent_frames - before == (named ? 0U : count));
  }
  CHECK(nothing_left_behind());
}

namespace {

/// A value whose encoding is its bytes (codec<T> is bytewise), large enough that a stream
/// receiver reads its payload straight from the pipe into it.
using block = std::array<std::uint64_t, 8192>;  // 64 KiB

block block_of(int i) {
  block b;
  for (std::size_t k = 0; k < b.size(); ++k) b[k] = static_cast<std::uint64_t>(i) * 1000003 + k;
  return b;
}

}  // namespace

TEST_CASE("a large value whose encoding is its bytes is read from the pipe straight into it",
          "[channel][ipc][lending][direct]") {
  // Every frame is in the 1 MiB pipe before the receiver starts: each receive() and
  // receive_into() reads its payload into the value; a view reads it into the buffer.
  const std::string scheme = GENERATE("pipe", "fifo");
  const std::string address = fresh_address(scheme, "capacity=1048576");
  constexpr int count = 12;
  {
    channel_link link = channel_link::create(address);
    ipcoro::test::handshake sent;
    child_process child([&]() -> int {
      ipcoro::io_context ctx;
      channel_sender<block> tx = link.sender<block>();
      link.reset();
      ipcoro::sync_wait(ctx, [](channel_sender<block>& tx) -> task<void> {
        for (int i = 0; i < count; ++i) {
          block b = block_of(i);
          co_await tx.send(std::move(b));
        }
        co_await tx.flush();
      }(tx));
      sent.signal();
      tx.close();
      ctx.run();
      return 0;
    });
    channel_receiver<block> rx = link.receiver<block>();
    link.reset();
    REQUIRE(sent.wait());
    ipcoro::io_context ctx;
    const std::uint64_t before = ipcoro::detail::stream_counts().direct_payloads;
    // A receive asked to stop before it starts leaves the first block, its payload still
    // in the pipe, for the next one.
    std::stop_source stop;
    stop.request_stop();
    CHECK_THROWS_AS(ipcoro::sync_wait(ctx, rx.receive().with_stop_token(stop.get_token())),
                    ipcoro::operation_cancelled);
    int intact = 0;
    block into{};
    for (int i = 0; i < count; ++i) {
      switch (i % 3) {
        case 0: {
          std::optional<block> m = ipcoro::sync_wait(ctx, rx.receive());
          intact += m && *m == block_of(i);
          break;
        }
        case 1:
          intact += ipcoro::sync_wait(ctx, rx.receive_into(into)) && into == block_of(i);
          break;
        default: {
          std::optional<ipcoro::channel_view> v = ipcoro::sync_wait(ctx, rx.receive_view());
          const block expected = block_of(i);
          intact += v && v->bytes().size() == sizeof(block) &&
                    std::memcmp(v->bytes().data(), expected.data(), sizeof(block)) == 0;
        }
      }
    }
    CHECK(intact == count);
    CHECK(ipcoro::detail::stream_counts().direct_payloads - before == count * 2 / 3);
    CHECK_FALSE(ipcoro::sync_wait(ctx, rx.receive()));
    CHECK(child.wait() == 0);
  }
  CHECK(nothing_left_behind());
}

TEST_CASE("a large value cut by its sender's death is reported as a cut frame, not read straight in",
          "[channel][ipc][lending][direct][death]") {
  // A 128 KiB pipe takes the first block and part of the second. The pipe holds less than
  // the second frame: it is read as any frame, and its end is missing.
  const std::string scheme = GENERATE("pipe", "fifo");
  check_cut_frame(fresh_address(scheme, "capacity=131072"), block_of(0), block_of(1));
}
