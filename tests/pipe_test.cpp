// SPDX-License-Identifier: MIT
// Anonymous pipes through the loop: end of stream, EPIPE, fork, capacity, splice, 1000 at once.
#include "ipcoro/pipe.hpp"
#include "ipcoro/error.hpp"
#include "ipcoro/fd_io.hpp"
#include "ipcoro/io_context.hpp"
#include "ipcoro/scope.hpp"
#include "ipcoro/sync_wait.hpp"
#include "ipcoro/task.hpp"
#include "ipcoro/timer.hpp"
#include "ipcoro/when_all.hpp"

#include "process.hpp"

#include <catch2/catch.hpp>

#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <bit>
#include <cerrno>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <vector>

namespace {

using namespace std::chrono_literals;
using ipcoro::task;
using ipcoro::test::child_process;
using ipcoro::test::fill_pattern;

constexpr std::size_t KiB = 1024;
constexpr std::size_t MiB = 1024 * KiB;

std::span<const std::byte> as_bytes(std::string_view s) noexcept {
  return std::as_bytes(std::span<const char>(s.data(), s.size()));
}

std::vector<std::byte> pattern(std::size_t size, std::uint64_t seed, std::uint64_t offset = 0) {
  std::vector<std::byte> v(size);
  fill_pattern(v, seed, offset);
  return v;
}

/// True when `data` is the pattern stream `seed` from `offset` on.
bool matches_pattern(std::span<const std::byte> data, std::uint64_t seed, std::uint64_t offset) {
  std::array<std::byte, 4096> expected;
  while (!data.empty()) {
    const std::size_t n = std::min(data.size(), expected.size());
    fill_pattern(std::span(expected).first(n), seed, offset);
    if (std::memcmp(expected.data(), data.data(), n) != 0) return false;
    data = data.subspan(n);
    offset += n;
  }
  return true;
}

/// A cheap streaming checksum over 8-byte words (the same value whatever the piece sizes),
/// so that hundreds of MiB can be checked in the -O0 sanitizer build.
class word_checksum {
 public:
  void update(std::span<const std::byte> data) noexcept {
    bytes_ += data.size();
    std::size_t i = 0;
    while (pending_size_ != 0 && i < data.size()) {
      pending_[pending_size_++] = data[i++];
      if (pending_size_ == 8) {
        mix(load(pending_.data()));
        pending_size_ = 0;
      }
    }
    for (; data.size() - i >= 8; i += 8) mix(load(data.data() + i));
    for (; i < data.size(); ++i) pending_[pending_size_++] = data[i];
  }
  std::uint64_t value() const noexcept {
    std::uint64_t h = h_;
    for (std::size_t i = 0; i < pending_size_; ++i) {
      h = std::rotl((h ^ static_cast<std::uint64_t>(pending_[i])) * 0x9e3779b97f4a7c15ull, 27);
    }
    return h ^ bytes_;
  }
  std::uint64_t bytes() const noexcept { return bytes_; }

 private:
  static std::uint64_t load(const std::byte* p) noexcept {
    std::uint64_t w;
    std::memcpy(&w, p, 8);
    return w;
  }
  void mix(std::uint64_t w) noexcept { h_ = std::rotl((h_ ^ w) * 0x9e3779b97f4a7c15ull, 27); }

  std::uint64_t h_ = 0xcbf29ce484222325ull;
  std::uint64_t bytes_ = 0;
  std::array<std::byte, 8> pending_{};
  std::size_t pending_size_ = 0;
};

/// Runs `f` and returns the errno of the std::system_error it throws, or 0 if it returns.
template <class F>
int system_error_of(F&& f) {
  try {
    f();
  } catch (const std::system_error& e) {
    if (e.code().category() != std::system_category()) return -1;
    return e.code().value();
  }
  return 0;
}

std::size_t open_fd_count() {
  std::size_t n = 0;
  for ([[maybe_unused]] const auto& entry : std::filesystem::directory_iterator("/proc/self/fd")) ++n;
  return n;
}

bool is_cloexec(int fd) {
  const int flags = ::fcntl(fd, F_GETFD);
  return flags >= 0 && (flags & FD_CLOEXEC) != 0;
}

/// Raises the soft RLIMIT_NOFILE to the hard limit for the life of the object.
class fd_limit_raised {
 public:
  explicit fd_limit_raised(std::size_t needed) {
    REQUIRE(::getrlimit(RLIMIT_NOFILE, &saved_) == 0);
    INFO("this test needs " << needed << " descriptors but the hard RLIMIT_NOFILE is " << saved_.rlim_max
                            << "; raise it (ulimit -Hn, or LimitNOFILE= for a service)");
    REQUIRE((saved_.rlim_max == RLIM_INFINITY || saved_.rlim_max >= needed));
    ::rlimit raised = saved_;
    raised.rlim_cur = saved_.rlim_max;
    REQUIRE(::setrlimit(RLIMIT_NOFILE, &raised) == 0);
  }
  ~fd_limit_raised() { ::setrlimit(RLIMIT_NOFILE, &saved_); }
  fd_limit_raised(const fd_limit_raised&) = delete;
  fd_limit_raised& operator=(const fd_limit_raised&) = delete;

