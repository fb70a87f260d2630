// SPDX-License-Identifier: MIT
// Child processes: exit statuses through the ring (waitid and the pidfd-poll fallback), exec, fd wiring,
// signals, the destructor's kill-and-reap, die_with_parent, concurrent and cancelled waits.
#include "ipcoro/process.hpp"
#include "ipcoro/error.hpp"
#include "ipcoro/fd_io.hpp"
#include "ipcoro/io_context.hpp"
#include "ipcoro/pipe.hpp"
#include "ipcoro/sync_wait.hpp"
#include "ipcoro/task.hpp"
#include "ipcoro/timer.hpp"
#include "ipcoro/when_all.hpp"
#include "ipcoro/when_any.hpp"

#include "process.hpp"

#include <catch2/catch.hpp>

#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <stdexcept>
#include <stop_token>
#include <string>
#include <string_view>
#include <system_error>
#include <vector>

namespace {

using namespace std::chrono_literals;
using ipcoro::exit_status;
using ipcoro::process;
using ipcoro::process_options;
using ipcoro::task;
using ipcoro::test::contains;

/// Sets (to "1") or unsets an environment variable for one test run, then restores it.
class env_flag {
 public:
  env_flag(const char* variable, bool set) : variable_(variable) {
    if (const char* v = std::getenv(variable)) saved_ = v;
    if (set) {
      ::setenv(variable, "1", 1);
    } else {
      ::unsetenv(variable);
    }
  }
  ~env_flag() {
    if (saved_) {
      ::setenv(variable_, saved_->c_str(), 1);
    } else {
      ::unsetenv(variable_);
    }
  }
  env_flag(const env_flag&) = delete;
  env_flag& operator=(const env_flag&) = delete;

 private:
  const char* variable_;
  std::optional<std::string> saved_;
};

/// Selects the wait path for one test run: IORING_OP_WAITID, or the pidfd-poll fallback.
struct wait_path : env_flag {
  explicit wait_path(bool fallback) : env_flag("IPCORO_WAITID_FALLBACK", fallback) {}
};

/// Both ways exec starts a child, as a Catch2 generator: clone3(CLONE_VFORK | CLONE_PIDFD),
/// or fork() + pidfd_open (IPCORO_CLONE3_FALLBACK=1).
#define IPCORO_BOTH_EXEC_PATHS()                                                   \
  const bool fork_fallback = GENERATE(false, true);                                \
  INFO("exec path: " << (fork_fallback ? "fork + pidfd_open" : "clone3 (vfork)")); \
  env_flag selected_exec_path { "IPCORO_CLONE3_FALLBACK", fork_fallback }

/// Both wait paths, as a Catch2 generator: each test using it runs once per path.
#define IPCORO_BOTH_WAIT_PATHS()                                                    \
  const bool fallback = GENERATE(false, true);                                      \
  INFO("wait path: " << (fallback ? "pidfd poll (fallback)" : "IORING_OP_WAITID")); \
  wait_path selected_path { fallback }

/// Checks, inside a test, that the path asked for is the one waits take.
void check_path(const ipcoro::io_context& ctx, bool fallback) {
  if (fallback) {
    CHECK_FALSE(ipcoro::process_waits_use_ring());
  } else {
    CHECK(ipcoro::process_waits_use_ring() == ctx.features().waitid);
  }
}

/// Everything until end of stream, each read bounded by a generous failure timeout.
task<std::string> read_all(const ipcoro::pipe_reader& r) {
  std::string out;
  std::array<std::byte, 512> buf;
  for (;;) {
    const std::size_t n = co_await r.read(buf).with_timeout(20s);
    if (n == 0) break;
    out.append(reinterpret_cast<const char*>(buf.data()), n);
  }
  co_return out;
}

int sys_pidfd_open(pid_t pid) { return static_cast<int>(::syscall(SYS_pidfd_open, pid, 0u)); }

/// Blocks (bounded: a failure bound, not synchronisation) until the pidfd is readable, i.e. the process
/// exited.
bool exits_within(int pidfd, std::chrono::milliseconds bound) {
  ::pollfd p{pidfd, POLLIN, 0};
  int rc;
  do {
    rc = ::poll(&p, 1, static_cast<int>(bound.count()));
  } while (rc < 0 && errno == EINTR);
  return rc == 1 && (p.revents & POLLIN) != 0;
}

/// A body that blocks until the pipe reaches end of stream, then returns `code`. The child
/// first closes its inherited copy of the write end, so that the parent's close is the last.
std::function<int()> block_on(ipcoro::pipe_pair& p, int code) {
  return [&p, code] {
    p.writer.close();
    char c;
    while (::read(p.reader.native_handle(), &c, 1) < 0 && errno == EINTR) {
    }
    return code;
  };
}

/// A body that never returns on its own.
int forever() {
  for (;;) ::pause();
}

/// Makes this process the reaper of orphaned descendants for a test, then restores it.
class subreaper_guard {
 public:
  subreaper_guard() {
    ::prctl(PR_GET_CHILD_SUBREAPER, &previous_);
    REQUIRE(::prctl(PR_SET_CHILD_SUBREAPER, 1) == 0);
  }
  ~subreaper_guard() { ::prctl(PR_SET_CHILD_SUBREAPER, previous_); }
  subreaper_guard(const subreaper_guard&) = delete;
  subreaper_guard& operator=(const subreaper_guard&) = delete;

