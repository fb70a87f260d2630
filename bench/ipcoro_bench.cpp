// SPDX-License-Identifier: MIT
// ipcoro-bench: every transport side by side — raw blocking syscalls, ipcoro's transport
// API, ipcoro's typed channels, standalone Asio, and the libraries people pick instead
// (ZeroMQ, Boost.Interprocess, Asio local sockets: peers.hpp) — measured in one run: 64-byte
// round trips (p50/p99/p99.9), one-way throughput at 64 B, 1 KiB and 64 KiB, heap
// allocations and CPU time per message, task switch cost, and the targets of the benchmark
// issue.
//
// Usage: ipcoro-bench [--quick] [--iterations N]
//                     [--transport pipe,fifo,mq,shm,file,inproc,zmq,boost-mq,asio-local]
//                     [--pin | --same-core] [--json FILE] [--plot FILE.png]
#include "bench_loops.hpp"
#include "bench_report.hpp"
#include "bench_support.hpp"
#include "counting_new.hpp"
#include "peers.hpp"
#include "targets.hpp"

#include <ipcoro/ipcoro.hpp>

#if IPCORO_BENCH_ASIO
#include <asio.hpp>
#include <ipcoro/asio.hpp>
#endif

#include <fcntl.h>
#include <mqueue.h>
#include <poll.h>
#include <sys/epoll.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include <array>
#include <chrono>
#include <coroutine>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <optional>
#include <set>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

// Every malloc-family allocation where counting_malloc.cpp is built (it sees what C libraries
// such as libzmq allocate); under a sanitizer, global operator new only.
std::uint64_t ipcoro::bench::allocation_count() noexcept {
#if IPCORO_BENCH_COUNT_MALLOC
  return malloc_count();
#else
  return ipcoro::test::allocations();
#endif
}

namespace {

using namespace ipcoro::bench;
using namespace std::chrono_literals;
using ipcoro::task;

constexpr std::array<std::size_t, 3> tput_sizes{64, 1024, 64 * 1024};
// Busy polling and ring spinning spend up to this long checking before they sleep.
constexpr std::chrono::microseconds busy_poll_budget{200};
constexpr std::chrono::microseconds ring_spin_budget{50};

struct settings {
  bool quick = false;
  std::size_t iterations = 100'000;       // round trips per latency row
  std::uint64_t tput_bytes = 1ULL << 30;  // per throughput row, at most
  std::size_t tput_max_messages = 1'000'000;
  std::size_t memcpy_span = 256 << 20;  // well above L2; streaming, not cache-hot
  std::size_t rounds = 4;               // parts each row is measured in, interleaved
  std::vector<placement> placements{placement::cross_core, placement::same_core};
  placement tput_placement = placement::cross_core;
  std::set<std::string> transports{"pipe",   "fifo", "mq",       "shm",       "file",
                                   "inproc", "zmq",  "boost-mq", "asio-local"};
  std::string json, plot;
};

std::size_t warmup_of(std::size_t n) { return std::max<std::size_t>(n / 10, 100); }

std::size_t tput_messages(const settings& s, std::size_t size) {
  return std::max<std::size_t>(std::min<std::uint64_t>(s.tput_bytes / size, s.tput_max_messages), 64);
}

// ---- the watchdog: a measurement that hangs ends the program with its name ----

// Either way out removes the names the run still owns (segments, queues, FIFOs, files).
char watchdog_label[160];
void on_alarm(int) {
  const char prefix[] = "ipcoro-bench: timed out in ";
  [[maybe_unused]] ssize_t n = ::write(2, prefix, sizeof prefix - 1);
  n = ::write(2, watchdog_label, std::strlen(watchdog_label));
  n = ::write(2, "\n", 1);
  remove_owned_names();
  ::_exit(1);
}
void on_terminate(int sig) {
  remove_owned_names();
  ::signal(sig, SIG_DFL);
  ::raise(sig);
}
struct watchdog {
  watchdog(const std::string& label, unsigned seconds) {
    std::snprintf(watchdog_label, sizeof watchdog_label, "%s", label.c_str());
    ::alarm(seconds);
  }
  ~watchdog() { ::alarm(0); }
};

// ---- raw blocking endpoints ----

struct raw_fd_end {
  int in = -1, out = -1;
  void send(std::span<const std::byte> m) const {
    for (std::size_t done = 0; done < m.size();) {
      const ssize_t n = ::write(out, m.data() + done, m.size() - done);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) throw std::system_error(errno, std::system_category(), "write");
      done += static_cast<std::size_t>(n);
    }
  }
  void receive(std::span<std::byte> m) const {
    for (std::size_t done = 0; done < m.size();) {
      const ssize_t n = ::read(in, m.data() + done, m.size() - done);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) throw std::system_error(errno, std::system_category(), "read");
      if (n == 0) throw std::runtime_error("read: unexpected end of stream");
      done += static_cast<std::size_t>(n);
    }
  }
};

/// Sends with vmsplice(2): the pages are referenced by the pipe instead of copied into it.
/// The buffer is never modified while the reader may still see it, which is what makes
/// this safe here.
struct raw_vmsplice_end {
  int out = -1;
  void send(std::span<const std::byte> m) const {
    iovec iov{const_cast<std::byte*>(m.data()), m.size()};
    while (iov.iov_len > 0) {
      const ssize_t n = ::vmsplice(out, &iov, 1, 0);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) throw std::system_error(errno, std::system_category(), "vmsplice");
      iov.iov_base = static_cast<char*>(iov.iov_base) + n;
      iov.iov_len -= static_cast<std::size_t>(n);
    }
  }
};

struct raw_mq_end {
  mqd_t in = -1, out = -1;
  void send(std::span<const std::byte> m) const {
    if (::mq_send(out, reinterpret_cast<const char*>(m.data()), m.size(), 0) != 0)
      throw std::system_error(errno, std::system_category(), "mq_send");
  }
  void receive(std::span<std::byte> m) const {
    if (::mq_receive(in, reinterpret_cast<char*>(m.data()), m.size(), nullptr) !=
        static_cast<ssize_t>(m.size()))
      throw std::system_error(errno, std::system_category(), "mq_receive");
  }
};

// ---- ipcoro endpoints: the same loops as coroutines on an io_context ----

void check_received(const ipcoro::mq_message& m, std::size_t size) {
  expect(m.size == size, "short message");
}
void check_received(const std::optional<std::size_t>& n, std::size_t size) {
  expect(n && *n == size, "ring: end of stream or short message");
}

struct coro_fd_end {
  ipcoro::pipe_reader in;
  ipcoro::pipe_writer out;
  auto send(std::span<const std::byte> m) const { return out.write_all(m); }
  auto receive(std::span<std::byte> m) const { return in.read_exact(m); }
};

struct coro_mq_end {
  const ipcoro::message_queue* in = nullptr;
  const ipcoro::message_queue* out = nullptr;
  auto send(std::span<const std::byte> m) const { return out->send(m); }
  auto receive(std::span<std::byte> m) const { return in->receive(m); }
};

struct coro_ring_end {
  ipcoro::spsc_ring_receiver rx;
  ipcoro::spsc_ring_sender tx;
  auto send(std::span<const std::byte> m) { return tx.send(m); }
  auto receive(std::span<std::byte> m) { return rx.receive(m).with_timeout(60s); }
};