 private:
  ::rlimit saved_{};
};

/// Writes `data` and returns 0, or the errno of the std::system_error it throws.
task<int> write_all_errno(const ipcoro::pipe_writer& w, std::span<const std::byte> data) {
  try {
    co_await w.write_all(data);
  } catch (const std::system_error& e) {
    co_return e.code().value();
  }
  co_return 0;
}

/// Execs this test program running only the hidden test case tagged `tag`, with SIGPIPE
/// back at its default action and nothing of ipcoro initialised yet (a fresh process).
int run_self_with_default_sigpipe(const char* tag) {
  child_process child([tag] {
    struct sigaction dfl {};
    dfl.sa_handler = SIG_DFL;
    sigemptyset(&dfl.sa_mask);
    ::sigaction(SIGPIPE, &dfl, nullptr);
    ::execl("/proc/self/exe", "pipe_test", tag, "--reporter", "compact", static_cast<char*>(nullptr));
    std::perror("execl /proc/self/exe");
    return 98;
  });
  return child.wait(60s);
}

}  // namespace

// ---- one process ----

TEST_CASE("reads into an empty buffer complete at once with 0, even on an empty pipe", "[pipe]") {
  ipcoro::io_context ctx;
  auto [r, w] = ipcoro::make_pipe();
  auto body = [&]() -> ipcoro::task<std::size_t> {
    std::span<std::byte> none;
    const std::size_t a = co_await r.read(none);
    const std::size_t b = co_await r.read_exact(none);
    co_return a + b + 1;
  };
  const auto before = ctx.stats().submitted;
  CHECK(ipcoro::sync_wait(ctx, body()) == 1);
  CHECK(ctx.stats().submitted == before);  // neither went through the ring
}

TEST_CASE("a writer from make_pipe writes without the ring when there is room; other writers use the ring",
          "[pipe]") {
  ipcoro::io_context ctx;
  auto [r, w] = ipcoro::make_pipe();
  CHECK(w.path() == ipcoro::write_path::try_nowait_first);
  ipcoro::pipe_writer ring_writer{ipcoro::unique_fd{::dup(w.native_handle())}};
  CHECK(ring_writer.path() == ipcoro::write_path::ring_only);
  const std::array<std::byte, 8> msg{};
  auto write_with = [&](const ipcoro::pipe_writer& writer) -> ipcoro::task<std::uint64_t> {
    const auto before = ctx.stats().submitted;
    co_await writer.write_all(msg);
    co_return ctx.stats().submitted - before;
  };
  CHECK(ipcoro::sync_wait(ctx, write_with(w)) == 0);
  CHECK(ipcoro::sync_wait(ctx, write_with(ring_writer)) >= 1);
  std::array<std::byte, 16> in{};
  auto drain = [&]() -> ipcoro::task<std::size_t> { co_return co_await r.read_exact(in); };
  CHECK(ipcoro::sync_wait(ctx, drain()) == 16);
}

TEST_CASE("a write is read back whole", "[pipe]") {
  ipcoro::io_context ctx;
  auto [r, w] = ipcoro::make_pipe();
  const std::string_view msg = "hello, pipe";
  const std::string got = ipcoro::sync_wait(ctx, [&]() -> task<std::string> {
    const std::size_t written = co_await w.write(as_bytes(msg));
    if (written != msg.size()) co_return "short write";
    std::array<char, 64> buf{};
    const std::size_t n = co_await r.read(std::as_writable_bytes(std::span(buf)));
    co_return std::string(buf.data(), n);
  }());
  REQUIRE(got == msg);
}

TEST_CASE("read returns 0 once every writer has closed", "[pipe]") {
  ipcoro::io_context ctx;
  auto [r, w] = ipcoro::make_pipe();
  ipcoro::unique_fd second_writer{::dup(w.native_handle())};
  REQUIRE(second_writer);

  std::vector<std::size_t> reads;
  ipcoro::sync_wait(ctx, ipcoro::when_all(
                             [&]() -> task<void> {
                               std::array<std::byte, 16> buf{};
                               for (;;) {
                                 const std::size_t n = co_await r.read(buf);
                                 reads.push_back(n);
                                 if (n == 0) co_return;
                               }
                             }(),
                             [&]() -> task<void> {
                               co_await w.write_all(as_bytes("abc"));
                               w.close();
                               // One writer is still open: the reader must not see the end yet.
                               co_await ipcoro::write_all(second_writer.get(), as_bytes("de"));
                               co_await ipcoro::nop();
                               second_writer.reset();
                             }()));
  REQUIRE(reads.size() >= 2);
  REQUIRE(reads.back() == 0);
  std::size_t total = 0;
  for (std::size_t n : reads) total += n;
  REQUIRE(total == 5);
  REQUIRE(std::count(reads.begin(), reads.end(), std::size_t{0}) == 1);

  // End of stream is a value, and it stays: reading again returns 0 again.
  std::array<std::byte, 16> buf{};
  REQUIRE(ipcoro::sync_wait(ctx, [&]() -> task<std::size_t> { co_return co_await r.read(buf); }()) == 0);
}

