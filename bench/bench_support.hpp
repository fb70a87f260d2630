// SPDX-License-Identifier: MIT
// Measurement pieces shared by the benchmark programs: pinning, CPU time, percentiles,
// a forked two-process runner that reports each side's steady-state window, the names a run
// creates (removed even when it ends on a signal), raw futex and busy-spin ping-pongs, and
// memcpy bandwidth.
#pragma once

#include "shared_memory.hpp"

#include <fcntl.h>
#include <fmt/core.h>
#include <linux/futex.h>
#include <mqueue.h>
#include <sched.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>
#include <vector>

namespace ipcoro::bench {

using clock_type = std::chrono::steady_clock;

/// Number of global operator new calls so far in this process; the program supplies it
/// (ipcoro-bench links the counting operator new of tests/support).
std::uint64_t allocation_count() noexcept;

/// malloc-family allocations so far in this process, operator new included (defined by
/// counting_malloc.cpp, which is built without sanitizers only).
std::uint64_t malloc_count() noexcept;

/// The CPUs this process may run on (its affinity mask at the first call), in order.
inline const std::vector<int>& usable_cpus() {
  static const std::vector<int> cpus = [] {
    std::vector<int> v;
    cpu_set_t set;
    CPU_ZERO(&set);
    if (::sched_getaffinity(0, sizeof set, &set) == 0) {
      for (int c = 0; c < CPU_SETSIZE; ++c)
        if (CPU_ISSET(c, &set)) v.push_back(c);
    }
    if (v.empty()) v.push_back(0);
    return v;
  }();
  return cpus;
}

inline int usable_cpu_count() { return static_cast<int>(usable_cpus().size()); }

/// Pins the calling process to the `index`-th usable CPU (modulo their number); exits on
/// failure, since a figure measured on the wrong CPU would be silently wrong.
inline void pin_to_cpu(int index) {
  const std::vector<int>& cpus = usable_cpus();
  const int cpu = cpus[static_cast<std::size_t>(index) % cpus.size()];
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(cpu, &set);
  if (::sched_setaffinity(0, sizeof set, &set) != 0) {
    fmt::print(stderr, "sched_setaffinity(cpu {}) failed: {}\n", cpu, std::strerror(errno));
    std::exit(1);
  }
}

/// User + system time of this process so far (getrusage), in seconds.
inline double self_cpu_seconds() noexcept {
  rusage ru{};
  ::getrusage(RUSAGE_SELF, &ru);
  return static_cast<double>(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) +
         static_cast<double>(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
}

inline double seconds_between(clock_type::time_point a, clock_type::time_point b) noexcept {
  return std::chrono::duration<double>(b - a).count();
}

/// The p-th percentile (0..100) of `v` by nearest rank; reorders `v`.
inline double percentile(std::vector<double>& v, double p) {
  if (v.empty()) return 0;
  const auto k = static_cast<std::size_t>(p / 100.0 * static_cast<double>(v.size() - 1) + 0.5);
  std::nth_element(v.begin(), v.begin() + static_cast<std::ptrdiff_t>(k), v.end());
  return v[k];
}

inline double mean(const std::vector<double>& v) {
  double s = 0;
  for (double x : v) s += x;
  return v.empty() ? 0 : s / static_cast<double>(v.size());
}

/// The steady-state part of one side of a measurement: allocations, CPU time and wall time
/// between start() (after the warm-up) and stop().
struct window {
  std::uint64_t allocs = 0;
  double cpu_seconds = 0;
  double seconds = 0;

  void start() noexcept {
    cpu0_ = self_cpu_seconds();
    allocs0_ = allocation_count();
    t0_ = clock_type::now();
  }
  void stop() noexcept {
    const auto t1 = clock_type::now();
    allocs = allocation_count() - allocs0_;
    cpu_seconds = self_cpu_seconds() - cpu0_;
    seconds = seconds_between(t0_, t1);
  }

 private:
  std::uint64_t allocs0_ = 0;
  double cpu0_ = 0;
  clock_type::time_point t0_{};
};

/// What a two-process measurement yields: the measuring (parent) side's window, the
/// peer's (child's) window, sent back through a pipe, and whether both succeeded.
struct pair_result {
  window self;
  window peer;
  bool ok = false;
  std::string error;
  double cpu_seconds() const noexcept { return self.cpu_seconds + peer.cpu_seconds; }
  std::uint64_t allocs() const noexcept { return self.allocs + peer.allocs; }
};

/// Where the two processes run: pinned to CPUs 0 and 1, or both to CPU 0.
enum class placement { cross_core, same_core };

inline const char* name_of(placement p) noexcept {
  return p == placement::cross_core ? "cross-core" : "same-core";
}

/// The message size of every round-trip row.
inline constexpr std::size_t rtt_size = 64;

/// What a row measures: 64-byte round trips, or one-way throughput.
enum class kind { rtt, tput };

/// One row to measure: which transport and implementation, how, and how many messages.
struct job {
  std::string transport, impl, mode;
  kind what = kind::rtt;
  placement where = placement::cross_core;
  std::size_t size = rtt_size;
  std::size_t warmup = 0, n = 0;
  std::size_t pipe_capacity = 0;  // 0: the default
  std::size_t ring_capacity = 0;  // shm and file channels; 0: the bench's (channel_address)
};

namespace detail {
struct wire_report {
  std::uint64_t allocs;
  double cpu_seconds;
  double seconds;
  int ok;
  char error[256];
};
}  // namespace detail

/// Runs `peer(window&)` in a forked child and `self(window&)` here, pinned as `where` says;
/// each calls window::start() after its warm-up and window::stop() at the end. Exceptions
/// on either side become `error`. The child dies with the parent (PR_SET_PDEATHSIG), and
/// leaves through _exit, so it never runs the parent's destructors.
template <class Peer, class Self>
pair_result run_pair(placement where, Peer&& peer, Self&& self) {
  int report[2];
  if (::pipe2(report, O_CLOEXEC) != 0) throw std::system_error(errno, std::system_category(), "pipe2");
  std::fflush(nullptr);
  const pid_t pid = ::fork();
  if (pid < 0) throw std::system_error(errno, std::system_category(), "fork");
  if (pid == 0) {
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
    ::close(report[0]);
    pin_to_cpu(where == placement::cross_core ? 1 : 0);
    detail::wire_report r{};
    window w;
    try {
      peer(w);
      r.ok = 1;
    } catch (const std::exception& e) {
      std::snprintf(r.error, sizeof r.error, "peer: %s", e.what());
    }
    r.allocs = w.allocs;
    r.cpu_seconds = w.cpu_seconds;
    r.seconds = w.seconds;
    [[maybe_unused]] const ssize_t n = ::write(report[1], &r, sizeof r);
    std::fflush(nullptr);
    ::_exit(r.ok ? 0 : 1);
  }
  ::close(report[1]);
  pin_to_cpu(0);
  pair_result result;
  bool self_ok = false;
  try {
    self(result.self);
    self_ok = true;
  } catch (const std::exception& e) {
    result.error = e.what();
    ::kill(pid, SIGKILL);  // it may wait forever for a measurer that gave up
  }
  detail::wire_report r{};
  const ssize_t n = ::read(report[0], &r, sizeof r);
  ::close(report[0]);
  int status = 0;
  ::waitpid(pid, &status, 0);
  const bool peer_ok =
      n == static_cast<ssize_t>(sizeof r) && r.ok && WIFEXITED(status) && WEXITSTATUS(status) == 0;
  if (!peer_ok && result.error.empty()) {
    result.error = n == static_cast<ssize_t>(sizeof r) && r.error[0] != '\0'
                       ? std::string(r.error)
                       : std::string("peer process failed");
  }
  // A peer that failed before the measurer gave up has said why: keep that too.
  if (!self_ok && n == static_cast<ssize_t>(sizeof r) && !r.ok && r.error[0] != '\0') {
    result.error += fmt::format(" ({})", r.error);
  }
  result.peer.allocs = r.allocs;
  result.peer.cpu_seconds = r.cpu_seconds;
  result.peer.seconds = r.seconds;
  result.ok = self_ok && peer_ok;
  return result;
}

/// A name no other run can have: ipcoro-bench-PID-WHAT-N.
inline std::string unique_name(std::string_view what) {
  static int counter = 0;
  return fmt::format("ipcoro-bench-{}-{}-{}", ::getpid(), what, ++counter);
}

/// What a created name is, which says how to remove it.
enum class name_kind : std::uint8_t { file, directory, shm, mqueue };

namespace detail {
/// A slot of the table a signal handler walks: 0 free, 1 being filled, 2 in use.
struct remembered_name {
  std::atomic<int> state{0};
  pid_t owner = 0;
  name_kind kind = name_kind::file;
  char name[240] = {};
};
inline remembered_name remembered_names[32];

/// Removes one name; only async-signal-safe calls (shm_unlink and mq_unlink are unlink and
/// a bare system call in glibc).
inline void remove_name(name_kind kind, const char* name) noexcept {
  switch (kind) {
    case name_kind::file:
      ::unlink(name);
      break;
    case name_kind::directory:
      ::rmdir(name);
      break;
    case name_kind::shm:
      ::shm_unlink(name);
      break;
    case name_kind::mqueue:
      ::mq_unlink(name);
      break;
  }
}
}  // namespace detail

/// Removes every name this process still owns (see owned_name): for a process about to end
/// abruptly (the watchdog, SIGINT, SIGTERM). Async-signal-safe. Names a forked child
/// inherited in its copy of the table belong to the parent and are left alone.
inline void remove_owned_names() noexcept {
  const pid_t self = ::getpid();
  // Directories last: the files they hold go first.
  for (const bool directories : {false, true}) {
    for (auto& slot : detail::remembered_names) {
      if (slot.state.load(std::memory_order_acquire) != 2 || slot.owner != self) continue;
      if ((slot.kind == name_kind::directory) != directories) continue;
      detail::remove_name(slot.kind, slot.name);
    }
  }
}

/// A file, directory, shared memory object or message queue this process created: removed
/// when the owned_name goes, whatever the row's outcome, and by remove_owned_names() if the
/// process ends first. Make it before creating the name, so no path leaves it behind.
class owned_name {
 public:
  owned_name() = default;
  /// Remembers `name` (a path, or "/name" for shm and mqueue). Throws std::length_error
  /// when the name is too long or too many are owned at once.
  owned_name(name_kind kind, std::string name) : kind_(kind), name_(std::move(name)) {
    if (name_.size() >= sizeof detail::remembered_names[0].name)
      throw std::length_error("name too long: " + name_);
    for (auto& slot : detail::remembered_names) {
      int free = 0;
      if (!slot.state.compare_exchange_strong(free, 1, std::memory_order_acq_rel)) continue;
      slot.owner = ::getpid();
      slot.kind = kind_;
      std::memcpy(slot.name, name_.c_str(), name_.size() + 1);
      slot.state.store(2, std::memory_order_release);
      slot_ = &slot;
      return;
    }
    throw std::length_error("too many names owned at once");
  }
  ~owned_name() { remove(); }
  owned_name(owned_name&& other) noexcept
      : kind_(other.kind_), name_(std::move(other.name_)), slot_(std::exchange(other.slot_, nullptr)) {}
  owned_name& operator=(owned_name&& other) noexcept {
    if (this != &other) {
      remove();
      kind_ = other.kind_;
      name_ = std::move(other.name_);
      slot_ = std::exchange(other.slot_, nullptr);
    }
    return *this;
  }

  const std::string& name() const noexcept { return name_; }

  /// Removes the name now (if it still exists) and forgets it.
  void remove() noexcept {
    if (slot_ == nullptr) return;
    detail::remove_name(kind_, name_.c_str());
    slot_->state.store(0, std::memory_order_release);
    slot_ = nullptr;
  }

 private:
  name_kind kind_ = name_kind::file;
  std::string name_;
  detail::remembered_name* slot_ = nullptr;
};

/// Makes a fresh directory from `prefix` + "XXXXXX" (mkdtemp), owned: removed once empty
/// when the owned_name goes.
inline owned_name make_owned_directory(const std::string& prefix) {
  std::string path = prefix + "XXXXXX";
  if (::mkdtemp(path.data()) == nullptr) throw std::system_error(errno, std::system_category(), "mkdtemp");
  try {
    return owned_name(name_kind::directory, path);
  } catch (...) {
    ::rmdir(path.c_str());
    throw;
  }
}

using ipcoro::test::shared_memory;  // tests/support/shared_memory.hpp

inline void cpu_relax() noexcept {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

inline long futex(std::atomic<std::uint32_t>* word, int op, std::uint32_t value) noexcept {
  return ::syscall(SYS_futex, reinterpret_cast<std::uint32_t*>(word), op, value, nullptr, nullptr, 0);
}

/// A raw ping-pong on one shared word whose value says whose turn it is: 1 = ping (the
/// peer's turn), 2 = pong (the measurer's turn), 3 = stop. Sleeping waits use FUTEX_WAIT
/// and every hand-over a FUTEX_WAKE syscall; spinning waits poll the word.
class turn_word {
 public:
  explicit turn_word(std::atomic<std::uint32_t>& word, bool spin) noexcept : word_(word), spin_(spin) {}

  /// Waits for one of `a` or `b` and returns the value found.
  std::uint32_t await_either(std::uint32_t a, std::uint32_t b) const noexcept {
    for (;;) {
      const std::uint32_t v = word_.load(std::memory_order_acquire);
      if (v == a || v == b) return v;
      if (spin_) {
        cpu_relax();
      } else {
        futex(&word_, FUTEX_WAIT, v);
      }
    }
  }
  void give(std::uint32_t value) const noexcept {
    word_.store(value, std::memory_order_release);
    if (!spin_) futex(&word_, FUTEX_WAKE, 1);
  }

  /// The peer's side: answers pings until told to stop.
  void echo(std::size_t warmup, window& w) const noexcept {
    std::size_t n = 0;
    while (await_either(1, 3) == 1) {
      if (n++ == warmup) w.start();
      give(2);
    }
    w.stop();
  }
  /// One round trip, from the measurer's side.
  void ping() const noexcept {
    give(1);
    await_either(2, 2);
  }
  void stop() const noexcept { give(3); }

 private:
  std::atomic<std::uint32_t>& word_;
  bool spin_;
};

/// memcpy bandwidth in bytes/s: `bytes` copied in `chunk`-sized copies walking through a
/// `span`-byte source and destination (pick a span well above the caches for streaming
/// figures). Touches both buffers first so page faults are not timed.
inline double memcpy_bandwidth(std::uint64_t bytes, std::size_t chunk, std::size_t span) {
  std::vector<std::byte> src(span, std::byte{1});
  std::vector<std::byte> dst(span, std::byte{0});
  std::size_t offset = 0;
  const auto t0 = clock_type::now();
  std::uint64_t done = 0;
  for (; done < bytes; done += chunk) {
    std::memcpy(dst.data() + offset, src.data() + offset, chunk);
    offset = offset + 2 * chunk > span ? 0 : offset + chunk;
    asm volatile("" : : "r"(dst.data()) : "memory");
  }
  return static_cast<double>(done) / seconds_between(t0, clock_type::now());
}

}  // namespace ipcoro::bench
