// SPDX-License-Identifier: MIT
// Named pipes across real processes: opening through the ring, end of stream, the server idiom,
// full duplex, atomic messages from many writers, dead peers, timeouts, cancellation, errors.
#include "ipcoro/fifo.hpp"
#include "ipcoro/error.hpp"
#include "ipcoro/fd_io.hpp"
#include "ipcoro/io_context.hpp"
#include "ipcoro/pipe.hpp"
#include "ipcoro/sync_wait.hpp"
#include "ipcoro/task.hpp"
#include "ipcoro/timer.hpp"
#include "ipcoro/when_all.hpp"

#include "process.hpp"

#include <catch2/catch.hpp>

#include <fcntl.h>
#include <grp.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <new>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <vector>

#include "counting_new.hpp"
#include "skip.hpp"

namespace {

using namespace std::chrono_literals;
using ipcoro::task;
using ipcoro::test::child_process;
using ipcoro::test::fill_pattern;

constexpr std::size_t pipe_buf = ipcoro::fifo_message_max;

std::span<const std::byte> as_bytes(std::string_view s) noexcept {
  return std::as_bytes(std::span<const char>(s.data(), s.size()));
}

std::string as_string(std::span<const std::byte> b) {
  return std::string(reinterpret_cast<const char*>(b.data()), b.size());
}

/// A fresh directory under the temp directory, removed with everything in it when the test
/// ends, pass or fail.
class temp_dir {
 public:
  explicit temp_dir(unsigned mode = 0700)
      : path_(std::filesystem::temp_directory_path() / ipcoro::test::unique_name("fifo")) {
    REQUIRE(::mkdir(path_.c_str(), mode) == 0);
    REQUIRE(::chmod(path_.c_str(), mode) == 0);  // not narrowed by the umask
  }
  ~temp_dir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  temp_dir(const temp_dir&) = delete;
  temp_dir& operator=(const temp_dir&) = delete;

  std::string at(std::string_view name) const { return (path_ / name).string(); }
  const std::filesystem::path& path() const noexcept { return path_; }
  std::size_t entries() const {
    std::size_t n = 0;
    for ([[maybe_unused]] const auto& e : std::filesystem::directory_iterator(path_)) ++n;
    return n;
  }

 private:
  std::filesystem::path path_;
};

void touch(const std::string& path) {
  ipcoro::unique_fd fd{::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600)};
  REQUIRE(fd);
}

bool exists(const std::string& path) {
  struct stat st {};
  return ::lstat(path.c_str(), &st) == 0;
}

struct stat stat_of(const std::string& path) {
  struct stat st {};
  REQUIRE(::lstat(path.c_str(), &st) == 0);
  return st;
}

/// How an operation failed: the errno (ETIMEDOUT for timed_out, ECANCELED for
/// operation_cancelled), 0 if it did not, and the message.
struct failure {
  int code = 0;
  std::string what;
};

template <class T>
task<failure> failure_of(task<T> t) {
  try {
    co_await std::move(t);
  } catch (const std::system_error& e) {
    co_return failure{e.code().value(), e.what()};
  }
  co_return failure{};
}

template <class F>
failure failure_of_call(F&& f) {
  try {
    f();
  } catch (const std::system_error& e) {
    return failure{e.code().value(), e.what()};
  }
  return failure{};
}

task<ipcoro::pipe_reader> open_reader(std::string path, std::chrono::milliseconds timeout = 30s) {
  co_return co_await ipcoro::open_fifo_reader(std::move(path)).with_timeout(timeout);
}
task<ipcoro::pipe_writer> open_writer(std::string path, std::chrono::milliseconds timeout = 30s) {
  co_return co_await ipcoro::open_fifo_writer(std::move(path)).with_timeout(timeout);
}
task<std::size_t> read_some(const ipcoro::pipe_reader& r, std::span<std::byte> buf,
                            std::chrono::milliseconds timeout = 30s) {
  co_return co_await r.read(buf).with_timeout(timeout);
}

/// Runs `body` (returning task<int>) on a fresh loop in a forked child; its value is the exit code.
template <class F>
child_process fork_with_loop(F body) {
  return child_process([body]() mutable {
    ipcoro::io_context ctx;
    return ipcoro::sync_wait(ctx, body());
  });
}

/// One byte through a control pipe: the handshakes between the test and its children.
void signal_byte(const ipcoro::pipe_writer& w) {
  const char c = '!';
  REQUIRE(::write(w.native_handle(), &c, 1) == 1);
}
task<bool> await_bytes(const ipcoro::pipe_reader& r, std::size_t n, std::chrono::milliseconds timeout = 30s) {
  std::vector<std::byte> buf(n);
  co_return co_await r.read_exact(buf).with_timeout(timeout) == n;
}

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

bool is_cloexec(int fd) {
  const int flags = ::fcntl(fd, F_GETFD);
  return flags >= 0 && (flags & FD_CLOEXEC) != 0;
}

}  // namespace

// ---- the owner ----

