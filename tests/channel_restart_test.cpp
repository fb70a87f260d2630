// SPDX-License-Identifier: MIT
// Restarts: a receiver killed by SIGKILL leaves a name its restarted successor reclaims (a live
// one's never), a durable file channel resumes after the last acknowledged message, and a
// region larger than the free space is refused before anything is allocated.
#include "ipcoro/channel.hpp"
#include "ipcoro/io_context.hpp"
#include "ipcoro/mapped_file.hpp"
#include "ipcoro/mqueue.hpp"
#include "ipcoro/shm_ring.hpp"
#include "ipcoro/shm_segment.hpp"
#include "ipcoro/sync_wait.hpp"
#include "ipcoro/task.hpp"
#include "ipcoro/timer.hpp"

#include "process.hpp"

#include <catch2/catch.hpp>

#include <dlfcn.h>
#include <fcntl.h>
#include <mqueue.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

// ---- posix_fallocate, watched ----
//
// The library is built with 64-bit file offsets, so it calls posix_fallocate64, which this
// definition interposes. Requests above 1 GiB are counted and refused with ENOSPC without
// allocating, so that a build that still allocates before checking cannot fill the disk.

namespace {
std::atomic<int> fallocate_calls{0};
std::atomic<int> large_fallocate_calls{0};
constexpr off_t large_request = off_t{1} << 30;
}  // namespace

extern "C" int posix_fallocate64(int fd, off_t offset, off_t length) {
  ++fallocate_calls;
  if (length > large_request) {
    ++large_fallocate_calls;
    return ENOSPC;
  }
  using real_fn = int (*)(int, off_t, off_t);
  static const auto real = reinterpret_cast<real_fn>(::dlsym(RTLD_NEXT, "posix_fallocate64"));
  return real(fd, offset, length);
}

namespace {

using namespace std::chrono_literals;
using ipcoro::channel_receiver;
using ipcoro::channel_sender;
using ipcoro::task;
using ipcoro::test::child_process;
using ipcoro::test::contains;
using ipcoro::test::unique_name;

/// A channel address of the given transport with a fresh name, and removal of whatever it
/// leaves (the names, and the owner record of a queue) when the test ends, however it ends.
struct fresh_channel {
  std::string transport;
  std::string name;
  std::string address;

  fresh_channel(const std::string& transport_, const std::string& options = "")
      : transport(transport_), name(unique_name("rs")) {
    if (transport == "fifo") address = "fifo:/tmp/" + name;
    if (transport == "mq") address = "mq:/" + name;
    if (transport == "shm") address = "shm:/" + name;
    if (transport == "file" || transport == "durable") address = "file:/tmp/" + name;
    std::string all = options;
    if (transport == "durable") all = all.empty() ? "durable=1" : "durable=1&" + all;
    if (!all.empty()) address += "?" + all;
  }
  fresh_channel(const fresh_channel&) = delete;
  fresh_channel& operator=(const fresh_channel&) = delete;
  ~fresh_channel() {
    std::error_code ec;
    std::filesystem::remove("/tmp/" + name, ec);
    ::shm_unlink(("/" + name).c_str());
    ::mq_unlink(("/" + name).c_str());
    ::shm_unlink(owner_record().c_str());
  }
  std::string owner_record() const { return "/" + name + ".ipcoro-mq"; }
};

/// Nothing named after this process is left in /dev/shm, /tmp or the mqueue namespace.
bool nothing_left_behind(const fresh_channel& ch) {
  const ipcoro::test::leftovers left =
      ipcoro::test::names_left_behind("ipcoro-test-" + std::to_string(::getpid()) + "-");
  for (const std::string& name : left.names) UNSCOPED_INFO("left behind: " << name);
  const bool record_left = std::filesystem::exists("/dev/shm" + ch.owner_record());
  if (record_left) UNSCOPED_INFO("left behind: the queue's owner record " << ch.owner_record());
  return left.names.empty() && !record_left;
}

/// A child that opens the receiver of `address`, says so, and then waits to be killed.
child_process receiver_that_waits(const std::string& address, const ipcoro::test::handshake& opened) {
  return child_process([&address, &opened]() -> int {
    ipcoro::io_context ctx;
    channel_receiver<int> rx = ipcoro::sync_wait(ctx, ipcoro::open_receiver<int>(address));
    opened.signal();
    for (;;) ::pause();
  });
}

/// A child that sends 0 .. count-1 to `address` and closes.
child_process sender_of(const std::string& address, int count) {
  return child_process([address, count]() -> int {
    ipcoro::io_context ctx;
    ipcoro::sync_wait(ctx, [](std::string address, int count) -> task<void> {
      channel_sender<int> tx = co_await ipcoro::open_sender<int>(address);
      for (int i = 0; i < count; ++i) co_await tx.send(i);
    }(address, count));
    return 0;
  });
}

task<std::vector<int>> drain(channel_receiver<int>& rx) {
  std::vector<int> out;
  for (;;) {
    std::optional<int> v = co_await rx.receive();
    if (!v) break;
    out.push_back(*v);
  }
  co_return out;
}

/// drain() for a durable receiver: acknowledges each value, so the sender may go on.
task<std::vector<int>> drain_acking(channel_receiver<int>& rx) {
  std::vector<int> out;
  for (;;) {
    std::optional<int> v = co_await rx.receive();
    if (!v) break;
    out.push_back(*v);
    rx.ack();
  }
  co_return out;
}

std::vector<int> iota(int count) {
  std::vector<int> v(static_cast<std::size_t>(count));
  for (int i = 0; i < count; ++i) v[static_cast<std::size_t>(i)] = i;
  return v;
}

}  // namespace