 private:
  int previous_ = 0;
};

}  // namespace

TEST_CASE("process waits take the path the environment selects", "[process]") {
  ipcoro::io_context ctx;
  {
    wait_path ring{false};
    CHECK(ipcoro::process_waits_use_ring() == ctx.features().waitid);
  }
  {
    wait_path poll{true};
    CHECK_FALSE(ipcoro::process_waits_use_ring());
  }
  INFO("kernel " << ctx.features().kernel_major << "." << ctx.features().kernel_minor);
  if (ctx.features().kernel_major > 6 ||
      (ctx.features().kernel_major == 6 && ctx.features().kernel_minor >= 7)) {
    CHECK(ctx.features().waitid);  // so that the ring path is really exercised here
  }
}

TEST_CASE("wait reports the exit codes of forked children", "[process]") {
  IPCORO_BOTH_WAIT_PATHS();
  ipcoro::io_context ctx;
  check_path(ctx, fallback);
  for (int code : {0, 3, 255}) {
    process p = process::fork([code] { return code; }, {.name = "exiter"});
    REQUIRE(p.pid() > 0);
    REQUIRE(p.pidfd() >= 0);
    const exit_status st = ipcoro::sync_wait(ctx, p.wait(20s));
    CHECK(st.exited());
    CHECK(st.code == code);
    CHECK(st.success() == (code == 0));
    CHECK(st.describe() == "exited with status " + std::to_string(code));
    // Reaped once: the cached status comes back, and the pid is no longer our child.
    CHECK(p.status() == st);
    const exit_status again = ipcoro::sync_wait(ctx, p.wait());
    CHECK(again == st);
    CHECK(p.try_wait() == st);
    CHECK_FALSE(p.running());
    errno = 0;
    siginfo_t info{};
    CHECK(::waitid(P_PID, static_cast<id_t>(p.pid()), &info, WEXITED | WNOHANG) == -1);
    CHECK(errno == ECHILD);
    CHECK(contains(p.describe(), "process 'exiter' (pid "));
    CHECK(contains(p.describe(), "exited with status"));
  }
}

TEST_CASE("wait reports the signal that killed a forked child", "[process]") {
  IPCORO_BOTH_WAIT_PATHS();
  ipcoro::io_context ctx;
  process p = process::fork([] {
    ::signal(SIGUSR1, SIG_DFL);
    ::raise(SIGUSR1);
    return 0;
  });
  const exit_status st = ipcoro::sync_wait(ctx, p.wait(20s));
  CHECK_FALSE(st.exited());
  CHECK_FALSE(st.success());
  CHECK(st.signal == SIGUSR1);
  CHECK(st.describe() == "killed by signal " + std::to_string(SIGUSR1) + " (SIGUSR1)");
  CHECK(exit_status{0, SIGKILL, false}.describe() == "killed by signal 9 (SIGKILL)");
  CHECK(exit_status{0, SIGSEGV, true}.describe() == "killed by signal 11 (SIGSEGV) (core dumped)");
}