TEST_CASE("a FIFO is created with mode 0600 and removed by its owner", "[fifo]") {
  temp_dir dir;
  const std::string path = dir.at("plain");
  {
    ipcoro::fifo f(path);
    REQUIRE(f.path() == path);
    const struct stat st = stat_of(path);
    CHECK(S_ISFIFO(st.st_mode));
    CHECK((st.st_mode & 07777) == 0600);
    CHECK(st.st_uid == ::geteuid());
  }
  CHECK_FALSE(exists(path));

  SECTION("a mode asked for is applied exactly, whatever the umask") {
    struct umask_guard {
      mode_t saved = ::umask(077);
      ~umask_guard() { ::umask(saved); }
    } narrow_umask;
    ipcoro::fifo f(path, {.mode = 0660});
    CHECK((stat_of(path).st_mode & 07777) == 0660);
  }
  SECTION("a relative path is removed from where it was created, even after a chdir") {
    const std::filesystem::path cwd = std::filesystem::current_path();
    REQUIRE(::chdir(dir.path().c_str()) == 0);
    std::string owned;
    {
      ipcoro::fifo f("relative");
      owned = f.path();
      REQUIRE(::chdir(cwd.c_str()) == 0);
      CHECK(owned == dir.at("relative"));
      CHECK(S_ISFIFO(stat_of(owned).st_mode));
    }
    CHECK_FALSE(exists(owned));
  }
  SECTION("moving hands over ownership; release() gives it up") {
    ipcoro::fifo a(path);
    ipcoro::fifo b(std::move(a));
    CHECK_FALSE(a);
    a.unlink();
    CHECK(exists(path));
    const std::string released = b.release();
    CHECK(released == path);
    b.unlink();
    CHECK(exists(path));
    CHECK(::unlink(path.c_str()) == 0);
  }
  SECTION("a mode beyond the permission bits is refused") {
    const failure f = failure_of_call([&] { ipcoro::fifo bad(path, {.mode = 04600}); });
    CHECK(f.code == EINVAL);
    CHECK_THAT(f.what, Catch::Contains("0777"));
    CHECK_FALSE(exists(path));
  }
  CHECK(dir.entries() == 0);
}

TEST_CASE("creating a FIFO where a file exists fails with EEXIST saying what is there", "[fifo][errors]") {
  temp_dir dir;
  const std::string path = dir.at("taken");

  SECTION("a regular file is never replaced") {
    touch(path);
    for (bool replace : {false, true}) {
      const failure f = failure_of_call([&] { ipcoro::fifo x(path, {.reclaim = replace}); });
      CHECK(f.code == EEXIST);
      CHECK_THAT(f.what, Catch::Contains(path) && Catch::Contains("regular file"));
      CHECK(S_ISREG(stat_of(path).st_mode));
    }
  }
  SECTION("a FIFO left behind is reported, and replaced on request") {
    REQUIRE(::mkfifo(path.c_str(), 0600) == 0);
    const ino_t stale = stat_of(path).st_ino;
    const failure f = failure_of_call([&] { ipcoro::fifo x(path); });
    CHECK(f.code == EEXIST);
    CHECK_THAT(f.what, Catch::Contains(path) && Catch::Contains("reclaim"));
    CHECK(stat_of(path).st_ino == stale);

    {
      ipcoro::fifo fresh(path, {.reclaim = true});
      CHECK(S_ISFIFO(stat_of(path).st_mode));
      CHECK(stat_of(path).st_ino != stale);
      CHECK(dir.entries() == 1);  // nothing left from the replacement
    }
    CHECK_FALSE(exists(path));
  }
  SECTION("a FIFO that another process is reading is not taken over") {
    REQUIRE(::mkfifo(path.c_str(), 0600) == 0);
    const ino_t in_use = stat_of(path).st_ino;
    auto [ready_r, ready_w] = ipcoro::make_pipe();
    auto [done_r, done_w] = ipcoro::make_pipe();
    child_process server = fork_with_loop([&]() -> task<int> {
      ready_r.close();
      done_w.close();
      ipcoro::fifo_server_reader reader = ipcoro::open_fifo_server_reader(path);
      signal_byte(ready_w);
      std::array<std::byte, 1> b{};
      (void)co_await done_r.read(b);  // until the test closes it
      co_return 0;
    });
    ready_w.close();
    done_r.close();
    ipcoro::io_context ctx;
    REQUIRE(ipcoro::sync_wait(ctx, await_bytes(ready_r, 1)));
    const failure f = failure_of_call([&] { ipcoro::fifo x(path, {.reclaim = true}); });
    CHECK(f.code == EBUSY);
    CHECK_THAT(f.what, Catch::Contains(path) && Catch::Contains("open for reading"));
    CHECK(stat_of(path).st_ino == in_use);
    done_w.close();
    CHECK(server.wait(30s) == 0);
  }
}

TEST_CASE("the owner leaves alone a FIFO that has replaced its own", "[fifo]") {
  temp_dir dir;
  const std::string path = dir.at("replaced");
  ipcoro::fifo first(path);
  ipcoro::fifo second(path, {.reclaim = true});
  const ino_t second_ino = stat_of(path).st_ino;
  first.unlink();
  REQUIRE(exists(path));
  CHECK(stat_of(path).st_ino == second_ino);
  second.unlink();
  CHECK_FALSE(exists(path));
}

TEST_CASE("a forked child that drops its copy of a FIFO leaves the parent's FIFO in place", "[fifo][fork]") {
  temp_dir dir;
  const std::string path = dir.at("shared");
  std::optional<ipcoro::fifo> node{std::in_place, path};
  child_process child([&]() -> int {
    node.reset();  // the child's copy of the owner goes, as when a forked worker ends
    return exists(path) ? 0 : 1;
  });
  CHECK(child.wait() == 0);
  CHECK(exists(path));
  node.reset();  // the creator's does remove it
  CHECK_FALSE(exists(path));
}

// ---- opening and end of stream ----