template <class E>
task<void> coro_echo(E& e, std::size_t size, std::size_t warmup, std::size_t n, window& w) {
  std::vector<std::byte> buf(size);
  for (std::size_t i = 0; i < warmup + n; ++i) {
    if (i == warmup) w.start();
    const auto got = co_await e.receive(buf);
    check_received(got, size);
    co_await e.send(buf);
  }
  w.stop();
}

template <class E>
task<void> coro_ping(E& e, std::size_t size, std::size_t warmup, std::size_t n, window& w,
                     std::vector<double>& rtt) {
  std::vector<std::byte> buf(size);
  for (std::size_t i = 0; i < warmup + n; ++i) {
    if (i == warmup) w.start();
    const auto t0 = clock_type::now();
    co_await e.send(buf);
    const auto got = co_await e.receive(buf);
    check_received(got, size);
    if (i >= warmup) rtt.push_back(std::chrono::duration<double, std::micro>(clock_type::now() - t0).count());
  }
  w.stop();
}

template <class E>
task<void> coro_produce(E& e, std::size_t size, std::size_t warmup, std::size_t n, window& w) {
  std::vector<std::byte> buf(size, std::byte{0x5a});
  for (std::size_t i = 0; i < warmup + n; ++i) {
    if (i == warmup) w.start();
    co_await e.send(buf);
  }
  w.stop();
}

template <class E>
task<void> coro_consume(E& e, std::size_t size, std::size_t warmup, std::size_t n, window& w) {
  std::vector<std::byte> buf(size);
  for (std::size_t i = 0; i < warmup + n; ++i) {
    if (i == warmup) w.start();
    const auto got = co_await e.receive(buf);
    check_received(got, size);
  }
  w.stop();
}

/// vmsplice through the loop: a non-blocking vmsplice, and when the pipe is full a wait
/// for POLLOUT in the ring.
task<void> coro_vmsplice_produce(int out, std::size_t size, std::size_t warmup, std::size_t n, window& w) {
  std::vector<std::byte> buf(size, std::byte{0x5a});
  for (std::size_t i = 0; i < warmup + n; ++i) {
    if (i == warmup) w.start();
    iovec iov{buf.data(), buf.size()};
    while (iov.iov_len > 0) {
      const ssize_t r = ::vmsplice(out, &iov, 1, SPLICE_F_NONBLOCK);
      if (r > 0) {
        iov.iov_base = static_cast<char*>(iov.iov_base) + r;
        iov.iov_len -= static_cast<std::size_t>(r);
      } else if (r < 0 && errno == EAGAIN) {
        (void)co_await ipcoro::poll(out, POLLOUT);
      } else if (!(r < 0 && errno == EINTR)) {
        throw std::system_error(errno, std::system_category(), "vmsplice");
      }
    }
  }
  w.stop();
}

// ---- standalone Asio, C++20 coroutines on posix::stream_descriptor (epoll reactor) ----

#if IPCORO_BENCH_ASIO
struct asio_fd_end {
  asio::posix::stream_descriptor in, out;  // unopened where the side does not use it
  asio_fd_end(asio::io_context& io, int in_fd, int out_fd) : in(io), out(io) {
    if (in_fd >= 0) in.assign(::dup(in_fd));
    if (out_fd >= 0) out.assign(::dup(out_fd));
  }
  auto send(std::span<const std::byte> m) {
    return asio::async_write(out, asio::buffer(m.data(), m.size()), asio::use_awaitable);
  }
  auto receive(std::span<std::byte> m) {
    return asio::async_read(in, asio::buffer(m.data(), m.size()), asio::use_awaitable);
  }
};

/// Runs `make(end)` to completion on a fresh single-threaded Asio io_context; rethrows.
template <class Make>
void run_asio(int in_fd, int out_fd, Make make) {
  asio::io_context io(1);
  asio_fd_end end(io, in_fd, out_fd);
  std::exception_ptr error;
  asio::co_spawn(io, make(end), [&](std::exception_ptr e) { error = e; });
  io.run();
  if (error) std::rethrow_exception(error);
}
#endif

// ---- typed channels ----

template <std::size_t N>
using blob = std::array<std::byte, N>;

template <std::size_t N>
task<void> chan_echo(ipcoro::channel_receiver<blob<N>>& rx, ipcoro::channel_sender<blob<N>>& tx,
                     std::size_t warmup, std::size_t n, window& w) {
  for (std::size_t i = 0; i < warmup + n; ++i) {
    if (i == warmup) w.start();
    std::optional<blob<N>> m = co_await rx.receive();
    expect(m.has_value(), "channel: end of stream");
    co_await tx.send(*m);
  }
  w.stop();
}

template <std::size_t N>
task<void> chan_ping(ipcoro::channel_sender<blob<N>>& tx, ipcoro::channel_receiver<blob<N>>& rx,
                     std::size_t warmup, std::size_t n, window& w, std::vector<double>& rtt) {
  blob<N> out{};
  for (std::size_t i = 0; i < warmup + n; ++i) {
    if (i == warmup) w.start();
    const auto t0 = clock_type::now();
    co_await tx.send(out);
    std::optional<blob<N>> m = co_await rx.receive();
    expect(m.has_value(), "channel: end of stream");
    if (i >= warmup) rtt.push_back(std::chrono::duration<double, std::micro>(clock_type::now() - t0).count());
  }
  w.stop();
}

template <std::size_t N>
task<void> chan_produce(ipcoro::channel_sender<blob<N>>& tx, std::size_t warmup, std::size_t n, window& w) {
  blob<N> out{};
  out.fill(std::byte{0x5a});
  for (std::size_t i = 0; i < warmup + n; ++i) {
    if (i == warmup) w.start();
    co_await tx.send(out);
  }
  w.stop();
  tx.close();
}

template <std::size_t N>
task<void> chan_consume(ipcoro::channel_receiver<blob<N>>& rx, std::size_t warmup, std::size_t n, window& w) {
  for (std::size_t i = 0; i < warmup + n; ++i) {
    if (i == warmup) w.start();
    std::optional<blob<N>> m = co_await rx.receive();
    expect(m.has_value(), "channel: end of stream");
  }
  w.stop();
}

/// chan_produce with zero-copy loans: each message is written once, into the ring (a copy
/// of `out`, as a producer that builds it in place would write it).
template <std::size_t N>
task<void> chan_produce_loans(ipcoro::channel_sender<blob<N>>& tx, std::size_t warmup, std::size_t n,
                              window& w) {
  blob<N> out{};
  out.fill(std::byte{0x5a});
  for (std::size_t i = 0; i < warmup + n; ++i) {
    if (i == warmup) w.start();
    ipcoro::channel_loan loan = co_await tx.loan(N);
    // The size as the loan gives it, not the constant N: GCC 12 inlines a memcpy of a
    // constant 512 bytes or more as `rep movsq`, several times slower into a ring record
    // (8-aligned, not 64) than the C library's copy, which the copying channel uses.
    std::memcpy(loan.bytes().data(), out.data(), loan.bytes().size());
    loan.commit();
  }
  w.stop();
  tx.close();
}

/// chan_consume with views: each message is looked at in place and released.
template <std::size_t N>
task<void> chan_consume_views(ipcoro::channel_receiver<blob<N>>& rx, std::size_t warmup, std::size_t n,
                              window& w) {
  for (std::size_t i = 0; i < warmup + n; ++i) {
    if (i == warmup) w.start();
    std::optional<ipcoro::channel_view> m = co_await rx.receive_view();
    expect(m.has_value() && m->bytes().size() == N, "channel: end of stream");
  }
  w.stop();
}

