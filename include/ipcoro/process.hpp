// SPDX-License-Identifier: MIT
// Child processes: fork a function or exec a program, wire descriptors in, await the exit through a pidfd.
#pragma once

#include "ipcoro/export.hpp"
#include "ipcoro/task.hpp"

#include <signal.h>
#include <sys/types.h>

#include <chrono>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace ipcoro {

/// How a child process ended.
struct IPCORO_API exit_status {
  int code = 0;    ///< exit code when exited normally
  int signal = 0;  ///< terminating signal, 0 when exited normally
  bool core_dumped = false;
  bool exited() const noexcept { return signal == 0; }
  bool success() const noexcept { return signal == 0 && code == 0; }
  /// "exited with status 3", "killed by signal 9 (SIGKILL)", "... (core dumped)".
  std::string describe() const;
  friend bool operator==(const exit_status&, const exit_status&) = default;
};

/// One descriptor wired into a child: `dup2(parent_fd, child_fd)` in the child. `parent_fd`
/// may be close-on-exec (pipe ends are); the child's copy never is. Mappings may overlap
/// (a `parent_fd` that is another mapping's `child_fd`, or two children of one parent fd).
struct fd_mapping {
  int child_fd;
  int parent_fd;
};

// Every member has an initializer, so designated initializers may name any subset of them
// without GCC 12's -Wmissing-field-initializers.
struct process_options {
  /// Shown in errors and describe(); default: the program for exec, "child" for fork.
  std::string name{};
  /// Descriptors wired into the child (use 0/1/2 for the standard streams). Unmapped
  /// standard streams are inherited.
  std::vector<fd_mapping> fds{};
  /// The child gets SIGKILL when the parent *thread* that spawned it exits
  /// (PR_SET_PDEATHSIG), and dies at once if the parent was already gone before that was
  /// armed. Survives exec, except into set-user-ID/set-group-ID programs.
  bool die_with_parent = true;
  /// exec only: close every descriptor that is neither in `fds` nor 0-2 (close_range),
  /// whether or not it is close-on-exec.
  bool close_other_fds = true;
  /// exec only: the child's working directory; empty: the parent's.
  std::string working_directory{};
};

/// True when process waits on this thread go through IORING_OP_WAITID (Linux 6.7); false
/// when they poll the pidfd instead: the kernel lacks the opcode, or the environment sets
/// IPCORO_WAITID_FALLBACK to anything but "" or "0" (read at every wait).
IPCORO_API bool process_waits_use_ring() noexcept;

/// A child process, owned: move-only. Unless detached, the destructor makes sure the
/// child is neither left running nor left a zombie (SIGKILL, then reap). A copy that a
/// forked child inherits never signals, waits for or kills the child it names: only the
/// process that spawned it does. See docs/processes.md.
class IPCORO_API process {
 public:
  process() noexcept;
  process(process&& other) noexcept;
  /// Kills and reaps the child this object owned before, as the destructor does.
  process& operator=(process&& other) noexcept;
  process(const process&) = delete;
  process& operator=(const process&) = delete;
  /// If the child was neither reaped nor detached: SIGKILL, then reap it synchronously
  /// (blocks only as long as the kernel takes to kill it). No zombie, no orphan.
  ~process();

  /// Forks; the child runs body() and exits with its return value (std::fflush(nullptr)
  /// then _exit, never exit(): no atexit handlers or static destructors of the parent run
  /// twice). An exception escaping body prints "ipcoro: process '<name>' failed: <what>"
  /// to stderr and exits 70. The child starts without a current io_context and must
  /// create its own to await anything; stdio buffers are flushed before forking, so
  /// nothing the parent had buffered is written twice. `fds` are wired in;
  /// `close_other_fds` and `working_directory` do not apply. Throws std::system_error
  /// (EAGAIN: process limit, EMFILE: no descriptor for the pidfd; ECHILD when SIGCHLD is
  /// ignored, which makes children unwaitable) and std::invalid_argument for bad `fds`.
  [[nodiscard]] static process fork(const std::function<int()>& body, const process_options& opts = {});

  /// Starts a child (clone3 with CLONE_VFORK | CLONE_PIDFD; fork where clone3 is filtered)
  /// that runs execvp(program, [program, args...]). Returns once the child has exec'd or
  /// failed to (a close-on-exec status pipe): a failure is thrown here as
  /// std::system_error naming the program, e.g. "exec 'nosuch': No such file or
  /// directory" (also for a working directory or descriptor that cannot be set up).
  /// The program starts with SIGPIPE at its default action and no signal blocked, even
  /// though ipcoro ignores SIGPIPE in the parent.
  [[nodiscard]] static process exec(const std::string& program, const std::vector<std::string>& args,
                                    const process_options& opts = {});

  /// -1 for an empty (default-constructed, moved-from or detached) process.
  pid_t pid() const noexcept;
  /// The pidfd (close-on-exec, owned by this object); -1 when empty.
  int pidfd() const noexcept;
  const std::string& name() const noexcept;
  /// "process 'worker' (pid 123): running", "...: exited with status 0".
  std::string describe() const;

  /// Awaits the exit through the ring (IORING_OP_WAITID with P_PIDFD where the kernel has
  /// it, otherwise a poll on the pidfd), then reaps the child: exactly once, whoever asks
  /// first; later waits, and waits of several coroutines at once, get the same status.
  /// Cancellable through the stop token of the awaiting task (operation_cancelled; also by
  /// when_any): a cancelled wait does not reap, a later wait still gets the status. The
  /// process object may move, but must outlive the wait. Throws std::logic_error on an
  /// empty process, std::system_error(ECHILD) when something else reaped the child.
  [[nodiscard]] task<exit_status> wait();
  /// As wait(), but throws timed_out unless the child exits within `timeout`.
  [[nodiscard]] task<exit_status> wait(std::chrono::nanoseconds timeout);
  /// Non-blocking: reaps and returns the status if the child has exited, else nullopt.
  std::optional<exit_status> try_wait();
  /// The status once reaped (by wait or try_wait), without any syscall.
  std::optional<exit_status> status() const noexcept;
  /// Sends `sig` through the pidfd (never to a recycled pid). Does nothing once reaped or
  /// once the child has exited; throws std::system_error naming the process otherwise.
  void signal(int sig);
  void kill() { signal(SIGKILL); }
  /// False once the child has exited (reaped or still a zombie). Does not reap.
  bool running();
  /// Forgets the child without killing it; this object becomes empty. The child stays
  /// this process's child: once it exits it is a zombie until this process exits or
  /// something reaps it (waitpid on its pid).
  void detach() noexcept;

  struct state;

 private:
  explicit process(std::unique_ptr<state> s) noexcept;
  void kill_and_reap() noexcept;
  // On the heap so that a pending wait() keeps working when the object moves.
  std::unique_ptr<state> state_;
};

}  // namespace ipcoro
