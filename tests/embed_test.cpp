// SPDX-License-Identifier: MIT
// Tests of running an io_context inside another event loop: poll() never sleeps, and poll_fd()
// is readable exactly when poll() has work, so one thread can serve both loops.
#include <ipcoro/ipcoro.hpp>

#include "process.hpp"

#include <catch2/catch.hpp>

#include <poll.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <array>
#include <cerrno>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <span>
#include <stdexcept>

namespace {

using namespace std::chrono_literals;
using ipcoro::io_context;
using ipcoro::task;
using ipcoro::test::child_process;
using ipcoro::test::handshake;

io_context::options embedded() {
  io_context::options o;
  o.embedded = true;
  return o;
}

// Whether `fd` is readable within `timeout_ms` (0: right now).
bool readable(int fd, int timeout_ms) {
  pollfd p{fd, POLLIN, 0};
  return ::poll(&p, 1, timeout_ms) == 1 && (p.revents & POLLIN) != 0;
}

// Polls until the descriptor stays quiet: a poll() may leave it readable once for completions
// it reaped itself. Returns false if it never settles.
bool settle(io_context& ctx, int fd) {
  for (int i = 0; i < 8; ++i) {
    if (!readable(fd, 0)) return true;
    (void)ctx.poll();
  }
  return false;
}

task<void> read_one(ipcoro::pipe_reader& in, bool& done) {
  std::array<std::byte, 1> b{};
  std::size_t n = co_await in.read_exact(b);
  done = n == 1;
}

task<void> wait_for(ipcoro::event& ev, bool& done) {
  co_await ev.wait();
  done = true;
}

// Echoes `rounds` 8-byte records from `in` to `out` through the ring.
task<void> echo_records(ipcoro::pipe_reader& in, ipcoro::pipe_writer& out, int rounds, int& echoed) {
  std::array<std::byte, 8> record{};
  for (int i = 0; i < rounds; ++i) {
    if (co_await in.read_exact(record) != record.size()) co_return;
    co_await out.write_all(record);
    ++echoed;
  }
}

// Sends `rounds` 8-byte records to `out` and waits for each to come back on `in`.
task<void> ping_records(ipcoro::pipe_reader& in, ipcoro::pipe_writer& out, int rounds, int& pinged) {
  for (int i = 0; i < rounds; ++i) {
    std::array<std::byte, 8> record{};
    record[0] = static_cast<std::byte>(i);
    co_await out.write_all(record);
    std::array<std::byte, 8> got{};
    if (co_await in.read_exact(got) != got.size() || got != record) co_return;
    ++pinged;
  }
}

TEST_CASE("poll_fd refuses a context whose ring defers completions to its own waits", "[embed]") {
  io_context ctx;
  if (ctx.features().defer_taskrun) {
    CHECK_THROWS_AS((void)ctx.poll_fd(), std::logic_error);
  } else {
    WARN("this kernel has no DEFER_TASKRUN: every ring suits poll_fd");
    CHECK(ctx.poll_fd() >= 0);
  }
}

TEST_CASE("an embedded round trip takes microseconds, not the late wake-up of DEFER_TASKRUN", "[embed]") {
  // 200 round trips through two embedded loops; with DEFER_TASKRUN each would wait ~30 ms for
  // its wake-up (12 s in all). The bound leaves room for a loaded machine.
  constexpr int rounds = 200;
  ipcoro::pipe_pair there = ipcoro::make_pipe();
  ipcoro::pipe_pair back = ipcoro::make_pipe();
  child_process child([&] {
    io_context ctx(embedded());
    int echoed = 0;
    ctx.spawn(echo_records(there.reader, back.writer, rounds, echoed));
    while (ctx.poll()) {
      if (!readable(ctx.poll_fd(), 10'000)) return 1;
    }
    return echoed == rounds ? 0 : 2;
  });
  io_context ctx(embedded());
  const auto t0 = std::chrono::steady_clock::now();
  int pinged = 0;
  ctx.spawn(ping_records(back.reader, there.writer, rounds, pinged));
  while (ctx.poll()) REQUIRE(readable(ctx.poll_fd(), 10'000));
  const auto took = std::chrono::steady_clock::now() - t0;
  REQUIRE(pinged == rounds);
  REQUIRE(child.wait() == 0);
  CHECK(took < 3s);
}

TEST_CASE("poll returns at once with a read in flight, and false once the context is idle", "[embed]") {
  io_context ctx(embedded());
  ipcoro::pipe_pair pipe = ipcoro::make_pipe();
  bool done = false;
  ctx.spawn(read_one(pipe.reader, done));
  // Nothing will ever be written unless poll() returns: a poll() that slept would hang here.
  REQUIRE(ctx.poll());
  REQUIRE(ctx.poll());
  REQUIRE_FALSE(done);
  const std::byte x{42};
  REQUIRE(::write(pipe.writer.native_handle(), &x, 1) == 1);
  const int fd = ctx.poll_fd();
  for (int i = 0; i < 100 && !done; ++i) {
    REQUIRE(readable(fd, 10'000));
    (void)ctx.poll();
  }
  REQUIRE(done);
  REQUIRE_FALSE(ctx.poll());
}

TEST_CASE("poll_fd turns readable when another process's write completes a read, not before", "[embed]") {
  ipcoro::pipe_pair pipe = ipcoro::make_pipe();
  handshake go;
  child_process child([&] {
    pipe.reader.close();
    if (!go.wait()) return 2;
    const std::byte x{7};
    return ::write(pipe.writer.native_handle(), &x, 1) == 1 ? 0 : 1;
  });
  pipe.writer.close();

  io_context ctx(embedded());
  const int fd = ctx.poll_fd();
  bool done = false;
  ctx.spawn(read_one(pipe.reader, done));
  REQUIRE(ctx.poll());
  REQUIRE(settle(ctx, fd));
  REQUIRE_FALSE(done);

  go.signal();
  REQUIRE(readable(fd, 10'000));
  for (int i = 0; i < 100 && !done; ++i) {
    (void)ctx.poll();
    if (!done) REQUIRE(readable(fd, 10'000));
  }
  REQUIRE(done);
  REQUIRE(child.wait() == 0);
}

TEST_CASE("a coroutine made ready outside poll makes poll_fd readable", "[embed]") {
  io_context ctx(embedded());
  const int fd = ctx.poll_fd();
  ipcoro::event ev;
  bool done = false;
  ctx.spawn(wait_for(ev, done));
  (void)ctx.poll();
  REQUIRE(settle(ctx, fd));
  ev.set();  // from the other loop's code, say: no ring operation is involved
  REQUIRE(readable(fd, 0));
  (void)ctx.poll();
  REQUIRE(done);
  REQUIRE_FALSE(ctx.poll());
}

TEST_CASE("one thread serves an epoll loop's socket and ipcoro's pipes in turn, with no other thread",
          "[embed]") {
  constexpr int rounds = 200;
  ipcoro::pipe_pair to_parent = ipcoro::make_pipe();
  ipcoro::pipe_pair to_child = ipcoro::make_pipe();
  int sv[2];
  REQUIRE(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0);
  // Each round needs both loops: a record echoed by ipcoro, then a ping answered by the epoll
  // handler; the child waits for each answer before it goes on.
  child_process child([&] {
    ::close(sv[0]);
    for (int i = 0; i < rounds; ++i) {
      std::uint64_t record = i, back = 0;
      if (::write(to_parent.writer.native_handle(), &record, sizeof record) != sizeof record) return 1;
      if (::read(to_child.reader.native_handle(), &back, sizeof back) != sizeof back) return 2;
      if (back != record) return 2;
      char ping = 'p', pong = 0;
      if (::write(sv[1], &ping, 1) != 1 || ::read(sv[1], &pong, 1) != 1 || pong != 'P') return 3;
    }
    return 0;
  });
  ::close(sv[1]);
  to_parent.writer.close();
  to_child.reader.close();

  io_context ctx(embedded());
  int echoed = 0;
  ctx.spawn(echo_records(to_parent.reader, to_child.writer, rounds, echoed));
  const int ep = ::epoll_create1(EPOLL_CLOEXEC);
  REQUIRE(ep >= 0);
  epoll_event sock_ev{EPOLLIN, {.fd = sv[0]}};
  epoll_event ipcoro_ev{EPOLLIN, {.fd = ctx.poll_fd()}};
  REQUIRE(::epoll_ctl(ep, EPOLL_CTL_ADD, sv[0], &sock_ev) == 0);
  REQUIRE(::epoll_ctl(ep, EPOLL_CTL_ADD, ctx.poll_fd(), &ipcoro_ev) == 0);

  int pongs = 0;
  while (pongs < rounds || echoed < rounds) {
    std::array<epoll_event, 4> events{};
    const int n = ::epoll_wait(ep, events.data(), events.size(), 10'000);
    if (n < 0 && errno == EINTR) continue;  // the child's SIGCHLD, for one
    REQUIRE(n > 0);                         // 10 s without either loop having work: a wake-up was lost
    for (int i = 0; i < n; ++i) {
      if (events[i].data.fd == sv[0]) {
        char ping = 0;
        REQUIRE(::read(sv[0], &ping, 1) == 1);
        const char pong = 'P';
        REQUIRE(::write(sv[0], &pong, 1) == 1);
        ++pongs;
      } else {
        (void)ctx.poll();
      }
    }
  }
  ::close(ep);
  ::close(sv[0]);
  REQUIRE(echoed == rounds);
  REQUIRE(child.wait() == 0);
}

}  // namespace
