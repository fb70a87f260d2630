// SPDX-License-Identifier: MIT
// Process liveness: this process's identity, and the one rule for telling a dead process.
#include "liveness.hpp"

#include "ipcoro/error.hpp"
#include "ipcoro/hash.hpp"

#include <fcntl.h>
#include <fmt/core.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string_view>

namespace ipcoro::detail {

std::uint64_t boot_id_hash() noexcept {
  static const std::uint64_t hash = [] {
    char text[64] = {};
    std::FILE* f = std::fopen("/proc/sys/kernel/random/boot_id", "re");
    if (f == nullptr) return std::uint64_t{1};
    const std::size_t n = std::fread(text, 1, sizeof text - 1, f);
    std::fclose(f);
    return n == 0 ? std::uint64_t{1} : (fnv1a(std::string_view{text, n}) | 1);
  }();
  return hash;
}

int read_proc_stat(pid_t pid, proc_stat_fields& out) noexcept {
  char path[48];
  std::snprintf(path, sizeof path, "/proc/%d/stat", static_cast<int>(pid));
  const int fd = ::open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return -errno;
  char buf[1024];
  ssize_t n;
  do {
    n = ::read(fd, buf, sizeof buf - 1);
  } while (n < 0 && errno == EINTR);
  const int err = errno;
  ::close(fd);
  if (n < 0) return -err;
  if (n == 0) return -ESRCH;  // the process went away between open and read
  buf[n] = '\0';
  // Field 2 (the command name) may hold spaces and parentheses: start after the last ')'.
  const char* p = std::strrchr(buf, ')');
  if (p == nullptr) return -EINVAL;
  ++p;
  int field = 2;
  while (*p != '\0' && field < 22) {
    while (*p == ' ') ++p;
    ++field;
    if (field == 3) out.state = *p;
    if (field == 9) out.flags = std::strtoull(p, nullptr, 10);
    if (field == 22) {
      char* end = nullptr;
      out.start_time = std::strtoull(p, &end, 10);
      return end == p ? -EINVAL : 0;
    }
    while (*p != ' ' && *p != '\0') ++p;
  }
  return -EINVAL;
}

namespace {

struct identity_cache {
  std::mutex lock;
  std::atomic<bool> valid{false};
  process_identity id;
};

identity_cache& the_identity_cache() {
  static identity_cache* cache = [] {
    auto* c = new identity_cache;  // never destroyed: identities are used until _exit
    // A forked child is another process: forget the parent's identity. The lock is held
    // across fork() so the child never inherits it locked by a thread it does not have.
    ::pthread_atfork([] { the_identity_cache().lock.lock(); }, [] { the_identity_cache().lock.unlock(); },
                     [] {
                       identity_cache& c = the_identity_cache();
                       c.valid.store(false, std::memory_order_relaxed);
                       c.lock.unlock();
                     });
    return c;
  }();
  return *cache;
}

}  // namespace

const process_identity& this_process() {
  identity_cache& c = the_identity_cache();
  if (c.valid.load(std::memory_order_acquire)) return c.id;
  std::lock_guard guard(c.lock);
  if (!c.valid.load(std::memory_order_relaxed)) {
    const pid_t pid = ::getpid();
    proc_stat_fields f;
    if (const int rc = read_proc_stat(pid, f); rc < 0) {
      throw_errno(
          -rc, fmt::format("reading /proc/{}/stat for this process's start time (is /proc mounted?)", pid));
    }
    c.id = process_identity{pid, 0, f.start_time, boot_id_hash()};
    c.valid.store(true, std::memory_order_release);
  }
  return c.id;
}

std::uint64_t this_process_start_time() noexcept {
  try {
    return this_process().start_time;
  } catch (...) {
    return 0;  // no /proc: records keep no start time
  }
}

namespace {

/// The rule (see liveness.hpp); `expected_start` is compared under `start_mask` when
/// `check_start` is set.
bool alive(pid_t pid, bool check_start, std::uint64_t expected_start, std::uint64_t start_mask) noexcept {
  if (pid <= 0) return false;  // never kill(0) or kill(-1): those are process groups
  const auto no_such_pid = [pid] { return ::kill(pid, 0) != 0 && errno == ESRCH; };
  if (no_such_pid()) return false;
  proc_stat_fields f;
  const int rc = read_proc_stat(pid, f);
  // Gone since kill() looked, or hidden from this process (/proc missing, or mounted with
  // hidepid): kill() tells which.
  if (rc == -ENOENT || rc == -ESRCH) return !no_such_pid();
  if (rc < 0) return true;  // cannot tell: do not take anything from it
  if (f.state == 'Z' || f.state == 'X' || f.state == 'x') return false;  // exited, not yet reaped
  return !check_start || (f.start_time & start_mask) == expected_start;
}

}  // namespace

bool process_alive(const process_identity& who) noexcept {
  if (who.pid <= 0) return false;
  if (who.boot_id != boot_id_hash()) return false;
  return alive(who.pid, true, who.start_time, ~std::uint64_t{0});
}

bool pid_alive(pid_t pid, std::uint64_t start_time, std::uint64_t start_mask) noexcept {
  return alive(pid, start_time != 0, start_time & start_mask, start_mask);
}

bool pid_running(pid_t pid) noexcept { return alive(pid, false, 0, 0); }

bool pid_exiting(pid_t pid) noexcept {
  constexpr std::uint64_t pf_exiting = 0x4;  // PF_EXITING, set as do_exit() begins
  proc_stat_fields f;
  if (read_proc_stat(pid, f) != 0) return false;
  return f.state == 'Z' || f.state == 'X' || (f.flags & pf_exiting) != 0;
}

bool write_ends_closed(int fd) noexcept {
  ::pollfd p{fd, 0, 0};
  int rc;
  do {
    rc = ::poll(&p, 1, 0);
  } while (rc < 0 && errno == EINTR);
  return rc > 0 && (p.revents & POLLHUP) != 0;
}

}  // namespace ipcoro::detail