TEST_CASE("an exception escaping a fork body exits 70 and says why on the child's stderr", "[process]") {
  IPCORO_BOTH_WAIT_PATHS();
  ipcoro::io_context ctx;
  auto [err_read, err_write] = ipcoro::make_pipe();
  process p = process::fork([]() -> int { throw std::runtime_error("the disk is on fire"); },
                            {.name = "thrower", .fds = {{2, err_write.native_handle()}}});
  err_write.close();  // the child holds the only writer: end of stream when it exits
  const std::string text = ipcoro::sync_wait(ctx, read_all(err_read));
  const exit_status st = ipcoro::sync_wait(ctx, p.wait(20s));
  CHECK(st.code == 70);
  CHECK(st.signal == 0);
  CHECK(text == "ipcoro: process 'thrower' failed: the disk is on fire\n");
}

TEST_CASE("a forked child runs its own io_context, not its parent's", "[process]") {
  IPCORO_BOTH_WAIT_PATHS();
  ipcoro::io_context ctx;
  auto [r, w] = ipcoro::make_pipe();
  process p = process::fork([&w] {
    if (ipcoro::io_context::current_or_null() != nullptr) return 10;  // the parent's must be forgotten
    ipcoro::io_context child_ctx;
    constexpr std::string_view msg = "from the child's ring";
    ipcoro::sync_wait(child_ctx,
                      [&]() -> task<void> { co_await w.write_all(std::as_bytes(std::span{msg})); }());
    return 0;
  });
  w.close();
  const std::string got = ipcoro::sync_wait(ctx, read_all(r));
  const exit_status st = ipcoro::sync_wait(ctx, p.wait(20s));
  CHECK(st.describe() == "exited with status 0");
  CHECK(got == "from the child's ring");
}

TEST_CASE("exec runs /bin/sh with descriptor 3 wired to a pipe", "[process]") {
  IPCORO_BOTH_EXEC_PATHS();
  IPCORO_BOTH_WAIT_PATHS();
  ipcoro::io_context ctx;
  auto [r, w] = ipcoro::make_pipe();
  process p = process::exec("/bin/sh", {"-c", "echo \"hello $1\" >&3; exit 4", "sh", "world"},
                            {.fds = {{3, w.native_handle()}}});
  CHECK(p.name() == "/bin/sh");
  w.close();
  const std::string out = ipcoro::sync_wait(ctx, read_all(r));
  const exit_status st = ipcoro::sync_wait(ctx, p.wait(20s));
  CHECK(out == "hello world\n");
  CHECK(st.code == 4);
}

TEST_CASE("exec searches PATH and wires the standard streams", "[process]") {
  ipcoro::io_context ctx;
  auto [in_r, in_w] = ipcoro::make_pipe();
  auto [out_r, out_w] = ipcoro::make_pipe();
  process p =
      process::exec("tr", {"a-z", "A-Z"}, {.fds = {{0, in_r.native_handle()}, {1, out_w.native_handle()}}});
  in_r.close();
  out_w.close();
  const std::string out = ipcoro::sync_wait(ctx, [&]() -> task<std::string> {
    constexpr std::string_view text = "shout this";
    co_await in_w.write_all(std::as_bytes(std::span{text}));
    in_w.close();
    co_return co_await read_all(out_r);
  }());
  const exit_status st = ipcoro::sync_wait(ctx, p.wait(20s));
  CHECK(out == "SHOUT THIS");
  CHECK(st.success());
}