// ---- item 2: a crashed receiver's name ----

TEST_CASE("a receiver restarted after its predecessor was killed opens the same address again",
          "[channel][restart][ipc]") {
  const std::string transport = GENERATE("fifo", "mq", "shm", "file");
  const fresh_channel ch(transport, transport == "mq" ? "capacity=4&message_size=64" : "");
  CAPTURE(ch.address);
  {
    ipcoro::test::handshake opened;
    child_process first = receiver_that_waits(ch.address, opened);
    REQUIRE(opened.wait());
    first.kill(SIGKILL);
    REQUIRE(first.wait() == 128 + SIGKILL);

    ipcoro::io_context ctx;
    std::optional<channel_receiver<int>> rx;
    REQUIRE_NOTHROW(rx.emplace(ipcoro::sync_wait(ctx, ipcoro::open_receiver<int>(ch.address))));
    child_process sender = sender_of(ch.address, 100);
    CHECK(ipcoro::sync_wait(ctx, drain(*rx)) == iota(100));
    CHECK(sender.wait() == 0);
  }
  CHECK(nothing_left_behind(ch));
}

TEST_CASE("a live receiver's address is never taken over by a second receiver", "[channel][restart][ipc]") {
  const std::string transport = GENERATE("fifo", "mq", "shm", "file", "durable");
  const fresh_channel ch(transport, transport == "mq" ? "capacity=4&message_size=64" : "");
  CAPTURE(ch.address);
  {
    ipcoro::test::handshake opened;
    child_process owner([&]() -> int {
      ipcoro::io_context ctx;
      channel_receiver<int> rx = ipcoro::sync_wait(ctx, ipcoro::open_receiver<int>(ch.address));
      opened.signal();
      const std::vector<int> got = ipcoro::sync_wait(ctx, drain(rx));
      return got == iota(10) ? 0 : 1;
    });
    REQUIRE(opened.wait());
    ipcoro::io_context ctx;
    const ipcoro::test::failure refused = ipcoro::test::failure_of(
        [&] { (void)ipcoro::sync_wait(ctx, ipcoro::open_receiver<int>(ch.address)); });
    CHECK((refused.code == EEXIST || refused.code == EBUSY));
    CHECK(contains(refused.what, ch.address));
    // The owner still has its channel: a sender reaches it.
    child_process sender = sender_of(ch.address, 10);
    CHECK(sender.wait() == 0);
    CHECK(owner.wait() == 0);
  }
  if (transport != "durable") CHECK(nothing_left_behind(ch));
}

TEST_CASE("a queue that no channel receiver owns is not taken over", "[channel][restart][ipc]") {
  const fresh_channel ch("mq");
  ipcoro::message_queue raw = ipcoro::message_queue::create("/" + ch.name, {4, 64});
  ipcoro::io_context ctx;
  const ipcoro::test::failure refused =
      ipcoro::test::failure_of([&] { (void)ipcoro::sync_wait(ctx, ipcoro::open_receiver<int>(ch.address)); });
  CHECK(refused.code == EEXIST);
  CHECK(contains(refused.what, ch.address));
  CHECK_NOTHROW(ipcoro::message_queue::open("/" + ch.name));
  CHECK_FALSE(std::filesystem::exists("/dev/shm" + ch.owner_record()));
}