TEST_CASE("read_exact returns fewer bytes only at end of stream", "[pipe]") {
  ipcoro::io_context ctx;
  auto [r, w] = ipcoro::make_pipe();
  const std::vector<std::byte> data = pattern(1300, 7);

  std::size_t first = 0, second = 0, third = 0;
  bool first_ok = false, second_ok = false;
  ipcoro::sync_wait(ctx, ipcoro::when_all(
                             [&]() -> task<void> {
                               std::vector<std::byte> buf(1000);
                               first = co_await r.read_exact(buf);
                               first_ok = matches_pattern(std::span(buf).first(first), 7, 0);
                               second = co_await r.read_exact(buf);
                               second_ok = matches_pattern(std::span(buf).first(second), 7, 1000);
                               third = co_await r.read_exact(buf);
                             }(),
                             [&]() -> task<void> {
                               // Thirteen pieces, each a separate completion for the reader.
                               for (std::size_t i = 0; i < 13; ++i) {
                                 co_await w.write_all(std::span(data).subspan(i * 100, 100));
                                 co_await ipcoro::nop();
                               }
                               w.close();
                             }()));
  REQUIRE(first == 1000);
  REQUIRE(first_ok);
  REQUIRE(second == 300);
  REQUIRE(second_ok);
  REQUIRE(third == 0);
}

TEST_CASE("write_all of more than the pipe holds completes while a reader drains it", "[pipe]") {
  ipcoro::io_context ctx;
  auto [r, w] = ipcoro::make_pipe();
  const std::size_t capacity = ipcoro::pipe_capacity(w.native_handle());
  const std::size_t size = 8 * MiB + 123;
  REQUIRE(size > 4 * capacity);
  const std::vector<std::byte> data = pattern(size, 11);

  std::size_t received = 0;
  std::size_t reads = 0;
  bool intact = true;
  ipcoro::sync_wait(ctx, ipcoro::when_all(
                             [&]() -> task<void> {
                               co_await w.write_all(data);
                               w.close();
                             }(),
                             [&]() -> task<void> {
                               std::vector<std::byte> buf(3001);
                               for (;;) {
                                 const std::size_t n = co_await r.read(buf);
                                 if (n == 0) co_return;
                                 ++reads;
                                 intact = intact && matches_pattern(std::span(buf).first(n), 11, received);
                                 received += n;
                               }
                             }()));
  REQUIRE(received == size);
  REQUIRE(intact);
  REQUIRE(reads >= size / 3001);
}

TEST_CASE("pipe descriptors are close-on-exec", "[pipe][fork]") {
  auto [r, w] = ipcoro::make_pipe();
  auto [a, b] = ipcoro::make_duplex_pipe();
  const std::array<int, 6> fds{r.native_handle(),          w.native_handle(),
                               a.reader().native_handle(), a.writer().native_handle(),
                               b.reader().native_handle(), b.writer().native_handle()};
  for (int fd : fds) {
    INFO("fd " << fd);
    REQUIRE(is_cloexec(fd));
  }

  // And exec really drops them, while a descriptor without the flag survives (the control).
  ipcoro::unique_fd control{::dup(r.native_handle())};
  REQUIRE(control);
  REQUIRE_FALSE(is_cloexec(control.get()));
  std::string script = "test -e /proc/$$/fd/" + std::to_string(control.get()) + " || exit 10;";
  for (int fd : fds) script += " test -e /proc/$$/fd/" + std::to_string(fd) + " && exit 11;";
  script += " exit 0";
  child_process child([&] {
    ::execl("/bin/sh", "sh", "-c", script.c_str(), static_cast<char*>(nullptr));
    return 98;
  });
  REQUIRE(child.wait(30s) == 0);
}

// ---- EPIPE, never SIGPIPE ----