TEST_CASE("exec of a missing program throws with the program's name", "[process]") {
  IPCORO_BOTH_EXEC_PATHS();
  const auto f = ipcoro::test::failure_of([] { (void)process::exec("ipcoro-no-such-program", {"x"}); });
  CHECK(f.code == ENOENT);
  CHECK(contains(f.what, "exec 'ipcoro-no-such-program': No such file or directory"));
  const auto g =
      ipcoro::test::failure_of([] { (void)process::exec("/nonexistent/dir/prog", {}, {.name = "worker"}); });
  CHECK(g.code == ENOENT);
  CHECK(contains(g.what, "process 'worker': exec '/nonexistent/dir/prog'"));
  const auto h = ipcoro::test::failure_of([] { (void)process::exec("/dev/null", {}); });
  CHECK(h.code == EACCES);
  CHECK(contains(h.what, "exec '/dev/null'"));
  // Nothing is left behind: the failed children were reaped.
  siginfo_t info{};
  errno = 0;
  CHECK(::waitid(P_ALL, 0, &info, WEXITED | WNOHANG) == -1);
  CHECK(errno == ECHILD);
}

TEST_CASE("an exec'd program starts with SIGPIPE at its default and no signal blocked", "[process]") {
  IPCORO_BOTH_EXEC_PATHS();
  ipcoro::io_context ctx;  // ipcoro ignores SIGPIPE in this process
  struct sigaction here {};
  REQUIRE(::sigaction(SIGPIPE, nullptr, &here) == 0);
  REQUIRE(here.sa_handler == SIG_IGN);
  sigset_t blocked, old;
  sigemptyset(&blocked);
  sigaddset(&blocked, SIGUSR2);
  REQUIRE(::pthread_sigmask(SIG_BLOCK, &blocked, &old) == 0);
  auto [r, w] = ipcoro::make_pipe();
  process p =
      process::exec("grep", {"-E", "^Sig(Ign|Blk)", "/proc/self/status"}, {.fds = {{1, w.native_handle()}}});
  ::pthread_sigmask(SIG_SETMASK, &old, nullptr);
  w.close();
  const std::string out = ipcoro::sync_wait(ctx, read_all(r));
  CHECK(ipcoro::sync_wait(ctx, p.wait(20s)).success());
  std::uint64_t ign = ~0ull, blk = ~0ull;
  for (std::size_t pos = 0; pos < out.size();) {
    const std::size_t end = out.find('\n', pos);
    const std::string line = out.substr(pos, end - pos);
    if (line.rfind("SigIgn:", 0) == 0) ign = std::stoull(line.substr(7), nullptr, 16);
    if (line.rfind("SigBlk:", 0) == 0) blk = std::stoull(line.substr(7), nullptr, 16);
    pos = end == std::string::npos ? out.size() : end + 1;
  }
  INFO(out);
  CHECK((ign & (1ull << (SIGPIPE - 1))) == 0);
  CHECK(blk == 0);
}

TEST_CASE("exec into a missing working directory throws naming the directory", "[process]") {
  const auto f = ipcoro::test::failure_of(
      [] { (void)process::exec("/bin/true", {}, {.working_directory = "/nonexistent-ipcoro-dir"}); });
  CHECK(f.code == ENOENT);
  CHECK(contains(f.what, "exec '/bin/true': working directory '/nonexistent-ipcoro-dir'"));
}

TEST_CASE("exec runs the program in the working directory asked for", "[process]") {
  ipcoro::io_context ctx;
  auto [r, w] = ipcoro::make_pipe();
  process p = process::exec("/bin/sh", {"-c", "pwd >&3"},
                            {.fds = {{3, w.native_handle()}}, .working_directory = "/usr"});
  w.close();
  const std::string out = ipcoro::sync_wait(ctx, read_all(r));
  CHECK(out == "/usr\n");
  CHECK(ipcoro::sync_wait(ctx, p.wait(20s)).success());
}