TEST_CASE("a reader and a writer in different processes meet through the ring without blocking the loop",
          "[fifo][fork]") {
  temp_dir dir;
  ipcoro::fifo f(dir.at("meet"));
  ipcoro::io_context ctx;

  SECTION("the peer is a forked ipcoro process") {
    child_process writer = fork_with_loop([&]() -> task<int> {
      ipcoro::pipe_writer w = co_await open_writer(f.path());
      co_await ipcoro::write_message(w, as_bytes("hello through a FIFO"));
      co_return 0;
    });
    int ticks_while_opening = 0;
    bool opened = false;
    auto [text, unit] = ipcoro::sync_wait(ctx, ipcoro::when_all(
                                                   [&]() -> task<std::string> {
                                                     ipcoro::pipe_reader r = co_await open_reader(f.path());
                                                     opened = true;
                                                     std::string all;
                                                     std::array<std::byte, 64> buf{};
                                                     while (const std::size_t n = co_await read_some(r, buf))
                                                       all += as_string(std::span(buf).first(n));
                                                     co_return all;
                                                   }(),
                                                   [&]() -> task<void> {
                                                     while (!opened) {
                                                       co_await ipcoro::nop();
                                                       ++ticks_while_opening;
                                                     }
                                                   }()));
    (void)unit;
    CHECK(text == "hello through a FIFO");
    CHECK(ticks_while_opening > 0);
    CHECK(writer.wait(30s) == 0);
  }
  SECTION("the peers are shell commands that know nothing of ipcoro") {
    const std::string write_cmd = "printf 'from the shell' > '" + f.path() + "'";
    child_process shell_writer([&] {
      ::execl("/bin/sh", "sh", "-c", write_cmd.c_str(), static_cast<char*>(nullptr));
      return 98;
    });
    const std::string got = ipcoro::sync_wait(ctx, [&]() -> task<std::string> {
      ipcoro::pipe_reader r = co_await open_reader(f.path());
      std::string all;
      std::array<std::byte, 64> buf{};
      while (const std::size_t n = co_await read_some(r, buf)) all += as_string(std::span(buf).first(n));
      co_return all;
    }());
    CHECK(got == "from the shell");
    CHECK(shell_writer.wait(30s) == 0);

    const std::string read_cmd = "read -r line < '" + f.path() + "'; test \"$line\" = 'to the shell'";
    child_process shell_reader([&] {
      ::execl("/bin/sh", "sh", "-c", read_cmd.c_str(), static_cast<char*>(nullptr));
      return 98;
    });
    ipcoro::sync_wait(ctx, [&]() -> task<void> {
      ipcoro::pipe_writer w = co_await open_writer(f.path());
      co_await ipcoro::write_message(w, as_bytes("to the shell\n"));
    }());
    CHECK(shell_reader.wait(30s) == 0);
  }
}

TEST_CASE("read returns 0 only once every writer process has closed", "[fifo][fork]") {
  temp_dir dir;
  ipcoro::fifo f(dir.at("eof"));
  auto [opened_r, opened_w] = ipcoro::make_pipe();
  auto [go_a_r, go_a_w] = ipcoro::make_pipe();
  auto [go_b_r, go_b_w] = ipcoro::make_pipe();
  auto writer = [&](const ipcoro::pipe_reader& go, std::string_view text) {
    return fork_with_loop([&go, &opened_r, &opened_w, &go_a_w, &go_b_w, &f, text]() -> task<int> {
      opened_r.close();
      go_a_w.close();
      go_b_w.close();
      ipcoro::pipe_writer w = co_await open_writer(f.path());
      signal_byte(opened_w);
      if (!co_await await_bytes(go, 1)) co_return 2;
      co_await ipcoro::write_message(w, as_bytes(text));
      co_return 0;  // exiting closes the write end
    });
  };
  child_process a = writer(go_a_r, "a");
  child_process b = writer(go_b_r, "b");
  opened_w.close();
  go_a_r.close();
  go_b_r.close();

  ipcoro::io_context ctx;
  ipcoro::pipe_reader r = ipcoro::sync_wait(ctx, open_reader(f.path()));
  REQUIRE(ipcoro::sync_wait(ctx, await_bytes(opened_r, 2)));  // both writers have the FIFO open

  std::array<std::byte, 8> buf{};
  signal_byte(go_a_w);
  REQUIRE(ipcoro::sync_wait(ctx, read_some(r, buf)) == 1);
  CHECK(buf[0] == std::byte{'a'});
  REQUIRE(a.wait(30s) == 0);
  // One writer is gone, the other still has its end open: no end of stream yet.
  CHECK(ipcoro::sync_wait(ctx, failure_of(read_some(r, buf, 50ms))).code == ETIMEDOUT);

  signal_byte(go_b_w);
  REQUIRE(ipcoro::sync_wait(ctx, read_some(r, buf)) == 1);
  CHECK(buf[0] == std::byte{'b'});
  REQUIRE(b.wait(30s) == 0);
  CHECK(ipcoro::sync_wait(ctx, read_some(r, buf)) == 0);
  CHECK(ipcoro::sync_wait(ctx, read_some(r, buf)) == 0);  // and it stays ended
}

TEST_CASE("a server's reader waits for the next client instead of reading end of stream", "[fifo][fork]") {
  temp_dir dir;
  ipcoro::fifo f(dir.at("server"));
  // Opens at once, with no client yet.
  ipcoro::fifo_server_reader server = ipcoro::open_fifo_server_reader(f.path());
  CHECK(is_cloexec(server.native_handle()));
  CHECK(is_cloexec(server.own_writer().native_handle()));
  CHECK((::fcntl(server.native_handle(), F_GETFL) & O_NONBLOCK) == 0);
  ipcoro::io_context ctx;
  std::array<std::byte, 16> buf{};
  auto read_server = [&](std::chrono::milliseconds timeout) -> task<std::size_t> {
    co_return co_await server.read(buf).with_timeout(timeout);
  };
  CHECK(ipcoro::sync_wait(ctx, failure_of(read_server(30ms))).code == ETIMEDOUT);

  for (std::string_view text : {"first client", "second client"}) {
    child_process client = fork_with_loop([&server, &f, text]() -> task<int> {
      server.close();  // the server's descriptors, inherited through fork
      ipcoro::pipe_writer w = co_await open_writer(f.path());
      co_await ipcoro::write_message(w, as_bytes(text));
      co_return 0;
    });
    const std::size_t n = ipcoro::sync_wait(ctx, read_server(30s));
    CHECK(as_string(std::span(buf).first(n)) == text);
    REQUIRE(client.wait(30s) == 0);
    // The client has gone: a plain reader would now read 0; the server waits instead.
    CHECK(ipcoro::sync_wait(ctx, failure_of(read_server(30ms))).code == ETIMEDOUT);
  }
  server.close_own_writer();
  CHECK(ipcoro::sync_wait(ctx, read_server(30s)) == 0);
}

