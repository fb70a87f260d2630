// pipe_rtt_bench: 64-byte round trip between two processes over a pair of pipes, through
// ipcoro beside plain blocking read/write, with both processes on different cores and on
// the same core, measured in one run. "ipcoro+poll" is ipcoro with the opt-in busy polling
// (io_context::options::busy_poll) on both sides; its CPU column shows what that costs.
//
// Usage: pipe_rtt_bench [--iterations N] [--quick]
#include <ipcoro/ipcoro.hpp>

#if IPCORO_BENCH_ASIO
#include <asio.hpp>
#endif

#include <fmt/core.h>
#include <sched.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdlib>
#include <cstring>
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

result measure(impl which, bool same_core, std::size_t iterations) {
  const std::size_t warmup = std::max<std::size_t>(iterations / 10, 100);
  auto [to_child_r, to_child_w] = ipcoro::make_pipe();
  auto [to_parent_r, to_parent_w] = ipcoro::make_pipe();
  const double cpu_before = cpu_seconds(RUSAGE_SELF) + cpu_seconds(RUSAGE_CHILDREN);

  std::fflush(nullptr);
  const pid_t child = ::fork();
  if (child == 0) {
    pin_to(same_core ? 0 : 1);
    to_child_w.close();
    to_parent_r.close();
    if (which == impl::raw) {
      raw_echo(to_child_r.native_handle(), to_parent_w.native_handle(), warmup + iterations);
    } else if (which == impl::asio) {
#if IPCORO_BENCH_ASIO
      run_asio(to_child_r.native_handle(), to_parent_w.native_handle(),
               [&](auto& in, auto& out) { return asio_echo(in, out, warmup + iterations); });
#endif
    } else {
      ipcoro::io_context ctx(context_options(which));
      ipcoro::sync_wait(ctx, coro_echo(to_child_r, to_parent_w, warmup + iterations));
    }
    ::_exit(0);
  }
  pin_to(0);
  to_child_r.close();
  to_parent_w.close();

  result r;
  std::vector<double> discard;
  discard.reserve(warmup);
  r.rtt_us.reserve(iterations);
  if (which == impl::raw) {
    raw_ping(to_child_w.native_handle(), to_parent_r.native_handle(), warmup, discard);
    raw_ping(to_child_w.native_handle(), to_parent_r.native_handle(), iterations, r.rtt_us);
  } else if (which == impl::asio) {
#if IPCORO_BENCH_ASIO
    run_asio(to_parent_r.native_handle(), to_child_w.native_handle(), [&](auto& in, auto& out) {
      return [](auto& out, auto& in, std::size_t w, std::size_t n, std::vector<double>& d,
                std::vector<double>& rtt) -> asio::awaitable<void> {
        co_await asio_ping(out, in, w, d);
        co_await asio_ping(out, in, n, rtt);
      }(out, in, warmup, iterations, discard, r.rtt_us);
    });
#endif
  } else {
    ipcoro::io_context ctx(context_options(which));
    ipcoro::sync_wait(ctx, coro_ping(to_child_w, to_parent_r, warmup, discard));
    ipcoro::sync_wait(ctx, coro_ping(to_child_w, to_parent_r, iterations, r.rtt_us));
  }
  int status = 0;
  ::waitpid(child, &status, 0);
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    fmt::print(stderr, "echo child failed\n");
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
  for (int i = 1; i < argc; ++i) {
    const std::string_view arg = argv[i];
    if (arg == "--quick") {
      iterations = 2'000;
    } else if (arg == "--iterations" && i + 1 < argc) {
      iterations = std::strtoul(argv[++i], nullptr, 10);
    } else {
      fmt::print(stderr, "usage: {} [--iterations N] [--quick]\n", argv[0]);
      return 2;
    }
  }
  if (iterations < 10) {
    fmt::print(stderr, "--iterations must be at least 10\n");
    return 2;
  }
  const long cpus = ::sysconf(_SC_NPROCESSORS_ONLN);
  fmt::print("64-byte round trip over two pipes between two processes, {} round trips each\n", iterations);
  fmt::print("{:<11} {:<12} {:>9} {:>9} {:>9} {:>9} {:>11} {:>13}\n", "placement", "impl", "mean us",
             "p50 us", "p99 us", "p99.9 us", "mean/raw", "cpu us/rtt");
  for (bool same_core : {false, true}) {
    if (!same_core && cpus < 2) {
      fmt::print("cross-core  skipped: only one CPU online\n");
      continue;
    }
    double raw_mean = 0;
    for (impl which : {impl::raw, impl::ipcoro, impl::ipcoro_busy_poll, impl::asio}) {
      if (which == impl::asio && !IPCORO_BENCH_ASIO) continue;
      result r = measure(which, same_core, iterations);
      const double m = mean(r.rtt_us);
      if (which == impl::raw) raw_mean = m;
      fmt::print("{:<11} {:<12} {:>9.2f} {:>9.2f} {:>9.2f} {:>9.2f} {:>10.3f}x {:>13.2f}\n",
                 same_core ? "same-core" : "cross-core", name_of(which), m, percentile(r.rtt_us, 50),
                 percentile(r.rtt_us, 99), percentile(r.rtt_us, 99.9), m / raw_mean, r.cpu_us_per_rtt);
    }
  }
  return 0;
}