TEST_CASE("writing after the reader closed throws EPIPE and the process lives on", "[pipe]") {
  ipcoro::io_context ctx;
  auto [r, w] = ipcoro::make_pipe();
  r.close();
  const int write_err = system_error_of(
      [&] { ipcoro::sync_wait(ctx, [&]() -> task<void> { (void)co_await w.write(as_bytes("x")); }()); });
  REQUIRE(write_err == EPIPE);
  const int write_all_err = system_error_of(
      [&] { ipcoro::sync_wait(ctx, [&]() -> task<void> { co_await w.write_all(as_bytes("xyz")); }()); });
  REQUIRE(write_all_err == EPIPE);
  std::string what;
  try {
    ipcoro::sync_wait(ctx, [&]() -> task<void> { co_await w.write_all(as_bytes("xyz")); }());
  } catch (const std::system_error& e) {
    what = e.what();
    CHECK(e.code() == std::errc::broken_pipe);
  }
  INFO(what);
  REQUIRE_FALSE(what.empty());
}

TEST_CASE("write_all fails with EPIPE when the reader goes away halfway", "[pipe]") {
  ipcoro::io_context ctx;
  auto [r, w] = ipcoro::make_pipe();
  const std::vector<std::byte> data = pattern(4 * MiB, 3);
  int err = 0;
  std::size_t got = 0;
  ipcoro::sync_wait(ctx, ipcoro::when_all([&]() -> task<void> { err = co_await write_all_errno(w, data); }(),
                                          [&]() -> task<void> {
                                            std::vector<std::byte> buf(100 * KiB);
                                            got = co_await r.read_exact(buf);
                                            r.close();
                                          }()));
  REQUIRE(got == 100 * KiB);
  REQUIRE(err == EPIPE);
}

TEST_CASE("a forked child that writes to a pipe whose reader is gone gets EPIPE and survives",
          "[pipe][fork]") {
  SECTION("the child closes the reader itself") {
    child_process child([] {
      ipcoro::io_context ctx;
      auto [r, w] = ipcoro::make_pipe();
      r.close();
      const int err = ipcoro::sync_wait(ctx, write_all_errno(w, as_bytes("lost")));
      return err == EPIPE ? 42 : 1;
    });
    REQUIRE(child.wait(30s) == 42);
  }
  SECTION("the parent closes the reader while the child is blocked on a full pipe") {
    ipcoro::io_context ctx;
    auto [r, w] = ipcoro::make_pipe();
    child_process child([&] {
      r.close();
      ipcoro::io_context child_ctx;
      const std::vector<std::byte> data = pattern(2 * MiB, 5);
      const int err = ipcoro::sync_wait(child_ctx, write_all_errno(w, data));
      return err == EPIPE ? 42 : 1;
    });
    w.close();
    std::vector<std::byte> buf(4 * KiB);
    const std::size_t n = ipcoro::sync_wait(
        ctx, [&]() -> task<std::size_t> { co_return co_await r.read_exact(buf).with_timeout(30s); }());
    REQUIRE(n == buf.size());
    REQUIRE(matches_pattern(buf, 5, 0));
    r.close();
    REQUIRE(child.wait(30s) == 42);
  }
}

TEST_CASE("helper: a fresh process with the default SIGPIPE action gets EPIPE",
          "[.][pipe-helper-sigpipe-default]") {
  struct sigaction sa {};
  REQUIRE(::sigaction(SIGPIPE, nullptr, &sa) == 0);
  REQUIRE(sa.sa_handler == SIG_DFL);
  auto [r, w] = ipcoro::make_pipe();
  r.close();
  ipcoro::io_context ctx;
  REQUIRE(ipcoro::sync_wait(ctx, write_all_errno(w, as_bytes("nobody reads this"))) == EPIPE);
  REQUIRE(::sigaction(SIGPIPE, nullptr, &sa) == 0);
  REQUIRE(sa.sa_handler == SIG_IGN);
}

namespace {
std::atomic<int> sigpipe_handled{0};
void count_sigpipe(int) { sigpipe_handled.fetch_add(1); }
}  // namespace

TEST_CASE("helper: a SIGPIPE handler the program installed is left in place",
          "[.][pipe-helper-sigpipe-handler]") {
  struct sigaction mine {};
  mine.sa_handler = &count_sigpipe;
  sigemptyset(&mine.sa_mask);
  REQUIRE(::sigaction(SIGPIPE, &mine, nullptr) == 0);
  ipcoro::io_context ctx;
  auto [r, w] = ipcoro::make_pipe();
  r.close();
  REQUIRE(ipcoro::sync_wait(ctx, write_all_errno(w, as_bytes("nobody reads this"))) == EPIPE);
  struct sigaction now {};
  REQUIRE(::sigaction(SIGPIPE, nullptr, &now) == 0);
  REQUIRE(now.sa_handler == &count_sigpipe);
}

TEST_CASE("a fresh program is not killed by SIGPIPE and keeps its own SIGPIPE handler", "[pipe][fork]") {
  // exec() gives a process in which ipcoro has not run yet, with SIGPIPE at SIG_DFL: only
  // there does "ipcoro ignores SIGPIPE for you" get tested. 128 + 13 would mean SIGPIPE.
  REQUIRE(run_self_with_default_sigpipe("[pipe-helper-sigpipe-default]") == 0);
  REQUIRE(run_self_with_default_sigpipe("[pipe-helper-sigpipe-handler]") == 0);
}

