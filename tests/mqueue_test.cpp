// SPDX-License-Identifier: MIT
// POSIX message queues across real processes: attributes, priorities, cancellation, full
// queues, 100,000 messages among 8 processes, labelled messages, every limit error, no leftovers.
#include "ipcoro/mqueue.hpp"
#include "ipcoro/error.hpp"
#include "ipcoro/event.hpp"
#include "ipcoro/io_context.hpp"
#include "ipcoro/pipe.hpp"
#include "ipcoro/sync_wait.hpp"
#include "ipcoro/task.hpp"
#include "ipcoro/timer.hpp"
#include "ipcoro/when_all.hpp"

#include "process.hpp"

#include <catch2/catch.hpp>

#include <dirent.h>
#include <fcntl.h>
#include <linux/capability.h>
#include <mqueue.h>
#include <poll.h>
#include <sched.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
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
#include <map>
#include <new>
#include <optional>
#include <span>
#include <stop_token>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>
#include <vector>

// ---- allocation counting, for the allocation test ----

#include "counting_new.hpp"
#include "skip.hpp"

namespace {

using namespace std::chrono_literals;
using ipcoro::message_queue;
using ipcoro::mq_access;
using ipcoro::mq_attributes;
using ipcoro::mq_demux;
using ipcoro::mq_message;
using ipcoro::mq_open_options;
using ipcoro::task;
using ipcoro::test::child_process;
using ipcoro::test::fill_pattern;

// Not `"/" + name`: GCC 12 at -O3 warns about it with a false -Wrestrict (GCC bug 105651).
std::string queue_name(const std::string& tag) {
  std::string name = "/";
  name += ipcoro::test::unique_name(tag);
  return name;
}

/// Unlinks the queue even when the test fails halfway.
struct unlink_guard {
  std::string name;
  explicit unlink_guard(std::string n) : name(std::move(n)) {}
  unlink_guard(const unlink_guard&) = delete;
  unlink_guard& operator=(const unlink_guard&) = delete;
  ~unlink_guard() { ::mq_unlink(name.c_str()); }
};

/// Whether a queue of that name exists, by opening it (the mqueue file system is not
/// mounted on every machine).
bool queue_exists(const std::string& name) {
  const mqd_t q = ::mq_open(name.c_str(), O_RDONLY);
  if (q != static_cast<mqd_t>(-1)) {
    ::mq_close(q);
    return true;
  }
  if (errno != ENOENT) throw std::system_error(errno, std::system_category(), "mq_open " + name);
  return false;
}

long proc_value(const char* path) {
  std::FILE* f = std::fopen(path, "re");
  if (f == nullptr) throw std::runtime_error(std::string("cannot read ") + path);
  long v = -1;
  const int n = std::fscanf(f, "%ld", &v);
  std::fclose(f);
  if (n != 1) throw std::runtime_error(std::string("cannot parse ") + path);
  return v;
}

struct caught {
  int code = 0;
  std::string what;
};

/// Runs `f` and returns the std::system_error it threw (code 0 when it threw none).
template <class F>
caught error_of(F&& f) {
  try {
    f();
  } catch (const std::system_error& e) {
    return {e.code().value(), e.what()};
  }
  return {};
}

template <class T>
std::span<const std::byte> bytes_of(const T& v) noexcept {
  return std::as_bytes(std::span(&v, 1));
}

template <class T>
T read_as(std::span<const std::byte> b) noexcept {
  T v{};
  std::memcpy(&v, b.data(), std::min(sizeof v, b.size()));
  return v;
}

mq_open_options opening(mq_access access) {
  mq_open_options o;
  o.access = access;
  return o;
}

/// Blocks until one byte arrives on `fd`, or `timeout_ms` passes (returns false).
bool wait_byte(int fd, int timeout_ms) {
  ::pollfd p{fd, POLLIN, 0};
  int rc;
  do {
    rc = ::poll(&p, 1, timeout_ms);
  } while (rc < 0 && errno == EINTR);
  if (rc != 1) return false;
  char c;
  return ::read(fd, &c, 1) == 1;
}

void put_byte(int fd) {
  const char c = 1;
  while (::write(fd, &c, 1) < 0 && errno == EINTR) {
  }
}

// ---- opening, attributes, names ----

TEST_CASE("a queue is created with the asked attributes, mode 0600 and a non-blocking descriptor",
          "[mqueue]") {
  const std::string name = queue_name("attrs");
  unlink_guard guard{name};
  auto q = message_queue::create(name, {4, 128});
  REQUIRE(q.owns_name());
  CHECK(q.attributes().max_messages == 4);
  CHECK(q.attributes().message_size == 128);
  struct stat st {};
  REQUIRE(::fstat(q.native_handle(), &st) == 0);
  CHECK((st.st_mode & 0777) == 0600);
  ::mq_attr a{};
  REQUIRE(::mq_getattr(q.native_handle(), &a) == 0);
  CHECK((a.mq_flags & O_NONBLOCK) != 0);
  CHECK((::fcntl(q.native_handle(), F_GETFD) & FD_CLOEXEC) != 0);
  CHECK(q.current_messages() == 0);

  // Another process opens it by name and sees the same attributes; it does not own the name.
  child_process child([&] {
    auto r = message_queue::open(name, opening(mq_access::read_only));
    return r.attributes().max_messages == 4 && r.attributes().message_size == 128 && !r.owns_name() ? 0 : 1;
  });
  REQUIRE(child.wait(30s) == 0);

  // Creating it again fails and says what to do.
  const caught again = error_of([&] { (void)message_queue::create(name, {4, 128}); });
  CHECK(again.code == EEXIST);
  CHECK_THAT(again.what, Catch::Contains(name) && Catch::Contains("unlink"));
}

TEST_CASE("a queue created with no attributes gets msg_default and msgsize_default", "[mqueue]") {
  const std::string name = queue_name("defaults");
  unlink_guard guard{name};
  auto q = message_queue::create(name);
  CHECK(q.attributes().max_messages == proc_value("/proc/sys/fs/mqueue/msg_default"));
  CHECK(q.attributes().message_size == proc_value("/proc/sys/fs/mqueue/msgsize_default"));
  // One attribute given: the other takes its default.
  const std::string name2 = queue_name("half");
  unlink_guard guard2{name2};
  auto q2 = message_queue::create(name2, {3, 0});
  CHECK(q2.attributes().max_messages == 3);
  CHECK(q2.attributes().message_size == proc_value("/proc/sys/fs/mqueue/msgsize_default"));
}

TEST_CASE(
    "the creator unlinks its queue on destruction, unlink removes a name, open of a missing queue says so",
    "[mqueue]") {
  const std::string name = queue_name("owner");
  unlink_guard guard{name};
  {
    auto q = message_queue::create(name, {2, 16});
    REQUIRE(queue_exists(name));
    // A forked child that destroys its copy of the owner leaves the parent's queue alone.
    child_process child([&] {
      message_queue copy = std::move(q);
      copy.close();
      return 0;
    });
    REQUIRE(child.wait(30s) == 0);
    REQUIRE(queue_exists(name));
  }
  CHECK_FALSE(queue_exists(name));

  {
    auto q = message_queue::create(name, {2, 16});
    q.release_name();
  }
  REQUIRE(queue_exists(name));
  auto opened = message_queue::open(name);
  CHECK_FALSE(opened.owns_name());
  CHECK(message_queue::unlink(name));
  CHECK_FALSE(queue_exists(name));
  CHECK_FALSE(message_queue::unlink(name));

  const caught missing = error_of([&] { (void)message_queue::open(name); });
  CHECK(missing.code == ENOENT);
  CHECK_THAT(missing.what, Catch::Contains(name) && Catch::Contains("does not exist"));

  // open with `create` makes the queue (and does not own it).
  mq_open_options o;
  o.create = true;
  o.attributes = {3, 32};
  auto made = message_queue::open(name, o);
  CHECK(made.attributes().max_messages == 3);
  CHECK_FALSE(made.owns_name());
  CHECK(queue_exists(name));
  CHECK(message_queue::unlink(name));
}

TEST_CASE("bad names are refused with the rule they break", "[mqueue][limits]") {
  struct bad_name {
    std::string name;
    int code;
    const char* rule;
  };
  const std::vector<bad_name> cases = {
      {"jobs", EINVAL, "must start with '/'"},
      {"", EINVAL, "must start with '/'"},
      {"/", EINVAL, "needs a name after the '/'"},
      {"/jobs/urgent", EINVAL, "no '/' after the first character"},
      {"/..", EINVAL, "not queue names"},
      {"/" + std::string(256, 'x'), ENAMETOOLONG, "NAME_MAX (255)"},
  };
  for (const bad_name& c : cases) {
    INFO("name: " << c.name);
    const caught created = error_of([&] { (void)message_queue::create(c.name); });
    CHECK(created.code == c.code);
    CHECK_THAT(created.what, Catch::Contains(c.rule));
    const caught unlinked = error_of([&] { (void)message_queue::unlink(c.name); });
    CHECK(unlinked.code == c.code);
  }
  // The longest allowed name works.
  std::string longest = queue_name("long");
  longest.resize(256, 'y');
  unlink_guard guard{longest};
  {
    auto q = message_queue::create(longest, {1, 8});
    CHECK(queue_exists(longest));
  }
  CHECK_FALSE(queue_exists(longest));
}

TEST_CASE(
    "attributes above /proc/sys/fs/mqueue/msg_max or msgsize_max are refused, naming the file and value",
    "[mqueue][limits]") {
  const long msg_max = proc_value("/proc/sys/fs/mqueue/msg_max");
  const long msgsize_max = proc_value("/proc/sys/fs/mqueue/msgsize_max");
  const std::string name = queue_name("attrlimit");
  unlink_guard guard{name};

  const caught too_many = error_of([&] { (void)message_queue::create(name, {msg_max + 1, 16}); });
  CHECK(too_many.code == EINVAL);
  CHECK_THAT(too_many.what,
             Catch::Contains("/proc/sys/fs/mqueue/msg_max (" + std::to_string(msg_max) + ")") &&
                 Catch::Contains("max_messages " + std::to_string(msg_max + 1)));

  const caught too_big = error_of([&] { (void)message_queue::create(name, {1, msgsize_max + 1}); });
  CHECK(too_big.code == EINVAL);
  CHECK_THAT(too_big.what,
             Catch::Contains("/proc/sys/fs/mqueue/msgsize_max (" + std::to_string(msgsize_max) + ")") &&
                 Catch::Contains("message_size " + std::to_string(msgsize_max + 1)));

  const caught negative = error_of([&] { (void)message_queue::create(name, {-1, 16}); });
  CHECK(negative.code == EINVAL);
  CHECK_THAT(negative.what, Catch::Contains("must be positive"));
  CHECK_FALSE(queue_exists(name));

  // Exactly at the limits is allowed.
  {
    auto q = message_queue::create(name, {msg_max, msgsize_max});
    CHECK(q.attributes().max_messages == msg_max);
    CHECK(q.attributes().message_size == msgsize_max);
  }
  CHECK_FALSE(queue_exists(name));
}

TEST_CASE("too many queues: RLIMIT_MSGQUEUE is named with its value and what to change", "[mqueue][limits]") {
  const std::string name = queue_name("rlimit");
  unlink_guard guard{name};
  child_process child([&] {
    const rlimit small{1000, 1000};
    if (::setrlimit(RLIMIT_MSGQUEUE, &small) != 0) return 2;
    const caught e = error_of([&] { (void)message_queue::create(name, {4, 1024}); });
    if (e.code != EMFILE) {
      std::fprintf(stderr, "expected EMFILE, got %d: %s\n", e.code, e.what.c_str());
      return 3;
    }
    const bool named = e.what.find("RLIMIT_MSGQUEUE (1000 bytes)") != std::string::npos &&
                       e.what.find("ulimit -q") != std::string::npos &&
                       e.what.find("4 x 1024") != std::string::npos;
    if (!named) std::fprintf(stderr, "message: %s\n", e.what.c_str());
    return named ? 0 : 4;
  });
  REQUIRE(child.wait(30s) == 0);
  CHECK_FALSE(queue_exists(name));
}

/// Drops CAP_SYS_RESOURCE from the effective set, so the kernel enforces queues_max.
bool drop_sys_resource() {
  __user_cap_header_struct header{_LINUX_CAPABILITY_VERSION_3, 0};
  __user_cap_data_struct data[2]{};
  if (::syscall(SYS_capget, &header, data) != 0) return false;
  data[CAP_TO_INDEX(CAP_SYS_RESOURCE)].effective &= ~CAP_TO_MASK(CAP_SYS_RESOURCE);
  return ::syscall(SYS_capset, &header, data) == 0;
}

TEST_CASE("too many queues: queues_max is named with its value, in a private IPC namespace",
          "[mqueue][limits]") {
  // The namespace keeps the change to queues_max (and the queues) away from the rest of
  // the machine; it disappears with the child.
  child_process child([&] {
    if (::unshare(CLONE_NEWIPC) != 0) return 77;
    std::FILE* f = std::fopen("/proc/sys/fs/mqueue/queues_max", "we");
    if (f == nullptr) return 77;
    std::fputs("1\n", f);
    if (std::fclose(f) != 0) return 77;
    if (!drop_sys_resource()) return 2;
    auto first = message_queue::create("/ipcoro-test-first", {1, 8});
    const caught e = error_of([&] { (void)message_queue::create("/ipcoro-test-second", {1, 8}); });
    if (e.code != ENOSPC) {
      std::fprintf(stderr, "expected ENOSPC, got %d: %s\n", e.code, e.what.c_str());
      return 3;
    }
    const bool named = e.what.find("/proc/sys/fs/mqueue/queues_max allows 1") != std::string::npos;
    if (!named) std::fprintf(stderr, "message: %s\n", e.what.c_str());
    return named ? 0 : 4;
  });
  const int code = child.wait(30s);
  if (code == 77) IPCORO_SKIP("cannot create an IPC namespace or write queues_max here");
  REQUIRE(code == 0);
}

// ---- send and receive ----

TEST_CASE("messages keep their boundaries and come out by priority, oldest first within one", "[mqueue]") {
  struct sent {
    unsigned priority;
    std::size_t size;
  };
  const std::vector<sent> script = {{0, 0}, {5, 100}, {0, 128}, {5, 1}, {31, 64}, {0, 7}, {5, 33}, {1, 128}};
  const std::string name = queue_name("prio");
  unlink_guard guard{name};
  ipcoro::io_context ctx;
  auto q = message_queue::create(name, {static_cast<long>(script.size()), 128});

  child_process child([&] {
    ipcoro::io_context child_ctx;
    auto w = message_queue::open(name, opening(mq_access::write_only));
    ipcoro::sync_wait(child_ctx, [&]() -> task<void> {
      std::array<std::byte, 128> buf{};
      for (std::size_t i = 0; i < script.size(); ++i) {
        fill_pattern(std::span(buf).first(script[i].size), i, 0);
        co_await w.send(std::span(buf).first(script[i].size), script[i].priority);
      }
    }());
    return 0;
  });
  REQUIRE(child.wait(30s) == 0);
  REQUIRE(q.current_messages() == static_cast<long>(script.size()));

  std::vector<std::size_t> expected(script.size());
  for (std::size_t i = 0; i < expected.size(); ++i) expected[i] = i;
  std::stable_sort(expected.begin(), expected.end(),
                   [&](std::size_t a, std::size_t b) { return script[a].priority > script[b].priority; });

  std::vector<mq_message> got;
  std::vector<std::vector<std::byte>> bodies;
  bool drained_times_out = false;
  ipcoro::sync_wait(ctx, [&]() -> task<void> {
    std::array<std::byte, 128> buf{};
    for (std::size_t i = 0; i < script.size(); ++i) {
      const mq_message m = co_await q.receive(buf).with_timeout(10s);
      got.push_back(m);
      bodies.emplace_back(buf.begin(), buf.begin() + static_cast<std::ptrdiff_t>(m.size));
    }
    try {
      (void)co_await q.receive(buf).with_timeout(20ms);
    } catch (const ipcoro::timed_out&) {
      drained_times_out = true;
    }
  }());
  REQUIRE(got.size() == script.size());
  for (std::size_t k = 0; k < got.size(); ++k) {
    const std::size_t i = expected[k];
    INFO("position " << k << ", sent as message " << i);
    CHECK(got[k].priority == script[i].priority);
    REQUIRE(got[k].size == script[i].size);
    std::vector<std::byte> want(script[i].size);
    fill_pattern(want, i, 0);
    CHECK(bodies[k] == want);
  }
  CHECK(drained_times_out);
}

TEST_CASE("send and receive end with timed_out when nothing comes or there is no room, changing nothing",
          "[mqueue]") {
  const std::string name = queue_name("timeout");
  unlink_guard guard{name};
  ipcoro::io_context ctx;
  auto q = message_queue::create(name, {2, 16});
  int timeouts = 0;
  std::vector<std::uint32_t> order;
  ipcoro::sync_wait(ctx, [&]() -> task<void> {
    std::array<std::byte, 16> buf{};
    const auto start = std::chrono::steady_clock::now();
    try {
      (void)co_await q.receive(buf).with_timeout(30ms);
    } catch (const ipcoro::timed_out&) {
      ++timeouts;
    }
    if (std::chrono::steady_clock::now() - start < 25ms) co_return;
    for (std::uint32_t i = 0; i < 2; ++i) co_await q.send(bytes_of(i));
    const std::uint32_t third = 3;
    try {
      co_await q.send(bytes_of(third)).with_timeout(30ms);
    } catch (const ipcoro::timed_out&) {
      ++timeouts;
    }
    if (q.current_messages() != 2) co_return;
    for (int i = 0; i < 2; ++i) {
      const mq_message m = co_await q.receive(buf).with_timeout(5s);
      order.push_back(read_as<std::uint32_t>(std::span(buf).first(m.size)));
    }
  }());
  CHECK(timeouts == 2);
  CHECK(order == std::vector<std::uint32_t>{0, 1});
  CHECK(q.current_messages() == 0);
}

TEST_CASE(
    "a receiver in another process cancelled while waiting takes nothing; another receiver gets the message",
    "[mqueue][fork]") {
  const std::string name = queue_name("cancel");
  unlink_guard guard{name};
  ipcoro::io_context ctx;
  auto q = message_queue::create(name, {4, 32});
  auto ready = ipcoro::make_pipe();
  auto go = ipcoro::make_pipe();

  // Exit codes: 0 cancelled as expected, 1 received something, 2 other error.
  child_process cancelled([&] {
    ipcoro::io_context child_ctx;
    auto r = message_queue::open(name, opening(mq_access::read_only));
    std::stop_source stop;
    int outcome = 2;
    auto receiver = [&]() -> task<void> {
      std::array<std::byte, 32> buf{};
      try {
        (void)co_await r.receive(buf);
        outcome = 1;
      } catch (const ipcoro::operation_cancelled&) {
        outcome = 0;
      }
    };
    auto canceller = [&]() -> task<void> {
      // The receiver task ran first and is parked in the ring by now.
      const std::byte b{1};
      co_await ready.writer.write_all(std::span(&b, 1));
      std::byte got{};
      if (co_await go.reader.read_exact(std::span(&got, 1)).with_timeout(30s) == 1) stop.request_stop();
    };
    ipcoro::sync_wait(child_ctx, [&]() -> task<void> {
      co_await ipcoro::when_all(receiver().with_stop_token(stop.get_token()), canceller());
    }());
    return outcome;
  });
  child_process patient([&] {
    ipcoro::io_context child_ctx;
    auto r = message_queue::open(name, opening(mq_access::read_only));
    std::uint64_t value = 0;
    auto receiver = [&]() -> task<void> {
      std::array<std::byte, 32> buf{};
      const mq_message m = co_await r.receive(buf).with_timeout(30s);
      if (m.size == sizeof value) value = read_as<std::uint64_t>(buf);
    };
    auto announce = [&]() -> task<void> {
      const std::byte b{2};
      co_await ready.writer.write_all(std::span(&b, 1));
    };
    ipcoro::sync_wait(child_ctx,
                      [&]() -> task<void> { co_await ipcoro::when_all(receiver(), announce()); }());
    return value == 0x5eed ? 0 : 1;
  });
  ready.writer.close();
  go.reader.close();

  REQUIRE(wait_byte(ready.reader.native_handle(), 30'000));
  REQUIRE(wait_byte(ready.reader.native_handle(), 30'000));
  put_byte(go.writer.native_handle());
  REQUIRE(cancelled.wait(30s) == 0);
  const std::uint64_t value = 0x5eed;
  ipcoro::sync_wait(ctx, [&]() -> task<void> { co_await q.send(bytes_of(value)); }());
  REQUIRE(patient.wait(30s) == 0);
  CHECK(q.current_messages() == 0);
}

TEST_CASE("a full queue holds back its senders in other processes until there is room", "[mqueue][fork]") {
  constexpr long capacity = 3;
  constexpr std::uint32_t senders = 3;
  constexpr std::uint32_t per_sender = 4;
  constexpr std::uint32_t total = senders * per_sender;
  const std::string name = queue_name("full");
  unlink_guard guard{name};
  ipcoro::io_context ctx;
  auto q = message_queue::create(name, {capacity, 16});
  auto sent = ipcoro::make_pipe();  // one byte per completed send

  std::vector<child_process> children;
  for (std::uint32_t s = 0; s < senders; ++s) {
    children.emplace_back([&, s] {
      sent.reader.close();
      ipcoro::io_context child_ctx;
      auto w = message_queue::open(name, opening(mq_access::write_only));
      ipcoro::sync_wait(child_ctx, [&]() -> task<void> {
        for (std::uint32_t i = 0; i < per_sender; ++i) {
          const std::array<std::uint32_t, 2> m{s, i};
          co_await w.send(std::as_bytes(std::span(m))).with_timeout(60s);
          const std::byte b{1};
          co_await sent.writer.write_all(std::span(&b, 1));
        }
      }());
      return 0;
    });
  }
  sent.writer.close();

  std::map<std::pair<std::uint32_t, std::uint32_t>, int> seen;
  bool held_back = false;
  bool full_after_each = true;
  ipcoro::sync_wait(ctx, [&]() -> task<void> {
    std::array<std::byte, 16> buf{};
    std::byte token{};
    // The queue fills up: exactly `capacity` sends complete...
    for (long i = 0; i < capacity; ++i) {
      if (co_await sent.reader.read_exact(std::span(&token, 1)).with_timeout(30s) != 1) co_return;
    }
    // ...and then no sender gets through while nobody receives (a timer, not a guess: any
    // completed send would have written its byte by now or later, and none may come).
    try {
      (void)co_await sent.reader.read_exact(std::span(&token, 1)).with_timeout(200ms);
      co_return;
    } catch (const ipcoro::timed_out&) {
      held_back = q.current_messages() == capacity;
    }
    for (std::uint32_t received = 0; received < total; ++received) {
      const mq_message m = co_await q.receive(buf).with_timeout(30s);
      const auto pair = read_as<std::array<std::uint32_t, 2>>(std::span(buf).first(m.size));
      ++seen[{pair[0], pair[1]}];
      if (received < total - capacity) {
        // Each message taken lets exactly one waiting sender in.
        if (co_await sent.reader.read_exact(std::span(&token, 1)).with_timeout(30s) != 1) co_return;
        full_after_each = full_after_each && q.current_messages() == capacity;
      }
    }
  }());
  CHECK(held_back);
  CHECK(full_after_each);
  REQUIRE(seen.size() == total);
  for (const auto& [key, count] : seen) {
    CHECK(count == 1);
    CHECK(key.first < senders);
    CHECK(key.second < per_sender);
  }
  for (auto& c : children) CHECK(c.wait(30s) == 0);
  CHECK(q.current_messages() == 0);
}

TEST_CASE("100000 messages through one queue among 4 sending and 4 receiving processes arrive exactly once",
          "[mqueue][fork][stress]") {
  constexpr std::uint32_t senders = 4;
  constexpr std::uint32_t receivers = 4;
  constexpr std::uint32_t per_sender = 25'000;
  constexpr std::uint32_t total = senders * per_sender;
  constexpr std::uint32_t stop_mark = 0xffffffff;

  struct record {
    std::uint32_t sender;
    std::uint32_t seq;
    std::uint64_t check;
  };
  auto check_of = [](std::uint32_t sender, std::uint32_t seq) {
    return (std::uint64_t{sender} << 32 | seq) * 0x9e3779b97f4a7c15ull;
  };
  struct shared_counts {
    std::atomic<std::uint32_t> count[total];
    std::atomic<std::uint32_t> corrupt;
    std::atomic<std::uint32_t> out_of_order;
    std::atomic<std::uint32_t> per_receiver[receivers];
  };
  void* mem =
      ::mmap(nullptr, sizeof(shared_counts), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  REQUIRE(mem != MAP_FAILED);
  struct unmap {
    void* p;
    ~unmap() { ::munmap(p, sizeof(shared_counts)); }
  } unmap_guard{mem};
  auto* counts = new (mem) shared_counts{};

  const std::string name = queue_name("many");
  unlink_guard guard{name};
  ipcoro::io_context ctx;
  auto q = message_queue::create(name, {proc_value("/proc/sys/fs/mqueue/msg_max"), sizeof(record)});

  std::vector<child_process> receiving;
  for (std::uint32_t r = 0; r < receivers; ++r) {
    receiving.emplace_back([&, r] {
      ipcoro::io_context child_ctx;
      auto in = message_queue::open(name, opening(mq_access::read_only));
      ipcoro::sync_wait(child_ctx, [&]() -> task<void> {
        std::array<std::byte, sizeof(record)> buf{};
        // Last sequence number seen per (sender, priority): one priority of one sender is FIFO.
        std::array<std::array<std::int64_t, 4>, senders> last;
        for (auto& l : last) l.fill(-1);
        for (;;) {
          const mq_message m = co_await in.receive(buf).with_timeout(60s);
          const auto rec = read_as<record>(buf);
          if (m.size != sizeof(record)) {
            counts->corrupt.fetch_add(1);
            continue;
          }
          if (rec.sender == stop_mark) co_return;
          if (rec.sender >= senders || rec.seq >= per_sender || rec.check != check_of(rec.sender, rec.seq) ||
              m.priority != 1 + rec.seq % 3) {
            counts->corrupt.fetch_add(1);
            continue;
          }
          std::int64_t& prev = last[rec.sender][m.priority];
          if (static_cast<std::int64_t>(rec.seq) <= prev) counts->out_of_order.fetch_add(1);
          prev = rec.seq;
          counts->count[rec.sender * per_sender + rec.seq].fetch_add(1);
          counts->per_receiver[r].fetch_add(1);
        }
      }());
      return 0;
    });
  }
  std::vector<child_process> sending;
  for (std::uint32_t s = 0; s < senders; ++s) {
    sending.emplace_back([&, s] {
      ipcoro::io_context child_ctx;
      auto out = message_queue::open(name, opening(mq_access::write_only));
      ipcoro::sync_wait(child_ctx, [&]() -> task<void> {
        for (std::uint32_t i = 0; i < per_sender; ++i) {
          const record rec{s, i, check_of(s, i)};
          co_await out.send(bytes_of(rec), 1 + i % 3).with_timeout(60s);
        }
      }());
      return 0;
    });
  }
  for (auto& c : sending) REQUIRE(c.wait(120s) == 0);
  // Every data message has priority >= 1, so the stop marks (priority 0) come out only after
  // all of them; each receiver takes exactly one and ends.
  ipcoro::sync_wait(ctx, [&]() -> task<void> {
    for (std::uint32_t r = 0; r < receivers; ++r) {
      const record stop{stop_mark, r, 0};
      co_await q.send(bytes_of(stop), 0).with_timeout(60s);
    }
  }());
  for (auto& c : receiving) REQUIRE(c.wait(120s) == 0);

  CHECK(counts->corrupt.load() == 0);
  CHECK(counts->out_of_order.load() == 0);
  std::uint32_t missing = 0, duplicated = 0;
  for (std::uint32_t i = 0; i < total; ++i) {
    const std::uint32_t c = counts->count[i].load();
    if (c == 0) ++missing;
    if (c > 1) ++duplicated;
  }
  CHECK(missing == 0);
  CHECK(duplicated == 0);
  std::uint32_t sum = 0;
  for (std::uint32_t r = 0; r < receivers; ++r) sum += counts->per_receiver[r].load();
  CHECK(sum == total);
  CHECK(q.current_messages() == 0);
}

// ---- limit errors on send and receive ----

TEST_CASE("a message larger than the queue's message size is refused, naming both sizes; nothing is sent",
          "[mqueue][limits]") {
  const std::string name = queue_name("toolarge");
  unlink_guard guard{name};
  ipcoro::io_context ctx;
  auto q = message_queue::create(name, {2, 64});
  auto reader = message_queue::open(name, opening(mq_access::read_only));
  std::vector<caught> errors;
  ipcoro::sync_wait(ctx, [&]() -> task<void> {
    std::array<std::byte, 65> big{};
    auto record = [&](auto&& op) -> task<void> {
      try {
        co_await op();
        errors.push_back({});
      } catch (const std::system_error& e) {
        errors.push_back({e.code().value(), e.what()});
      }
    };
    co_await record([&]() -> task<void> { co_await q.send(big); });
    co_await record([&]() -> task<void> { co_await q.send_labelled(1, std::span(big).first(61)); });
    co_await record(
        [&]() -> task<void> { co_await q.send(std::span(big).first(8), ipcoro::mq_priority_max); });
    co_await record([&]() -> task<void> { co_await reader.send(std::span(big).first(8)); });
    co_await record([&]() -> task<void> { (void)co_await q.receive(std::span(big).first(63)); });
    // At the limit it works.
    co_await record([&]() -> task<void> { co_await q.send(std::span(big).first(64)); });
    co_await record([&]() -> task<void> { co_await q.send_labelled(1, std::span(big).first(60)); });
  }());
  REQUIRE(errors.size() == 7);
  CHECK(errors[0].code == EMSGSIZE);
  CHECK_THAT(errors[0].what, Catch::Contains("message of 65 bytes") && Catch::Contains("(64 bytes)") &&
                                 Catch::Contains("/proc/sys/fs/mqueue/msgsize_max") && Catch::Contains(name));
  CHECK(errors[1].code == EMSGSIZE);
  CHECK_THAT(errors[1].what, Catch::Contains("65 bytes (with its label header)"));
  CHECK(errors[2].code == EINVAL);
  CHECK_THAT(errors[2].what, Catch::Contains("MQ_PRIO_MAX (32768)"));
  CHECK(errors[3].code == EBADF);
  CHECK_THAT(errors[3].what, Catch::Contains("read-only"));
  CHECK(errors[4].code == EMSGSIZE);
  CHECK_THAT(errors[4].what, Catch::Contains("buffer of 63 bytes") && Catch::Contains("(64 bytes)"));
  CHECK(errors[5].code == 0);
  CHECK(errors[6].code == 0);
  CHECK(q.current_messages() == 2);
}

// ---- labelled messages ----

struct labelled_record {
  std::uint32_t sender;
  std::uint32_t label;
  std::uint32_t seq;  ///< per sender and label
  std::uint32_t check;
};

/// Sends `per_label` messages of each of `labels` labels, interleaved, priority = label.
int send_labelled_records(const std::string& name, std::uint32_t sender, std::uint32_t labels,
                          std::uint32_t per_label) {
  ipcoro::io_context child_ctx;
  auto out = message_queue::open(name, opening(mq_access::write_only));
  ipcoro::sync_wait(child_ctx, [&]() -> task<void> {
    for (std::uint32_t i = 0; i < per_label; ++i) {
      for (std::uint32_t l = 0; l < labels; ++l) {
        const labelled_record rec{sender, l, i, sender * 7919 + l * 104729 + i};
        co_await out.send_labelled(l, bytes_of(rec), l).with_timeout(60s);
      }
    }
  }());
  return 0;
}

struct consumer_log {
  std::uint32_t received = 0;
  std::uint32_t wrong_label = 0;
  std::uint32_t out_of_order = 0;
  std::map<std::uint32_t, std::uint32_t> next_seq;  ///< per sender
};

task<void> consume(mq_demux& demux, std::uint32_t label, std::uint32_t expected, consumer_log& log) {
  std::vector<std::byte> buf(demux.max_payload());
  while (log.received < expected) {
    const std::optional<mq_message> m = co_await demux.receive(label, buf);
    if (!m) co_return;
    const auto rec = read_as<labelled_record>(buf);
    ++log.received;
    if (m->size != sizeof rec || rec.label != label || m->priority != label ||
        rec.check != rec.sender * 7919 + rec.label * 104729 + rec.seq) {
      ++log.wrong_label;
      continue;
    }
    std::uint32_t& next = log.next_seq[rec.sender];
    if (rec.seq != next) ++log.out_of_order;
    next = rec.seq + 1;
  }
}

TEST_CASE("labelled messages from two processes reach only their label's consumer, in order, none lost",
          "[mqueue][labels][fork]") {
  constexpr std::uint32_t labels = 3;
  constexpr std::uint32_t per_label = 200;
  constexpr std::uint32_t senders = 2;
  const std::string name = queue_name("labels");
  unlink_guard guard{name};
  ipcoro::io_context ctx;
  auto q = message_queue::create(name, {10, 64});
  std::vector<child_process> children;
  for (std::uint32_t s = 0; s < senders; ++s) {
    children.emplace_back([&, s] { return send_labelled_records(name, s, labels, per_label); });
  }
  // Few slots: the pump must keep cycling them, and pauses when consumers lag.
  mq_demux demux(q, labels, 4);
  std::array<consumer_log, labels> logs;
  ipcoro::sync_wait(ctx, [&]() -> task<void> {
    auto consumers = [&]() -> task<void> {
      co_await ipcoro::when_all(consume(demux, 0, senders * per_label, logs[0]),
                                consume(demux, 1, senders * per_label, logs[1]),
                                consume(demux, 2, senders * per_label, logs[2]));
      demux.close();
    };
    co_await ipcoro::when_all(demux.run(), consumers());
  }());
  for (std::uint32_t l = 0; l < labels; ++l) {
    INFO("label " << l);
    CHECK(logs[l].received == senders * per_label);
    CHECK(logs[l].wrong_label == 0);
    CHECK(logs[l].out_of_order == 0);
    for (std::uint32_t s = 0; s < senders; ++s) CHECK(logs[l].next_seq[s] == per_label);
  }
  CHECK(demux.held() == 0);
  for (auto& c : children) CHECK(c.wait(30s) == 0);
  CHECK(q.current_messages() == 0);
}

TEST_CASE("a label whose consumer starts late gets its held messages in order", "[mqueue][labels][fork]") {
  constexpr std::uint32_t labels = 3;
  constexpr std::uint32_t per_label = 50;
  const std::string name = queue_name("late");
  unlink_guard guard{name};
  ipcoro::io_context ctx;
  auto q = message_queue::create(name, {10, 64});
  child_process child([&] { return send_labelled_records(name, 9, labels, per_label); });
  mq_demux demux(q, labels, 128);
  std::array<consumer_log, labels> logs;
  std::size_t held_when_late_consumer_started = 0;
  ipcoro::sync_wait(ctx, [&]() -> task<void> {
    auto consumers = [&]() -> task<void> {
      co_await ipcoro::when_all(consume(demux, 0, per_label, logs[0]), consume(demux, 1, per_label, logs[1]));
      held_when_late_consumer_started = demux.held();
      co_await consume(demux, 2, per_label, logs[2]);
      demux.close();
    };
    co_await ipcoro::when_all(demux.run(), consumers());
  }());
  // Labels are sent interleaved: by the time the last label-0 and label-1 messages were
  // taken, all but the last label-2 message had been taken (and held) too.
  CHECK(held_when_late_consumer_started >= per_label - 1);
  for (std::uint32_t l = 0; l < labels; ++l) {
    INFO("label " << l);
    CHECK(logs[l].received == per_label);
    CHECK(logs[l].wrong_label == 0);
    CHECK(logs[l].out_of_order == 0);
    CHECK(logs[l].next_seq[9] == per_label);
  }
  CHECK(child.wait(30s) == 0);
  CHECK(q.current_messages() == 0);
}

TEST_CASE("closing a demux ends waiting consumers, hands out what it holds, and leaves the queue alone",
          "[mqueue][labels][fork]") {
  const std::string name = queue_name("close");
  unlink_guard guard{name};
  ipcoro::io_context ctx;
  auto q = message_queue::create(name, {8, 32});
  // Three messages for label 1, then one for label 0, all at one priority (FIFO).
  child_process child([&] {
    ipcoro::io_context child_ctx;
    auto out = message_queue::open(name, opening(mq_access::write_only));
    ipcoro::sync_wait(child_ctx, [&]() -> task<void> {
      for (std::uint32_t i = 0; i < 3; ++i) co_await out.send_labelled(1, bytes_of(i));
      const std::uint32_t zero = 100;
      co_await out.send_labelled(0, bytes_of(zero));
    }());
    return 0;
  });
  REQUIRE(child.wait(30s) == 0);

  mq_demux demux(q, 2, 8);
  ipcoro::event first_arrived;
  std::optional<std::uint32_t> label0_first;
  bool label0_second_ended = false;
  std::vector<std::uint32_t> label1;
  bool label1_ended = false;
  std::size_t held_before_close = 0;
  long queued_after_close = -1;
  ipcoro::sync_wait(ctx, [&]() -> task<void> {
    auto zero = [&]() -> task<void> {
      std::array<std::byte, 28> buf{};
      if (auto m = co_await demux.receive(0, buf)) label0_first = read_as<std::uint32_t>(buf);
      first_arrived.set();
      label0_second_ended = !(co_await demux.receive(0, buf)).has_value();
    };
    auto closer = [&]() -> task<void> {
      co_await first_arrived.wait();
      held_before_close = demux.held();
      demux.close();
      // Sent after the close: stays in the queue.
      const std::uint32_t late = 7;
      co_await q.send_labelled(1, bytes_of(late));
      std::array<std::byte, 28> buf{};
      while (auto m = co_await demux.receive(1, buf)) label1.push_back(read_as<std::uint32_t>(buf));
      label1_ended = true;
      queued_after_close = q.current_messages();
    };
    co_await ipcoro::when_all(demux.run(), zero(), closer());
  }());
  CHECK(label0_first == 100u);
  CHECK(label0_second_ended);
  CHECK(held_before_close == 3);
  CHECK(label1 == std::vector<std::uint32_t>{0, 1, 2});
  CHECK(label1_ended);
  CHECK(queued_after_close == 1);
}

TEST_CASE("a demux closed before it runs ends its consumers at once and run returns", "[mqueue][labels]") {
  const std::string name = queue_name("early");
  unlink_guard guard{name};
  ipcoro::io_context ctx;
  auto q = message_queue::create(name, {2, 32});
  mq_demux demux(q, 1, 2);
  bool consumer_ended = false;
  bool ran = false;
  ipcoro::sync_wait(ctx, [&]() -> task<void> {
    auto consumer = [&]() -> task<void> {
      std::array<std::byte, 28> buf{};
      consumer_ended = !(co_await demux.receive(0, buf)).has_value();
    };
    auto closer = [&]() -> task<void> {
      demux.close();  // the consumer is parked; no pump has started
      co_await demux.run();
      ran = true;
    };
    co_await ipcoro::when_all(consumer(), closer());
  }());
  CHECK(consumer_ended);
  CHECK(ran);
}

TEST_CASE("a message with an unknown label or no header ends the demux with an error naming it",
          "[mqueue][labels]") {
  const std::string name = queue_name("badlabel");
  unlink_guard guard{name};
  ipcoro::io_context ctx;
  auto q = message_queue::create(name, {4, 32});
  for (int variant = 0; variant < 2; ++variant) {
    INFO("variant " << variant);
    mq_demux demux(q, 3, 4);
    caught consumer_error;
    caught run_error;
    ipcoro::sync_wait(ctx, [&]() -> task<void> {
      const std::uint32_t v = 1;
      if (variant == 0)
        co_await q.send_labelled(7, bytes_of(v));
      else
        co_await q.send(std::as_bytes(std::span("ab", 2)));
      auto consumer = [&]() -> task<void> {
        std::array<std::byte, 28> buf{};
        try {
          (void)co_await demux.receive(0, buf);
        } catch (const std::system_error& e) {
          consumer_error = {e.code().value(), e.what()};
        }
      };
      auto pump = [&]() -> task<void> {
        try {
          co_await demux.run();
        } catch (const std::system_error& e) {
          run_error = {e.code().value(), e.what()};
        }
      };
      co_await ipcoro::when_all(consumer(), pump());
    }());
    CHECK(run_error.code == EBADMSG);
    CHECK(consumer_error.code == EBADMSG);
    if (variant == 0) {
      CHECK_THAT(run_error.what, Catch::Contains("label 7") && Catch::Contains("labels 0 to 2"));
    } else {
      CHECK_THAT(run_error.what, Catch::Contains("2 bytes has no label header"));
    }
    CHECK(q.current_messages() == 0);
  }
}

TEST_CASE("a demux consumer cancelled while waiting takes nothing; the next consumer gets the message",
          "[mqueue][labels]") {
  const std::string name = queue_name("democancel");
  unlink_guard guard{name};
  ipcoro::io_context ctx;
  auto q = message_queue::create(name, {4, 32});
  mq_demux demux(q, 2, 4);
  bool cancelled = false;
  std::optional<std::uint32_t> got;
  ipcoro::sync_wait(ctx, [&]() -> task<void> {
    std::stop_source stop;
    auto waiting = [&]() -> task<void> {
      std::array<std::byte, 28> buf{};
      try {
        (void)co_await demux.receive(1, buf);
      } catch (const ipcoro::operation_cancelled&) {
        cancelled = true;
      }
    };
    auto driver = [&]() -> task<void> {
      stop.request_stop();  // the waiting consumer is parked by now
      const std::uint32_t v = 42;
      co_await q.send_labelled(1, bytes_of(v));
      std::array<std::byte, 28> buf{};
      if (auto m = co_await demux.receive(1, buf)) got = read_as<std::uint32_t>(buf);
      demux.close();
    };
    co_await ipcoro::when_all(demux.run(), waiting().with_stop_token(stop.get_token()), driver());
  }());
  CHECK(cancelled);
  CHECK(got == 42u);
  CHECK(demux.held() == 0);
}

// ---- allocation ----

TEST_CASE("steady-state send, receive and demux receive allocate nothing, waiting in the ring or not",
          "[mqueue][alloc]") {
  constexpr int rounds = 3000;
  constexpr int measure_from = 500;
  constexpr int measure_to = 2500;
  const std::string name = queue_name("alloc");
  unlink_guard guard{name};
  const std::string name2 = queue_name("alloclab");
  unlink_guard guard2{name2};
  ipcoro::io_context ctx;
  auto q = message_queue::create(name, {4, 64});
  auto lq = message_queue::create(name2, {4, 64});
  mq_demux demux(lq, 2, 4);
  std::uint64_t plain_allocations = 0, labelled_allocations = 0;
  int received = 0, labelled_received = 0, mismatches = 0;
  ipcoro::sync_wait(ctx, [&]() -> task<void> {
    std::array<std::byte, 64> out{}, in{};
    // The queue holds 4: the producer waits for POLLOUT and the consumer for POLLIN in turn.
    auto producer = [&]() -> task<void> {
      for (int i = 0; i < rounds; ++i) {
        std::memcpy(out.data(), &i, sizeof i);
        co_await q.send(std::span(out).first(16), static_cast<unsigned>(i % 2)).with_timeout(10s);
      }
    };
    auto consumer = [&]() -> task<void> {
      std::uint64_t before = 0;
      for (int i = 0; i < rounds; ++i) {
        if (i == measure_from) before = ipcoro::test::allocations();
        const mq_message m = co_await q.receive(in).with_timeout(10s);
        if (m.size != 16) ++mismatches;
        if (i == measure_to) plain_allocations = ipcoro::test::allocations() - before;
        ++received;
      }
    };
    co_await ipcoro::when_all(producer(), consumer());

    std::array<std::byte, 64> lout{};
    auto labelled_producer = [&]() -> task<void> {
      for (int i = 0; i < rounds; ++i) {
        std::memcpy(lout.data(), &i, sizeof i);
        co_await lq.send_labelled(static_cast<std::uint32_t>(i % 2), std::span(lout).first(8))
            .with_timeout(10s);
      }
    };
    auto labelled_consumer = [&](std::uint32_t label) -> task<void> {
      std::array<std::byte, 60> buf{};
      std::uint64_t before = 0;
      for (int i = 0; i < rounds / 2; ++i) {
        if (label == 0 && i == measure_from / 2) before = ipcoro::test::allocations();
        auto m = co_await demux.receive(label, buf);
        if (!m || m->size != 8 || read_as<int>(buf) % 2 != static_cast<int>(label)) ++mismatches;
        if (label == 0 && i == measure_to / 2) labelled_allocations = ipcoro::test::allocations() - before;
        ++labelled_received;
      }
    };
    auto labelled_consumers = [&]() -> task<void> {
      co_await ipcoro::when_all(labelled_consumer(0), labelled_consumer(1));
      demux.close();
    };
    co_await ipcoro::when_all(demux.run(), labelled_producer(), labelled_consumers());
  }());
  CHECK(received == rounds);
  CHECK(labelled_received == rounds);
  CHECK(mismatches == 0);
  CHECK(plain_allocations == 0);
  CHECK(labelled_allocations == 0);
}

// ---- nothing left behind ----

TEST_CASE("no queue of this test run is left in the mqueue namespace", "[mqueue]") {
  const ipcoro::test::leftovers left =
      ipcoro::test::names_left_behind("ipcoro-test-" + std::to_string(::getpid()) + "-");
  if (!left.queues_checked) {
    WARN("cannot mount an mqueue file system here: leftovers were checked per test, by name");
  }
  for (const std::string& name : left.names) FAIL_CHECK("left behind: " << name);
  CHECK(left.names.empty());
}

}  // namespace

TEST_CASE("after a receive that had to wait, messages already queued still come whole and in order",
          "[mqueue]") {
  // A receive that found the queue empty sends the next few straight to the ring's poll;
  // those must take what is queued at once, in order, and the ones after must too.
  const std::string name = queue_name("skips");
  const unlink_guard guard(name);
  auto q = message_queue::create(name, {10, 64});
  ipcoro::io_context ctx;
  const int received = ipcoro::sync_wait(ctx, [&]() -> task<int> {
    auto [first, fill] = co_await ipcoro::when_all(
        [&]() -> task<int> {
          std::array<std::byte, 64> buf{};
          const ipcoro::mq_message m = co_await q.receive(buf);  // waits: the queue is empty
          int v = -1;
          std::memcpy(&v, buf.data(), sizeof v);
          co_return m.size == sizeof v ? v : -1;
        }(),
        [&]() -> task<int> {  // starts once the receive above waits
          for (int i = 0; i < 10; ++i) co_await q.send(bytes_of(i));
          co_return 0;
        }());
    (void)fill;
    if (first != 0) co_return -1;
    int n = 1;
    // Nine queued (1..9), then eleven more sent one at a time, each received at once.
    for (int i = 1; i < 20; ++i, ++n) {
      if (i >= 10) co_await q.send(bytes_of(i));
      std::array<std::byte, 64> buf{};
      const ipcoro::mq_message m = co_await q.receive(buf);
      int v = -1;
      std::memcpy(&v, buf.data(), sizeof v);
      if (m.size != sizeof v || v != i) co_return -100 - i;
    }
    co_return n;
  }());
  REQUIRE(received == 20);
}
