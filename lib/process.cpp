// SPDX-License-Identifier: MIT
// Spawning children (fork a function, exec a program), wiring descriptors in, and awaiting their exit.
#include "ipcoro/process.hpp"

#include "ipcoro/error.hpp"
#include "ipcoro/fd_io.hpp"
#include "ipcoro/io_context.hpp"
#include "ipcoro/unique_fd.hpp"
#include "waitid_operation.hpp"

#include <fcntl.h>
#include <fmt/core.h>
#include <linux/close_range.h>
#include <linux/sched.h>
#include <poll.h>
#include <sched.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <stdexcept>
#include <system_error>
#include <utility>

namespace ipcoro {

struct process::state {
  std::string name;
  pid_t pid = -1;
  pid_t owner = -1;  // the process that spawned it; a forked copy of this object must not touch it
  unique_fd pidfd;
  std::optional<exit_status> status;

  bool ours() const noexcept { return owner == ::getpid(); }
};

namespace {

constexpr int exit_body_failed = 70;  // EX_SOFTWARE
constexpr int exit_exec_failed = 127;

int sys_pidfd_open(pid_t pid) noexcept { return static_cast<int>(::syscall(SYS_pidfd_open, pid, 0u)); }

int sys_pidfd_send_signal(int pidfd, int sig) noexcept {
  return static_cast<int>(::syscall(SYS_pidfd_send_signal, pidfd, sig, nullptr, 0u));
}

std::string signal_name(int sig) {
  const char* abbrev = ::sigabbrev_np(sig);
  return abbrev != nullptr ? fmt::format("SIG{}", abbrev) : fmt::format("signal {}", sig);
}

exit_status status_of(const siginfo_t& info) noexcept {
  exit_status s;
  switch (info.si_code) {
    case CLD_EXITED:
      s.code = info.si_status;
      break;
    case CLD_DUMPED:
      s.core_dumped = true;
      s.signal = info.si_status;
      break;
    default:  // CLD_KILLED; stops and continues are not asked for
      s.signal = info.si_status;
      break;
  }
  return s;
}

std::string who(const process::state& s) { return fmt::format("process '{}' (pid {})", s.name, s.pid); }

/// Reaps the child if it has exited; the one place where a status is taken from the kernel.
std::optional<exit_status> reap_if_exited(process::state& s) {
  if (s.status) return s.status;
  siginfo_t info{};
  int rc;
  do {
    rc = ::waitid(P_PIDFD, static_cast<id_t>(s.pidfd.get()), &info, WEXITED | WNOHANG);
  } while (rc != 0 && errno == EINTR);
  if (rc != 0) {
    const int err = errno;
    if (err == ECHILD) {
      throw std::system_error(err, std::system_category(),
                              fmt::format("wait for {}: it was reaped by something else (waitpid(-1, ...) "
                                          "elsewhere in this program, or SIGCHLD set to SIG_IGN)",
                                          who(s)));
    }
    throw_errno(err, fmt::format("wait for {}", who(s)));
  }
  if (info.si_pid == 0) return std::nullopt;  // still running
  s.status = status_of(info);
  return s.status;
}

using deadline_t = std::optional<std::chrono::steady_clock::time_point>;

task<exit_status> wait_for_exit(process::state* s, deadline_t deadline) {
  if (s == nullptr || !s->pidfd) throw std::logic_error("ipcoro::process::wait: empty process");
  if (!s->ours()) {
    throw std::logic_error(fmt::format("ipcoro::process::wait: {} is not a child of this process", who(*s)));
  }
  for (;;) {
    if (s->status) co_return *s->status;
    int res = 0;
    if (process_waits_use_ring()) {
      // WNOWAIT: the reaping is reap_if_exited()'s, whichever wait gets there first.
      detail::waitid_operation op{s->pidfd.get()};
      if (deadline) {
        res = co_await op.with_deadline(*deadline);
      } else {
        res = co_await op;
      }
    } else {
      // The pidfd turns readable when the child exits (Linux 5.3).
      poll_operation op{s->pidfd.get(), POLLIN};
      if (deadline) {
        (void)co_await op.with_deadline(*deadline);
      } else {
        (void)co_await op;
      }
    }
    // ECHILD: another wait on this child reaped it meanwhile; reap_if_exited knows.
    if (res < 0 && res != -ECHILD) throw_errno(-res, fmt::format("wait for {}", who(*s)));
    if (std::optional<exit_status> st = reap_if_exited(*s)) co_return *st;
  }
}

// ---- descriptor wiring, shared by fork and exec ----

/// Everything the child needs to wire its descriptors, prepared before fork so that the
/// child only makes async-signal-safe calls.
struct wiring_plan {
  std::vector<fd_mapping> maps;
  std::vector<int> temps;  // scratch: each parent_fd duplicated above every target
  std::vector<int> kept;   // sorted targets >= 3, kept by close_other_fds
  int base = 3;            // above every child_fd