TEST_CASE("fd mappings that swap descriptors or map one onto itself reach the right targets", "[process]") {
  IPCORO_BOTH_EXEC_PATHS();
  ipcoro::io_context ctx;
  auto [a_r, a_w] = ipcoro::make_pipe();
  auto [b_r, b_w] = ipcoro::make_pipe();
  auto [c_r, c_w] = ipcoro::make_pipe();
  // Place the writers at known numbers: a at 40, b at 41, c at 42 (all close-on-exec).
  ipcoro::unique_fd a40{::fcntl(a_w.native_handle(), F_DUPFD_CLOEXEC, 40)};
  ipcoro::unique_fd b41{::fcntl(b_w.native_handle(), F_DUPFD_CLOEXEC, 41)};
  ipcoro::unique_fd c42{::fcntl(c_w.native_handle(), F_DUPFD_CLOEXEC, 42)};
  REQUIRE(a40.get() == 40);
  REQUIRE(b41.get() == 41);
  REQUIRE(c42.get() == 42);
  a_w.close();
  b_w.close();
  c_w.close();
  // Child 41 <- parent 40 and child 40 <- parent 41: each source is the other's target.
  // Child 42 <- parent 42: the same number, close-on-exec in the parent.
  // bash, since dash redirects only descriptors 0-9.
  process p = process::exec("/bin/bash", {"-c", "echo to-a >&41; echo to-b >&40; echo to-c >&42"},
                            {.fds = {{41, 40}, {40, 41}, {42, 42}}});
  a40.reset();
  b41.reset();
  c42.reset();
  const std::string a = ipcoro::sync_wait(ctx, read_all(a_r));
  const std::string b = ipcoro::sync_wait(ctx, read_all(b_r));
  const std::string c = ipcoro::sync_wait(ctx, read_all(c_r));
  CHECK(ipcoro::sync_wait(ctx, p.wait(20s)).success());
  CHECK(a == "to-a\n");
  CHECK(b == "to-b\n");
  CHECK(c == "to-c\n");
}

TEST_CASE("close_other_fds hides inheritable descriptors that are not mapped", "[process]") {
  ipcoro::io_context ctx;
  int raw[2];
  REQUIRE(::pipe(raw) == 0);  // deliberately without O_CLOEXEC
  ipcoro::unique_fd leak_r{raw[0]};
  ipcoro::unique_fd leak_w{raw[1]};
  const std::string script = "exec 2>/dev/null; echo leaked >&" + std::to_string(leak_w.get());
  process closed = process::exec("/bin/sh", {"-c", script});
  process open = process::exec("/bin/sh", {"-c", script}, {.close_other_fds = false});
  const exit_status closed_st = ipcoro::sync_wait(ctx, closed.wait(20s));
  const exit_status open_st = ipcoro::sync_wait(ctx, open.wait(20s));
  CHECK_FALSE(closed_st.success());  // the shell could not write: the descriptor was closed
  CHECK(open_st.success());
  leak_w.reset();
  char buf[64] = {};
  const ssize_t n = ::read(leak_r.get(), buf, sizeof buf);
  CHECK(std::string(buf, n > 0 ? static_cast<std::size_t>(n) : 0) == "leaked\n");
}

TEST_CASE("bad fd mappings are refused before forking", "[process]") {
  CHECK_THROWS_AS(process::fork([] { return 0; }, {.fds = {{-1, 0}}}), std::invalid_argument);
  CHECK_THROWS_AS(process::fork([] { return 0; }, {.fds = {{3, 1}, {3, 2}}}), std::invalid_argument);
  const auto f = ipcoro::test::failure_of([] {
    (void)process::exec("/bin/true", {}, {.name = "badfd", .fds = {{3, 987}}});
  });
  CHECK(f.code == EBADF);
  CHECK(contains(f.what, "process 'badfd'"));
}

TEST_CASE("signal(SIGTERM) then wait reports death by SIGTERM", "[process]") {
  IPCORO_BOTH_WAIT_PATHS();
  ipcoro::io_context ctx;
  process p = process::exec("sleep", {"1000"});
  CHECK(p.running());
  p.signal(SIGTERM);
  const exit_status st = ipcoro::sync_wait(ctx, p.wait(20s));
  CHECK(st.signal == SIGTERM);
  CHECK(st.describe() == "killed by signal 15 (SIGTERM)");
  CHECK_FALSE(p.running());
  CHECK_NOTHROW(p.signal(SIGTERM));  // reaped: does nothing
}

