// SPDX-License-Identifier: MIT
// Implementation of the test helpers for real processes.
#include "process.hpp"

#include <dirent.h>
#include <fcntl.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <bit>
#include <cerrno>
#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <iterator>
#include <stdexcept>
#include <string_view>
#include <utility>

namespace ipcoro::test {

child_process::child_process(std::function<int()> body) {
  std::fflush(nullptr);
  pid_ = ::fork();
  if (pid_ < 0) throw std::runtime_error("fork failed");
  if (pid_ == 0) {
    int code = 99;
    try {
      code = body();
    } catch (const std::exception& e) {
      std::fprintf(stderr, "child %d: uncaught exception: %s\n", ::getpid(), e.what());
    } catch (...) {
      std::fprintf(stderr, "child %d: uncaught non-standard exception\n", ::getpid());
    }
    std::fflush(nullptr);
    ::_exit(code);
  }
  pidfd_ = static_cast<int>(::syscall(SYS_pidfd_open, pid_, 0));
}

child_process::child_process(child_process&& other) noexcept
    : pid_(std::exchange(other.pid_, -1)),
      pidfd_(std::exchange(other.pidfd_, -1)),
      reaped_(std::exchange(other.reaped_, true)) {}

child_process::~child_process() {
  if (pid_ > 0 && !reaped_) {
    ::kill(pid_, SIGKILL);
    int status = 0;
    while (::waitpid(pid_, &status, 0) < 0 && errno == EINTR) {
    }
  }
  if (pidfd_ >= 0) ::close(pidfd_);
}

void child_process::kill(int sig) noexcept {
  if (pid_ > 0 && !reaped_) ::kill(pid_, sig);
}

int child_process::wait(std::chrono::milliseconds timeout) {
  if (reaped_) throw std::logic_error("child_process::wait called twice");
  if (pidfd_ >= 0) {
    ::pollfd p{pidfd_, POLLIN, 0};
    int rc;
    do {
      rc = ::poll(&p, 1, static_cast<int>(timeout.count()));
    } while (rc < 0 && errno == EINTR);
    if (rc == 0) {
      std::fprintf(stderr, "child %d did not exit within %lld ms: killing it\n", pid_,
                   static_cast<long long>(timeout.count()));
      ::kill(pid_, SIGKILL);
      int status = 0;
      ::waitpid(pid_, &status, 0);
      reaped_ = true;
      return -1;
    }
  }
  int status = 0;
  while (::waitpid(pid_, &status, 0) < 0) {
    if (errno != EINTR) throw std::runtime_error("waitpid failed");
  }
  reaped_ = true;
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
  return -1;
}

handshake::handshake() {
  if (::pipe2(fds_, O_CLOEXEC) != 0) throw std::runtime_error("handshake: pipe2 failed");
}

handshake::~handshake() {
  ::close(fds_[0]);
  ::close(fds_[1]);
}

void handshake::signal() const noexcept { [[maybe_unused]] ssize_t n = ::write(fds_[1], "x", 1); }

bool handshake::wait() const noexcept {
  char c;
  return ::read(fds_[0], &c, 1) == 1;
}

bool forbid_io_uring_setup() noexcept {
  sock_filter program[] = {
      BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(seccomp_data, nr)),
      BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_io_uring_setup, 0, 1),
      BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | EPERM),
      BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
  };
  sock_fprog filter{static_cast<unsigned short>(std::size(program)), program};
  return ::prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0 &&
         ::prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &filter) == 0;
}

kernel_version running_kernel() {
  ::utsname u{};
  kernel_version v;
  if (::uname(&u) != 0 || std::sscanf(u.release, "%d.%d", &v.major, &v.minor) != 2) {
    throw std::runtime_error("cannot read the kernel version from uname");
  }
  return v;
}

namespace {
bool env_flag(const char* variable) noexcept {
  const char* v = std::getenv(variable);
  return v != nullptr && *v != '\0' && std::strcmp(v, "0") != 0;
}
}  // namespace

