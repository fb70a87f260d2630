// SPDX-License-Identifier: MIT
// Byte-stream channels (pipe, FIFO, fd) across real processes: a sender that dies at any
// point, even before its first message, is an error and never a clean end; descriptors
// of fd: addresses are checked when the channel is made.
#include "ipcoro/channel.hpp"
#include "ipcoro/error.hpp"
#include "ipcoro/io_context.hpp"
#include "ipcoro/pipe.hpp"
#include "ipcoro/sync_wait.hpp"
#include "ipcoro/task.hpp"

#include "channel_support.hpp"
#include "counting_new.hpp"
#include "process.hpp"

#include <catch2/catch.hpp>

#include <fcntl.h>
#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <optional>
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

/// How a receive ended: a value count, and the error if there was one.
struct outcome {
  int values = 0;
  bool clean_end = false;
  std::string error;
};

/// Receives until the end or an error, each wait bounded so that a hang fails the test.
task<outcome> receive_all(channel_receiver<int>& rx) {
  outcome o;
  try {
    while (std::optional<int> v = co_await rx.receive().with_timeout(10s)) ++o.values;
    o.clean_end = true;
  } catch (const ipcoro::timed_out&) {
    o.error = "timed out: the receiver would have waited forever";
  } catch (const std::exception& e) {
    o.error = e.what();
  }
  co_return o;
}

enum class death { before_taking_its_end, before_its_first_message, closes_without_sending };

const char* to_string(death d) {
  switch (d) {
    case death::before_taking_its_end:
      return "killed before taking its end";
    case death::before_its_first_message:
      return "killed before its first message";
    case death::closes_without_sending:
      return "closes without sending";
  }
  return "?";
}

}  // namespace

TEST_CASE("a stream sender killed before its first message is an error for the receiver, not a clean end",
          "[channel][ipc][death]") {
  const std::string transport = GENERATE("pipe", "fifo");
  const death how =
      GENERATE(death::before_taking_its_end, death::before_its_first_message, death::closes_without_sending);
  CAPTURE(transport, to_string(how));
  outcome got;
  {
    channel_link link = channel_link::create(fresh_address(transport));
    child_process child([&link, how]() -> int {
      if (how == death::before_taking_its_end) ::raise(SIGKILL);
      ipcoro::io_context ctx;
      channel_sender<int> tx = link.sender<int>();
      link.reset();
      if (how == death::before_its_first_message) ::raise(SIGKILL);
      tx.close();
      return 0;
    });
    channel_receiver<int> rx = link.receiver<int>();
    link.reset();
    ipcoro::io_context ctx;
    got = ipcoro::sync_wait(ctx, receive_all(rx));
    CHECK(child.wait() == (how == death::closes_without_sending ? 0 : 128 + SIGKILL));
  }
  CAPTURE(got.error);
  CHECK(got.values == 0);
  if (how == death::closes_without_sending) {
    CHECK(got.clean_end);
    CHECK(got.error.empty());
  } else {
    CHECK_FALSE(got.clean_end);
    CHECK(contains(got.error, "went away"));
  }
  CHECK(nothing_left_behind());
}

TEST_CASE("a named FIFO's sender killed right after opening it ends the receive with an error",
          "[channel][ipc][death]") {
  const bool sends_first = GENERATE(false, true);
  CAPTURE(sends_first);
  const std::string address = fresh_address("fifo");
  ipcoro::io_context ctx;
  channel_receiver<int> rx = ipcoro::sync_wait(ctx, ipcoro::open_receiver<int>(address));
  outcome got;
  {
    child_process child([&address, sends_first]() -> int {
      ipcoro::io_context ctx;
      channel_sender<int> tx = ipcoro::sync_wait(ctx, ipcoro::open_sender<int>(address));
      if (sends_first) ipcoro::sync_wait(ctx, tx.send(1));
      ::raise(SIGKILL);
      return 0;
    });
    got = ipcoro::sync_wait(ctx, receive_all(rx));
    CHECK(child.wait() == 128 + SIGKILL);
  }
  CAPTURE(got.error);
  CHECK(got.values == (sends_first ? 1 : 0));
  CHECK_FALSE(got.clean_end);
  CHECK(contains(got.error, "went away"));
  rx.close();
  CHECK(nothing_left_behind());
}

TEST_CASE("an fd: address whose descriptor is not open, or open the wrong way, is refused when opened",
          "[channel][fd]") {
  ipcoro::io_context ctx;
  // A descriptor number this process surely does not have open.
  const int unused = 1000;
  REQUIRE(::fcntl(unused, F_GETFD) == -1);
  const std::string address = "fd:" + std::to_string(unused);
  const std::string refused = ipcoro::test::what_of<ipcoro::channel_error>(
      [&] { (void)ipcoro::sync_wait(ctx, ipcoro::open_receiver<int>(address)); });
  CHECK(contains(refused, address));
  CHECK(contains(refused, "not open"));
  const std::string refused_sender = ipcoro::test::what_of<ipcoro::channel_error>(
      [&] { (void)ipcoro::sync_wait(ctx, ipcoro::open_sender<int>(address)); });
  CHECK(contains(refused_sender, "not open"));

  ipcoro::pipe_pair p = ipcoro::make_pipe();
  const std::string read_end = "fd:" + std::to_string(p.reader.native_handle());
  const std::string wrong_way = ipcoro::test::what_of<ipcoro::channel_error>(
      [&] { (void)ipcoro::sync_wait(ctx, ipcoro::open_sender<int>(read_end)); });
  CHECK(contains(wrong_way, read_end));
  CHECK(contains(wrong_way, "reading only"));
}

TEST_CASE("a frame head announcing a gigabyte makes a stream receiver reserve only what has arrived",
          "[channel][fd][hostile]") {
  ipcoro::pipe_pair p = ipcoro::make_pipe();
  {
    // Another process writes a head that announces 1 GiB, a little of it, and goes.
    child_process liar([&p]() -> int {
      p.reader.close();
      const std::uint32_t head[2] = {std::uint32_t{1} << 30, 1};  // length, kind: greeting
      const std::string some(1000, 'x');
      const bool ok =
          ::write(p.writer.native_handle(), head, sizeof head) == sizeof head &&
          ::write(p.writer.native_handle(), some.data(), some.size()) == static_cast<ssize_t>(some.size());
      return ok ? 0 : 1;
    });
    CHECK(liar.wait() == 0);
  }
  p.writer.close();
  ipcoro::io_context ctx;
  const std::string address = "fd:" + std::to_string(p.reader.release_fd().release());
  channel_receiver<int> rx = ipcoro::sync_wait(ctx, ipcoro::open_receiver<int>(address));
  (void)ipcoro::test::take_largest_allocation();
  const std::string error =
      ipcoro::test::what_of<ipcoro::channel_error>([&] { (void)ipcoro::sync_wait(ctx, rx.receive()); });
  CHECK(contains(error, "ended inside a message"));
  CHECK(ipcoro::test::take_largest_allocation() < 1024 * 1024);
}