/// The name a channel address creates, owned so that it is removed even if the link is not
/// (the link should remove it itself); empty for pipes.
owned_name owned_name_of(const std::string& address) {
  const auto colon = address.find(':');
  const auto query = address.find('?');
  const std::string scheme = address.substr(0, colon);
  const std::string path = address.substr(colon + 1, query == std::string::npos ? query : query - colon - 1);
  if (scheme == "fifo" || scheme == "file") return {name_kind::file, path};
  if (scheme == "mq") return {name_kind::mqueue, path};
  if (scheme == "shm") return {name_kind::shm, path};
  return {};
}

/// `ring_capacity`: a ring's capacity other than the bench's (1 MiB; 4 MiB at 64 KiB).
std::string channel_address(const std::string& transport, std::size_t size, std::size_t ring_capacity = 0) {
  if (transport == "pipe") return "pipe:";
  if (transport == "fifo") return fmt::format("fifo:/tmp/{}", unique_name("chan"));
  if (transport == "mq")
    // The defaults (10 messages of 8192 bytes), which hold a 1 KiB message and its framing;
    // a channel with one receiver packs a loop turn's messages into them.
    return size + 64 <= 8192
               ? fmt::format("mq:/{}", unique_name("chan"))
               : fmt::format("mq:/{}?capacity=10&message_size={}", unique_name("chan"), size + 64);
  const std::size_t capacity = ring_capacity != 0 ? ring_capacity : size >= 65536 ? 4 << 20 : 1 << 20;
  if (transport == "shm") return fmt::format("shm:/{}?capacity={}", unique_name("chan"), capacity);
  return fmt::format("file:/tmp/{}?capacity={}", unique_name("chan"), capacity);
}

template <std::size_t N>
pair_result channel_rtt(const std::string& transport, [[maybe_unused]] const std::string& mode,
                        placement where, std::size_t warmup, std::size_t n, std::vector<double>& rtt) {
  // Mode "asio": each side's context is driven from an Asio loop (ipcoro::asio_driver).
  const auto run_side = [&](task<void> t) {
#if IPCORO_BENCH_ASIO
    if (mode == "asio") {
      ipcoro::io_context::options o;
      o.embedded = true;
      asio::io_context io(1);
      ipcoro::io_context ctx(o);
      ipcoro::asio_driver driver(io, ctx);
      driver.spawn(std::move(t));
      io.run();
      return;
    }
#endif
    ipcoro::io_context ctx;
    ipcoro::sync_wait(ctx, std::move(t));
  };
  const std::string addr_a = channel_address(transport, N), addr_b = channel_address(transport, N);
  const owned_name name_a = owned_name_of(addr_a), name_b = owned_name_of(addr_b);
  pair_result r;
  {
    auto a = ipcoro::channel_link::create(addr_a);
    auto b = ipcoro::channel_link::create(addr_b);
    r = run_pair(
        where,
        [&](window& w) {
          auto rx = a.template receiver<blob<N>>();
          auto tx = b.template sender<blob<N>>();
          run_side(chan_echo<N>(rx, tx, warmup, n, w));
        },
        [&](window& w) {
          auto tx = a.template sender<blob<N>>();
          auto rx = b.template receiver<blob<N>>();
          run_side(chan_ping<N>(tx, rx, warmup, n, w, rtt));
        });
  }
  return r;
}

/// `loans`: the producer lends and commits, the consumer views (modes "loan...").
template <std::size_t N>
pair_result channel_tput(const std::string& transport, placement where, std::size_t warmup, std::size_t n,
                         bool loans, std::size_t ring_capacity) {
  const std::string addr = channel_address(transport, N, ring_capacity);
  const owned_name name = owned_name_of(addr);
  pair_result r;
  {
    auto link = ipcoro::channel_link::create(addr);
    r = run_pair(
        where,
        [&](window& w) {
          ipcoro::io_context ctx;
          auto tx = link.template sender<blob<N>>();
          ipcoro::sync_wait(
              ctx, loans ? chan_produce_loans<N>(tx, warmup, n, w) : chan_produce<N>(tx, warmup, n, w));
        },
        [&](window& w) {
          ipcoro::io_context ctx;
          auto rx = link.template receiver<blob<N>>();
          ipcoro::sync_wait(
              ctx, loans ? chan_consume_views<N>(rx, warmup, n, w) : chan_consume<N>(rx, warmup, n, w));
        });
  }
  return r;
}

/// In one process, one thread: two coroutines on one io_context.
template <std::size_t N>
pair_result inproc_rtt(std::size_t warmup, std::size_t n, std::vector<double>& rtt) {
  pair_result r;
  ipcoro::io_context ctx;
  auto there = ipcoro::make_channel<blob<N>>(64);
  auto back = ipcoro::make_channel<blob<N>>(64);
  window echo_window;
  ctx.spawn(chan_echo<N>(there.receiver, back.sender, warmup, n, echo_window));
  ipcoro::sync_wait(ctx, chan_ping<N>(there.sender, back.receiver, warmup, n, r.self, rtt));
  ctx.run();
  r.ok = true;
  return r;
}

template <std::size_t N>
pair_result inproc_tput(std::size_t warmup, std::size_t n) {
  pair_result r;
  ipcoro::io_context ctx;
  auto pair = ipcoro::make_channel<blob<N>>(N >= 65536 ? 16 : 256);
  window producer_window;
  ctx.spawn(chan_produce<N>(pair.sender, warmup, n, producer_window));
  ipcoro::sync_wait(ctx, chan_consume<N>(pair.receiver, warmup, n, r.self));
  ctx.run();
  r.ok = true;
  return r;
}

/// Calls f.template operator()<N>() for the message size `size` (64, 1024 or 65536).
template <class F>
pair_result with_size(std::size_t size, F&& f) {
  switch (size) {
    case 64:
      return f.template operator()<64>();
    case 1024:
      return f.template operator()<1024>();
    default:
      return f.template operator()<65536>();
  }
}

// ---- one measurement per (transport, impl, mode) ----

ipcoro::io_context::options context_options(const job& j) {
  ipcoro::io_context::options o;
  if (j.mode == "busy-poll") o.busy_poll = busy_poll_budget;
  if (j.mode == "embedded") o.embedded = true;
  return o;
}

int open_or_throw(const std::string& path, int flags) {
  const int fd = ::open(path.c_str(), flags | O_CLOEXEC);
  if (fd < 0) throw std::system_error(errno, std::system_category(), "open " + path);
  return fd;
}

/// A side's descriptors of a byte-stream link (pipes or FIFOs); -1 where unused.
struct fd_pair {
  ipcoro::unique_fd in, out;
};

task<void> then_mark(task<void> t, bool& done) {
  co_await std::move(t);
  done = true;
}

/// Runs `t` as a program with its own loop would: an epoll loop watches ctx.poll_fd() and calls
/// ctx.poll() when it is readable (mode "embedded"). Rethrows what `t` throws.
void run_embedded(ipcoro::io_context& ctx, task<void> t) {
  bool done = false;
  ctx.spawn(then_mark(std::move(t), done));
  const ipcoro::unique_fd ep{::epoll_create1(EPOLL_CLOEXEC)};
  epoll_event ev{EPOLLIN, {.fd = ctx.poll_fd()}};
  if (!ep || ::epoll_ctl(ep.get(), EPOLL_CTL_ADD, ctx.poll_fd(), &ev) != 0) {
    throw std::system_error(errno, std::system_category(), "epoll for the embedded loop");
  }
  while (!done) {
    epoll_event got{};
    if (::epoll_wait(ep.get(), &got, 1, -1) < 0 && errno != EINTR) {
      throw std::system_error(errno, std::system_category(), "epoll_wait");
    }
    (void)ctx.poll();
  }
}