  /// Returns 0, or the errno with `*failed` set to the mapping's index.
  int wire(std::size_t* failed) noexcept {
    // First move every source above every target, so that a source that is another
    // mapping's target (say {0, 1} and {1, 0}) is not overwritten before it is used.
    for (std::size_t i = 0; i < maps.size(); ++i) {
      temps[i] = ::fcntl(maps[i].parent_fd, F_DUPFD_CLOEXEC, base);
      if (temps[i] < 0) {
        *failed = i;
        return errno;
      }
    }
    for (std::size_t i = 0; i < maps.size(); ++i) {
      // temps[i] >= base > child_fd, so dup2 always makes a fresh, inheritable descriptor.
      if (::dup2(temps[i], maps[i].child_fd) < 0) {
        *failed = i;
        return errno;
      }
    }
    for (int t : temps) ::close(t);
    return 0;
  }

  /// exec only: marks every descriptor but 0-2 and the targets close-on-exec.
  int close_others() const noexcept {
    unsigned from = 3;
    for (int k : kept) {
      const auto fd = static_cast<unsigned>(k);
      if (fd > from && ::close_range(from, fd - 1, CLOSE_RANGE_CLOEXEC) != 0) return errno;
      from = fd + 1;
    }
    if (::close_range(from, ~0u, CLOSE_RANGE_CLOEXEC) != 0) return errno;
    return 0;
  }
};

wiring_plan plan_wiring(const process_options& opts, const std::string& name) {
  wiring_plan plan;
  plan.maps = opts.fds;
  plan.temps.resize(plan.maps.size(), -1);
  for (const fd_mapping& m : plan.maps) {
    if (m.child_fd < 0 || m.parent_fd < 0) {
      throw std::invalid_argument(
          fmt::format("ipcoro::process '{}': fd mapping {{child {}, parent {}}}: "
                      "descriptors must not be negative",
                      name, m.child_fd, m.parent_fd));
    }
    if (::fcntl(m.parent_fd, F_GETFD) < 0) {
      throw_errno(errno, fmt::format("process '{}': fd mapping {{child {}, parent {}}}: parent descriptor",
                                     name, m.child_fd, m.parent_fd));
    }
    plan.base = std::max(plan.base, m.child_fd + 1);
    if (m.child_fd >= 3) plan.kept.push_back(m.child_fd);
  }
  std::sort(plan.kept.begin(), plan.kept.end());
  for (std::size_t i = 0; i < plan.maps.size(); ++i) {
    for (std::size_t j = i + 1; j < plan.maps.size(); ++j) {
      if (plan.maps[i].child_fd == plan.maps[j].child_fd) {
        throw std::invalid_argument(fmt::format(
            "ipcoro::process '{}': two fd mappings have child descriptor {}", name, plan.maps[i].child_fd));
      }
    }
  }
  return plan;
}

/// A child whose exit nothing could ever collect is a bug to report at spawn time.
void check_sigchld(const std::string& name) {
  struct sigaction sa {};
  if (::sigaction(SIGCHLD, nullptr, &sa) == 0 && (sa.sa_handler == SIG_IGN || (sa.sa_flags & SA_NOCLDWAIT))) {
    throw std::system_error(
        ECHILD, std::system_category(),
        fmt::format("spawn process '{}': SIGCHLD is ignored (SIG_IGN or SA_NOCLDWAIT), so "
                    "the kernel reaps children by itself and none can be awaited; restore "
                    "SIGCHLD to SIG_DFL or a handler",
                    name));
  }
}

/// In the child, first thing: arm PR_SET_PDEATHSIG, then close the race with a parent
/// that died before it was armed (the child then has a new parent already).
void die_with(pid_t parent) noexcept {
  ::prctl(PR_SET_PDEATHSIG, SIGKILL);
  if (::getppid() != parent) ::_exit(128 + SIGKILL);
}

/// Takes ownership of a freshly forked child: opens its pidfd unless clone3 gave one. No race with pid reuse:
/// the child is ours and stays a zombie until we reap it (SIGCHLD is not ignored).
std::unique_ptr<process::state> adopt(pid_t pid, std::string name, int pidfd = -1) {
  auto s = std::make_unique<process::state>();
  s->name = std::move(name);
  s->pid = pid;
  s->owner = ::getpid();
  s->pidfd.reset(pidfd >= 0 ? pidfd : sys_pidfd_open(pid));
  if (!s->pidfd) {
    const int err = errno;
    ::kill(pid, SIGKILL);
    int ignored = 0;
    while (::waitpid(pid, &ignored, 0) < 0 && errno == EINTR) {
    }
    throw_errno(err, fmt::format("pidfd_open for {} (the child was killed)", who(*s)));
  }
  return s;
}

// What the exec child reports through the status pipe when it cannot exec.
struct exec_failure {
  enum stage_t : int { wiring, closing, chdir, exec } stage;
  int err;
  int index;  // the mapping, for `wiring`
};

bool env_flag(const char* variable) noexcept {
  const char* v = std::getenv(variable);
  return v != nullptr && *v != '\0' && std::strcmp(v, "0") != 0;
}

/// For tests of the fallback: exec through fork() even where clone3 works.
bool clone3_fallback_forced() noexcept { return env_flag("IPCORO_CLONE3_FALLBACK"); }

/// Everything the exec child touches, ready before it starts: between fork and exec the
/// child makes only async-signal-safe calls.
struct exec_child {
  wiring_plan plan;
  std::vector<char*> argv;
  const char* cwd = nullptr;
  sigset_t no_signals;
  struct sigaction default_action {};
  bool die_with_parent = true;
  bool close_other_fds = true;
  pid_t parent = -1;
  int report_fd = -1;  // the status pipe's write end