TEST_CASE("two FIFOs make a full-duplex channel between processes, whichever order each side names them",
          "[fifo][fork]") {
  temp_dir dir;
  ipcoro::fifo up(dir.at("up"));
  ipcoro::fifo down(dir.at("down"));
  constexpr std::size_t total = 1 << 20;
  constexpr std::uint64_t seed = 1234;

  // The child echoes every byte back, transformed, until end of stream.
  child_process echo = fork_with_loop([&]() -> task<int> {
    ipcoro::duplex_pipe end = co_await ipcoro::open_fifo_duplex(up.path(), down.path(), 30s);
    std::vector<std::byte> buf(7000);
    for (;;) {
      const std::size_t n = co_await end.read(buf).with_timeout(30s);
      if (n == 0) break;
      for (std::byte& b : std::span(buf).first(n)) b = ~b;
      co_await end.write_all(std::span(buf).first(n));
    }
    co_return 0;
  });

  ipcoro::io_context ctx;
  std::size_t received = 0;
  bool intact = true;
  ipcoro::sync_wait(ctx, [&]() -> task<void> {
    ipcoro::duplex_pipe end = co_await ipcoro::open_fifo_duplex(down.path(), up.path(), 30s);
    // Both directions busy at once: one coroutine sends while another receives.
    co_await ipcoro::when_all(
        [&]() -> task<void> {
          std::vector<std::byte> chunk(5000);
          for (std::size_t sent = 0; sent < total;) {
            const std::size_t n = std::min(chunk.size(), total - sent);
            fill_pattern(std::span(chunk).first(n), seed, sent);
            co_await end.write_all(std::span(chunk).first(n));
            sent += n;
          }
          end.close_write();
        }(),
        [&]() -> task<void> {
          std::vector<std::byte> buf(6000);
          for (;;) {
            const std::size_t n = co_await end.read(buf).with_timeout(30s);
            if (n == 0) co_return;
            for (std::byte& b : std::span(buf).first(n)) b = ~b;
            intact = intact && matches_pattern(std::span(buf).first(n), seed, received);
            received += n;
          }
        }());
  }());
  CHECK(received == total);
  CHECK(intact);
  CHECK(echo.wait(30s) == 0);
}

// ---- atomic messages ----

namespace {

struct record_header {
  std::uint32_t writer;
  std::uint32_t seq;
  std::uint32_t length;  ///< of the whole record, header included
  std::uint32_t check;   ///< ~(writer * 1'000'003 + seq)
};

std::uint32_t header_check(std::uint32_t writer, std::uint32_t seq) { return ~(writer * 1'000'003u + seq); }
std::uint64_t record_seed(std::uint32_t writer, std::uint32_t seq) {
  return (std::uint64_t{writer} << 32) | seq;
}

std::uint32_t record_length(bool fixed, std::uint32_t writer, std::uint32_t seq) {
  if (fixed) return static_cast<std::uint32_t>(pipe_buf);
  // From a bare header up to PIPE_BUF, so that small messages share pipe pages too.
  const std::uint64_t mixed = (record_seed(writer, seq) + 1) * 0x9e3779b97f4a7c15ull;
  return static_cast<std::uint32_t>(sizeof(record_header) +
                                    (mixed >> 40) % (pipe_buf - sizeof(record_header) + 1));
}

std::string fmt_header(const record_header& h) {
  return "record header {writer " + std::to_string(h.writer) + ", seq " + std::to_string(h.seq) +
         ", length " + std::to_string(h.length) + ", check " + std::to_string(h.check) + "}";
}

struct stream_report {
  std::uint64_t records = 0;
  std::uint64_t writer_switches = 0;  ///< consecutive records from different writers
  std::string first_problem;
};

/// `writers` processes each send `per_writer` self-describing records into one FIFO at once
/// with write_message; the test reads them all back and checks that none is torn.
stream_report many_writers(bool fixed, std::uint32_t writers, std::uint32_t per_writer) {
  temp_dir dir;
  ipcoro::fifo f(dir.at("many"));
  ipcoro::fifo_server_reader server = ipcoro::open_fifo_server_reader(f.path());
  auto [ready_r, ready_w] = ipcoro::make_pipe();
  auto [gate_r, gate_w] = ipcoro::make_pipe();

  std::vector<child_process> children;
  for (std::uint32_t id = 0; id < writers; ++id) {
    children.push_back(fork_with_loop([&, id]() -> task<int> {
      server.close();
      ready_r.close();
      gate_w.close();
      ipcoro::pipe_writer w = co_await open_writer(f.path());
      signal_byte(ready_w);
      std::array<std::byte, 1> go{};
      (void)co_await gate_r.read(go);  // end of stream: everyone starts at once
      std::array<std::byte, pipe_buf> record{};
      for (std::uint32_t seq = 0; seq < per_writer; ++seq) {
        const record_header h{id, seq, record_length(fixed, id, seq), header_check(id, seq)};
        std::memcpy(record.data(), &h, sizeof h);
        auto body = std::span(record).subspan(sizeof h, h.length - sizeof h);
        fill_pattern(body, record_seed(id, seq), 0);
        co_await ipcoro::write_message(w, std::span(record).first(h.length));
      }
      co_return 0;
    }));
  }
  ready_w.close();
  gate_r.close();

  ipcoro::io_context ctx;
  stream_report report;
  ipcoro::sync_wait(ctx, [&]() -> task<void> {
    if (!co_await await_bytes(ready_r, writers)) {
      report.first_problem = "the writers did not all open the FIFO";
      co_return;
    }
    gate_w.close();
    std::vector<std::uint32_t> next(writers, 0);
    std::array<std::byte, pipe_buf> record{};
    std::uint32_t previous = writers;
    const std::uint64_t expected = std::uint64_t{writers} * per_writer;
    while (report.records < expected) {
      record_header h{};
      auto head = std::span(record).first(sizeof h);
      if (co_await server.read_exact(head).with_timeout(60s) != head.size()) {
        report.first_problem = "end of stream inside a record header";
        co_return;
      }
      std::memcpy(&h, head.data(), sizeof h);
      if (h.writer >= writers || h.check != header_check(h.writer, h.seq) || h.seq != next[h.writer] ||
          h.length != record_length(fixed, h.writer, h.seq)) {
        report.first_problem = fmt_header(h);
        co_return;
      }
      auto body = std::span(record).subspan(sizeof h, h.length - sizeof h);
      if (co_await server.read_exact(body).with_timeout(60s) != body.size() ||
          !matches_pattern(body, record_seed(h.writer, h.seq), 0)) {
        report.first_problem = "torn body in " + fmt_header(h);
        co_return;
      }
      ++next[h.writer];
      if (previous != writers && previous != h.writer) ++report.writer_switches;
      previous = h.writer;
      ++report.records;
    }
  }());
  for (auto& child : children) CHECK(child.wait(60s) == 0);
  // Every writer has exited: with the server's own end closed, the stream ends right here.
  server.close_own_writer();
  std::array<std::byte, 1> extra{};
  CHECK(ipcoro::sync_wait(ctx, [&]() -> task<std::size_t> {
          co_return co_await server.read(extra).with_timeout(30s);
        }()) == 0);
  return report;
}

}  // namespace