/// The per-side body over byte streams, for raw, ipcoro and Asio.
void stream_side(const job& j, bool peer, int in, int out, window& w, std::vector<double>* rtt) {
  const bool pipe = j.transport == "pipe";
  if (j.impl == "raw") {
    if (j.what == kind::rtt) {
      raw_fd_end e{in, out};
      peer ? sync_echo(e, j.size, j.warmup, j.n, w) : sync_ping(e, j.size, j.warmup, j.n, w, *rtt);
    } else if (peer) {
      if (j.mode == "vmsplice") {
        sync_produce(raw_vmsplice_end{out}, j.size, j.warmup, j.n, w);
      } else {
        sync_produce(raw_fd_end{in, out}, j.size, j.warmup, j.n, w);
      }
    } else {
      sync_consume(raw_fd_end{in, out}, j.size, j.warmup, j.n, w);
    }
    return;
  }
#if IPCORO_BENCH_ASIO
  if (j.impl == "asio") {
    run_asio(in, out, [&](asio_fd_end& e) -> asio::awaitable<void> {
      if (j.what == kind::rtt) {
        return peer ? asio_echo(e, j.size, j.warmup, j.n, w) : asio_ping(e, j.size, j.warmup, j.n, w, *rtt);
      }
      return peer ? asio_produce(e, j.size, j.warmup, j.n, w) : asio_consume(e, j.size, j.warmup, j.n, w);
    });
    return;
  }
#endif
  ipcoro::io_context ctx(context_options(j));
  if (j.mode == "vmsplice" && peer) {
    ipcoro::sync_wait(ctx, coro_vmsplice_produce(out, j.size, j.warmup, j.n, w));
    return;
  }
  // Anonymous pipes take RWF_NOWAIT writes; FIFOs refuse them (see ipcoro::write_path).
  coro_fd_end e{
      ipcoro::pipe_reader{ipcoro::unique_fd{in >= 0 ? ::dup(in) : -1}},
      ipcoro::pipe_writer{ipcoro::unique_fd{out >= 0 ? ::dup(out) : -1},
                          pipe ? ipcoro::write_path::try_nowait_first : ipcoro::write_path::ring_only}};
  if (j.what == kind::rtt && j.mode == "embedded") {
    task<void> side =
        peer ? coro_echo(e, j.size, j.warmup, j.n, w) : coro_ping(e, j.size, j.warmup, j.n, w, *rtt);
    run_embedded(ctx, std::move(side));
  } else if (j.what == kind::rtt) {
    ipcoro::sync_wait(
        ctx, peer ? coro_echo(e, j.size, j.warmup, j.n, w) : coro_ping(e, j.size, j.warmup, j.n, w, *rtt));
  } else {
    ipcoro::sync_wait(
        ctx, peer ? coro_produce(e, j.size, j.warmup, j.n, w) : coro_consume(e, j.size, j.warmup, j.n, w));
  }
}

pair_result measure_stream(const job& j, std::vector<double>* rtt) {
  if (j.transport == "pipe") {
    ipcoro::pipe_options opts{.capacity = j.pipe_capacity};
    ipcoro::pipe_pair there = ipcoro::make_pipe(opts);
    ipcoro::pipe_pair back;
    if (j.what == kind::rtt) back = ipcoro::make_pipe(opts);
    // Round trips: the peer reads `there` and answers on `back`, the measurer the other way
    // round; throughput: the peer writes `there`, the measurer reads it. Each side keeps
    // its ends and closes the rest.
    const auto side = [&](bool peer, window& w) {
      ipcoro::unique_fd in, out;
      if (j.what == kind::rtt) {
        in = (peer ? there : back).reader.release_fd();
        out = (peer ? back : there).writer.release_fd();
      } else if (peer) {
        out = there.writer.release_fd();
      } else {
        in = there.reader.release_fd();
      }
      there = {};
      back = {};
      stream_side(j, peer, in.get(), out.get(), w, peer ? nullptr : rtt);
    };
    return run_pair(
        j.where, [&](window& w) { side(true, w); }, [&](window& w) { side(false, w); });
  }
  // FIFOs: throughput uses one (the peer writes, the measurer reads), round trips two;
  // both sides open them in the same order, so neither waits forever.
  const owned_name dir = make_owned_directory("/tmp/ipcoro-bench-fifo-");
  const owned_name there_name(name_kind::file, dir.name() + "/there");
  const owned_name back_name(name_kind::file, dir.name() + "/back");
  const std::string& there = there_name.name();
  const std::string& back = back_name.name();
  if (::mkfifo(there.c_str(), 0600) != 0 || ::mkfifo(back.c_str(), 0600) != 0)
    throw std::system_error(errno, std::system_category(), "mkfifo");
  pair_result r = run_pair(
      j.where,
      [&](window& w) {
        ipcoro::unique_fd in{open_or_throw(there, j.what == kind::rtt ? O_RDONLY : O_WRONLY)};
        ipcoro::unique_fd out;
        if (j.what == kind::rtt) {
          out = ipcoro::unique_fd{open_or_throw(back, O_WRONLY)};
          stream_side(j, true, in.get(), out.get(), w, nullptr);
        } else {
          stream_side(j, true, -1, in.get(), w, nullptr);
        }
      },
      [&](window& w) {
        ipcoro::unique_fd first{open_or_throw(there, j.what == kind::rtt ? O_WRONLY : O_RDONLY)};
        if (j.what == kind::rtt) {
          ipcoro::unique_fd in{open_or_throw(back, O_RDONLY)};
          stream_side(j, false, in.get(), first.get(), w, rtt);
        } else {
          stream_side(j, false, first.get(), -1, w, rtt);
        }
      });
  return r;
}

long mq_limit(const char* file, long fallback) {
  std::FILE* f = std::fopen(file, "r");
  if (!f) return fallback;
  long v = fallback;
  if (std::fscanf(f, "%ld", &v) != 1) v = fallback;
  std::fclose(f);
  return v;
}