// ---- across fork() ----

namespace {
struct message_header {
  std::uint64_t seq;
  std::uint64_t size;
};

std::size_t message_size(std::uint64_t seq) { return (seq * 977) % 6000; }

// The child's side: answer each message with one of its own, until end of stream.
task<int> pong_side(ipcoro::duplex_pipe& end, std::uint64_t expected) {
  std::vector<std::byte> payload(8 * KiB);
  for (std::uint64_t seq = 0;; ++seq) {
    message_header h{};
    const std::size_t n = co_await end.read_exact(std::as_writable_bytes(std::span(&h, 1)));
    if (n == 0) co_return seq == expected ? 0 : 2;
    if (n != sizeof h || h.seq != seq || h.size != message_size(seq)) co_return 3;
    const auto body = std::span(payload).first(h.size);
    if (co_await end.read_exact(body) != h.size) co_return 4;
    if (!matches_pattern(body, seq, 0)) co_return 5;
    fill_pattern(body, seq + 1'000'000, 0);
    co_await end.write_all(std::as_bytes(std::span(&h, 1)));
    co_await end.write_all(body);
  }
}
}  // namespace

TEST_CASE("parent and child ping-pong messages over a duplex pipe, each with its own loop", "[pipe][fork]") {
  constexpr std::uint64_t rounds = 1000;
  ipcoro::io_context ctx;  // the child's inherited copy is forgotten after fork
  auto [near, far] = ipcoro::make_duplex_pipe();
  child_process child([&] {
    near.close();
    ipcoro::io_context child_ctx;
    return ipcoro::sync_wait(child_ctx, pong_side(far, rounds));
  });
  far.close();

  std::uint64_t answered = 0;
  bool eof_after_close = false;
  ipcoro::sync_wait(ctx, [&]() -> task<void> {
    std::vector<std::byte> out(8 * KiB), in(8 * KiB);
    for (std::uint64_t seq = 0; seq < rounds; ++seq) {
      message_header h{seq, message_size(seq)};
      fill_pattern(std::span(out).first(h.size), seq, 0);
      co_await near.write_all(std::as_bytes(std::span(&h, 1)));
      co_await near.write_all(std::span(out).first(h.size));
      message_header reply{};
      const auto header = std::as_writable_bytes(std::span(&reply, 1));
      if (co_await near.read_exact(header).with_timeout(30s) != sizeof reply) co_return;
      if (reply.seq != seq || reply.size != h.size) co_return;
      const auto body = std::span(in).first(reply.size);
      if (co_await near.read_exact(body).with_timeout(30s) != body.size()) co_return;
      if (!matches_pattern(body, seq + 1'000'000, 0)) co_return;
      ++answered;
    }
    // Half-close: the child sees end of stream, finishes, and its exit closes our input.
    near.close_write();
    std::array<std::byte, 16> buf{};
    eof_after_close = co_await near.read(buf).with_timeout(30s) == 0;
  }());
  REQUIRE(answered == rounds);
  REQUIRE(eof_after_close);
  REQUIRE(child.wait(30s) == 0);
}

TEST_CASE("a child killed with SIGKILL mid-stream leaves the parent reading end of stream, not hanging",
          "[pipe][fork]") {
  ipcoro::io_context ctx;
  auto [r, w] = ipcoro::make_pipe();
  child_process child([&] {
    r.close();
    ipcoro::io_context child_ctx;
    std::vector<std::byte> chunk(16 * KiB);
    ipcoro::sync_wait(child_ctx, [&]() -> task<void> {
      for (std::uint64_t offset = 0;; offset += chunk.size()) {
        fill_pattern(chunk, 21, offset);
        co_await w.write_all(chunk);
      }
    }());
    return 1;  // only reached if a write failed
  });
  // The parent's own copy of the write end would keep the pipe open forever.
  w.close();

  std::uint64_t received = 0;
  bool intact = true;
  bool saw_eof = false;
  ipcoro::sync_wait(ctx, [&]() -> task<void> {
    std::vector<std::byte> buf(7000);
    bool killed = false;
    for (;;) {
      const std::size_t n = co_await r.read(buf).with_timeout(30s);
      if (n == 0) {
        saw_eof = true;
        co_return;
      }
      intact = intact && matches_pattern(std::span(buf).first(n), 21, received);
      received += n;
      if (!killed && received >= 256 * KiB) {
        child.kill(SIGKILL);
        killed = true;
      }
    }
  }());
  REQUIRE(saw_eof);
  REQUIRE(intact);
  REQUIRE(received >= 256 * KiB);
  REQUIRE(child.wait(30s) == 128 + SIGKILL);
}