// ---- item 3: the durable file channel ----

namespace {

/// What the consumers of the durable test share (an anonymous shared mapping).
struct consumer_log {
  std::atomic<std::int64_t> intent;     // the value about to be acknowledged
  std::atomic<std::int64_t> confirmed;  // the value acknowledged last
  std::atomic<std::int64_t> first;      // the first value the consumer received
  std::atomic<std::int64_t> received;   // how many it received
  std::atomic<int> out_of_order;        // a value other than the one before it + 1
};

constexpr int ack_every = 5;

/// Receives until the end of the stream, checking that the values count up, and
/// acknowledges every `ack_every`-th; raises SIGKILL at its `kill_at`-th value, at
/// `stage`: 0 before acknowledging, 1 between recording the intent and ack(), 2 between
/// ack() and recording that it was done.
int durable_consumer(const std::string& address, consumer_log& log, std::int64_t kill_at, int stage) {
  ipcoro::io_context ctx;
  return ipcoro::sync_wait(
      ctx, [](std::string address, consumer_log& log, std::int64_t kill_at, int stage) -> task<int> {
        channel_receiver<std::int64_t> rx = co_await ipcoro::open_receiver<std::int64_t>(address);
        std::int64_t previous = -1;
        for (std::int64_t n = 0;; ++n) {
          const std::optional<std::int64_t> v = co_await rx.receive();
          if (!v) break;
          if (n == 0) {
            // Where the file resumed is what is acknowledged now (a predecessor killed before
            // its first ack left its own predecessor's figures).
            log.first = *v;
            log.intent = *v - 1;
            log.confirmed = *v - 1;
          }
          if (n > 0 && *v != previous + 1) ++log.out_of_order;
          previous = *v;
          ++log.received;
          const bool killed_here = n == kill_at;
          if (killed_here && stage == 0) ::raise(SIGKILL);
          if (*v % ack_every == ack_every - 1 || killed_here) {
            log.intent = *v;
            if (killed_here && stage == 1) ::raise(SIGKILL);
            rx.ack();
            if (killed_here && stage == 2) ::raise(SIGKILL);
            log.confirmed = *v;
          }
        }
        rx.ack();
        co_return 0;
      }(address, log, kill_at, stage));
}

}  // namespace

