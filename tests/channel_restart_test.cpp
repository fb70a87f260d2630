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

using ipcoro::test::contains;
using ipcoro::test::unique_name;

}  // namespace

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
