// shm_bench: shared-memory rings between two processes on different cores, measured in one
// run beside the raw mechanisms they are built from.
//  - Round trip of a 64-byte message: the ipcoro SPSC ring sleeping (spin 0: futex wait
//    through io_uring when empty), with the default ring_options (a short adaptive spin,
//    then sleep) and spinning (spin up to 50 us), beside a raw futex ping-pong (FUTEX_WAIT /
//    FUTEX_WAKE syscalls) and a raw busy-spin ping-pong. The CPU column is user + system
//    time of both processes per round trip: what spinning costs.
//  - Throughput of the ring at 64-byte and 64 KiB messages in the same three modes, beside
//    memcpy bandwidth.
// The measuring functions (raw_ping_pong, ring_round_trip, ring_throughput,
// memcpy_bandwidth) take everything they vary as parameters, so that other programs can
// reuse them.
//
// Usage: shm_bench [--quick] [--rounds N] [--bytes N] [--only TEXT]
#include <ipcoro/ipcoro.hpp>

#include <fmt/core.h>
#include <linux/futex.h>
#include <sched.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

namespace {

using clock_type = std::chrono::steady_clock;
using ipcoro::task;
using namespace std::chrono_literals;

void pin_to_cpu(int cpu) {
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(cpu % static_cast<int>(std::max(1L, ::sysconf(_SC_NPROCESSORS_ONLN))), &set);
  ::sched_setaffinity(0, sizeof set, &set);
}

double cpu_seconds(const rusage& ru) {
  return static_cast<double>(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) +
         static_cast<double>(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
}
double self_cpu_seconds() {
  rusage ru{};
  ::getrusage(RUSAGE_SELF, &ru);
  return cpu_seconds(ru);
}

/// Anonymous MAP_SHARED memory, shared with the forked peer.
class shared_memory {
public:
  explicit shared_memory(std::size_t size) : size_(size) {
    void* p = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) throw std::system_error(errno, std::system_category(), "mmap");
    data_ = static_cast<std::byte*>(p);
  }
  ~shared_memory() { ::munmap(data_, size_); }
  shared_memory(const shared_memory&) = delete;
  shared_memory& operator=(const shared_memory&) = delete;
  std::span<std::byte> bytes() const noexcept { return {data_, size_}; }

private:
  std::byte* data_;
  std::size_t size_;
};

/// Runs `peer` in a child pinned to CPU 1 and `self` here on CPU 0; returns the wall time
/// of `self` and the CPU time of both processes.
struct timing {
  double seconds = 0;
  double cpu_seconds = 0;
  bool ok = false;
};
timing run_pair(const std::function<bool()>& peer, const std::function<bool()>& self) {
  std::fflush(nullptr);
  const pid_t pid = ::fork();
  if (pid == 0) {
    pin_to_cpu(1);
    bool ok = false;
    try {
      ok = peer();
    } catch (const std::exception& e) {
      fmt::print(stderr, "peer: {}\n", e.what());
    }
    std::fflush(nullptr);
    ::_exit(ok ? 0 : 1);
  }
  pin_to_cpu(0);
  const double cpu0 = self_cpu_seconds();
  const auto t0 = clock_type::now();
  bool ok = false;
  try {
    ok = self();
  } catch (const std::exception& e) {
    fmt::print(stderr, "bench: {}\n", e.what());
  }
  timing t;
  t.seconds = std::chrono::duration<double>(clock_type::now() - t0).count();
  int status = 0;
  rusage child{};
  ::wait4(pid, &status, 0, &child);
  t.cpu_seconds = self_cpu_seconds() - cpu0 + cpu_seconds(child);
  t.ok = ok && WIFEXITED(status) && WEXITSTATUS(status) == 0;
  return t;
}

// ---- raw ping-pongs on one shared word whose value says whose turn it is ----

long futex(std::atomic<std::uint32_t>* word, int op, std::uint32_t value) {
  return ::syscall(SYS_futex, reinterpret_cast<std::uint32_t*>(word), op, value, nullptr, nullptr, 0);
}

/// Waits until `word` holds `want`: by FUTEX_WAIT (sleeping) or by polling (spinning).
void await_turn(std::atomic<std::uint32_t>& word, std::uint32_t want, bool spin) {
  for (;;) {
    const std::uint32_t v = word.load(std::memory_order_acquire);
    if (v == want) return;
    if (spin) {
#if defined(__x86_64__) || defined(__i386__)
      __builtin_ia32_pause();
#endif
    } else {
      futex(&word, FUTEX_WAIT, v);
    }
  }
}
void give_turn(std::atomic<std::uint32_t>& word, std::uint32_t value, bool spin) {
  word.store(value, std::memory_order_release);
  if (!spin) futex(&word, FUTEX_WAKE, 1);
}

timing raw_ping_pong(std::uint64_t rounds, bool spin) {
  shared_memory mem(4096);
  auto& word = *new (mem.bytes().data()) std::atomic<std::uint32_t>{0};
  // The parent sets 1 (ping), the peer answers 2 (pong); 3 tells the peer to stop.
  return run_pair(
      [&] {
        for (;;) {
          std::uint32_t v;
          while ((v = word.load(std::memory_order_acquire)) != 1 && v != 3) {
            if (spin) {
#if defined(__x86_64__) || defined(__i386__)
              __builtin_ia32_pause();
#endif
            } else {
              futex(&word, FUTEX_WAIT, v);
            }
          }
          if (v == 3) return true;
          give_turn(word, 2, spin);
        }
      },
      [&] {
        for (std::uint64_t i = 0; i < rounds; ++i) {
          give_turn(word, 1, spin);
          await_turn(word, 2, spin);
        }
        give_turn(word, 3, spin);
        return true;
      });
}

// ---- the ring ----

/// `rounds` round trips of a 64-byte message through two SPSC rings with an echo process.
timing ring_round_trip(std::uint64_t rounds, const ipcoro::ring_options& opts) {
  const std::size_t region = ipcoro::spsc_ring_region_size(4096);
  shared_memory mem(2 * region);
  auto ping = mem.bytes().first(region);
  auto pong = mem.bytes().subspan(region, region);
  ipcoro::format_spsc_ring(ping);
  ipcoro::format_spsc_ring(pong);
  return run_pair(
      [&] {
        ipcoro::io_context ctx;
        return ipcoro::sync_wait(ctx, [&]() -> task<bool> {
          ipcoro::spsc_ring_receiver rx(ping, opts);
          ipcoro::spsc_ring_sender tx(pong, opts);
          std::array<std::byte, 64> buf{};
          while (auto n = co_await rx.receive(buf).with_timeout(30s)) co_await tx.send(std::span(buf).first(*n));
          co_return true;
        }());
      },
      [&] {
        ipcoro::io_context ctx;
        return ipcoro::sync_wait(ctx, [&]() -> task<bool> {
          ipcoro::spsc_ring_sender tx(ping, opts);
          ipcoro::spsc_ring_receiver rx(pong, opts);
          std::array<std::byte, 64> out{};
          std::array<std::byte, 64> in{};
          for (std::uint64_t i = 0; i < rounds; ++i) {
            std::memcpy(out.data(), &i, sizeof i);
            co_await tx.send(out);
            const auto n = co_await rx.receive(in).with_timeout(30s);
            if (n != out.size() || std::memcmp(in.data(), &i, sizeof i) != 0) co_return false;
          }
          tx.close();
          co_return true;
        }());
      });
}

/// `bytes` (rounded down to whole messages) streamed one way through an SPSC ring of
/// `ring_size` bytes in messages of `message_size`.
timing ring_throughput(std::uint64_t bytes, std::size_t message_size, std::size_t ring_size,
                       const ipcoro::ring_options& opts) {
  const std::size_t region = ipcoro::spsc_ring_region_size(ring_size);
  shared_memory mem(region);
  ipcoro::format_spsc_ring(mem.bytes());
  const std::uint64_t messages = bytes / message_size;
  return run_pair(
      [&] {
        ipcoro::io_context ctx;
        return ipcoro::sync_wait(ctx, [&]() -> task<bool> {
          ipcoro::spsc_ring_sender tx(mem.bytes(), opts);
          std::vector<std::byte> msg(message_size, std::byte{0x5a});
          for (std::uint64_t i = 0; i < messages; ++i) co_await tx.send(msg);
          tx.close();
          co_return true;
        }());
      },
      [&] {
        ipcoro::io_context ctx;
        return ipcoro::sync_wait(ctx, [&]() -> task<bool> {
          ipcoro::spsc_ring_receiver rx(mem.bytes(), opts);
          std::vector<std::byte> buf(message_size);
          std::uint64_t got = 0;
          while (auto n = co_await rx.receive(buf).with_timeout(30s)) got += *n;
          co_return got == messages * message_size;
        }());
      });
}

/// memcpy of `bytes` in `chunk`-sized copies from a 4 MiB source to a 4 MiB destination
/// (the ring's working set at 4 MiB), in GB/s.
double memcpy_bandwidth(std::uint64_t bytes, std::size_t chunk) {
  const std::size_t span = 4 << 20;
  std::vector<std::byte> src(span, std::byte{1});
  std::vector<std::byte> dst(span);
  const auto t0 = clock_type::now();
  std::size_t offset = 0;
  for (std::uint64_t done = 0; done < bytes; done += chunk) {
    std::memcpy(dst.data() + offset, src.data() + offset, chunk);
    offset = offset + chunk + chunk > span ? 0 : offset + chunk;
    asm volatile("" : : "r"(dst.data()) : "memory");
  }
  return static_cast<double>(bytes) / std::chrono::duration<double>(clock_type::now() - t0).count() / 1e9;
}

}  // namespace

