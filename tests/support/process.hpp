// SPDX-License-Identifier: MIT
// Test helpers for real processes: forked children that are always reaped, unique names,
// and counted payloads with checksums.
#pragma once

#include "ipcoro/hash.hpp"

#include <sys/types.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <system_error>
#include <vector>

namespace ipcoro::test {

/// A forked child running `body`; its return value is the exit code (an escaping exception
/// prints and exits 99). The child never returns into the test framework. If the test
/// ends without waiting, the destructor kills and reaps the child, so no test leaves a
/// process behind.
class child_process {
 public:
  explicit child_process(std::function<int()> body);
  child_process(child_process&& other) noexcept;
  child_process& operator=(child_process&&) = delete;
  ~child_process();

  pid_t pid() const noexcept { return pid_; }
  /// Waits for the exit and returns the exit code, or 128 + signal number if it was
  /// killed. Past `timeout` the child is killed with SIGKILL and -1 is returned.
  int wait(std::chrono::milliseconds timeout = std::chrono::seconds(60));
  /// Sends `sig` to the child.
  void kill(int sig) noexcept;

 private:
  pid_t pid_ = -1;
  int pidfd_ = -1;
  bool reaped_ = false;
};

/// A one-shot "go" between processes over a pipe made before fork(): one side signals,
/// the other waits (false if the signalling side died without signalling).
class handshake {
 public:
  handshake();
  ~handshake();
  handshake(const handshake&) = delete;
  handshake& operator=(const handshake&) = delete;
  void signal() const noexcept;
  bool wait() const noexcept;

 private:
  int fds_[2] = {-1, -1};
};

/// How a call failed: the error code and message of the std::system_error it threw
/// (code 0 if it did not throw).
struct failure {
  int code = 0;
  std::string what;
};
template <class F>
failure failure_of(F&& f) {
  try {
    f();
  } catch (const std::system_error& e) {
    return {e.code().value(), e.what()};
  }
  return {};
}

/// The message of the `E` that `f` throws, or "" when it throws none (anything else passes
/// through): for tests that check which error an operation reports and what it says.
template <class E, class F>
std::string what_of(F&& f) {
  try {
    f();
  } catch (const E& e) {
    return e.what();
  }
  return {};
}

inline bool contains(const std::string& haystack, const std::string& needle) {
  return haystack.find(needle) != std::string::npos;
}

/// The running kernel's major.minor version, from uname(2).
struct kernel_version {
  int major = 0;
  int minor = 0;
  bool at_least(int maj, int min) const noexcept { return major > maj || (major == maj && minor >= min); }
};
kernel_version running_kernel();
/// Whether IPCORO_NO_DEFER_TASKRUN makes every ring as a kernel before 6.0 would (no
/// SINGLE_ISSUER, no DEFER_TASKRUN), as the library reads it.
bool no_defer_taskrun_forced() noexcept;
/// Whether IPCORO_FUTEX_FALLBACK sends every futex wait through the helper-thread fallback.
bool futex_fallback_forced() noexcept;

/// Makes io_uring_setup fail with EPERM in this process and its children from now on, as
/// a container's seccomp policy would. False when the kernel refuses the filter.
bool forbid_io_uring_setup() noexcept;

/// IPC names starting with `prefix` still present: entries of /dev/shm and /tmp, and
/// queues of the mqueue namespace as "mq:/<name>". The namespace is listed by a child
/// through a private mount of its own (the machine's mount table never sees it); where
/// mounting is refused, `queues_checked` is false and callers check queues by name.
struct leftovers {
  std::vector<std::string> names;
  bool queues_checked = false;
};
leftovers names_left_behind(const std::string& prefix);

/// A name unique to this process and call: "ipcoro-test-<pid>-<counter>-<tag>".
std::string unique_name(const std::string& tag);

/// Fills `out` with a deterministic pseudo-random stream; `offset` is the position of
/// out[0] in the stream, so a stream can be produced in pieces.
void fill_pattern(std::span<std::byte> out, std::uint64_t seed, std::uint64_t offset);

/// A running 64-bit checksum (FNV-1a) of a byte stream.
class checksum {
 public:
  void update(std::span<const std::byte> data) noexcept;
  std::uint64_t value() const noexcept { return h_; }

 private:
  std::uint64_t h_ = fnv1a_basis;
};

}  // namespace ipcoro::test
