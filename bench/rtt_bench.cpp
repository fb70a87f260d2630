// rtt_bench: 64-byte round trip between two processes over two pipes, two FIFOs and two
// POSIX message queues — through ipcoro beside the plain blocking calls (read/write,
// mq_send/mq_receive) and, for pipes and FIFOs, standalone Asio — with the two processes
// on different cores and on the same core, all in one run. "ipcoro+poll" is ipcoro with the
// opt-in busy polling (io_context::options::busy_poll) on both sides; the CPU column shows
// what that costs.
//
// Usage: rtt_bench [--iterations N] [--quick] [--transport pipe|fifo|mq|all]
#include <ipcoro/ipcoro.hpp>

#if IPCORO_BENCH_ASIO
#include <asio.hpp>
#endif

#include <fcntl.h>
#include <fmt/core.h>
#include <mqueue.h>
#include <sched.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace {

constexpr std::size_t message_size = 64;
using clock_type = std::chrono::steady_clock;
using message = std::array<std::byte, message_size>;

enum class impl { raw, ipcoro, ipcoro_busy_poll, asio };

// Busy polling spends up to this long checking for completions before sleeping.
constexpr std::chrono::microseconds busy_poll_budget{200};

ipcoro::io_context::options context_options(impl which) {
  ipcoro::io_context::options o;
  if (which == impl::ipcoro_busy_poll) o.busy_poll = busy_poll_budget;
  return o;
}

const char* name_of(impl which) {
  switch (which) {
    case impl::raw:
      return "raw";
    case impl::ipcoro:
      return "ipcoro";
    case impl::ipcoro_busy_poll:
      return "ipcoro+poll";
    case impl::asio:
      return "asio";
  }
  return "?";
}

struct result {
  std::vector<double> rtt_us;  // one per round trip
  double cpu_us_per_rtt = 0;   // user + system time of both processes
};

void pin_to(int cpu) {
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(cpu, &set);
  if (::sched_setaffinity(0, sizeof set, &set) != 0) {
    fmt::print(stderr, "sched_setaffinity(cpu {}) failed: {}\n", cpu, std::strerror(errno));
    std::exit(1);
  }
}