TEST_CASE("running() turns false for an exited child that is not yet reaped, and try_wait reaps it",
          "[process]") {
  ipcoro::pipe_pair pipe = ipcoro::make_pipe();
  auto& [r, w] = pipe;
  process p = process::fork(block_on(pipe, 6));
  CHECK(p.running());
  CHECK_FALSE(p.try_wait().has_value());
  w.close();  // the child reads end of stream and exits
  REQUIRE(exits_within(p.pidfd(), 20s));
  CHECK_FALSE(p.running());             // a zombie is not running...
  CHECK_FALSE(p.status().has_value());  // ...and is not reaped by asking
  const std::optional<exit_status> st = p.try_wait();
  REQUIRE(st.has_value());
  CHECK(st->code == 6);
  CHECK(p.status() == st);
}

TEST_CASE("the destructor of a running child kills and reaps it", "[process]") {
  ipcoro::unique_fd watch;
  pid_t pid = -1;
  {
    process p = process::fork(forever);
    pid = p.pid();
    watch.reset(::fcntl(p.pidfd(), F_DUPFD_CLOEXEC, 3));
    REQUIRE(watch);
    CHECK(p.running());
  }
  // Dead...
  CHECK(exits_within(watch.get(), 0ms));
  // ...and reaped: neither the pidfd nor the pid names a child of ours any more.
  siginfo_t info{};
  errno = 0;
  CHECK(::waitid(P_PIDFD, static_cast<id_t>(watch.get()), &info, WEXITED | WNOHANG) == -1);
  CHECK(errno == ECHILD);
  errno = 0;
  CHECK(::waitid(P_PID, static_cast<id_t>(pid), &info, WEXITED | WNOHANG) == -1);
  CHECK(errno == ECHILD);
}

TEST_CASE("move assignment kills and reaps the child it replaces; detach leaves it running", "[process]") {
  ipcoro::io_context ctx;
  process a = process::fork(forever);
  ipcoro::unique_fd watch{::fcntl(a.pidfd(), F_DUPFD_CLOEXEC, 3)};
  a = process::fork([] { return 9; });
  CHECK(exits_within(watch.get(), 0ms));
  CHECK(ipcoro::sync_wait(ctx, a.wait(20s)).code == 9);

  process d = process::fork(forever);
  const pid_t pid = d.pid();
  ipcoro::unique_fd dwatch{sys_pidfd_open(pid)};
  REQUIRE(dwatch);
  d.detach();
  CHECK(d.pid() == -1);
  CHECK_FALSE(exits_within(dwatch.get(), 0ms));  // still alive: nobody killed it
  // Clean up what detach left to us.
  REQUIRE(::syscall(SYS_pidfd_send_signal, dwatch.get(), SIGKILL, nullptr, 0u) == 0);
  siginfo_t info{};
  REQUIRE(::waitid(P_PIDFD, static_cast<id_t>(dwatch.get()), &info, WEXITED) == 0);
  CHECK(info.si_status == SIGKILL);
}

