// SPDX-License-Identifier: MIT
// Tests of ipcoro/asio.hpp: one thread's asio::io_context::run() serves Asio sockets and an
// ipcoro context at once, and Asio coroutines await ipcoro tasks.
#include <ipcoro/asio.hpp>
#include <ipcoro/ipcoro.hpp>

#include "channel_support.hpp"
#include "process.hpp"

#include <catch2/catch.hpp>

#include <unistd.h>

#include <asio/co_spawn.hpp>
#include <asio/experimental/as_tuple.hpp>
#include <asio/experimental/awaitable_operators.hpp>
#include <asio/ip/tcp.hpp>
#include <asio/read.hpp>
#include <asio/steady_timer.hpp>
#include <asio/write.hpp>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstddef>
#include <exception>
#include <filesystem>
#include <optional>
#include <stdexcept>
#include <string>
#include <variant>

namespace {

using namespace std::chrono_literals;
using asio::ip::tcp;
using ipcoro::channel_link;
using ipcoro::channel_receiver;
using ipcoro::channel_sender;
using ipcoro::task;
using ipcoro::test::child_process;
using ipcoro::test::fresh_address;
using ipcoro::test::nothing_left_behind;

ipcoro::io_context::options embedded() {
  ipcoro::io_context::options o;
  o.embedded = true;
  return o;
}

// io.run(), bounded: fails the test if work is still left after 20 s (a hang, not a slow run).
void run_bounded(asio::io_context& io) {
  io.run_for(20s);
  REQUIRE(io.stopped());  // it ran out of work, rather than out of time
}

// Threads of this process now (io_uring's io-wq workers would show up here too).
std::size_t thread_count() {
  return static_cast<std::size_t>(std::distance(std::filesystem::directory_iterator("/proc/self/task"),
                                                std::filesystem::directory_iterator{}));
}

std::string message(int i) {
  return "round " + std::to_string(i) + std::string(static_cast<std::size_t>(i % 97), 'x');
}

// The child's side: echoes every string back until the sender closes.
task<int> echo(channel_receiver<std::string>& rx, channel_sender<std::string>& tx) {
  int echoed = 0;
  for (;;) {
    std::optional<std::string> got = co_await rx.receive();
    if (!got) break;
    co_await tx.send(std::move(*got));
    ++echoed;
  }
  co_return echoed;
}

// Asio's side of the TCP echo: one connection, 64-byte records echoed until end of stream.
asio::awaitable<void> tcp_echo_server(tcp::acceptor& acceptor) {
  tcp::socket socket = co_await acceptor.async_accept(asio::use_awaitable);
  std::array<char, 64> record{};
  for (;;) {
    auto [ec, n] = co_await asio::async_read(socket, asio::buffer(record),
                                             asio::experimental::as_tuple(asio::use_awaitable));
    if (ec == asio::error::eof) co_return;
    if (ec) throw std::system_error(ec, "tcp echo read");
    co_await asio::async_write(socket, asio::buffer(record.data(), n), asio::use_awaitable);
  }
}

struct progress {
  int tcp_rounds = 0;
  int channel_rounds = 0;
  std::size_t most_threads = 0;
  void note_threads() { most_threads = std::max(most_threads, thread_count()); }
};

asio::awaitable<void> tcp_client(tcp::endpoint server, int rounds, progress& p) {
  tcp::socket socket(co_await asio::this_coro::executor);
  co_await socket.async_connect(server, asio::use_awaitable);
  for (int i = 0; i < rounds; ++i) {
    std::array<char, 64> out{};
    std::fill(out.begin(), out.end(), static_cast<char>('a' + i % 26));
    out[0] = static_cast<char>(i);
    co_await asio::async_write(socket, asio::buffer(out), asio::use_awaitable);
    std::array<char, 64> in{};
    co_await asio::async_read(socket, asio::buffer(in), asio::use_awaitable);
    if (in != out) throw std::runtime_error("tcp echo: wrong data in round " + std::to_string(i));
    ++p.tcp_rounds;
    p.note_threads();
  }
  socket.shutdown(tcp::socket::shutdown_send);
}

// Sends each string over the ipcoro channel and awaits its echo, from an Asio coroutine.
asio::awaitable<void> channel_client(ipcoro::asio_driver& driver, channel_sender<std::string>& tx,
                                     channel_receiver<std::string>& rx, int rounds, progress& p) {
  for (int i = 0; i < rounds; ++i) {
    auto sent = ipcoro::as_asio(driver, tx.send(message(i)));
    co_await std::move(sent);
    auto received = ipcoro::as_asio(driver, rx.receive());
    std::optional<std::string> got = co_await std::move(received);
    if (got != message(i)) throw std::runtime_error("channel echo: wrong data in round " + std::to_string(i));
    ++p.channel_rounds;
    p.note_threads();
  }
  tx.close();
}

TEST_CASE("one thread's asio run() serves a TCP echo and an ipcoro shm channel to another process",
          "[asio]") {
  constexpr int rounds = 300;
  {
    channel_link there = channel_link::create(fresh_address("shm"));
    channel_link back = channel_link::create(fresh_address("shm"));
    child_process child([&]() -> int {
      channel_receiver<std::string> rx = there.receiver<std::string>();
      channel_sender<std::string> tx = back.sender<std::string>();
      there.reset();
      back.reset();
      ipcoro::io_context ctx;
      return ipcoro::sync_wait(ctx, echo(rx, tx)) == rounds ? 0 : 1;
    });
    channel_sender<std::string> tx = there.sender<std::string>();
    channel_receiver<std::string> rx = back.receiver<std::string>();
    there.reset();
    back.reset();

    const std::size_t threads_before = thread_count();
    asio::io_context io(1);
    ipcoro::io_context ctx(embedded());
    ipcoro::asio_driver driver(io, ctx);
    tcp::acceptor acceptor(io, tcp::endpoint(asio::ip::address_v4::loopback(), 0));

    progress p;
    std::exception_ptr failure;
    auto keep = [&](std::exception_ptr e) {
      if (e && !failure) failure = e;
    };
    asio::co_spawn(io, tcp_echo_server(acceptor), keep);
    asio::co_spawn(io, tcp_client(acceptor.local_endpoint(), rounds, p), keep);
    asio::co_spawn(io, channel_client(driver, tx, rx, rounds, p), keep);
    run_bounded(io);
    if (failure) std::rethrow_exception(failure);
    CHECK(p.tcp_rounds == rounds);
    CHECK(p.channel_rounds == rounds);
    CHECK(threads_before == 1);
    if (ctx.features().futex && !ipcoro::test::futex_fallback_forced()) {
      CHECK(p.most_threads == 1);
    } else {
      // The futex fallback parks each ring wait in a helper thread (docs/shared-memory.md),
      // and starts 4 at its first wait; this process never has more than one wait parked.
      CHECK(p.most_threads <= 5);
    }
    CHECK(child.wait() == 0);
  }
  CHECK(nothing_left_behind());
}

task<int> fails_after_a_turn(ipcoro::pipe_reader& in) {
  std::array<std::byte, 1> b{};
  (void)co_await in.read(b);
  throw std::runtime_error("the ipcoro task failed");
}

asio::awaitable<void> await_failure(ipcoro::asio_driver& driver, ipcoro::pipe_reader& in,
                                    std::string& caught) {
  try {
    auto op = ipcoro::as_asio(driver, fails_after_a_turn(in));
    (void)co_await std::move(op);
  } catch (const std::runtime_error& e) {
    caught = e.what();
  }
}

TEST_CASE("as_asio hands an ipcoro task's exception to the awaiting Asio coroutine", "[asio]") {
  asio::io_context io(1);
  ipcoro::io_context ctx(embedded());
  ipcoro::asio_driver driver(io, ctx);
  ipcoro::pipe_pair pipe = ipcoro::make_pipe();
  const std::byte x{1};
  REQUIRE(::write(pipe.writer.native_handle(), &x, 1) == 1);
  std::string caught;
  std::exception_ptr failure;
  asio::co_spawn(io, await_failure(driver, pipe.reader, caught), [&](std::exception_ptr e) { failure = e; });
  run_bounded(io);  // returns: the watch lapses once the task is done and its result posted
  REQUIRE_FALSE(failure);
  CHECK(caught == "the ipcoro task failed");
}

task<void> count_reads(ipcoro::pipe_reader& in, int& reads) {
  std::array<std::byte, 1> b{};
  while (co_await in.read(b) == 1) ++reads;
}

TEST_CASE("a task spawned through the driver runs inside run(), which returns once it is done", "[asio]") {
  asio::io_context io(1);
  ipcoro::io_context ctx(embedded());
  ipcoro::asio_driver driver(io, ctx);
  ipcoro::pipe_pair pipe = ipcoro::make_pipe();
  int reads = 0;
  driver.spawn(count_reads(pipe.reader, reads));
  // The writes come from Asio's side of the loop, after run() has started.
  asio::post(io, [&] {
    const std::array<std::byte, 3> bytes{};
    for (const std::byte& b : bytes) REQUIRE(::write(pipe.writer.native_handle(), &b, 1) == 1);
    pipe.writer.close();
  });
  run_bounded(io);
  CHECK(reads == 3);
}

// A receive that nothing will answer, raced against an Asio timer with `||`: the timer wins, and
// the awaitable operator cancels the receive through its cancellation slot.
asio::awaitable<void> receive_or_time_out(ipcoro::asio_driver& driver, ipcoro::channel_pair<int>& ch,
                                          std::string& outcome) {
  using namespace asio::experimental::awaitable_operators;
  asio::steady_timer timer(co_await asio::this_coro::executor, 1ms);
  auto receive = ipcoro::as_asio(driver, ch.receiver.receive());
  auto expire = timer.async_wait(asio::use_awaitable);
  auto either = std::move(receive) || std::move(expire);
  std::variant<std::optional<int>, std::monostate> first = co_await std::move(either);
  outcome = first.index() == 1 ? "timer" : "receive";
  // The cancelled receive took nothing: the channel goes on.
  auto sent = ipcoro::as_asio(driver, ch.sender.send(5));
  co_await std::move(sent);
  auto again = ipcoro::as_asio(driver, ch.receiver.receive());
  std::optional<int> next = co_await std::move(again);
  outcome += next == 5 ? ", then 5" : ", then something else";
}

TEST_CASE("an Asio cancellation (an awaitable operator's ||) stops the ipcoro task of as_asio", "[asio]") {
  asio::io_context io(1);
  ipcoro::io_context ctx(embedded());
  ipcoro::asio_driver driver(io, ctx);
  ipcoro::channel_pair<int> ch = ipcoro::make_channel<int>(4);
  std::string outcome;
  std::exception_ptr failure;
  asio::co_spawn(io, receive_or_time_out(driver, ch, outcome), [&](std::exception_ptr e) { failure = e; });
  run_bounded(io);
  if (failure) std::rethrow_exception(failure);
  CHECK(outcome == "timer, then 5");
}

}  // namespace