double cpu_seconds(int who) {
  rusage ru{};
  ::getrusage(who, &ru);
  return static_cast<double>(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) +
         static_cast<double>(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
}

// ---- raw blocking read/write ----

void raw_full(int fd, void* buf, bool reading) {
  auto* p = static_cast<char*>(buf);
  std::size_t done = 0;
  while (done < message_size) {
    const ssize_t n =
        reading ? ::read(fd, p + done, message_size - done) : ::write(fd, p + done, message_size - done);
    if (n <= 0) {
      if (n < 0 && errno == EINTR) continue;
      std::exit(3);
    }
    done += static_cast<std::size_t>(n);
  }
}

void raw_echo(int in, int out, std::size_t count) {
  message m{};
  for (std::size_t i = 0; i < count; ++i) {
    raw_full(in, m.data(), true);
    raw_full(out, m.data(), false);
  }
}

void raw_ping(int out, int in, std::size_t count, std::vector<double>& rtt) {
  message m{};
  for (std::size_t i = 0; i < count; ++i) {
    const auto t0 = clock_type::now();
    raw_full(out, m.data(), false);
    raw_full(in, m.data(), true);
    rtt.push_back(std::chrono::duration<double, std::micro>(clock_type::now() - t0).count());
  }
}

// ---- ipcoro ----

ipcoro::task<void> coro_echo(const ipcoro::pipe_reader& in, const ipcoro::pipe_writer& out,
                             std::size_t count) {
  message m{};
  for (std::size_t i = 0; i < count; ++i) {
    co_await in.read_exact(m);
    co_await out.write_all(m);
  }
}

ipcoro::task<void> coro_ping(const ipcoro::pipe_writer& out, const ipcoro::pipe_reader& in, std::size_t count,
                             std::vector<double>& rtt) {
  message m{};
  for (std::size_t i = 0; i < count; ++i) {
    const auto t0 = clock_type::now();
    co_await out.write_all(m);
    co_await in.read_exact(m);
    rtt.push_back(std::chrono::duration<double, std::micro>(clock_type::now() - t0).count());
  }
}

// ---- standalone Asio, C++20 coroutines on posix::stream_descriptor (epoll reactor) ----

#if IPCORO_BENCH_ASIO
asio::awaitable<void> asio_echo(asio::posix::stream_descriptor& in, asio::posix::stream_descriptor& out,
                                std::size_t count) {
  message m{};
  for (std::size_t i = 0; i < count; ++i) {
    co_await asio::async_read(in, asio::buffer(m), asio::use_awaitable);
    co_await asio::async_write(out, asio::buffer(m), asio::use_awaitable);
  }
}

asio::awaitable<void> asio_ping(asio::posix::stream_descriptor& out, asio::posix::stream_descriptor& in,
                                std::size_t count, std::vector<double>& rtt) {
  message m{};
  for (std::size_t i = 0; i < count; ++i) {
    const auto t0 = clock_type::now();
    co_await asio::async_write(out, asio::buffer(m), asio::use_awaitable);
    co_await asio::async_read(in, asio::buffer(m), asio::use_awaitable);
    rtt.push_back(std::chrono::duration<double, std::micro>(clock_type::now() - t0).count());
  }
}

/// Runs `make(in, out)` on a fresh single-threaded io_context over duplicates of the fds.
template <class Make>
void run_asio(int in_fd, int out_fd, Make make) {
  asio::io_context io(1);
  asio::posix::stream_descriptor in(io, ::dup(in_fd));
  asio::posix::stream_descriptor out(io, ::dup(out_fd));
  asio::co_spawn(io, make(in, out), asio::detached);
  io.run();
}
#endif

// ---- POSIX message queues ----

void raw_mq_echo(mqd_t in, mqd_t out, std::size_t count) {
  message m{};
  for (std::size_t i = 0; i < count; ++i) {
    if (::mq_receive(in, reinterpret_cast<char*>(m.data()), m.size(), nullptr) != message_size) std::exit(3);
    if (::mq_send(out, reinterpret_cast<const char*>(m.data()), m.size(), 0) != 0) std::exit(3);
  }
}

void raw_mq_ping(mqd_t out, mqd_t in, std::size_t count, std::vector<double>& rtt) {
  message m{};
  for (std::size_t i = 0; i < count; ++i) {
    const auto t0 = clock_type::now();
    if (::mq_send(out, reinterpret_cast<const char*>(m.data()), m.size(), 0) != 0) std::exit(3);
    if (::mq_receive(in, reinterpret_cast<char*>(m.data()), m.size(), nullptr) != message_size) std::exit(3);
    rtt.push_back(std::chrono::duration<double, std::micro>(clock_type::now() - t0).count());
  }
}

ipcoro::task<void> coro_mq_echo(const ipcoro::message_queue& in, const ipcoro::message_queue& out,
                                std::size_t count) {
  message m{};
  for (std::size_t i = 0; i < count; ++i) {
    co_await in.receive(m);
    co_await out.send(m);
  }
}

ipcoro::task<void> coro_mq_ping(const ipcoro::message_queue& out, const ipcoro::message_queue& in,
                                std::size_t count, std::vector<double>& rtt) {
  message m{};
  for (std::size_t i = 0; i < count; ++i) {
    const auto t0 = clock_type::now();
    co_await out.send(m);
    co_await in.receive(m);
    rtt.push_back(std::chrono::duration<double, std::micro>(clock_type::now() - t0).count());
  }
}

// ---- one measurement ----

enum class transport { pipe, fifo, mq };

const char* name_of(transport t) {
  switch (t) {
    case transport::pipe:
      return "pipe";
    case transport::fifo:
      return "fifo";
    case transport::mq:
      return "mq";
  }
  return "?";
}

/// The echo child's side and the measuring parent's side of one round-trip link pair.
struct side {
  int in = -1;
  int out = -1;
};

/// Runs the echo (child) or the measurement (parent) over byte-stream descriptors.
void run_stream(impl which, transport t, side ends, bool echo, std::size_t warmup, std::size_t iterations,
                std::vector<double>& discard, std::vector<double>& rtt) {
  const std::size_t total = warmup + iterations;
  if (which == impl::raw) {
    if (echo) {
      raw_echo(ends.in, ends.out, total);
    } else {
      raw_ping(ends.out, ends.in, warmup, discard);
      raw_ping(ends.out, ends.in, iterations, rtt);
    }
  } else if (which == impl::asio) {
#if IPCORO_BENCH_ASIO
    if (echo) {
      run_asio(ends.in, ends.out, [&](auto& in, auto& out) { return asio_echo(in, out, total); });
    } else {
      run_asio(ends.in, ends.out, [&](auto& in, auto& out) {
        return [](auto& o, auto& i, std::size_t w, std::size_t n, std::vector<double>& d,
                  std::vector<double>& r) -> asio::awaitable<void> {
          co_await asio_ping(o, i, w, d);
          co_await asio_ping(o, i, n, r);
        }(out, in, warmup, iterations, discard, rtt);
      });
    }
#endif
  } else {
    ipcoro::io_context ctx(context_options(which));
    const ipcoro::pipe_reader in{ipcoro::unique_fd{::dup(ends.in)}};
    // Anonymous pipes take RWF_NOWAIT writes; FIFOs do not (see ipcoro::write_path).
    const ipcoro::pipe_writer out{
        ipcoro::unique_fd{::dup(ends.out)},
        t == transport::pipe ? ipcoro::write_path::try_nowait_first : ipcoro::write_path::ring_only};
    if (echo) {
      ipcoro::sync_wait(ctx, coro_echo(in, out, total));
    } else {
      ipcoro::sync_wait(ctx, coro_ping(out, in, warmup, discard));
      ipcoro::sync_wait(ctx, coro_ping(out, in, iterations, rtt));
    }
  }
}

int open_or_die(const std::string& path, int flags) {
  const int fd = ::open(path.c_str(), flags | O_CLOEXEC);
  if (fd < 0) {
    fmt::print(stderr, "open {}: {}\n", path, std::strerror(errno));
    std::exit(1);
  }
  return fd;
}

result measure(transport t, impl which, bool same_core, std::size_t iterations) {
  const std::size_t warmup = std::max<std::size_t>(iterations / 10, 100);
  const std::string tag = fmt::format("ipcoro-rtt-{}-{}", ::getpid(), static_cast<int>(t));
  // Set up before fork: two pipes, two FIFOs in a fresh directory, or two queues.
  ipcoro::pipe_pair to_child, to_parent;
  std::string dir, fifo_a, fifo_b;
  std::optional<ipcoro::message_queue> queue_a, queue_b;
  if (t == transport::pipe) {
    to_child = ipcoro::make_pipe();
    to_parent = ipcoro::make_pipe();
  } else if (t == transport::fifo) {
    char templ[] = "/tmp/ipcoro-rtt-XXXXXX";
    if (::mkdtemp(templ) == nullptr) std::exit(1);
    dir = templ;
    fifo_a = dir + "/to-child";
    fifo_b = dir + "/to-parent";
    if (::mkfifo(fifo_a.c_str(), 0600) != 0 || ::mkfifo(fifo_b.c_str(), 0600) != 0) std::exit(1);
  } else {
    const ipcoro::mq_attributes attrs{.max_messages = 8, .message_size = static_cast<long>(message_size)};
    queue_a.emplace(ipcoro::message_queue::create("/" + tag + "-a", attrs));
    queue_b.emplace(ipcoro::message_queue::create("/" + tag + "-b", attrs));
  }
  const double cpu_before = cpu_seconds(RUSAGE_SELF) + cpu_seconds(RUSAGE_CHILDREN);

  result r;
  std::vector<double> discard;
  discard.reserve(warmup);
  r.rtt_us.reserve(iterations);
  std::fflush(nullptr);
  const pid_t child = ::fork();
  const bool echo = child == 0;
  pin_to(echo ? (same_core ? 0 : 1) : 0);
  if (t == transport::mq) {
    const ipcoro::message_queue& in = echo ? *queue_a : *queue_b;
    const ipcoro::message_queue& out = echo ? *queue_b : *queue_a;
    if (which == impl::raw) {
      // Blocking descriptors of the same queues: the classic way.
      const mqd_t raw_in = ::mq_open(in.name().c_str(), O_RDONLY | O_CLOEXEC);
      const mqd_t raw_out = ::mq_open(out.name().c_str(), O_WRONLY | O_CLOEXEC);
      if (raw_in < 0 || raw_out < 0) std::exit(1);
      if (echo) {
        raw_mq_echo(raw_in, raw_out, warmup + iterations);
      } else {
        raw_mq_ping(raw_out, raw_in, warmup, discard);
        raw_mq_ping(raw_out, raw_in, iterations, r.rtt_us);
      }
      ::mq_close(raw_in);
      ::mq_close(raw_out);
    } else {
      ipcoro::io_context ctx(context_options(which));
      if (echo) {
        ipcoro::sync_wait(ctx, coro_mq_echo(in, out, warmup + iterations));
      } else {
        ipcoro::sync_wait(ctx, coro_mq_ping(out, in, warmup, discard));
        ipcoro::sync_wait(ctx, coro_mq_ping(out, in, iterations, r.rtt_us));
      }
    }
  } else {
    ipcoro::unique_fd in, out;
    if (t == transport::pipe) {
      in = echo ? to_child.reader.release_fd() : to_parent.reader.release_fd();
      out = echo ? to_parent.writer.release_fd() : to_child.writer.release_fd();
      to_child = {};
      to_parent = {};
    } else if (echo) {  // the same open order on both sides, so neither waits forever
      in = ipcoro::unique_fd{open_or_die(fifo_a, O_RDONLY)};
      out = ipcoro::unique_fd{open_or_die(fifo_b, O_WRONLY)};
    } else {
      out = ipcoro::unique_fd{open_or_die(fifo_a, O_WRONLY)};
      in = ipcoro::unique_fd{open_or_die(fifo_b, O_RDONLY)};
    }
    run_stream(which, t, {in.get(), out.get()}, echo, warmup, iterations, discard, r.rtt_us);
  }
  if (echo) ::_exit(0);

  int status = 0;
  ::waitpid(child, &status, 0);
  if (!dir.empty()) {
    ::unlink(fifo_a.c_str());
    ::unlink(fifo_b.c_str());
    ::rmdir(dir.c_str());
  }
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    fmt::print(stderr, "{} echo child failed\n", name_of(t));
    std::exit(1);
  }
  const double cpu_after = cpu_seconds(RUSAGE_SELF) + cpu_seconds(RUSAGE_CHILDREN);
  r.cpu_us_per_rtt = (cpu_after - cpu_before) * 1e6 / static_cast<double>(warmup + iterations);
  return r;
}

