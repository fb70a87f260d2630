// SPDX-License-Identifier: MIT
// Generic descriptor operations: openat through the ring (blocking FIFO opens that never
// block the loop, with timeouts and cancellation) and poll.
#include <ipcoro/ipcoro.hpp>

#include <catch2/catch.hpp>

#include <fcntl.h>
#include <poll.h>
#include <sys/stat.h>
#include <unistd.h>

#include <array>
#include <chrono>
#include <filesystem>
#include <string>

#include "process.hpp"

using namespace std::chrono_literals;
using ipcoro::task;

namespace {

/// A FIFO under the temp directory that is removed when the test ends, pass or fail.
struct temp_fifo {
  std::string path = (std::filesystem::temp_directory_path() / ipcoro::test::unique_name("fifo")).string();
  temp_fifo() { REQUIRE(::mkfifo(path.c_str(), 0600) == 0); }
  ~temp_fifo() { ::unlink(path.c_str()); }
};

/// Runs `attempt` (a task) and returns the errno it failed with, 0 on success.
task<int> error_of(task<void> attempt) {
  try {
    co_await std::move(attempt);
  } catch (const ipcoro::timed_out&) {
    co_return ETIMEDOUT;
  } catch (const ipcoro::operation_cancelled&) {
    co_return ECANCELED;
  } catch (const std::system_error& e) {
    co_return e.code().value();
  }
  co_return 0;
}

}  // namespace

TEST_CASE("opening a FIFO through the ring waits for the other end without blocking the loop",
          "[fd_io][fifo]") {
  temp_fifo fifo;
  ipcoro::io_context ctx;
  ipcoro::test::child_process writer([&] {
    ipcoro::io_context child_ctx;
    auto body = [&]() -> task<int> {
      ipcoro::unique_fd fd{co_await ipcoro::openat(AT_FDCWD, fifo.path.c_str(), O_WRONLY | O_CLOEXEC)};
      const std::array<std::byte, 4> msg{std::byte{'p'}, std::byte{'i'}, std::byte{'n'}, std::byte{'g'}};
      co_await ipcoro::write_all(fd.get(), msg);
      co_return 0;
    };
    return ipcoro::sync_wait(child_ctx, body());
  });
  // While the open waits for the writer, the loop keeps running other coroutines.
  int ticks_while_opening = 0;
  bool opened = false;
  auto open_and_read = [&]() -> task<std::string> {
    ipcoro::unique_fd fd{co_await ipcoro::openat(AT_FDCWD, fifo.path.c_str(), O_RDONLY | O_CLOEXEC)};
    opened = true;
    std::array<std::byte, 4> buf{};
    const std::size_t n = co_await ipcoro::read_exact(fd.get(), buf);
    co_return std::string(reinterpret_cast<const char*>(buf.data()), n);
  };
  auto ticker = [&]() -> task<void> {
    while (!opened) {
      co_await ipcoro::nop();
      ++ticks_while_opening;
    }
  };
  auto [text, unit] = ipcoro::sync_wait(ctx, ipcoro::when_all(open_and_read(), ticker()));
  (void)unit;
  CHECK(text == "ping");
  CHECK(ticks_while_opening > 0);
  CHECK(writer.wait() == 0);
}

TEST_CASE("a FIFO open that nobody answers times out, for a reader and for a writer",
          "[fd_io][fifo][timeout]") {
  temp_fifo fifo;
  ipcoro::io_context ctx;
  const auto t0 = std::chrono::steady_clock::now();
  auto open_with_timeout = [&](int flags) -> task<void> {
    ipcoro::unique_fd fd{
        co_await ipcoro::openat(AT_FDCWD, fifo.path.c_str(), flags | O_CLOEXEC).with_timeout(30ms)};
  };
  CHECK(ipcoro::sync_wait(ctx, error_of(open_with_timeout(O_WRONLY))) == ETIMEDOUT);
  CHECK(ipcoro::sync_wait(ctx, error_of(open_with_timeout(O_RDONLY))) == ETIMEDOUT);
  CHECK(std::chrono::steady_clock::now() - t0 >= 60ms);
}

TEST_CASE("a FIFO open that nobody answers can be cancelled through its stop token",
          "[fd_io][fifo][cancel]") {
  temp_fifo fifo;
  ipcoro::io_context ctx;
  std::stop_source source;
  auto opener = [&]() -> task<int> {
    co_return co_await error_of([&]() -> task<void> {
      ipcoro::unique_fd fd{co_await ipcoro::openat(AT_FDCWD, fifo.path.c_str(), O_WRONLY | O_CLOEXEC)};
    }());
  };
  auto canceller = [&]() -> task<void> {
    co_await ipcoro::sleep_for(20ms);  // lets the open reach its worker; the outcome does not depend on it
    source.request_stop();
  };
  auto [err, unit] =
      ipcoro::sync_wait(ctx, ipcoro::when_all(opener().with_stop_token(source.get_token()), canceller()));
  (void)unit;
  CHECK(err == ECANCELED);
}

TEST_CASE("opening a missing path through the ring reports ENOENT with the path", "[fd_io]") {
  ipcoro::io_context ctx;
  const std::string path = "/nonexistent-ipcoro-dir/" + ipcoro::test::unique_name("x");
  auto body = [&]() -> task<std::string> {
    try {
      co_await ipcoro::openat(AT_FDCWD, path.c_str(), O_RDONLY | O_CLOEXEC);
    } catch (const std::system_error& e) {
      CHECK(e.code().value() == ENOENT);
      co_return e.what();
    }
    co_return "";
  };
  CHECK_THAT(ipcoro::sync_wait(ctx, body()), Catch::Contains(path));
}

TEST_CASE("poll completes when the descriptor becomes readable, with the events that happened", "[fd_io]") {
  ipcoro::io_context ctx;
  auto [r, w] = ipcoro::make_pipe();
  bool written = false;
  auto poller = [&]() -> task<unsigned> {
    const unsigned events = co_await ipcoro::poll(r.native_handle(), POLLIN);
    CHECK(written);
    co_return events;
  };
  auto writer = [&]() -> task<void> {
    co_await ipcoro::nop();
    written = true;
    const std::array<std::byte, 1> one{std::byte{1}};
    co_await w.write_all(one);
  };
  auto [events, unit] = ipcoro::sync_wait(ctx, ipcoro::when_all(poller(), writer()));
  (void)unit;
  CHECK((events & POLLIN) != 0);

  w.close();
  std::array<std::byte, 1> drain{};
  CHECK(ipcoro::sync_wait(ctx, [&]() -> task<std::size_t> { co_return co_await r.read(drain); }()) == 1);
  const unsigned hangup = ipcoro::sync_wait(
      ctx, [&]() -> task<unsigned> { co_return co_await ipcoro::poll(r.native_handle(), POLLIN); }());
  CHECK((hangup & POLLHUP) != 0);
}