pair_result measure_mq(const job& j, std::vector<double>* rtt) {
  const ipcoro::mq_attributes attrs{
      .max_messages = std::min(10L, mq_limit("/proc/sys/fs/mqueue/msg_max", 10)),
      .message_size = static_cast<long>(j.size)};
  const owned_name there_name(name_kind::mqueue, fmt::format("/{}", unique_name("mq")));
  const owned_name back_name(name_kind::mqueue, fmt::format("/{}", unique_name("mq")));
  ipcoro::message_queue there = ipcoro::message_queue::create(there_name.name(), attrs);
  ipcoro::message_queue back;
  if (j.what == kind::rtt) back = ipcoro::message_queue::create(back_name.name(), attrs);
  const auto side = [&](bool peer, window& w) {
    const ipcoro::message_queue* in = peer ? &there : &back;
    const ipcoro::message_queue* out = peer ? &back : &there;
    if (j.what == kind::tput) {
      in = peer ? nullptr : &there;
      out = peer ? &there : nullptr;
    }
    if (j.impl == "raw") {
      // Blocking descriptors of the same queues: the classic way.
      raw_mq_end e;
      if (in) e.in = ::mq_open(in->name().c_str(), O_RDONLY | O_CLOEXEC);
      if (out) e.out = ::mq_open(out->name().c_str(), O_WRONLY | O_CLOEXEC);
      if ((in && e.in < 0) || (out && e.out < 0))
        throw std::system_error(errno, std::system_category(), "mq_open");
      if (j.what == kind::rtt) {
        peer ? sync_echo(e, j.size, j.warmup, j.n, w) : sync_ping(e, j.size, j.warmup, j.n, w, *rtt);
      } else {
        peer ? sync_produce(e, j.size, j.warmup, j.n, w) : sync_consume(e, j.size, j.warmup, j.n, w);
      }
      if (e.in >= 0) ::mq_close(e.in);
      if (e.out >= 0) ::mq_close(e.out);
      return;
    }
    ipcoro::io_context ctx(context_options(j));
    coro_mq_end e{in, out};
    if (j.what == kind::rtt) {
      ipcoro::sync_wait(
          ctx, peer ? coro_echo(e, j.size, j.warmup, j.n, w) : coro_ping(e, j.size, j.warmup, j.n, w, *rtt));
    } else {
      ipcoro::sync_wait(
          ctx, peer ? coro_produce(e, j.size, j.warmup, j.n, w) : coro_consume(e, j.size, j.warmup, j.n, w));
    }
  };
  return run_pair(
      j.where, [&](window& w) { side(true, w); }, [&](window& w) { side(false, w); });
}

/// A shared region for the shm and file transports: a shm_segment or a mapped file,
/// created before fork and removed afterwards.
class region {
 public:
  region(const std::string& transport, const ipcoro::region_layout& layout,
         const std::function<void(std::span<std::byte>)>& init) {
    if (transport == "shm") {
      name_ = owned_name(name_kind::shm, fmt::format("/{}", unique_name("shm")));
      segment_ = ipcoro::shm_segment::create(name_.name(), layout,
                                             ipcoro::shm_segment::options{.mode = 0600, .initialize = init});
      bytes_ = segment_.payload();
    } else {
      name_ = owned_name(name_kind::file, fmt::format("/tmp/{}", unique_name("file")));
      file_ = ipcoro::mapped_file::create(name_.name(), layout, 0600, init);
      bytes_ = file_.payload();
    }
  }
  region(const region&) = delete;
  region& operator=(const region&) = delete;
  std::span<std::byte> bytes() const noexcept { return bytes_; }

 private:
  owned_name name_;  // first: removed last, even when the run ends on the watchdog
  ipcoro::shm_segment segment_;
  ipcoro::mapped_file file_;
  std::span<std::byte> bytes_;
};

pair_result measure_ring(const job& j, std::vector<double>* rtt) {
  if (j.impl == "raw") {  // a futex or busy-spin ping-pong on one word of the region
    const region mem(j.transport, {0x57524157 /* "WRAW" */, 1, 4096}, {});
    auto& word = *new (mem.bytes().data()) std::atomic<std::uint32_t>{0};
    const turn_word turn(word, j.mode == "spin");
    return run_pair(
        j.where, [&](window& w) { turn.echo(j.warmup, w); },
        [&](window& w) {
          for (std::size_t i = 0; i < j.warmup; ++i) turn.ping();
          w.start();
          for (std::size_t i = 0; i < j.n; ++i) {
            const auto t0 = clock_type::now();
            turn.ping();
            rtt->push_back(std::chrono::duration<double, std::micro>(clock_type::now() - t0).count());
          }
          w.stop();
          turn.stop();
        });
  }
  const std::size_t capacity = j.size >= 65536 ? 4 << 20 : 1 << 20;
  const auto layout = ipcoro::spsc_ring_layout(j.what == kind::rtt ? 4096 : capacity);
  const region there(j.transport, layout, ipcoro::format_spsc_ring);
  std::optional<region> back;
  if (j.what == kind::rtt) back.emplace(j.transport, layout, ipcoro::format_spsc_ring);
  ipcoro::ring_options opts;
  // "sleep": park at once when the ring is empty or full (the target's "when sleeping");
  // "spin": busy-poll first. The default options (a short adaptive spin) lie between.
  opts.spin =
      j.mode == "spin" ? std::chrono::nanoseconds(ring_spin_budget) : std::chrono::nanoseconds::zero();
  const auto side = [&](bool peer, window& w) {
    ipcoro::io_context ctx;
    coro_ring_end e;
    if (j.what == kind::rtt) {
      e.rx = ipcoro::spsc_ring_receiver(peer ? there.bytes() : back->bytes(), opts);
      e.tx = ipcoro::spsc_ring_sender(peer ? back->bytes() : there.bytes(), opts);
      ipcoro::sync_wait(
          ctx, peer ? coro_echo(e, j.size, j.warmup, j.n, w) : coro_ping(e, j.size, j.warmup, j.n, w, *rtt));
    } else if (peer) {
      e.tx = ipcoro::spsc_ring_sender(there.bytes(), opts);
      ipcoro::sync_wait(ctx, coro_produce(e, j.size, j.warmup, j.n, w));
    } else {
      e.rx = ipcoro::spsc_ring_receiver(there.bytes(), opts);
      ipcoro::sync_wait(ctx, coro_consume(e, j.size, j.warmup, j.n, w));
    }
  };
  return run_pair(
      j.where, [&](window& w) { side(true, w); }, [&](window& w) { side(false, w); });
}

pair_result measure(const job& j, std::vector<double>* rtt) {
  if (find_peer(j.transport) != nullptr) return measure_peer(j, rtt);
  if (j.impl == "ipcoro-channel") {
    return with_size(j.size, [&]<std::size_t N>() {
      if (j.transport == "inproc")
        return j.what == kind::rtt ? inproc_rtt<N>(j.warmup, j.n, *rtt) : inproc_tput<N>(j.warmup, j.n);
      return j.what == kind::rtt ? channel_rtt<N>(j.transport, j.mode, j.where, j.warmup, j.n, *rtt)
                                 : channel_tput<N>(j.transport, j.where, j.warmup, j.n,
                                                   j.mode.starts_with("loan"), j.ring_capacity);
    });
  }
  if (j.transport == "pipe" || j.transport == "fifo") return measure_stream(j, rtt);
  if (j.transport == "mq") return measure_mq(j, rtt);
  return measure_ring(j, rtt);
}

// ---- task switch: resuming an awaiting coroutine ----

/// The floor: a bare coroutine that suspends at every step, resumed by handle.resume().
struct bare_coroutine {
  struct promise_type {
    bare_coroutine get_return_object() { return {std::coroutine_handle<promise_type>::from_promise(*this)}; }
    std::suspend_always initial_suspend() noexcept { return {}; }
    std::suspend_always final_suspend() noexcept { return {}; }
    void return_void() noexcept {}
    void unhandled_exception() { std::terminate(); }
  };
  std::coroutine_handle<promise_type> handle;
};

bare_coroutine bare_loop(std::uint64_t& counter) {
  for (;;) {
    ++counter;
    co_await std::suspend_always{};
  }
}

double bare_switch_ns(std::size_t n) {
  std::uint64_t counter = 0;
  bare_coroutine c = bare_loop(counter);
  c.handle.resume();
  const auto t0 = clock_type::now();
  for (std::size_t i = 0; i < n; ++i) c.handle.resume();
  const double ns = seconds_between(t0, clock_type::now()) * 1e9 / static_cast<double>(n);
  c.handle.destroy();
  if (counter != n + 1) std::abort();
  return ns;
}