double percentile(std::vector<double>& v, double p) {
  const auto k = static_cast<std::size_t>(p / 100.0 * static_cast<double>(v.size() - 1));
  std::nth_element(v.begin(), v.begin() + static_cast<std::ptrdiff_t>(k), v.end());
  return v[k];
}

double mean(const std::vector<double>& v) {
  double s = 0;
  for (double x : v) s += x;
  return s / static_cast<double>(v.size());
}

}  // namespace

int main(int argc, char** argv) {
  std::size_t iterations = 100'000;
  std::vector<transport> transports{transport::pipe, transport::fifo, transport::mq};
  for (int i = 1; i < argc; ++i) {
    const std::string_view arg = argv[i];
    if (arg == "--quick") {
      iterations = 2'000;
    } else if (arg == "--iterations" && i + 1 < argc) {
      iterations = std::strtoul(argv[++i], nullptr, 10);
    } else if (arg == "--transport" && i + 1 < argc) {
      const std::string_view t = argv[++i];
      if (t == "pipe")
        transports = {transport::pipe};
      else if (t == "fifo")
        transports = {transport::fifo};
      else if (t == "mq")
        transports = {transport::mq};
      else if (t != "all") {
        fmt::print(stderr, "--transport: expected pipe, fifo, mq or all, got '{}'\n", t);
        return 2;
      }
    } else {
      fmt::print(stderr, "usage: {} [--iterations N] [--quick] [--transport pipe|fifo|mq|all]\n", argv[0]);
      return 2;
    }
  }
  if (iterations < 10) {
    fmt::print(stderr, "--iterations must be at least 10\n");
    return 2;
  }
  const long cpus = ::sysconf(_SC_NPROCESSORS_ONLN);
  fmt::print("64-byte round trip between two processes, {} round trips each\n", iterations);
  fmt::print("{:<6} {:<11} {:<12} {:>9} {:>9} {:>9} {:>9} {:>11} {:>13}\n", "link", "placement", "impl",
             "mean us", "p50 us", "p99 us", "p99.9 us", "mean/raw", "cpu us/rtt");
  for (transport t : transports) {
    for (bool same_core : {false, true}) {
      if (!same_core && cpus < 2) {
        fmt::print("{:<6} cross-core  skipped: only one CPU online\n", name_of(t));
        continue;
      }
      double raw_mean = 0;
      for (impl which : {impl::raw, impl::ipcoro, impl::ipcoro_busy_poll, impl::asio}) {
        if (which == impl::asio && (!IPCORO_BENCH_ASIO || t == transport::mq)) continue;
        result r = measure(t, which, same_core, iterations);
        const double m = mean(r.rtt_us);
        if (which == impl::raw) raw_mean = m;
        fmt::print("{:<6} {:<11} {:<12} {:>9.2f} {:>9.2f} {:>9.2f} {:>9.2f} {:>10.3f}x {:>13.2f}\n",
                   name_of(t), same_core ? "same-core" : "cross-core", name_of(which), m,
                   percentile(r.rtt_us, 50), percentile(r.rtt_us, 99), percentile(r.rtt_us, 99.9),
                   m / raw_mean, r.cpu_us_per_rtt);
      }
    }
  }
  return 0;
}