TEST_CASE("records of exactly PIPE_BUF bytes from many writer processes at once are never torn",
          "[fifo][fork][atomic]") {
  constexpr std::uint32_t writers = 16;
  constexpr std::uint32_t per_writer = 300;
  const stream_report r = many_writers(true, writers, per_writer);
  INFO(r.first_problem);
  CHECK(r.first_problem.empty());
  CHECK(r.records == std::uint64_t{writers} * per_writer);
  // The writers really did take turns in the one stream.
  CHECK(r.writer_switches >= writers);
}

TEST_CASE("messages of every size up to PIPE_BUF from many writer processes at once are never torn",
          "[fifo][fork][atomic]") {
  constexpr std::uint32_t writers = 12;
  constexpr std::uint32_t per_writer = 400;
  const stream_report r = many_writers(false, writers, per_writer);
  INFO(r.first_problem);
  CHECK(r.first_problem.empty());
  CHECK(r.records == std::uint64_t{writers} * per_writer);
  CHECK(r.writer_switches >= writers);
}

TEST_CASE("write_message refuses a message larger than PIPE_BUF with EMSGSIZE and writes nothing",
          "[fifo][atomic]") {
  temp_dir dir;
  ipcoro::fifo f(dir.at("big"));
  ipcoro::fifo_server_reader server = ipcoro::open_fifo_server_reader(f.path());
  ipcoro::io_context ctx;
  ipcoro::pipe_writer w = ipcoro::sync_wait(ctx, open_writer(f.path()));

  std::vector<std::byte> big(pipe_buf + 1);
  fill_pattern(big, 5, 0);
  const failure refused =
      ipcoro::sync_wait(ctx, failure_of([&]() -> task<void> { co_await ipcoro::write_message(w, big); }()));
  CHECK(refused.code == EMSGSIZE);
  CHECK_THAT(refused.what, Catch::Contains("4097 bytes") && Catch::Contains("PIPE_BUF (4096 bytes)") &&
                               Catch::Contains("interleaved") && Catch::Contains("Split"));

  // Exactly PIPE_BUF is accepted, and it is the only thing in the FIFO.
  ipcoro::sync_wait(
      ctx, [&]() -> task<void> { co_await ipcoro::write_message(w, std::span(big).first(pipe_buf)); }());
  std::vector<std::byte> got(pipe_buf + 1);
  const std::size_t n =
      ipcoro::sync_wait(ctx, [&]() -> task<std::size_t> { co_return co_await server.read(got); }());
  CHECK(n == pipe_buf);
  CHECK(std::memcmp(got.data(), big.data(), pipe_buf) == 0);
  CHECK(ipcoro::sync_wait(ctx, failure_of([&]() -> task<std::size_t> {
                            co_return co_await server.read(got).with_timeout(30ms);
                          }()))
            .code == ETIMEDOUT);
}