TEST_CASE("256 MiB from a forked child arrive with the checksum the child computed", "[pipe][fork][stress]") {
  constexpr std::uint64_t total = 256 * MiB;
  constexpr std::size_t chunk = 1 * MiB;
  constexpr std::uint64_t seed = 0x5eed;
  ipcoro::io_context ctx;
  const std::size_t capacity = std::min<std::size_t>(1 * MiB, ipcoro::pipe_max_size());
  auto [data_r, data_w] = ipcoro::make_pipe({.capacity = capacity});
  auto [sum_r, sum_w] = ipcoro::make_pipe();
  child_process child([&] {
    data_r.close();
    sum_r.close();
    ipcoro::io_context child_ctx;
    return ipcoro::sync_wait(child_ctx, [&]() -> task<int> {
      std::vector<std::byte> buf(chunk);
      word_checksum sum;
      for (std::uint64_t offset = 0; offset < total; offset += chunk) {
        fill_pattern(buf, seed, offset);
        sum.update(buf);
        co_await data_w.write_all(buf);
      }
      data_w.close();
      const std::array<std::uint64_t, 2> result{sum.value(), sum.bytes()};
      co_await sum_w.write_all(std::as_bytes(std::span(result)));
      co_return 0;
    }());
  });
  data_w.close();
  sum_w.close();

  word_checksum received;
  std::array<std::uint64_t, 2> sent{};
  std::size_t sent_size = 0;
  ipcoro::sync_wait(ctx, [&]() -> task<void> {
    std::vector<std::byte> buf(chunk);
    for (;;) {
      const std::size_t n = co_await data_r.read_exact(buf).with_timeout(60s);
      received.update(std::span(buf).first(n));
      if (n < buf.size()) break;
    }
    sent_size = co_await sum_r.read_exact(std::as_writable_bytes(std::span(sent))).with_timeout(60s);
  }());
  REQUIRE(child.wait(60s) == 0);
  REQUIRE(sent_size == sizeof sent);
  REQUIRE(sent[1] == total);
  REQUIRE(received.bytes() == total);
  REQUIRE(received.value() == sent[0]);
}

namespace {
constexpr int echo_rounds = 4;
std::size_t echo_message_size(std::size_t pipe, int round) {
  return 100 + (pipe * 37 + static_cast<std::size_t>(round) * 1009) % 3900;
}

// Parent side: echo whatever arrives, checking it is pipe `index`'s stream, until the end.
task<void> serve_echo(ipcoro::duplex_pipe& end, std::size_t index, std::uint64_t& echoed, char& intact) {
  std::array<std::byte, 4096> buf;
  for (;;) {
    const std::size_t n = co_await end.read(buf);
    if (n == 0) break;
    if (!matches_pattern(std::span(buf).first(n), index, echoed)) intact = 0;
    co_await end.write_all(std::span(buf).first(n));
    echoed += n;
  }
  end.close_write();
}

// Child side: send each message, expect it back, then half-close and expect the end.
task<int> echo_client(ipcoro::duplex_pipe& end, std::size_t index) {
  std::array<std::byte, 4096> out, in;
  std::uint64_t offset = 0;
  for (int round = 0; round < echo_rounds; ++round) {
    const std::size_t size = echo_message_size(index, round);
    fill_pattern(std::span(out).first(size), index, offset);
    co_await end.write_all(std::span(out).first(size));
    if (co_await end.read_exact(std::span(in).first(size)) != size) co_return 1;
    if (std::memcmp(in.data(), out.data(), size) != 0) co_return 1;
    offset += size;
  }
  end.close_write();
  co_return co_await end.read(in) == 0 ? 0 : 1;
}
}  // namespace

TEST_CASE("one loop serves 1000 pipes at once, every stream verified", "[pipe][fork][stress]") {
  constexpr std::size_t pipes = 1000;
  // Each duplex pipe is two pipes, so four descriptors, all open until the fork.
  const fd_limit_raised limit(4 * pipes + open_fd_count() + 64);
  ipcoro::io_context ctx;
  std::vector<ipcoro::duplex_pair> pairs;
  pairs.reserve(pipes);
  for (std::size_t i = 0; i < pipes; ++i) pairs.push_back(ipcoro::make_duplex_pipe());

  child_process client([&] {
    for (auto& p : pairs) p.first.close();
    ipcoro::io_context client_ctx;
    std::vector<task<int>> clients;
    clients.reserve(pipes);
    for (std::size_t i = 0; i < pipes; ++i) clients.push_back(echo_client(pairs[i].second, i));
    const std::vector<int> failed = ipcoro::sync_wait(client_ctx, ipcoro::when_all(std::move(clients)));
    return static_cast<int>(std::min<long>(std::count(failed.begin(), failed.end(), 1), 100));
  });
  for (auto& p : pairs) p.second.close();

  std::vector<std::uint64_t> echoed(pipes, 0);
  std::vector<char> intact(pipes, 1);
  ipcoro::sync_wait(ctx, ipcoro::with_scope([&](ipcoro::scope& s) -> task<void> {
                      for (std::size_t i = 0; i < pipes; ++i)
                        s.spawn(serve_echo(pairs[i].first, i, echoed[i], intact[i]));
                      co_return;
                    }));
  REQUIRE(client.wait(60s) == 0);
  for (std::size_t i = 0; i < pipes; ++i) {
    std::uint64_t expected = 0;
    for (int round = 0; round < echo_rounds; ++round) expected += echo_message_size(i, round);
    INFO("pipe " << i);
    REQUIRE(intact[i] == 1);
    REQUIRE(echoed[i] == expected);
  }
}