TEST_CASE("die_with_parent kills a grandchild when its parent dies; without it, it survives", "[process]") {
  const bool die = GENERATE(true, false);
  INFO("die_with_parent = " << die);
  subreaper_guard reaper;  // orphans come to us, so the grandchild can be reaped and inspected
  ipcoro::io_context ctx;
  auto [pid_r, pid_w] = ipcoro::make_pipe();
  auto [ping_r, ping_w] = ipcoro::make_pipe();
  auto [pong_r, pong_w] = ipcoro::make_pipe();
  process middle = process::fork(
      [&, die] {
        process grandchild = process::fork(
            [&] {
              char c;
              while (::read(ping_r.native_handle(), &c, 1) == 1) {
                if (::write(pong_w.native_handle(), &c, 1) != 1) return 1;
              }
              return 0;
            },
            {.name = "grandchild", .die_with_parent = die});
        const pid_t gpid = grandchild.pid();
        if (::write(pid_w.native_handle(), &gpid, sizeof gpid) != sizeof gpid) return 1;
        return forever();
      },
      {.name = "middle"});
  pid_t gpid = -1;
  const std::size_t got = ipcoro::sync_wait(ctx, [&]() -> task<std::size_t> {
    co_return co_await pid_r.read_exact(std::as_writable_bytes(std::span{&gpid, 1})).with_timeout(20s);
  }());
  REQUIRE(got == sizeof gpid);
  ipcoro::unique_fd gfd{sys_pidfd_open(gpid)};
  REQUIRE(gfd);
  // Cleans up whatever happens below.
  struct killer {
    int fd;
    ~killer() {
      ::syscall(SYS_pidfd_send_signal, fd, SIGKILL, nullptr, 0u);
      siginfo_t info{};
      ::waitid(P_PIDFD, static_cast<id_t>(fd), &info, WEXITED);
    }
  } cleanup{gfd.get()};

  auto ping = [&]() -> task<bool> {
    const std::byte b{42};
    co_await ping_w.write_all(std::span{&b, 1});
    std::byte back{};
    const std::size_t n = co_await pong_r.read(std::span{&back, 1}).with_timeout(20s);
    co_return n == 1 && back == b;
  };
  const bool alive_before = ipcoro::sync_wait(ctx, ping());
  REQUIRE(alive_before);

  middle.kill();
  const exit_status mst = ipcoro::sync_wait(ctx, middle.wait(20s));
  CHECK(mst.signal == SIGKILL);

  if (die) {
    // The generous bound only limits a failure; the pidfd wakes us when it dies.
    REQUIRE(exits_within(gfd.get(), 20s));
    siginfo_t info{};
    REQUIRE(::waitid(P_PIDFD, static_cast<id_t>(gfd.get()), &info, WEXITED) == 0);
    CHECK(info.si_code == CLD_KILLED);
    CHECK(info.si_status == SIGKILL);
  } else {
    const bool alive_after = ipcoro::sync_wait(ctx, ping());
    CHECK(alive_after);
    CHECK_FALSE(exits_within(gfd.get(), 0ms));
  }
}

TEST_CASE("32 children awaited at once with when_all each report their own status", "[process]") {
  IPCORO_BOTH_WAIT_PATHS();
  ipcoro::io_context ctx;
  check_path(ctx, fallback);
  constexpr int n = 32;
  ipcoro::pipe_pair go = ipcoro::make_pipe();
  auto& [go_r, go_w] = go;
  std::vector<process> children;
  for (int i = 0; i < n; ++i) children.push_back(process::fork(block_on(go, i + 1)));
  go_r.close();
  const auto statuses = ipcoro::sync_wait(ctx, [&]() -> task<std::vector<exit_status>> {
    std::vector<task<exit_status>> waits;
    for (process& p : children) waits.push_back(p.wait(30s));
    auto release = [&]() -> task<void> {
      co_await ipcoro::nop();  // every wait is in flight before any child may exit
      go_w.close();
    };
    auto [all, ignored] = co_await ipcoro::when_all(ipcoro::when_all(std::move(waits)), release());
    (void)ignored;
    co_return std::move(all);
  }());
  REQUIRE(statuses.size() == n);
  for (int i = 0; i < n; ++i) {
    CHECK(statuses[static_cast<std::size_t>(i)].code == i + 1);
    CHECK(children[static_cast<std::size_t>(i)].status() == statuses[static_cast<std::size_t>(i)]);
  }
}

TEST_CASE("two coroutines waiting on one child both get its status", "[process]") {
  IPCORO_BOTH_WAIT_PATHS();
  ipcoro::io_context ctx;
  ipcoro::pipe_pair pipe = ipcoro::make_pipe();
  auto& [r, w] = pipe;
  process p = process::fork(block_on(pipe, 12));
  r.close();
  const auto [first, second, ignored] =
      ipcoro::sync_wait(ctx, [&]() -> task<std::tuple<exit_status, exit_status, std::monostate>> {
        auto release = [&]() -> task<void> {
          co_await ipcoro::nop();
          w.close();
        };
        auto result = co_await ipcoro::when_all(p.wait(20s), p.wait(20s), release());
        co_return result;
      }());
  (void)ignored;
  CHECK(first.code == 12);
  CHECK(second == first);
}