TEST_CASE("write_message waits while the FIFO is full and then writes the whole message", "[fifo][atomic]") {
  temp_dir dir;
  ipcoro::fifo f(dir.at("full"));
  ipcoro::fifo_server_reader server = ipcoro::open_fifo_server_reader(f.path());
  ipcoro::io_context ctx;
  ipcoro::pipe_writer w = ipcoro::sync_wait(ctx, open_writer(f.path()));
  const std::size_t capacity = ipcoro::pipe_capacity(w.native_handle());
  const std::size_t messages = capacity / pipe_buf + 1;  // one more than fits

  std::size_t written = 0;
  std::size_t written_when_full = 0;
  std::size_t got = 0;
  std::vector<std::byte> all(messages * pipe_buf);
  ipcoro::sync_wait(ctx, ipcoro::when_all(
                             [&]() -> task<void> {
                               std::array<std::byte, pipe_buf> message{};
                               for (std::size_t i = 0; i < messages; ++i) {
                                 fill_pattern(message, 9, i * pipe_buf);
                                 co_await ipcoro::write_message(w, message).with_timeout(30s);
                                 ++written;
                               }
                             }(),
                             [&]() -> task<void> {
                               // Until the FIFO is full; the writer's last message then waits in the ring.
                               for (int queued = 0; static_cast<std::size_t>(queued) < capacity;) {
                                 co_await ipcoro::nop();
                                 REQUIRE(::ioctl(server.native_handle(), FIONREAD, &queued) == 0);
                               }
                               co_await ipcoro::nop();
                               written_when_full = written;
                               // Not inside CHECK: GCC 12 mishandles co_await within Catch's expression
                               // templates.
                               got = co_await server.read_exact(all).with_timeout(30s);
                             }()));
  CHECK(written_when_full == messages - 1);
  CHECK(written == messages);
  CHECK(got == all.size());
  CHECK(matches_pattern(all, 9, 0));
}

TEST_CASE("write_message throws EPIPE once no process has the FIFO open for reading", "[fifo]") {
  temp_dir dir;
  ipcoro::fifo f(dir.at("epipe"));
  ipcoro::fifo_server_reader server = ipcoro::open_fifo_server_reader(f.path());
  ipcoro::io_context ctx;
  ipcoro::pipe_writer w = ipcoro::sync_wait(ctx, open_writer(f.path()));
  server.close();
  const failure e = ipcoro::sync_wait(ctx, failure_of([&]() -> task<void> {
                                        co_await ipcoro::write_message(w, as_bytes("nobody reads this"));
                                      }()));
  CHECK(e.code == EPIPE);
  CHECK_THAT(e.what, Catch::Contains("open for reading"));
}

// ---- dead peers ----

TEST_CASE("a writer killed mid-stream leaves the reader with end of stream, not a hang",
          "[fifo][fork][death]") {
  temp_dir dir;
  ipcoro::fifo f(dir.at("killed-writer"));
  constexpr std::size_t record = 1000;
  child_process writer = fork_with_loop([&]() -> task<int> {
    ipcoro::pipe_writer w = co_await open_writer(f.path());
    std::array<std::byte, record> buf{};
    for (std::uint64_t i = 0;; ++i) {  // until killed
      fill_pattern(buf, 21, i * record);
      co_await ipcoro::write_message(w, buf);
    }
  });

  ipcoro::io_context ctx;
  std::uint64_t records = 0;
  bool intact = true;
  bool torn = false;
  bool ended = false;
  ipcoro::sync_wait(ctx, [&]() -> task<void> {
    ipcoro::pipe_reader r = co_await open_reader(f.path());
    std::array<std::byte, record> buf{};
    for (;;) {
      if (records == 50) writer.kill(SIGKILL);  // mid-stream: the writer is still writing
      std::size_t n = 0;
      try {
        n = co_await r.read_exact(buf).with_timeout(30s);
      } catch (const ipcoro::timed_out&) {
        co_return;  // a hang: `ended` stays false
      }
      if (n == 0) {
        ended = true;
        co_return;
      }
      if (n != record) {
        torn = true;
        co_return;
      }
      intact = intact && matches_pattern(buf, 21, records * record);
      ++records;
    }
  }());
  CHECK(ended);
  CHECK_FALSE(torn);  // a killed writer never leaves half a message behind
  CHECK(intact);
  CHECK(records >= 50);
  CHECK(writer.wait(30s) == 128 + SIGKILL);
}

TEST_CASE("a writer whose reader was killed gets EPIPE, not a hang or SIGPIPE", "[fifo][fork][death]") {
  temp_dir dir;
  ipcoro::fifo f(dir.at("killed-reader"));
  auto [ready_r, ready_w] = ipcoro::make_pipe();
  auto [never_r, never_w] = ipcoro::make_pipe();
  child_process reader = fork_with_loop([&]() -> task<int> {
    ready_r.close();
    ipcoro::pipe_reader r = co_await open_reader(f.path());
    std::array<std::byte, 5> hello{};
    if (co_await r.read_exact(hello) != hello.size()) co_return 2;
    signal_byte(ready_w);
    std::array<std::byte, 1> b{};
    (void)co_await never_r.read(b);  // never written: waits until killed
    co_return 3;
  });
  ready_w.close();
  never_r.close();

  ipcoro::io_context ctx;
  ipcoro::pipe_writer w = ipcoro::sync_wait(ctx, open_writer(f.path()));
  ipcoro::sync_wait(ctx, [&]() -> task<void> { co_await ipcoro::write_message(w, as_bytes("hello")); }());
  REQUIRE(ipcoro::sync_wait(ctx, await_bytes(ready_r, 1)));
  reader.kill(SIGKILL);
  REQUIRE(reader.wait(30s) == 128 + SIGKILL);
  const failure e =
      ipcoro::sync_wait(ctx, failure_of([&]() -> task<void> {
                          co_await ipcoro::write_message(w, as_bytes("anyone?")).with_timeout(30s);
                        }()));
  CHECK(e.code == EPIPE);
}

// ---- opens that nobody answers ----