int main(int argc, char** argv) {
  std::uint64_t rounds = 50'000;
  std::uint64_t bytes = std::uint64_t{2} << 30;
  std::string_view only;
  for (int i = 1; i < argc; ++i) {
    const std::string_view arg = argv[i];
    if (arg == "--quick") {
      rounds = 3'000;
      bytes = 256 << 20;
    } else if (arg == "--rounds" && i + 1 < argc) {
      rounds = std::strtoull(argv[++i], nullptr, 10);
    } else if (arg == "--bytes" && i + 1 < argc) {
      bytes = std::strtoull(argv[++i], nullptr, 10);
    } else if (arg == "--only" && i + 1 < argc) {
      only = argv[++i];
    } else {
      fmt::print(stderr, "usage: {} [--quick] [--rounds N] [--bytes N] [--only TEXT]\n", argv[0]);
      fmt::print(stderr,
                 "  --only TEXT: run only the rows whose label contains TEXT (e.g. 'raw', 'spin', '64 B')\n");
      return 2;
    }
  }
  const auto wanted = [&](std::string_view label) {
    return only.empty() || label.find(only) != std::string_view::npos;
  };
  constexpr auto spin = std::chrono::microseconds(50);
  // The ring's three ways of waiting: sleep at once, the default options, spin up to 50 us.
  struct mode {
    std::string name;
    ipcoro::ring_options options;
  };
  std::vector<mode> modes(3);
  modes[0].name = "sleeping";
  modes[0].options.spin = std::chrono::nanoseconds::zero();
  modes[1].name = fmt::format("default (spin {} ns)", ipcoro::ring_options{}.spin.count());
  modes[2].name = fmt::format("spin up to {} us", spin.count());
  modes[2].options.spin = spin;
  bool ok = true;

  fmt::print("shm_bench: 64-byte round trip between two processes pinned to CPUs 0 and 1, {} rounds\n", rounds);
  fmt::print("{:<40} {:>10} {:>10} {:>16}\n", "", "us/rtt", "vs raw", "CPU us/rtt");
  const auto row = [&](const std::string& name, const timing& t, const timing& base) {
    ok = ok && t.ok;
    const double us = t.seconds * 1e6 / static_cast<double>(rounds);
    const double base_us = base.seconds * 1e6 / static_cast<double>(rounds);
    fmt::print("{:<40} {:>10.2f} {:>9.2f}x {:>16.2f}{}\n", name, us, us / base_us,
               t.cpu_seconds * 1e6 / static_cast<double>(rounds), t.ok ? "" : "  FAILED");
  };
  // Each ring row is compared with the raw ping-pong of its kind: futex for sleeping and
  // default, busy-spin for spinning.
  for (const bool spinning : {false, true}) {
    const std::string raw_name = spinning ? "raw busy-spin ping-pong" : "raw futex ping-pong (syscalls)";
    std::vector<const mode*> rows;
    for (const mode& m : modes) {
      const bool spin_mode = m.options.spin >= spin;
      if (spin_mode == spinning && wanted("ring round trip, " + m.name)) rows.push_back(&m);
    }
    if (rows.empty() && !wanted(raw_name)) continue;
    const timing raw = raw_ping_pong(rounds, spinning);
    row(raw_name, raw, raw);
    for (const mode* m : rows) row("ring round trip, " + m->name, ring_round_trip(rounds, m->options), raw);
  }

  fmt::print("\nthroughput, {} MiB per run, sender and receiver on CPUs 1 and 0\n", bytes >> 20);
  fmt::print("{:<40} {:>10} {:>12} {:>10} {:>12}\n", "", "GB/s", "Mmsg/s", "vs memcpy", "CPU s/GB");
  struct case_t {
    std::size_t size;
    std::size_t ring;
  };
  for (const case_t c : {case_t{64, 1 << 20}, case_t{64 * 1024, 4 << 20}}) {
    const std::string copy_name = fmt::format("memcpy, {} B copies", c.size);
    std::vector<const mode*> rows;
    for (const mode& m : modes) {
      if (wanted(fmt::format("ring, {} B messages, {}", c.size, m.name))) rows.push_back(&m);
    }
    if (rows.empty() && !wanted(copy_name)) continue;
    const double copy = memcpy_bandwidth(bytes, c.size);
    for (const mode* m : rows) {
      const timing t = ring_throughput(bytes, c.size, c.ring, m->options);
      ok = ok && t.ok;
      const double moved = static_cast<double>(bytes / c.size * c.size);
      const double gbs = moved / t.seconds / 1e9;
      fmt::print("{:<40} {:>10.2f} {:>12.2f} {:>9.2f}x {:>12.2f}{}\n",
                 fmt::format("ring, {} B messages, {}", c.size, m->name), gbs,
                 moved / static_cast<double>(c.size) / t.seconds / 1e6, gbs / copy,
                 t.cpu_seconds / (moved / 1e9), t.ok ? "" : "  FAILED");
    }
    fmt::print("{:<40} {:>10.2f} {:>12.2f} {:>9.2f}x\n", copy_name, copy,
               copy * 1e9 / static_cast<double>(c.size) / 1e6, 1.0);
  }
  return ok ? 0 : 1;
}