task<void> event_pong(ipcoro::event& ping, ipcoro::event& pong, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i) {
    co_await ping.wait();
    ping.reset();
    pong.set();
  }
}

task<void> event_ping(ipcoro::event& ping, ipcoro::event& pong, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i) {
    ping.set();
    co_await pong.wait();
    pong.reset();
  }
}

/// ipcoro: two coroutines on one io_context hand control to each other through two
/// events; each hand-over resumes an awaiting coroutine from the loop's ready queue.
double event_switch_ns(std::size_t n, double& allocs_per_switch) {
  ipcoro::io_context ctx;
  ipcoro::event ping, pong;
  ctx.spawn(event_pong(ping, pong, n));
  const std::uint64_t a0 = allocation_count();
  const auto t0 = clock_type::now();
  ipcoro::sync_wait(ctx, event_ping(ping, pong, n));
  const double ns = seconds_between(t0, clock_type::now()) * 1e9 / static_cast<double>(2 * n);
  allocs_per_switch = static_cast<double>(allocation_count() - a0) / static_cast<double>(2 * n);
  ctx.run();
  return ns;
}

task<int> ready_child(int v) { co_return v + 1; }
// The same, with its frame from the per-thread pool (the channels' opt-in): no malloc.
task<int> pooled_ready_child(ipcoro::detail::pooled_frame, int v) { co_return v + 1; }

task<void> await_children(bool pooled, std::size_t n, window& w) {
  int sum = co_await ready_child(0);
  sum += co_await pooled_ready_child({}, 0);  // warms the pool
  w.start();
  if (pooled) {
    for (std::size_t i = 0; i < n; ++i) sum += co_await pooled_ready_child({}, sum & 1);
  } else {
    for (std::size_t i = 0; i < n; ++i) sum += co_await ready_child(sum & 1);
  }
  w.stop();
  expect(sum > 0, "task sum");
}

/// The same loop driven by a bare coroutine, which carries no stop token: the tasks then
/// have no std::stop_token to copy (each copy is an atomic increment and decrement).
bare_coroutine bare_await_children(std::size_t n, window& w, int& sum) {
  sum += co_await pooled_ready_child({}, 0);
  w.start();
  for (std::size_t i = 0; i < n; ++i) sum += co_await pooled_ready_child({}, sum & 1);
  w.stop();
}

double bare_await_switch_ns(std::size_t n) {
  window w;
  int sum = 0;
  bare_coroutine c = bare_await_children(n, w, sum);
  c.handle.resume();  // every child completes at once, so this runs the whole loop
  expect(c.handle.done() && sum > 0, "bare await loop");
  c.handle.destroy();
  return w.seconds * 1e9 / static_cast<double>(2 * n);
}

/// ipcoro: a coroutine awaits a task that completes at once: the child is started and the
/// awaiting parent resumed by symmetric transfer — two switches per await, plus making
/// and freeing the child's frame.
double await_switch_ns(bool pooled, std::size_t n, double& allocs_per_await) {
  ipcoro::io_context ctx;
  window w;
  ipcoro::sync_wait(ctx, await_children(pooled, n, w));
  allocs_per_await = static_cast<double>(w.allocs) / static_cast<double>(n);
  return w.seconds * 1e9 / static_cast<double>(2 * n);
}

// ---- the run ----

void record(results& res, const job& j, pair_result& r, std::vector<double>& samples,
            const std::string& base_mode, const std::string& base_impl = "raw") {
  const std::string placement_name =
      j.transport == "inproc" ? std::string("one-thread") : std::string(name_of(j.where));
  if (j.what == kind::rtt) {
    rtt_row row;
    row.transport = j.transport;
    row.impl = j.impl;
    row.mode = j.mode;
    row.peer = find_peer(j.transport) != nullptr;
    row.placement = placement_name;
    row.base_mode = base_mode;
    if (!r.ok) {
      row.note = r.error;
      row.failed = true;
    } else {
      row.p50 = percentile(samples, 50);
      row.p99 = percentile(samples, 99);
      row.p999 = percentile(samples, 99.9);
      row.mean = mean(samples);
      row.cpu_us = r.cpu_seconds() * 1e6 / static_cast<double>(j.n);
      row.allocs = static_cast<double>(r.allocs()) / static_cast<double>(2 * j.n);
    }
    res.rtt.push_back(row);
  } else {
    tput_row row;
    row.transport = j.transport;
    row.impl = j.impl;
    row.mode = j.mode;
    row.peer = find_peer(j.transport) != nullptr;
    row.placement = placement_name;
    row.size = j.size;
    row.base_mode = base_mode;
    row.base_impl = base_impl;
    if (!r.ok) {
      row.note = r.error;
      row.failed = true;
    } else {
      // The receiver's window: from its first steady-state message to its last.
      row.msgs_per_s = static_cast<double>(j.n) / r.self.seconds;
      row.bytes_per_s = row.msgs_per_s * static_cast<double>(j.size);
      row.cpu_us = r.cpu_seconds() * 1e6 / static_cast<double>(j.n);
      row.allocs = static_cast<double>(r.allocs()) / static_cast<double>(j.n);
    }
    res.tput.push_back(row);
  }
}

void skip(results& res, const job& j, const std::string& why) {
  const std::string placement_name =
      j.transport == "inproc" ? std::string("one-thread") : std::string(name_of(j.where));
  if (j.what == kind::rtt) {
    rtt_row row;
    row.transport = j.transport;
    row.impl = j.impl;
    row.mode = j.mode;
    row.peer = find_peer(j.transport) != nullptr;
    row.placement = placement_name;
    row.note = why;
    res.rtt.push_back(row);
  } else {
    tput_row row;
    row.transport = j.transport;
    row.impl = j.impl;
    row.mode = j.mode;
    row.peer = find_peer(j.transport) != nullptr;
    row.placement = placement_name;
    row.size = j.size;
    row.note = why;
    res.tput.push_back(row);
  }
}

/// Runs the rows of one comparison (one transport and placement, or one transport and
/// size) interleaved: each row's messages are split into `rounds` parts, and every row
/// measures its part in turn, so that drift of the host over the minutes a comparison
/// takes (another VM waking up, frequency changes) lands on all of its rows alike.
struct runner {
  const settings& cfg;
  results& res;
  bool failed = false;

  struct entry {
    job j;
    std::string base_mode, base_impl;
    std::vector<double> samples;
    pair_result total;  // everything summed into `self`
    std::size_t n = 0;
  };
  std::vector<entry> group;

  void add(job j, const std::string& base_mode = "", const std::string& base_impl = "raw") {
    if (j.what == kind::rtt) {
      j.size = rtt_size;
      j.n = cfg.iterations;
    } else {
      j.n = tput_messages(cfg, j.size);
    }
    entry e;
    e.j = j;
    e.base_mode = base_mode;
    e.base_impl = base_impl;
    e.samples.reserve(j.n);
    e.total.ok = true;
    group.push_back(std::move(e));
  }