TEST_CASE("opening a FIFO that nobody opens from the other side can be timed out", "[fifo][timeout]") {
  temp_dir dir;
  ipcoro::fifo f(dir.at("lonely"));
  ipcoro::io_context ctx;
  const auto t0 = std::chrono::steady_clock::now();
  CHECK(ipcoro::sync_wait(ctx, failure_of(open_reader(f.path(), 30ms))).code == ETIMEDOUT);
  CHECK(ipcoro::sync_wait(ctx, failure_of(open_writer(f.path(), 30ms))).code == ETIMEDOUT);
  CHECK(ipcoro::sync_wait(ctx, failure_of(ipcoro::open_fifo_duplex(f.path(), dir.at("missing-too"), 30ms)))
            .code == ENOENT);
  ipcoro::fifo other(dir.at("lonely-too"));
  CHECK(ipcoro::sync_wait(ctx, failure_of(ipcoro::open_fifo_duplex(f.path(), other.path(), 30ms))).code ==
        ETIMEDOUT);
  CHECK(std::chrono::steady_clock::now() - t0 >= 90ms);

  // The abandoned opens left no reader or writer behind in the kernel.
  errno = 0;
  CHECK(::open(f.path().c_str(), O_WRONLY | O_NONBLOCK | O_CLOEXEC) == -1);
  CHECK(errno == ENXIO);
  ipcoro::unique_fd probe{::open(f.path().c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC)};
  REQUIRE(probe);
  char c = 0;
  CHECK(::read(probe.get(), &c, 1) == 0);  // 0, not EAGAIN: no writer
}

TEST_CASE("opening a FIFO that nobody opens from the other side can be cancelled", "[fifo][cancel]") {
  temp_dir dir;
  ipcoro::fifo f(dir.at("cancelled"));
  ipcoro::io_context ctx;
  auto open_and_drop = [](std::string path, bool for_writing) -> task<void> {
    if (for_writing) {
      (void)co_await ipcoro::open_fifo_writer(std::move(path));
    } else {
      (void)co_await ipcoro::open_fifo_reader(std::move(path));
    }
  };
  for (bool for_writing : {false, true}) {
    INFO((for_writing ? "writer" : "reader"));
    std::stop_source source;
    auto [result, unit] = ipcoro::sync_wait(
        ctx,
        ipcoro::when_all(failure_of(open_and_drop(f.path(), for_writing)).with_stop_token(source.get_token()),
                         [&]() -> task<void> {
                           co_await ipcoro::nop();  // the open has been submitted by now
                           source.request_stop();
                         }()));
    (void)unit;
    CHECK(result.code == ECANCELED);
  }
  errno = 0;
  CHECK(::open(f.path().c_str(), O_WRONLY | O_NONBLOCK | O_CLOEXEC) == -1);
  CHECK(errno == ENXIO);
  ipcoro::unique_fd probe{::open(f.path().c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC)};
  REQUIRE(probe);
  char c = 0;
  CHECK(::read(probe.get(), &c, 1) == 0);
  // Closed before the writer starts: its open must wait for the real reader below.
  probe.reset();

  // The FIFO still works for a real peer afterwards.
  child_process writer = fork_with_loop([&]() -> task<int> {
    ipcoro::pipe_writer w = co_await open_writer(f.path());
    co_await ipcoro::write_message(w, as_bytes("late"));
    co_return 0;
  });
  const std::string got = ipcoro::sync_wait(ctx, [&]() -> task<std::string> {
    ipcoro::pipe_reader r = co_await open_reader(f.path());
    std::array<std::byte, 8> buf{};
    const std::size_t n = co_await r.read_exact(buf);
    co_return as_string(std::span(buf).first(n));
  }());
  CHECK(got == "late");
  CHECK(writer.wait(30s) == 0);
}

// ---- clear errors ----

TEST_CASE("a path that exists but is not a FIFO is refused with EINVAL naming the path and what it is",
          "[fifo][errors]") {
  temp_dir dir;
  const std::string file = dir.at("file");
  const std::string subdir = dir.at("subdir");
  const std::string socket_path = dir.at("socket");
  touch(file);
  REQUIRE(::mkdir(subdir.c_str(), 0700) == 0);
  ipcoro::unique_fd sock{::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0)};
  ::sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::strncpy(addr.sun_path, socket_path.c_str(), sizeof addr.sun_path - 1);
  REQUIRE(::bind(sock.get(), reinterpret_cast<const ::sockaddr*>(&addr), sizeof addr) == 0);

  ipcoro::io_context ctx;
  for (auto [path, kind] : {std::pair{file, "regular file"},
                            {subdir, "directory"},
                            {socket_path, "socket"},
                            {std::string("/dev/null"), "character device"}}) {
    INFO(path);
    const failure r = ipcoro::sync_wait(ctx, failure_of(open_reader(path)));
    const failure w = ipcoro::sync_wait(ctx, failure_of(open_writer(path)));
    const failure s = failure_of_call([&] { (void)ipcoro::open_fifo_server_reader(path); });
    for (const failure& e : {r, w, s}) {
      CHECK(e.code == EINVAL);
      CHECK_THAT(e.what, Catch::Contains(path) && Catch::Contains(kind) && Catch::Contains("not a FIFO"));
    }
  }
  CHECK(S_ISREG(stat_of(file).st_mode));
}

TEST_CASE("a missing directory and a missing FIFO are told apart", "[fifo][errors]") {
  temp_dir dir;
  const std::string in_missing_dir = dir.at("no-such-dir") + "/fifo";
  const std::string missing_fifo = dir.at("no-such-fifo");
  ipcoro::io_context ctx;

  const failure create = failure_of_call([&] { ipcoro::fifo f(in_missing_dir); });
  CHECK(create.code == ENOENT);
  CHECK_THAT(create.what, Catch::Contains("directory " + dir.at("no-such-dir") + " does not exist"));

  for (const std::string& path : {in_missing_dir, missing_fifo}) {
    const bool dir_missing = path == in_missing_dir;
    const std::string expected = dir_missing ? "does not exist" : "there is no FIFO there";
    for (const failure& e : {ipcoro::sync_wait(ctx, failure_of(open_reader(path))),
                             ipcoro::sync_wait(ctx, failure_of(open_writer(path))),
                             failure_of_call([&] { (void)ipcoro::open_fifo_server_reader(path); })}) {
      INFO(e.what);
      CHECK(e.code == ENOENT);
      CHECK_THAT(e.what, Catch::Contains(path) && Catch::Contains(expected));
    }
  }
  CHECK(dir.entries() == 0);
}