// ---- capacity ----

TEST_CASE("make_pipe with a 1 MiB capacity gives at least 1 MiB", "[pipe]") {
  INFO("/proc/sys/fs/pipe-max-size is " << ipcoro::pipe_max_size());
  REQUIRE(ipcoro::pipe_max_size() >= 1 * MiB);
  ipcoro::io_context ctx;
  auto [r, w] = ipcoro::make_pipe({.capacity = 1 * MiB});
  REQUIRE(ipcoro::pipe_capacity(w.native_handle()) >= 1 * MiB);
  REQUIRE(ipcoro::pipe_capacity(r.native_handle()) >= 1 * MiB);
  // The buffer is real: 1 MiB fits with nobody reading.
  const std::vector<std::byte> data = pattern(1 * MiB, 9);
  ipcoro::sync_wait(ctx, [&]() -> task<void> { co_await w.write_all(data).with_timeout(10s); }());
  std::vector<std::byte> back(1 * MiB);
  w.close();
  REQUIRE(ipcoro::sync_wait(ctx, [&]() -> task<std::size_t> { co_return co_await r.read_exact(back); }()) ==
          back.size());
  REQUIRE(back == data);
}

TEST_CASE("asking for more than pipe-max-size throws an error naming /proc/sys/fs/pipe-max-size", "[pipe]") {
  const std::size_t max = ipcoro::pipe_max_size();
  const std::size_t fds_before = open_fd_count();
  std::string what;
  try {
    (void)ipcoro::make_pipe({.capacity = max + 1});
  } catch (const std::system_error& e) {
    what = e.what();
  }
  INFO("what(): " << what);
  REQUIRE_THAT(what, Catch::Contains("/proc/sys/fs/pipe-max-size"));
  // The pipe made before the capacity was refused is closed again.
  REQUIRE(open_fd_count() == fds_before);

  auto [r, w] = ipcoro::make_pipe();
  const std::size_t before = ipcoro::pipe_capacity(w.native_handle());
  what.clear();
  try {
    (void)ipcoro::set_pipe_capacity(w.native_handle(), 2 * max);
  } catch (const std::system_error& e) {
    what = e.what();
  }
  REQUIRE_THAT(what, Catch::Contains("/proc/sys/fs/pipe-max-size"));
  REQUIRE(ipcoro::pipe_capacity(w.native_handle()) == before);
}

// ---- splice ----