  void flush() {
    for (std::size_t round = 0; round < cfg.rounds; ++round) {
      for (entry& e : group) {
        if (!e.total.ok) continue;
        job j = e.j;
        j.n = std::max<std::size_t>(e.j.n / cfg.rounds, 10);
        j.warmup = warmup_of(j.n);
        const std::string label =
            fmt::format("{} {} {} {} {}", j.transport, j.impl, j.mode,
                        j.what == kind::rtt ? "round trip" : "throughput", size_label(j.size));
        fmt::print(stderr, "  {} (part {} of {}) ...\n", label, round + 1, cfg.rounds);
        pair_result r;
        try {
          const watchdog dog(label, cfg.quick ? 60 : 600);
          r = measure(j, &e.samples);
        } catch (const std::exception& ex) {
          r.ok = false;
          r.error = ex.what();
        }
        if (!r.ok) {
          failed = true;
          fmt::print(stderr, "ipcoro-bench: {} failed: {}\n", label, r.error);
          e.total.ok = false;
          e.total.error = r.error;
          continue;
        }
        e.total.self.seconds += r.self.seconds;
        e.total.self.cpu_seconds += r.cpu_seconds();
        e.total.self.allocs += r.allocs();
        e.n += j.n;
      }
    }
    for (entry& e : group) {
      e.j.n = e.n;
      record(res, e.j, e.total, e.samples, e.base_mode, e.base_impl);
    }
    group.clear();
  }
};

/// The peer libraries' rows of one comparison: each peer that --transport selects and this
/// build has. A peer that is not built is listed as skipped, with its packages, when
/// `note_missing` (once per kind of row).
void add_peer_rows(runner& run, const settings& cfg, kind what, placement where, std::size_t size,
                   bool note_missing) {
  for (const peer_library& p : peer_libraries()) {
    const std::string transport(p.transport);
    if (cfg.transports.count(transport) == 0) continue;
    const job j{transport,
                std::string(p.impl),
                std::string(what == kind::rtt ? p.rtt_mode : p.tput_mode),
                what,
                where,
                size};
    if (p.built) {
      run.add(j);
    } else if (note_missing) {
      skip(run.res, j, fmt::format("not built: install {} and reconfigure", p.packages));
    }
  }
  run.flush();
}

void run_all(const settings& cfg, results& res, bool& failed) {
  runner run{cfg, res, false, {}};
  const auto want = [&](const char* t) { return cfg.transports.count(t) != 0; };
  const bool asio = IPCORO_BENCH_ASIO != 0;

  // Round trips.
  for (const char* t : {"pipe", "fifo", "mq"}) {
    if (!want(t)) continue;
    for (placement where : cfg.placements) {
      run.add({t, "raw", "", kind::rtt, where});
      run.add({t, "ipcoro", "", kind::rtt, where});
      run.add({t, "ipcoro", "busy-poll", kind::rtt, where});
      // Both sides' loops inside an epoll loop (poll_fd + poll), beside ipcoro's own loop.
      if (std::string_view(t) == "pipe") run.add({t, "ipcoro", "embedded", kind::rtt, where});
      run.add({t, "ipcoro-channel", "", kind::rtt, where});
      if (asio && std::string_view(t) != "mq") run.add({t, "asio", "", kind::rtt, where});
      run.flush();
    }
  }
  for (const char* t : {"shm", "file"}) {
    if (!want(t)) continue;
    for (placement where : cfg.placements) {
      // Two spinning processes on one core only take turns by preemption: spinning is
      // measured across cores only.
      const bool spin = where == placement::cross_core;
      run.add({t, "raw", "futex", kind::rtt, where}, "futex");
      if (spin) run.add({t, "raw", "spin", kind::rtt, where}, "spin");
      run.add({t, "ipcoro", "sleep", kind::rtt, where}, "futex");
      if (spin) run.add({t, "ipcoro", "spin", kind::rtt, where}, "spin");
      run.add({t, "ipcoro-channel", "", kind::rtt, where}, "futex");
      // Both sides' contexts driven from Asio loops (ipcoro/asio.hpp), beside ipcoro's own loop.
      if (asio && std::string_view(t) == "shm") {
        run.add({t, "ipcoro-channel", "asio", kind::rtt, where}, "futex");
      }
      run.flush();
    }
  }
  if (want("inproc")) {
    run.add({"inproc", "ipcoro-channel", "", kind::rtt, placement::same_core});
    run.flush();
  }
  for (placement where : cfg.placements)
    add_peer_rows(run, cfg, kind::rtt, where, rtt_size, where == cfg.placements.front());

  // Throughput.
  const placement tp = cfg.tput_placement;
  const long msgsize_max = mq_limit("/proc/sys/fs/mqueue/msgsize_max", 8192);
  for (std::size_t size : tput_sizes) {
    for (const char* t : {"pipe", "fifo", "mq"}) {
      if (!want(t)) continue;
      if (std::string_view(t) == "mq" && static_cast<long>(size) > msgsize_max) {
        skip(res, {t, "raw", "", kind::tput, tp, size},
             fmt::format("above /proc/sys/fs/mqueue/msgsize_max ({})", msgsize_max));
        continue;
      }
      run.add({t, "raw", "", kind::tput, tp, size});
      run.add({t, "ipcoro", "", kind::tput, tp, size});
      run.add({t, "ipcoro-channel", "", kind::tput, tp, size});
      if (asio && std::string_view(t) != "mq") run.add({t, "asio", "", kind::tput, tp, size});
      if (std::string_view(t) == "pipe" && size == 65536) {
        // Bigger pipes mean fewer sleeps and wake-ups; vmsplice skips the copy into the pipe.
        const std::size_t mib = 1 << 20;
        if (ipcoro::pipe_max_size() < mib) {
          skip(res, {t, "raw", "1MiB-pipe", kind::tput, tp, size}, "/proc/sys/fs/pipe-max-size below 1 MiB");
        } else {
          run.add({t, "raw", "1MiB-pipe", kind::tput, tp, size, 0, 0, mib}, "1MiB-pipe");
          run.add({t, "ipcoro", "1MiB-pipe", kind::tput, tp, size, 0, 0, mib}, "1MiB-pipe");
          run.add({t, "raw", "vmsplice", kind::tput, tp, size, 0, 0, mib}, "1MiB-pipe");
          run.add({t, "ipcoro", "vmsplice", kind::tput, tp, size, 0, 0, mib}, "1MiB-pipe");
        }
      }
      run.flush();
    }
    // A ring's comparison is one thread's streaming memcpy of the same sizes: measured once.
    tput_row memcpy_row;
    memcpy_row.impl = "raw";
    memcpy_row.mode = "memcpy";
    memcpy_row.placement = "one-thread";
    memcpy_row.size = size;
    memcpy_row.base_mode = "memcpy";
    if (want("shm") || want("file")) {
      memcpy_row.bytes_per_s =
          memcpy_bandwidth(std::min<std::uint64_t>(cfg.tput_bytes, 1ULL << 30), size, cfg.memcpy_span);
      memcpy_row.msgs_per_s = memcpy_row.bytes_per_s / static_cast<double>(size);
    }
    for (const char* t : {"shm", "file"}) {
      if (!want(t)) continue;
      run.add({t, "ipcoro", "sleep", kind::tput, tp, size}, "memcpy");
      run.add({t, "ipcoro", "spin", kind::tput, tp, size}, "memcpy");
      run.add({t, "ipcoro-channel", "", kind::tput, tp, size}, "memcpy");
      if (std::string_view(t) == "shm") {
        run.add({t, "ipcoro-channel", "loan", kind::tput, tp, size}, "memcpy");
        if (size == 65536) {
          // The channel's default ring (1 MiB): small enough that the lines a 64 KiB loan
          // writes are still in the sender's cache when it comes round to them again. The
          // rows above use the bench's 4 MiB at this size.
          const std::size_t mib = 1 << 20;
          run.add({t, "ipcoro-channel", "1MiB-ring", kind::tput, tp, size, 0, 0, 0, mib}, "memcpy");
          run.add({t, "ipcoro-channel", "loan-1MiB", kind::tput, tp, size, 0, 0, 0, mib}, "memcpy");
        }
      }
      run.flush();
      tput_row copy = memcpy_row;
      copy.transport = t;
      res.tput.push_back(copy);
    }
    if (want("inproc")) {
      run.add({"inproc", "ipcoro-channel", "", kind::tput, placement::same_core, size});
      run.flush();
    }
    add_peer_rows(run, cfg, kind::tput, tp, size, size == tput_sizes.front());
  }

  // Task switch.
  if (want("inproc")) {
    const std::size_t n = cfg.quick ? 200'000 : 5'000'000;
    res.scalars.push_back({"inproc", "raw", "task_switch", 0, bare_switch_ns(n), "ns"});
    double allocs = 0;
    const double await_ns = await_switch_ns(true, n, allocs);
    res.scalars.push_back({"inproc", "ipcoro", "task_switch", 0, await_ns, "ns"});
    res.scalars.push_back({"inproc", "ipcoro", "allocs_per_task_await", 0, allocs, "allocations"});
    res.scalars.push_back(
        {"inproc", "ipcoro", "task_switch.no_stop_token", 0, bare_await_switch_ns(n), "ns"});
    const double heap_ns = await_switch_ns(false, n, allocs);
    res.scalars.push_back({"inproc", "ipcoro", "task_switch.heap_frame", 0, heap_ns, "ns"});
    res.scalars.push_back({"inproc", "ipcoro", "allocs_per_task_await.heap_frame", 0, allocs, "allocations"});
    const double loop_ns = event_switch_ns(n, allocs);
    res.scalars.push_back({"inproc", "ipcoro", "task_switch.loop", 0, loop_ns, "ns"});
    res.scalars.push_back({"inproc", "ipcoro", "allocs_per_switch.loop", 0, allocs, "allocations"});
  }
  failed = run.failed;
}

