// SPDX-License-Identifier: MIT
// One vocabulary: channel errors are std::system_errors that keep the error code below them.
#include "ipcoro/channel.hpp"
#include "ipcoro/io_context.hpp"
#include "ipcoro/sync_wait.hpp"
#include "ipcoro/task.hpp"

#include "channel_support.hpp"
#include "process.hpp"

#include <catch2/catch.hpp>

#include <string>
#include <system_error>
#include <typeinfo>

namespace {

using ipcoro::channel_link;
using ipcoro::channel_receiver;
using ipcoro::channel_sender;
using ipcoro::task;
using ipcoro::test::child_process;
using ipcoro::test::contains;
using ipcoro::test::fresh_address;
using ipcoro::test::nothing_left_behind;

/// What a call threw, seen as a std::system_error: its code, its message and its dynamic
/// type; `thrown` stays false when it threw nothing of that kind (anything else passes).
struct caught {
  bool thrown = false;
  std::error_code code;
  std::string what;
  std::string type;
};
template <class F>
caught system_error_of(F&& f) {
  try {
    f();
  } catch (const std::system_error& e) {
    return {true, e.code(), e.what(), typeid(e).name()};
  }
  return {};
}

task<void> send_until_refused(channel_sender<int>& tx) {
  // A stream may take a few messages into the pipe buffer before it notices.
  for (int i = 0; i < 100000; ++i) co_await tx.send(i);
}

}  // namespace

TEST_CASE("a channel error caused by EPIPE still says EPIPE", "[vocabulary][channel][ipc]") {
  const std::string transport = GENERATE("pipe", "fifo", "shm", "file");
  const std::string address = fresh_address(transport);
  CAPTURE(address);
  {
    channel_link link = channel_link::create(address);
    ipcoro::test::handshake closed;
    child_process child([&]() -> int {
      channel_receiver<int> rx = link.receiver<int>();
      link.reset();
      rx.close();
      closed.signal();
      return 0;
    });
    channel_sender<int> tx = link.sender<int>();
    link.reset();
    REQUIRE(closed.wait());
    REQUIRE(child.wait() == 0);
    ipcoro::io_context ctx;
    const caught c = system_error_of([&] { ipcoro::sync_wait(ctx, send_until_refused(tx)); });
    REQUIRE(c.thrown);
    CHECK(c.type == typeid(ipcoro::channel_closed).name());
    CHECK(c.code == std::errc::broken_pipe);
    CHECK(contains(c.what, address));
  }
  CHECK(nothing_left_behind());
}

TEST_CASE(
    "an in-process send after the receiver closed says EPIPE, and catch (channel_error) still catches it",
    "[vocabulary][channel]") {
  auto [tx, rx] = ipcoro::make_channel<int>(4);
  rx.close();
  ipcoro::io_context ctx;
  bool caught_as_channel_error = false;
  try {
    ipcoro::sync_wait(ctx, tx.send(1));
  } catch (const ipcoro::channel_error& e) {
    caught_as_channel_error = true;
    CHECK(dynamic_cast<const ipcoro::channel_closed*>(&e) != nullptr);
    const auto* as_system_error = dynamic_cast<const std::system_error*>(&e);
    REQUIRE(as_system_error != nullptr);
    CHECK(as_system_error->code() == std::errc::broken_pipe);
  }
  CHECK(caught_as_channel_error);
}

TEST_CASE("a receiver of another type is refused with EPROTO", "[vocabulary][channel][ipc]") {
  const std::string address = fresh_address("pipe");
  channel_link link = channel_link::create(address);
  child_process child([&]() -> int {
    ipcoro::io_context ctx;
    channel_sender<std::string> tx = link.sender<std::string>();
    link.reset();
    try {
      ipcoro::sync_wait(ctx, tx.send("not an int"));
    } catch (const ipcoro::channel_error&) {
    }
    return 0;
  });
  channel_receiver<int> rx = link.receiver<int>();
  link.reset();
  ipcoro::io_context ctx;
  const caught c = system_error_of([&] { (void)ipcoro::sync_wait(ctx, rx.receive()); });
  REQUIRE(c.thrown);
  CHECK(c.type == typeid(ipcoro::channel_type_mismatch).name());
  CHECK(c.code == std::errc::protocol_error);
  rx.close();
  CHECK(child.wait() == 0);
}

TEST_CASE("opening a sender where nobody listens keeps the ENOENT below it", "[vocabulary][channel][ipc]") {
  const std::string transport = GENERATE("fifo", "mq", "shm", "file");
  const std::string address = fresh_address(transport);
  CAPTURE(address);
  ipcoro::io_context ctx;
  const caught c = system_error_of([&] { (void)ipcoro::sync_wait(ctx, ipcoro::open_sender<int>(address)); });
  REQUIRE(c.thrown);
  CHECK(c.type == typeid(ipcoro::channel_error).name());
  CHECK(c.code == std::errc::no_such_file_or_directory);
  CHECK(contains(c.what, "nobody has opened its receiver"));
  CHECK(nothing_left_behind());
}