TEST_CASE("permission denied names the FIFO's mode and owner and the user that was refused",
          "[fifo][errors][root]") {
  if (::geteuid() != 0)
    IPCORO_SKIP("not running as root: cannot create a FIFO owned by another user to be refused");
  temp_dir dir(0755);                   // nobody may search it, not write to it
  ipcoro::fifo f(dir.at("root-only"));  // mode 0600, owned by root
  const std::string closed_dir = dir.at("closed");
  REQUIRE(::mkdir(closed_dir.c_str(), 0700) == 0);
  const std::string behind_closed_dir = closed_dir + "/fifo";
  REQUIRE(::mkfifo(behind_closed_dir.c_str(), 0666) == 0);

  child_process nobody([&] {
    if (::setgroups(0, nullptr) != 0 || ::setgid(65534) != 0 || ::setuid(65534) != 0) return 90;
    ipcoro::io_context ctx;
    int problems = 0;
    auto expect = [&](const failure& e, std::initializer_list<std::string_view> parts) {
      bool ok = e.code == EACCES;
      for (std::string_view part : parts) ok = ok && e.what.find(part) != std::string::npos;
      if (!ok) {
        std::fprintf(stderr, "unexpected: code %d, \"%s\"\n", e.code, e.what.c_str());
        ++problems;
      }
    };
    for (const failure& e : {ipcoro::sync_wait(ctx, failure_of(open_reader(f.path()))),
                             ipcoro::sync_wait(ctx, failure_of(open_writer(f.path()))),
                             failure_of_call([&] { (void)ipcoro::open_fifo_server_reader(f.path()); })}) {
      expect(e, {f.path(), "mode 0600", "uid 0", "uid 65534"});
    }
    expect(failure_of_call([&] { ipcoro::fifo mine(dir.at("mine")); }),
           {dir.at("mine"), "may not create files in directory", "uid 65534"});
    expect(ipcoro::sync_wait(ctx, failure_of(open_writer(behind_closed_dir))),
           {behind_closed_dir, "cannot be searched"});
    return problems;
  });
  CHECK(nobody.wait(30s) == 0);
  REQUIRE(::unlink(behind_closed_dir.c_str()) == 0);
}

TEST_CASE("a name too long is refused with ENAMETOOLONG naming the limit", "[fifo][errors]") {
  temp_dir dir;
  const std::string long_name = dir.at(std::string(300, 'n'));
  std::string long_path = dir.path().string();
  while (long_path.size() < 5000) long_path += "/d";
  ipcoro::io_context ctx;

  for (auto [path, limit] : {std::pair{long_name, "NAME_MAX"}, {long_path, "PATH_MAX"}}) {
    INFO(limit);
    for (const failure& e : {failure_of_call([&] { ipcoro::fifo f(path); }),
                             ipcoro::sync_wait(ctx, failure_of(open_reader(path))),
                             ipcoro::sync_wait(ctx, failure_of(open_writer(path))),
                             failure_of_call([&] { (void)ipcoro::open_fifo_server_reader(path); })}) {
      INFO(e.what);
      CHECK(e.code == ENAMETOOLONG);
      CHECK_THAT(e.what, Catch::Contains(limit));
    }
  }
  CHECK_THAT(failure_of_call([&] { ipcoro::fifo f(long_name); }).what, Catch::Contains("300 bytes"));
  CHECK(dir.entries() == 0);
}

// ---- steady state ----

TEST_CASE("steady-state message writes and reads on a FIFO allocate nothing", "[fifo][alloc]") {
  temp_dir dir;
  ipcoro::fifo f(dir.at("alloc"));
  ipcoro::fifo_server_reader server = ipcoro::open_fifo_server_reader(f.path());
  ipcoro::io_context ctx;
  ipcoro::pipe_writer w = ipcoro::sync_wait(ctx, open_writer(f.path()));
  constexpr int warm_up = 64;
  constexpr int messages = 2000;
  std::uint64_t before = 0;
  std::uint64_t after = 0;
  bool intact = true;
  // The FIFO fills up, so the writer also waits in the ring, not only on the cheap path.
  ipcoro::sync_wait(ctx, ipcoro::when_all(
                             [&]() -> task<void> {
                               std::array<std::byte, 3000> message{};
                               for (int i = 0; i < messages; ++i) {
                                 if (i == warm_up) before = ipcoro::test::allocations();
                                 message[0] = static_cast<std::byte>(i);
                                 co_await ipcoro::write_message(w, message).with_timeout(30s);
                               }
                             }(),
                             [&]() -> task<void> {
                               std::array<std::byte, 3000> message{};
                               for (int i = 0; i < messages; ++i) {
                                 const std::size_t n = co_await server.read_exact(message);
                                 intact =
                                     intact && n == message.size() && message[0] == static_cast<std::byte>(i);
                               }
                               after = ipcoro::test::allocations();
                             }()));
  CHECK(intact);
  CHECK(before != 0);
  CHECK(after - before == 0);
}

// Last, so that it sees what every test before it may have left behind.
TEST_CASE("nothing this program created is left in the temp directory", "[fifo]") {
  const std::string prefix = "ipcoro-test-" + std::to_string(::getpid()) + "-";
  std::vector<std::string> left;
  for (const auto& e : std::filesystem::directory_iterator(std::filesystem::temp_directory_path())) {
    const std::string name = e.path().filename().string();
    if (name.rfind(prefix, 0) == 0) left.push_back(name);
  }
  INFO("left behind: " << left.size());
  CHECK(left.empty());
}
