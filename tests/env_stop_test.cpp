// SPDX-License-Identifier: MIT
// Tests that ipcoro awaitables honour the stop token another library's coroutine offers
// through its promise's get_env() (the P2300 convention, queried with ipcoro::get_stop_token_t).
#include <ipcoro/ipcoro.hpp>

#include <catch2/catch.hpp>

#include <unistd.h>

#include <array>
#include <chrono>
#include <coroutine>
#include <cstddef>
#include <exception>
#include <optional>
#include <stop_token>
#include <string>
#include <utility>

namespace {

using namespace std::chrono_literals;
using ipcoro::task;

// The environment of the foreign promise: answers the stop-token query, nothing else.
struct env {
  std::stop_token token;
  std::stop_token query(ipcoro::get_stop_token_t) const noexcept { return token; }
};

// A minimal coroutine type that is not ipcoro's, as a sender/receiver library would have:
// started by hand, it records how it ended; its promise knows nothing of ipcoro but get_env().
struct foreign {
  struct promise_type {
    std::stop_token token;
    std::exception_ptr error;
    bool finished = false;

    foreign get_return_object() { return foreign{std::coroutine_handle<promise_type>::from_promise(*this)}; }
    std::suspend_always initial_suspend() const noexcept { return {}; }
    std::suspend_always final_suspend() const noexcept { return {}; }
    void return_void() noexcept { finished = true; }
    void unhandled_exception() noexcept { error = std::current_exception(); }
    env get_env() const noexcept { return env{token}; }
  };

  explicit foreign(std::coroutine_handle<promise_type> h) noexcept : handle(h) {}
  foreign(foreign&& other) noexcept : handle(std::exchange(other.handle, {})) {}
  ~foreign() {
    if (handle) handle.destroy();
  }
  void start(std::stop_token token) {
    handle.promise().token = std::move(token);
    handle.resume();
  }
  bool done() const noexcept { return handle.done(); }
  // What the coroutine ended with: "" for a normal end, else the exception's type.
  std::string outcome() const {
    if (!handle.promise().error) return handle.promise().finished ? "" : "unfinished";
    try {
      std::rethrow_exception(handle.promise().error);
    } catch (const ipcoro::operation_cancelled&) {
      return "operation_cancelled";
    } catch (const ipcoro::timed_out&) {
      return "timed_out";
    } catch (const std::exception& e) {
      return e.what();
    }
  }