  /// The child's part: wires, closes, changes directory and execs; on failure writes an
  /// exec_failure to report_fd and exits.
  [[noreturn]] void run() noexcept {
    if (die_with_parent) die_with(parent);
    // Start the program as a shell would: ipcoro ignores SIGPIPE in this process, and an
    // ignored signal or a blocked mask would otherwise carry over exec.
    ::sigaction(SIGPIPE, &default_action, nullptr);
    ::sigprocmask(SIG_SETMASK, &no_signals, nullptr);
    exec_failure f{exec_failure::wiring, 0, 0};
    std::size_t failed = 0;
    if (int err = plan.wire(&failed); err != 0) {
      f = {exec_failure::wiring, err, static_cast<int>(failed)};
    } else if (int err2 = close_other_fds ? plan.close_others() : 0; err2 != 0) {
      f = {exec_failure::closing, err2, 0};
    } else if (cwd != nullptr && ::chdir(cwd) != 0) {
      f = {exec_failure::chdir, errno, 0};
    } else {
      ::execvp(argv[0], argv.data());
      f = {exec_failure::exec, errno, 0};
    }
    [[maybe_unused]] ssize_t n = ::write(report_fd, &f, sizeof f);
    ::_exit(exit_exec_failed);
  }
};

/// Validates the descriptor wiring and prepares what the child will need. `program` and
/// `args` must outlive the result (argv points into them).
exec_child prepare_exec_child(const std::string& program, const std::vector<std::string>& args,
                              const process_options& opts, const std::string& name) {
  exec_child c;
  c.plan = plan_wiring(opts, name);
  c.argv.reserve(args.size() + 2);
  c.argv.push_back(const_cast<char*>(program.c_str()));
  for (const std::string& a : args) c.argv.push_back(const_cast<char*>(a.c_str()));
  c.argv.push_back(nullptr);
  c.cwd = opts.working_directory.empty() ? nullptr : opts.working_directory.c_str();
  sigemptyset(&c.no_signals);
  c.default_action.sa_handler = SIG_DFL;
  sigemptyset(&c.default_action.sa_mask);
  c.die_with_parent = opts.die_with_parent;
  c.close_other_fds = opts.close_other_fds;
  c.parent = ::getpid();
  return c;
}

/// The status pipe: close-on-exec, so a successful exec closes it (the parent reads end of
/// file) and a failure writes an exec_failure. Its write end lives at or above `base`, above
/// every target, so that the wiring cannot overwrite it.
struct status_pipe {
  unique_fd read_end;
  unique_fd write_end;
};

status_pipe open_status_pipe(const std::string& program, int base) {
  int raw[2];
  if (::pipe2(raw, O_CLOEXEC) != 0) throw_errno(errno, fmt::format("exec '{}': status pipe", program));
  status_pipe p{unique_fd{raw[0]}, unique_fd{raw[1]}};
  if (p.write_end.get() < base) {
    const int moved = ::fcntl(p.write_end.get(), F_DUPFD_CLOEXEC, base);
    if (moved < 0) throw_errno(errno, fmt::format("exec '{}': status pipe", program));
    p.write_end.reset(moved);
  }
  return p;
}

/// What the parent read from the status pipe: nothing (the child exec'd) or why it could not.
struct status_report {
  ssize_t n = 0;  // bytes read
  int err = 0;    // the errno of a failed read
  exec_failure failure{};
};

status_report read_status(int fd) noexcept {
  status_report r;
  do {
    r.n = ::read(fd, &r.failure, sizeof r.failure);
  } while (r.n < 0 && errno == EINTR);
  if (r.n < 0) r.err = errno;
  return r;
}

struct started_child {
  std::unique_ptr<process::state> state;
  status_report report;
};

/// The parent's part: starts the child and learns whether it exec'd.
///
/// clone3(CLONE_VFORK | CLONE_PIDFD): the pidfd comes with the child, atomically, and this
/// thread resumes only once the child has exec'd or exited. So the status pipe is read
/// without waiting for its end of file, which a child that another thread forks meanwhile
/// could hold off for as long as it lives. Without CLONE_VM the child gets its own copy of
/// memory, as after fork(); it skips glibc's fork handlers, which only matter to code that
/// the exec child never runs. Where clone3 is missing or filtered (seccomp), fork().
started_child start_exec_child(exec_child& child, status_pipe& pipe, std::string name,
                               const std::string& program) {
  int pidfd = -1;
  ::clone_args request{};
  request.flags = CLONE_VFORK | CLONE_PIDFD;
  request.pidfd = reinterpret_cast<std::uintptr_t>(&pidfd);
  request.exit_signal = SIGCHLD;
  const bool try_clone3 = !clone3_fallback_forced();
  const long cloned = try_clone3 ? ::syscall(SYS_clone3, &request, sizeof request) : -1;
  if (cloned == 0) child.run();
  if (cloned > 0) {
    pipe.write_end.reset();
    started_child started{adopt(static_cast<pid_t>(cloned), std::move(name), pidfd), {}};
    // A failure was written before the child exited; no bytes and no end of file: exec'd.
    // Asked with poll(), which cannot fail here the way making the pipe non-blocking
    // could (that would have left the child neither owned nor reaped).
    pollfd ready{pipe.read_end.get(), POLLIN, 0};
    int n = 0;
    while ((n = ::poll(&ready, 1, 0)) < 0 && errno == EINTR) {
    }
    if (n > 0) started.report = read_status(pipe.read_end.get());
    return started;
  }
  if (try_clone3 && errno != ENOSYS && errno != EPERM) {
    throw_errno(errno, fmt::format("clone3 for exec '{}'", program));
  }
  const pid_t pid = ::fork();
  if (pid < 0) throw_errno(errno, fmt::format("fork for exec '{}'", program));
  if (pid == 0) child.run();
  pipe.write_end.reset();
  started_child started{adopt(pid, std::move(name)), {}};
  // Blocks until the child has exec'd (end of file) or reported why it could not.
  started.report = read_status(pipe.read_end.get());
  return started;
}

/// Throws the error for a child that could not exec, naming the step that failed.
[[noreturn]] void throw_exec_failure(const std::string& name, const std::string& program,
                                     const status_report& r, const wiring_plan& plan,
                                     const process_options& opts) {
  const std::string prefix = name == program ? std::string() : fmt::format("process '{}': ", name);
  if (r.n != static_cast<ssize_t>(sizeof r.failure)) {
    throw_errno(r.n < 0 ? r.err : EIO,
                fmt::format("{}exec '{}': reading the child's status", prefix, program));
  }
  const exec_failure& f = r.failure;
  switch (f.stage) {
    case exec_failure::wiring: {
      const fd_mapping& m = plan.maps.at(static_cast<std::size_t>(f.index));
      throw_errno(f.err, fmt::format("{}exec '{}': wiring descriptor {} (from the parent's {})", prefix,
                                     program, m.child_fd, m.parent_fd));
    }
    case exec_failure::closing:
      throw_errno(f.err,
                  fmt::format("{}exec '{}': closing other descriptors (close_range)", prefix, program));
    case exec_failure::chdir:
      throw_errno(
          f.err, fmt::format("{}exec '{}': working directory '{}'", prefix, program, opts.working_directory));
    case exec_failure::exec:
    default:
      throw_errno(f.err, fmt::format("{}exec '{}'", prefix, program));
  }
}

}  // namespace

// ---- exit_status ----

std::string exit_status::describe() const {
  if (signal == 0) return fmt::format("exited with status {}", code);
  return fmt::format("killed by signal {} ({}){}", signal, signal_name(signal),
                     core_dumped ? " (core dumped)" : "");
}

bool process_waits_use_ring() noexcept {
  if (env_flag("IPCORO_WAITID_FALLBACK")) return false;
  io_context* ctx = io_context::current_or_null();
  return ctx != nullptr && ctx->features().waitid;
}

// ---- process ----

process::process() noexcept = default;
process::process(std::unique_ptr<state> s) noexcept : state_(std::move(s)) {}
process::process(process&& other) noexcept = default;

process& process::operator=(process&& other) noexcept {
  if (this != &other) {
    kill_and_reap();
    state_ = std::move(other.state_);
  }
  return *this;
}

process::~process() { kill_and_reap(); }

void process::kill_and_reap() noexcept {
  if (!state_ || state_->status || !state_->pidfd || !state_->ours()) return;
  sys_pidfd_send_signal(state_->pidfd.get(), SIGKILL);  // fails only if it has exited already
  siginfo_t info{};
  int rc;
  do {
    rc = ::waitid(P_PIDFD, static_cast<id_t>(state_->pidfd.get()), &info, WEXITED);
  } while (rc != 0 && errno == EINTR);
  if (rc == 0) state_->status = status_of(info);
}

process process::fork(const std::function<int()>& body, const process_options& opts) {
  if (!body) throw std::invalid_argument("ipcoro::process::fork: empty body");
  std::string name = opts.name.empty() ? std::string("child") : opts.name;
  check_sigchld(name);
  wiring_plan plan = plan_wiring(opts, name);
  // Whatever the parent has buffered would otherwise be written by both processes.
  std::fflush(nullptr);
  const pid_t parent = ::getpid();
  const pid_t pid = ::fork();
  if (pid < 0) throw_errno(errno, fmt::format("fork process '{}'", name));
  if (pid == 0) {
    // The child: glibc's fork ran the atfork handlers, so this thread has no io_context
    // (the parent's ring is not ours to drive) and the library's locks are usable.
    if (opts.die_with_parent) die_with(parent);
    int code = exit_body_failed;
    std::size_t failed = 0;
    if (int err = plan.wire(&failed); err != 0) {
      std::fprintf(stderr,
                   "ipcoro: process '%s' failed: cannot wire descriptor %d (from the parent's %d): %s\n",
                   name.c_str(), plan.maps[failed].child_fd, plan.maps[failed].parent_fd, std::strerror(err));
    } else {
      try {
        code = body();
      } catch (const std::exception& e) {
        std::fprintf(stderr, "ipcoro: process '%s' failed: %s\n", name.c_str(), e.what());
        code = exit_body_failed;
      } catch (...) {
        std::fprintf(stderr, "ipcoro: process '%s' failed with a non-standard exception\n", name.c_str());
        code = exit_body_failed;
      }
    }
    std::fflush(nullptr);
    ::_exit(code);
  }
  return process{adopt(pid, std::move(name))};
}

process process::exec(const std::string& program, const std::vector<std::string>& args,
                      const process_options& opts) {
  std::string name = opts.name.empty() ? program : opts.name;
  check_sigchld(name);
  exec_child child = prepare_exec_child(program, args, opts, name);
  status_pipe pipe = open_status_pipe(program, child.plan.base);
  child.report_fd = pipe.write_end.get();
  started_child started = start_exec_child(child, pipe, std::move(name), program);
  if (started.report.n == 0) return process{std::move(started.state)};
  process failed_child{std::move(started.state)};  // exiting already; its destructor reaps it
  throw_exec_failure(failed_child.name(), program, started.report, child.plan, opts);
}

pid_t process::pid() const noexcept { return state_ ? state_->pid : -1; }
int process::pidfd() const noexcept { return state_ ? state_->pidfd.get() : -1; }

const std::string& process::name() const noexcept {
  static const std::string empty;
  return state_ ? state_->name : empty;
}

std::string process::describe() const {
  if (!state_) return "process (empty)";
  return fmt::format("{}: {}", who(*state_), state_->status ? state_->status->describe() : "running");
}

task<exit_status> process::wait() { return wait_for_exit(state_.get(), std::nullopt); }

task<exit_status> process::wait(std::chrono::nanoseconds timeout) {
  return wait_for_exit(state_.get(),
                       std::chrono::steady_clock::now() +
                           std::chrono::duration_cast<std::chrono::steady_clock::duration>(timeout));
}

std::optional<exit_status> process::try_wait() {
  if (!state_ || !state_->pidfd) throw std::logic_error("ipcoro::process::try_wait: empty process");
  if (!state_->ours()) return state_->status;
  return reap_if_exited(*state_);
}

std::optional<exit_status> process::status() const noexcept { return state_ ? state_->status : std::nullopt; }

void process::signal(int sig) {
  if (!state_ || !state_->pidfd) throw std::logic_error("ipcoro::process::signal: empty process");
  if (state_->status || !state_->ours()) return;
  if (sys_pidfd_send_signal(state_->pidfd.get(), sig) != 0) {
    const int err = errno;
    if (err == ESRCH) return;  // exited, not yet reaped
    throw_errno(err, fmt::format("send {} to {}", signal_name(sig), who(*state_)));
  }
}

bool process::running() {
  if (!state_ || !state_->pidfd || state_->status) return false;
  // A readable pidfd means the child has exited (zombie or reaped).
  ::pollfd p{state_->pidfd.get(), POLLIN, 0};
  int rc;
  do {
    rc = ::poll(&p, 1, 0);
  } while (rc < 0 && errno == EINTR);
  if (rc < 0) throw_errno(errno, fmt::format("poll the pidfd of {}", who(*state_)));
  return rc == 0;
}

void process::detach() noexcept { state_.reset(); }

}  // namespace ipcoro