bool no_defer_taskrun_forced() noexcept { return env_flag("IPCORO_NO_DEFER_TASKRUN"); }
bool futex_fallback_forced() noexcept { return env_flag("IPCORO_FUTEX_FALLBACK"); }

std::string unique_name(const std::string& tag) {
  static std::atomic<unsigned> counter{0};
  return "ipcoro-test-" + std::to_string(::getpid()) + "-" + std::to_string(counter++) + "-" + tag;
}

namespace {
// splitmix64 of the 8-byte word index: any piece of the stream can be produced alone.
std::uint64_t pattern_word(std::uint64_t seed, std::uint64_t word) noexcept {
  std::uint64_t z = seed + (word + 1) * 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

std::byte pattern_byte(std::uint64_t seed, std::uint64_t pos) noexcept {
  return static_cast<std::byte>(pattern_word(seed, pos / 8) >> ((pos % 8) * 8));
}
}  // namespace

void fill_pattern(std::span<std::byte> out, std::uint64_t seed, std::uint64_t offset) {
  // Byte k of a word is bits 8k..8k+7 (little-endian order), so whole words are produced
  // at once: the stream is the same whatever the piece boundaries.
  std::size_t i = 0;
  const std::size_t n = out.size();
  for (; i < n && (offset + i) % 8 != 0; ++i) out[i] = pattern_byte(seed, offset + i);
  for (; n - i >= 8; i += 8) {
    std::uint64_t z = pattern_word(seed, (offset + i) / 8);
    if constexpr (std::endian::native != std::endian::little) z = __builtin_bswap64(z);
    std::memcpy(out.data() + i, &z, 8);
  }
  for (; i < n; ++i) out[i] = pattern_byte(seed, offset + i);
}

void checksum::update(std::span<const std::byte> data) noexcept { h_ = fnv1a(data, h_); }

namespace {

void list_dir(const char* dir, const std::string& prefix, const std::string& shown_as,
              std::vector<std::string>& out) {
  DIR* d = ::opendir(dir);
  if (d == nullptr) return;
  while (const dirent* e = ::readdir(d)) {
    if (std::string_view(e->d_name).starts_with(prefix)) out.push_back(shown_as + e->d_name);
  }
  ::closedir(d);
}

}  // namespace

leftovers names_left_behind(const std::string& prefix) {
  leftovers result;
  list_dir("/dev/shm", prefix, "/dev/shm/", result.names);
  list_dir("/tmp", prefix, "/tmp/", result.names);

  char dir_template[] = "/tmp/ipcoro-mqueue-XXXXXX";
  const char* dir = ::mkdtemp(dir_template);
  if (dir == nullptr) return result;
  int fds[2];
  if (::pipe2(fds, O_CLOEXEC) != 0) {
    ::rmdir(dir);
    return result;
  }
  child_process lister([&] {
    ::close(fds[0]);
    if (::unshare(CLONE_NEWNS) != 0) return 77;
    if (::mount(nullptr, "/", nullptr, MS_REC | MS_PRIVATE, nullptr) != 0) return 77;
    if (::mount("none", dir, "mqueue", 0, nullptr) != 0) return 77;
    std::vector<std::string> queues;
    list_dir(dir, prefix, "mq:/", queues);
    for (const std::string& q : queues) {
      const std::string line = q + "\n";
      [[maybe_unused]] ssize_t n = ::write(fds[1], line.data(), line.size());
    }
    return 0;
  });
  ::close(fds[1]);
  std::string text;
  char buf[512];
  for (ssize_t n; (n = ::read(fds[0], buf, sizeof buf)) != 0;) {
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) break;
    text.append(buf, static_cast<std::size_t>(n));
  }
  ::close(fds[0]);
  const int code = lister.wait(std::chrono::seconds(30));
  ::rmdir(dir);
  if (code != 0) return result;
  result.queues_checked = true;
  for (std::size_t start = 0; start < text.size();) {
    const std::size_t nl = text.find('\n', start);
    result.names.push_back(text.substr(start, nl - start));
    start = nl + 1;
  }
  return result;
}

}  // namespace ipcoro::test