  std::coroutine_handle<promise_type> handle;
};

static_assert(ipcoro::detail::env_stop_token_carrier<foreign::promise_type>);

// A promise with an environment that has no stop token: it gets none, as before.
struct no_token_env {};
struct env_without_token_promise {
  no_token_env get_env() const noexcept { return {}; }
};
static_assert(!ipcoro::detail::env_stop_token_carrier<env_without_token_promise>);

// Reads one byte that never comes; the timeout only bounds a test whose stop request is
// ignored (it then ends with timed_out, not operation_cancelled).
foreign read_from_foreign(ipcoro::pipe_reader& in, std::size_t& got) {
  std::array<std::byte, 1> b{};
  got = co_await in.read(b).with_timeout(10s);
}

task<std::size_t> read_in_task(ipcoro::pipe_reader& in, std::stop_token& seen) {
  seen = co_await ipcoro::get_stop_token();
  std::array<std::byte, 1> b{};
  co_return co_await in.read(b).with_timeout(10s);
}

foreign task_from_foreign(ipcoro::pipe_reader& in, std::stop_token& seen, std::size_t& got) {
  got = co_await read_in_task(in, seen);
}

TEST_CASE(
    "a read awaited by a foreign coroutine ends with operation_cancelled when its env's token is stopped",
    "[env_stop]") {
  ipcoro::io_context ctx;
  ipcoro::pipe_pair pipe = ipcoro::make_pipe();
  std::stop_source source;
  std::size_t got = 99;
  foreign f = read_from_foreign(pipe.reader, got);
  f.start(source.get_token());
  REQUIRE_FALSE(f.done());  // suspended on the read
  source.request_stop();
  const auto t0 = std::chrono::steady_clock::now();
  ctx.run();
  REQUIRE(f.done());
  CHECK(f.outcome() == "operation_cancelled");
  CHECK(got == 99);
  CHECK(std::chrono::steady_clock::now() - t0 < 5s);  // the stop ended it, not the timeout
}

TEST_CASE("a read awaited by a foreign coroutine whose token is already stopped fails at once",
          "[env_stop]") {
  ipcoro::io_context ctx;
  ipcoro::pipe_pair pipe = ipcoro::make_pipe();
  std::stop_source source;
  source.request_stop();
  std::size_t got = 99;
  foreign f = read_from_foreign(pipe.reader, got);
  f.start(source.get_token());
  ctx.run();
  REQUIRE(f.done());
  CHECK(f.outcome() == "operation_cancelled");
  CHECK(got == 99);
}

TEST_CASE("an ipcoro task awaited by a foreign coroutine inherits the token of its env", "[env_stop]") {
  ipcoro::io_context ctx;
  ipcoro::pipe_pair pipe = ipcoro::make_pipe();
  std::stop_source source;
  std::stop_token seen;
  std::size_t got = 99;
  foreign f = task_from_foreign(pipe.reader, seen, got);
  f.start(source.get_token());
  REQUIRE_FALSE(f.done());
  CHECK(seen == source.get_token());
  source.request_stop();
  ctx.run();
  REQUIRE(f.done());
  CHECK(f.outcome() == "operation_cancelled");
  CHECK(got == 99);
}

foreign receive_from_foreign(ipcoro::channel_receiver<int>& rx, std::optional<int>& got) {
  task<std::optional<int>> receive = rx.receive();
  got = co_await std::move(receive);
}

TEST_CASE(
    "a channel receive awaited by a foreign coroutine is cancelled by its env's token, and the channel "
    "goes on",
    "[env_stop]") {
  ipcoro::io_context ctx;
  ipcoro::channel_pair<int> ch = ipcoro::make_channel<int>(4);
  std::stop_source source;
  std::optional<int> got;
  foreign f = receive_from_foreign(ch.receiver, got);
  f.start(source.get_token());
  REQUIRE_FALSE(f.done());
  source.request_stop();
  ctx.run();
  REQUIRE(f.done());
  CHECK(f.outcome() == "operation_cancelled");
  CHECK_FALSE(got);
  ipcoro::sync_wait(ctx, ch.sender.send(7));
  CHECK(ipcoro::sync_wait(ctx, ch.receiver.receive()) == 7);
}

TEST_CASE("a task awaited by a foreign coroutine keeps the token it was given with with_stop_token",
          "[env_stop]") {
  ipcoro::io_context ctx;
  ipcoro::pipe_pair pipe = ipcoro::make_pipe();
  std::stop_source env_source, own_source;
  std::stop_token seen;
  std::size_t got = 99;
  auto body = [&](ipcoro::pipe_reader& in) -> foreign {
    task<std::size_t> t = read_in_task(in, seen).with_stop_token(own_source.get_token());
    got = co_await std::move(t);
  };
  foreign f = body(pipe.reader);
  f.start(env_source.get_token());
  CHECK(seen == own_source.get_token());
  own_source.request_stop();
  ctx.run();
  REQUIRE(f.done());
  CHECK(f.outcome() == "operation_cancelled");
}

TEST_CASE("a foreign coroutine's read completes normally when its token is never stopped", "[env_stop]") {
  ipcoro::io_context ctx;
  ipcoro::pipe_pair pipe = ipcoro::make_pipe();
  std::stop_source source;
  std::size_t got = 99;
  foreign f = read_from_foreign(pipe.reader, got);
  f.start(source.get_token());
  const char x = 'x';
  REQUIRE(::write(pipe.writer.native_handle(), &x, 1) == 1);
  ctx.run();
  REQUIRE(f.done());
  CHECK(f.outcome().empty());
  CHECK(got == 1);
}

}  // namespace
