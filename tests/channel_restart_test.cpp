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
  std::string owner_record() const { return "/ipcoro-mq-owner." + name; }
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
  const std::string transport = GENERATE("fifo", "mq", "shm", "file");
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
    const ipcoro::test::failure refused = ipcoro::test::failure_of([&] {
      (void)ipcoro::sync_wait(ctx, ipcoro::open_receiver<int>(ch.address));
    });
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
  const ipcoro::test::failure refused = ipcoro::test::failure_of([&] {
    (void)ipcoro::sync_wait(ctx, ipcoro::open_receiver<int>(ch.address));
  });
  CHECK(refused.code == EEXIST);
  CHECK(contains(refused.what, ch.address));
  CHECK_NOTHROW(ipcoro::message_queue::open("/" + ch.name));
  CHECK_FALSE(std::filesystem::exists("/dev/shm" + ch.owner_record()));
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
  const std::string error = ipcoro::test::what_of<ipcoro::bad_channel_address>([&] {
    (void)ipcoro::sync_wait(ctx, ipcoro::open_receiver<int>(address));
  });
  const std::string given = address.substr(address.rfind('=') + 1);
  CHECK(contains(error, given == "4096m" ? "4294967296" : given));
  CHECK(contains(error, "largest"));
  CHECK(large_fallocate_calls == large_before);
}