TEST_CASE("a wait that loses a when_any against a timer does not reap; a later wait gets the status",
          "[process]") {
  IPCORO_BOTH_WAIT_PATHS();
  ipcoro::io_context ctx;
  ipcoro::pipe_pair pipe = ipcoro::make_pipe();
  auto& [r, w] = pipe;
  process p = process::fork(block_on(pipe, 21));
  r.close();
  const auto raced = ipcoro::sync_wait(ctx, [&]() -> task<std::size_t> {
    auto timer = []() -> task<int> {
      co_await ipcoro::sleep_for(20ms);
      co_return 0;
    };
    auto result = co_await ipcoro::when_any(p.wait(), timer());
    co_return result.index();
  }());
  CHECK(raced == 1);
  CHECK_FALSE(p.status().has_value());
  CHECK(p.running());
  w.close();
  const exit_status st = ipcoro::sync_wait(ctx, p.wait(20s));
  CHECK(st.code == 21);
}

TEST_CASE("a stop request cancels a wait without reaping, and wait(timeout) times out", "[process]") {
  IPCORO_BOTH_WAIT_PATHS();
  ipcoro::io_context ctx;
  ipcoro::pipe_pair pipe = ipcoro::make_pipe();
  auto& [r, w] = pipe;
  process p = process::fork(block_on(pipe, 33));
  r.close();
  std::stop_source source;
  bool cancelled = false;
  ipcoro::sync_wait(ctx, [&]() -> task<void> {
    auto waiter = [&]() -> task<void> {
      try {
        (void)co_await p.wait();
      } catch (const ipcoro::operation_cancelled&) {
        cancelled = true;
      }
    };
    auto stopper = [&]() -> task<void> {
      co_await ipcoro::nop();
      source.request_stop();
    };
    co_await ipcoro::when_all(waiter().with_stop_token(source.get_token()), stopper());
  }());
  CHECK(cancelled);
  CHECK_FALSE(p.status().has_value());

  CHECK_THROWS_AS(ipcoro::sync_wait(ctx, p.wait(10ms)), ipcoro::timed_out);
  CHECK_FALSE(p.status().has_value());
  CHECK(p.running());

  w.close();
  const exit_status st = ipcoro::sync_wait(ctx, p.wait(20s));
  CHECK(st.code == 33);
}

TEST_CASE("a wait started before the process object moves still completes", "[process]") {
  IPCORO_BOTH_WAIT_PATHS();
  ipcoro::io_context ctx;
  process p = process::fork([] { return 44; });
  task<exit_status> w = p.wait(20s);
  process moved = std::move(p);
  CHECK(p.pid() == -1);
  const exit_status st = ipcoro::sync_wait(ctx, std::move(w));
  CHECK(st.code == 44);
  CHECK(moved.status() == st);
  CHECK_THROWS_AS(ipcoro::sync_wait(ctx, p.wait()), std::logic_error);
}

TEST_CASE("spawning refuses to run when SIGCHLD is ignored, since no child could be awaited", "[process]") {
  struct sigaction ign {
  }, old{};
  ign.sa_handler = SIG_IGN;
  sigemptyset(&ign.sa_mask);
  REQUIRE(::sigaction(SIGCHLD, &ign, &old) == 0);
  const auto f = ipcoro::test::failure_of([] { (void)process::fork([] { return 0; }, {.name = "orphan"}); });
  ::sigaction(SIGCHLD, &old, nullptr);
  CHECK(f.code == ECHILD);
  CHECK(contains(f.what, "process 'orphan'"));
  CHECK(contains(f.what, "SIGCHLD is ignored"));
}