TEST_CASE("splice moves a stream from one pipe into another through the ring", "[pipe]") {
  ipcoro::io_context ctx;
  REQUIRE(ctx.features().splice);
  auto [a_r, a_w] = ipcoro::make_pipe();
  auto [b_r, b_w] = ipcoro::make_pipe();
  const std::size_t size = 1 * MiB + 17;
  const std::vector<std::byte> data = pattern(size, 31);
  std::size_t spliced = 0;
  std::size_t received = 0;
  bool intact = true;
  ipcoro::sync_wait(ctx, ipcoro::when_all(
                             [&]() -> task<void> {
                               co_await a_w.write_all(data);
                               a_w.close();
                             }(),
                             [&]() -> task<void> {
                               for (;;) {
                                 const std::size_t n = co_await ipcoro::splice(
                                     a_r.native_handle(), -1, b_w.native_handle(), -1, 64 * KiB);
                                 if (n == 0) break;
                                 spliced += n;
                               }
                               b_w.close();
                             }(),
                             [&]() -> task<void> {
                               std::vector<std::byte> buf(10'000);
                               for (;;) {
                                 const std::size_t n = co_await b_r.read(buf);
                                 if (n == 0) co_return;
                                 intact = intact && matches_pattern(std::span(buf).first(n), 31, received);
                                 received += n;
                               }
                             }()));
  REQUIRE(spliced == size);
  REQUIRE(received == size);
  REQUIRE(intact);
}

TEST_CASE("splice moves bytes between a memfd at an offset and a pipe", "[pipe]") {
  ipcoro::io_context ctx;
  ipcoro::unique_fd file{::memfd_create("ipcoro-pipe-test", MFD_CLOEXEC)};
  REQUIRE(file);
  const std::vector<std::byte> content = pattern(256 * KiB, 41);
  REQUIRE(::write(file.get(), content.data(), content.size()) == static_cast<ssize_t>(content.size()));
  const off_t position = ::lseek(file.get(), 0, SEEK_CUR);

  auto [r, w] = ipcoro::make_pipe();
  constexpr std::int64_t from = 12'345;
  constexpr std::size_t length = 50'000;
  std::vector<std::byte> out(length);
  std::size_t moved = 0;
  ipcoro::sync_wait(ctx, [&]() -> task<void> {
    while (moved < length) {
      const std::size_t n =
          co_await ipcoro::splice(file.get(), from + static_cast<std::int64_t>(moved), w.native_handle(), -1,
                                  static_cast<std::uint32_t>(length - moved));
      if (n == 0) break;
      moved += n;
      // Drain what is in the pipe so the next splice has room.
      co_await r.read_exact(std::span(out).subspan(moved - n, n));
    }
  }());
  REQUIRE(moved == length);
  REQUIRE(std::memcmp(out.data(), content.data() + from, length) == 0);
  // With an explicit offset the file position is not used or moved.
  REQUIRE(::lseek(file.get(), 0, SEEK_CUR) == position);

  // The other way: from the pipe into the file at an offset past its end.
  constexpr std::int64_t to = 300'000;
  const std::vector<std::byte> more = pattern(30'000, 43);
  std::size_t written = 0;
  ipcoro::sync_wait(ctx, [&]() -> task<void> {
    co_await w.write_all(more);
    while (written < more.size()) {
      const std::size_t n =
          co_await ipcoro::splice(r.native_handle(), -1, file.get(), to + static_cast<std::int64_t>(written),
                                  static_cast<std::uint32_t>(more.size() - written));
      if (n == 0) break;
      written += n;
    }
  }());
  REQUIRE(written == more.size());
  std::vector<std::byte> back(more.size());
  REQUIRE(::pread(file.get(), back.data(), back.size(), to) == static_cast<ssize_t>(back.size()));
  REQUIRE(back == more);
  REQUIRE(::lseek(file.get(), 0, SEEK_CUR) == position);
}

// ---- timeouts across processes ----

TEST_CASE("reads that time out on a pipe from another process lose no data", "[pipe][fork]") {
  constexpr std::uint64_t total = 4 * MiB;
  constexpr std::uint64_t seed = 77;
  ipcoro::io_context ctx;
  auto [data_r, data_w] = ipcoro::make_pipe();
  auto [go_r, go_w] = ipcoro::make_pipe();
  child_process child([&] {
    data_r.close();
    go_w.close();
    ipcoro::io_context child_ctx;
    return ipcoro::sync_wait(child_ctx, [&]() -> task<int> {
      std::array<std::byte, 1> go{};
      if (co_await go_r.read_exact(go) != 1) co_return 2;
      std::vector<std::byte> buf(64 * KiB);
      std::uint64_t offset = 0;
      for (std::uint64_t i = 0; offset < total; ++i) {
        // Irregular pieces with pauses, so that the reader's timeouts fire now and then,
        // sometimes just as data arrives.
        const std::size_t size = std::min<std::uint64_t>(1 + (i * 7919) % (16 * KiB), total - offset);
        fill_pattern(std::span(buf).first(size), seed, offset);
        co_await data_w.write_all(std::span(buf).first(size));
        offset += size;
        if (i % 4 == 0) co_await ipcoro::sleep_for(std::chrono::microseconds(i % 300));
      }
      co_return 0;
    }());
  });
  data_w.close();
  go_r.close();

  std::uint64_t received = 0;
  std::uint64_t timeouts = 0;
  bool first_timed_out = false;
  bool intact = true;
  ipcoro::sync_wait(ctx, [&]() -> task<void> {
    std::vector<std::byte> buf(16 * KiB);
    // Nothing can arrive before "go": this one must time out.
    try {
      (void)co_await data_r.read(buf).with_timeout(5ms);
    } catch (const ipcoro::timed_out&) {
      first_timed_out = true;
    }
    co_await go_w.write_all(as_bytes("!"));
    for (std::uint64_t i = 0;; ++i) {
      std::size_t n = 0;
      try {
        if (i % 2 == 0) {
          n = co_await data_r.read(buf).with_timeout(std::chrono::microseconds(50 + i % 200));
        } else {
          n = co_await data_r.read(buf).with_deadline(std::chrono::steady_clock::now() + 100us);
        }
      } catch (const ipcoro::timed_out&) {
        ++timeouts;
        continue;
      }
      if (n == 0) co_return;
      intact = intact && matches_pattern(std::span(buf).first(n), seed, received);
      received += n;
    }
  }());
  INFO("timeouts while streaming: " << timeouts);
  REQUIRE(first_timed_out);
  REQUIRE(child.wait(60s) == 0);
  REQUIRE(received == total);
  REQUIRE(intact);
}