TEST_CASE(
    "a durable file channel resumes after the last acknowledged message across consumers killed at "
    "every point",
    "[channel][durable][ipc]") {
  const fresh_channel ch("durable", "capacity=4k");
  CAPTURE(ch.address);
  constexpr std::int64_t total = 20000;
  constexpr int restarts = 30;
  void* shared =
      ::mmap(nullptr, sizeof(consumer_log), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  REQUIRE(shared != MAP_FAILED);
  auto* log = new (shared) consumer_log{{-1}, {-1}, {-1}, {0}, {0}};

  ipcoro::test::handshake created;
  std::optional<child_process> producer;
  std::uint64_t seed = 0x9e3779b97f4a7c15ull;
  int previous_stage = 0;
  for (int k = 0; k <= restarts; ++k) {
    CAPTURE(k);
    seed = seed * 6364136223846793005ull + 1442695040888963407ull;
    const bool last = k == restarts;
    const std::int64_t kill_at = last ? -1 : static_cast<std::int64_t>((seed >> 33) % 400);
    const int stage = k % 3;
    // Where the next consumer must start: after the last acknowledged value, which is the
    // intent once a consumer got past ack().
    const std::int64_t expected_first =
        (previous_stage == 2 ? log->intent.load() : log->confirmed.load()) + 1;
    previous_stage = stage;
    log->first = -1;
    log->received = 0;
    child_process consumer([&]() -> int {
      if (k == 0) {
        // The first consumer creates the file; the producer opens it then.
        ipcoro::io_context ctx;
        channel_receiver<std::int64_t> probe =
            ipcoro::sync_wait(ctx, ipcoro::open_receiver<std::int64_t>(ch.address));
        probe.close();
        created.signal();
      }
      return durable_consumer(ch.address, *log, kill_at, stage);
    });
    if (k == 0) {
      REQUIRE(created.wait());
      producer.emplace([&]() -> int {
        ipcoro::io_context ctx;
        ipcoro::sync_wait(ctx, [](std::string address, std::int64_t total) -> task<void> {
          channel_sender<std::int64_t> tx = co_await ipcoro::open_sender<std::int64_t>(address);
          for (std::int64_t i = 0; i < total; ++i) co_await tx.send(i);
        }(ch.address, total));
        return 0;
      });
    }
    const int status = consumer.wait();
    if (last) {
      REQUIRE(status == 0);
      CHECK(log->first == expected_first);
      CHECK(log->first + log->received == total);
    } else {
      REQUIRE(status == 128 + SIGKILL);
      CHECK(log->first == expected_first);
      CHECK(log->received == kill_at + 1);
    }
  }
  CHECK(log->out_of_order == 0);
  REQUIRE(producer);
  CHECK(producer->wait() == 0);
  ::munmap(shared, sizeof(consumer_log));
}

TEST_CASE("a durable sender waits through its receiver's death, past the peer check, for the next receiver",
          "[channel][durable][ipc]") {
  const fresh_channel ch("durable", "capacity=4k");
  constexpr int total = 2000;
  ipcoro::test::handshake opened;
  child_process first = receiver_that_waits(ch.address, opened);
  REQUIRE(opened.wait());
  first.kill(SIGKILL);
  REQUIRE(first.wait() == 128 + SIGKILL);
  child_process producer = sender_of(ch.address, total);
  // Not a synchronisation: the time is what is tested. The producer fills the ring and
  // waits with no receiver alive for several peer checks (100 ms each), where a plain
  // sender gets peer_died.
  ipcoro::io_context ctx;
  ipcoro::sync_wait(ctx, []() -> task<void> { co_await ipcoro::sleep_for(500ms); }());
  channel_receiver<int> rx = ipcoro::sync_wait(ctx, ipcoro::open_receiver<int>(ch.address));
  CHECK(ipcoro::sync_wait(ctx, drain_acking(rx)) == iota(total));
  CHECK(producer.wait() == 0);
}

TEST_CASE("ack acknowledges what the receiver handed on, not a message ready() read ahead",
          "[channel][durable][ipc]") {
  const fresh_channel ch("durable");
  ipcoro::io_context ctx;
  {
    channel_receiver<int> rx = ipcoro::sync_wait(ctx, ipcoro::open_receiver<int>(ch.address));
    channel_sender<int> tx = ipcoro::sync_wait(ctx, ipcoro::open_sender<int>(ch.address));
    for (int i = 1; i <= 3; ++i) ipcoro::sync_wait(ctx, tx.send(i));
    CHECK(ipcoro::sync_wait(ctx, rx.receive()) == std::optional<int>(1));
    ipcoro::sync_wait(ctx, rx.ready());  // reads 2 from the file, without handing it on
    rx.ack();
    rx.close();
    // The receiver left without closing the queue: the sender goes on.
    CHECK_NOTHROW(ipcoro::sync_wait(ctx, tx.send(4)));
    tx.close();
  }
  channel_receiver<int> again = ipcoro::sync_wait(ctx, ipcoro::open_receiver<int>(ch.address));
  CHECK(ipcoro::sync_wait(ctx, drain(again)) == std::vector<int>{2, 3, 4});
}

TEST_CASE("a durable file channel's sender killed mid-stream reads as peer_died after its messages",
          "[channel][durable][ipc]") {
  const fresh_channel ch("durable");
  ipcoro::io_context ctx;
  channel_receiver<int> rx = ipcoro::sync_wait(ctx, ipcoro::open_receiver<int>(ch.address));
  child_process sender([&]() -> int {
    ipcoro::io_context child_ctx;
    ipcoro::sync_wait(child_ctx, [](std::string address) -> task<void> {
      channel_sender<int> tx = co_await ipcoro::open_sender<int>(address);
      for (int i = 0; i < 10; ++i) co_await tx.send(i);
      ::raise(SIGKILL);
    }(ch.address));
    return 0;
  });
  REQUIRE(sender.wait() == 128 + SIGKILL);
  std::vector<int> got;
  bool died = false;
  try {
    for (;;) {
      const std::optional<int> v = ipcoro::sync_wait(ctx, rx.receive());
      if (!v) break;
      got.push_back(*v);
      rx.ack();
    }
  } catch (const ipcoro::peer_died&) {
    died = true;
  }
  CHECK(got == iota(10));
  CHECK(died);
}

TEST_CASE("both ends of a durable file channel must say durable=1", "[channel][durable][ipc]") {
  const fresh_channel ch("durable");
  ipcoro::io_context ctx;
  channel_receiver<int> rx = ipcoro::sync_wait(ctx, ipcoro::open_receiver<int>(ch.address));
  const std::string plain = "file:/tmp/" + ch.name;
  const std::string sender_error = ipcoro::test::what_of<ipcoro::channel_error>(
      [&] { (void)ipcoro::sync_wait(ctx, ipcoro::open_sender<int>(plain)); });
  CHECK(contains(sender_error, "durable=1"));
  rx.close();
  // A plain receiver never removes a durable channel's file, even with its receiver gone.
  const std::string receiver_error = ipcoro::test::what_of<ipcoro::channel_error>(
      [&] { (void)ipcoro::sync_wait(ctx, ipcoro::open_receiver<int>(plain)); });
  CHECK(contains(receiver_error, "durable=1"));
  CHECK(std::filesystem::exists("/tmp/" + ch.name));
  CHECK_THROWS_AS(ipcoro::channel_link::create(ch.address), ipcoro::bad_channel_address);
}

// ---- item 8: sizes beyond the free space or the largest ring ----

namespace {

std::uint64_t free_bytes(const char* dir) {
  struct statvfs sv {};
  REQUIRE(::statvfs(dir, &sv) == 0);
  return std::uint64_t{::geteuid() == 0 ? sv.f_bfree : sv.f_bavail} * sv.f_frsize;
}

/// The first number after `marker` in `text`, or 0.
std::uint64_t number_after(const std::string& text, const std::string& marker) {
  const std::size_t at = text.find(marker);
  if (at == std::string::npos) return 0;
  return std::stoull(text.substr(at + marker.size()));
}

}  // namespace

TEST_CASE("a region larger than the free space is refused with the real figures before anything is allocated",
          "[mapped_file][shm_segment]") {
  const std::string where = GENERATE("file", "shm");
  CAPTURE(where);
  const std::string name = unique_name("big");
  const char* dir = where == "file" ? "/tmp" : "/dev/shm";
  const std::uint64_t before = free_bytes(dir);
  const ipcoro::region_layout layout{0x47494221, 1, before + (std::uint64_t{1} << 30)};
  const int calls_before = fallocate_calls;
  const ipcoro::test::failure refused = ipcoro::test::failure_of([&] {
    if (where == "file") {
      (void)ipcoro::mapped_file::create("/tmp/" + name, layout);
    } else {
      (void)ipcoro::shm_segment::create(name, layout);
    }
  });
  CHECK(refused.code == ENOSPC);
  CHECK(number_after(refused.what, "cannot allocate ") >= layout.payload_size);
  CHECK(fallocate_calls == calls_before);
  // The free space it names is the space that was free, not what a failed allocation left.
  const std::uint64_t named = number_after(refused.what, "it has ");
  const std::uint64_t slack = before / 10 + (std::uint64_t{64} << 20);
  CHECK(named + slack >= before);
  CHECK(named <= before + slack);
  CHECK_FALSE(std::filesystem::exists(std::string(dir) + "/" + name));

  // The watch sees the library's allocations (so that the count above means something).
  const std::string small = unique_name("small");
  {
    ipcoro::mapped_file f = ipcoro::mapped_file::create("/tmp/" + small, {0x47494221, 1, 4096});
    CHECK(fallocate_calls > calls_before);
  }
  std::filesystem::remove("/tmp/" + small);
}

TEST_CASE("a ring size beyond the largest ring is refused naming the figure the address gave", "[channel]") {
  const std::string address = GENERATE(std::string("file:/tmp/") + "x?capacity=18446744073709551615",
                                       std::string("shm:/x?capacity=2000000000000"),
                                       std::string("shm:/x?ring=mpmc&message_size=4096m"));
  CAPTURE(address);
  const int large_before = large_fallocate_calls;
  ipcoro::io_context ctx;
  const std::string error = ipcoro::test::what_of<ipcoro::bad_channel_address>(
      [&] { (void)ipcoro::sync_wait(ctx, ipcoro::open_receiver<int>(address)); });
  const std::string given = address.substr(address.rfind('=') + 1);
  CHECK(contains(error, given == "4096m" ? "4294967296" : given));
  CHECK(contains(error, "largest"));
  CHECK(large_fallocate_calls == large_before);
}