void usage(const char* argv0) {
  fmt::print(stderr,
             "usage: {} [--quick] [--iterations N] [--transport LIST] [--pin | --same-core]\n"
             "          [--json FILE] [--plot FILE.png]\n"
             "  --quick          a smoke run of a few seconds (CI)\n"
             "  --iterations N   round trips per latency row (default 100000)\n"
             "  --transport LIST comma-separated subset of pipe,fifo,mq,shm,file,inproc and of the\n"
             "                   peer libraries zmq,boost-mq,asio-local (default: all)\n"
             "  --pin            only the two sides on different cores (the first two usable CPUs)\n"
             "  --same-core      only the two sides on the same core (the first usable CPU)\n"
             "  --json FILE      write every figure as a JSON list of rows\n"
             "  --plot FILE.png  draw a chart with gnuplot\n",
             argv0);
}

}  // namespace

int main(int argc, char** argv) {
  settings cfg;
  bool iterations_given = false;
  for (int i = 1; i < argc; ++i) {
    const std::string_view arg = argv[i];
    const bool has_value = i + 1 < argc;
    if (arg == "--quick") {
      cfg.quick = true;
    } else if (arg == "--iterations" && has_value) {
      char* end = nullptr;
      cfg.iterations = std::strtoul(argv[++i], &end, 10);
      iterations_given = true;
      if (*end != '\0' || cfg.iterations < 10) {
        fmt::print(stderr, "--iterations: expected a number of at least 10\n");
        return 2;
      }
    } else if (arg == "--transport" && has_value) {
      cfg.transports.clear();
      std::string_view list = argv[++i];
      while (!list.empty()) {
        const auto comma = list.find(',');
        const std::string t(list.substr(0, comma));
        if (t != "pipe" && t != "fifo" && t != "mq" && t != "shm" && t != "file" && t != "inproc" &&
            find_peer(t) == nullptr) {
          fmt::print(stderr,
                     "--transport: unknown transport '{}' (pipe, fifo, mq, shm, file, inproc; peers: zmq, "
                     "boost-mq, asio-local)\n",
                     t);
          return 2;
        }
        cfg.transports.insert(t);
        list = comma == std::string_view::npos ? std::string_view{} : list.substr(comma + 1);
      }
    } else if (arg == "--pin") {
      cfg.placements = {placement::cross_core};
    } else if (arg == "--same-core") {
      cfg.placements = {placement::same_core};
      cfg.tput_placement = placement::same_core;
    } else if (arg == "--json" && has_value) {
      cfg.json = argv[++i];
    } else if (arg == "--plot" && has_value) {
      cfg.plot = argv[++i];
    } else {
      usage(argv[0]);
      return 2;
    }
  }
  if (cfg.quick) {
    if (!iterations_given) cfg.iterations = 2'000;
    cfg.tput_bytes = 16 << 20;
    cfg.tput_max_messages = 40'000;
    cfg.memcpy_span = 32 << 20;
    cfg.rounds = 1;
  }
  if (!cfg.plot.empty() && !have_gnuplot()) {
    fmt::print(stderr,
               "ipcoro-bench: --plot needs gnuplot, which is not installed "
               "(Debian: apt-get install gnuplot-nox, or run scripts/bootstrap)\n");
    return 2;
  }
  if (usable_cpu_count() < 2) {
    std::erase(cfg.placements, placement::cross_core);
    if (cfg.placements.empty()) cfg.placements = {placement::same_core};
    cfg.tput_placement = placement::same_core;
    fmt::print("only one usable CPU: cross-core rows skipped\n");
  }
  ::signal(SIGALRM, on_alarm);
  ::signal(SIGINT, on_terminate);
  ::signal(SIGTERM, on_terminate);

  double load[3] = {0, 0, 0};
  ::getloadavg(load, 3);
  const auto started = std::chrono::system_clock::now();
  fmt::print(
      "ipcoro-bench: {} run, {} round trips per latency row, up to {} per throughput row; "
      "{} CPUs, load average {:.2f} {:.2f} {:.2f}\n",
      cfg.quick ? "quick" : "full", cfg.iterations, si(static_cast<double>(cfg.tput_max_messages)),
      usable_cpu_count(), load[0], load[1], load[2]);
  fmt::print("peer libraries: {}\n", describe_peers());
  std::fflush(stdout);

  results res;
  res.allocation_counting =
      IPCORO_BENCH_COUNT_MALLOC
          ? "every malloc, calloc, realloc and memalign in both processes (operator new included)"
          : "global operator new in both processes (a sanitizer build: malloc is not counted)";
  bool failed = false;
  run_all(cfg, res, failed);
  print_tables(res);

  int met = 0, missed = 0;
  print_targets(res, cfg.quick, met, missed);
  ::getloadavg(load, 3);
  fmt::print("{} met, {} missed; took {:.0f} s; load average at the end {:.2f} {:.2f} {:.2f}\n", met, missed,
             std::chrono::duration<double>(std::chrono::system_clock::now() - started).count(), load[0],
             load[1], load[2]);

  if (!cfg.json.empty() && !write_json(res, cfg.json)) return 1;
  if (!cfg.plot.empty()) {
    const std::string title = fmt::format("ipcoro-bench ({} CPUs; {} round trips per latency row)",
                                          usable_cpu_count(), cfg.iterations);
    if (!write_plot(res, cfg.plot, title)) return 1;
    fmt::print("chart written to {}\n", cfg.plot);
  }
  return failed ? 1 : 0;
}
