// SPDX-License-Identifier: MIT
// Shared memory segments across processes: validation, allocation up front, reclaim, cleanup.
#include <ipcoro/shm_segment.hpp>

#include "process.hpp"

using ipcoro::test::contains;
using ipcoro::test::failure;
using ipcoro::test::failure_of;
using ipcoro::test::handshake;

#include <catch2/catch.hpp>

#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <limits>
#include <stdexcept>
#include <string>
#include <system_error>
#include <vector>

namespace {

using ipcoro::region_layout;
using ipcoro::shm_segment;
using ipcoro::test::child_process;
using ipcoro::test::unique_name;

constexpr std::uint32_t tag = 0x7465'7374;  // "test"
constexpr region_layout small{tag, 3, 4096};

/// Removes the segment `name` when the test ends, however it ends.
struct name_guard {
  std::string name;
  explicit name_guard(std::string n) : name(std::move(n)) {}
  ~name_guard() {
    try {
      shm_segment::unlink(name);
    } catch (...) {
    }
  }
  name_guard(const name_guard&) = delete;
  name_guard& operator=(const name_guard&) = delete;
};

bool exists_in_dev_shm(const std::string& name) { return std::filesystem::exists("/dev/shm/" + name); }

/// The std::system_error a call throws: its errno (0 if it returned) and message.

/// Writes `bytes` at `offset` of /dev/shm/<name>, behind the library's back.
void poke(const std::string& name, off_t offset, const void* bytes, std::size_t n) {
  const int fd = ::open(("/dev/shm/" + name).c_str(), O_WRONLY | O_CLOEXEC);
  REQUIRE(fd >= 0);
  REQUIRE(::pwrite(fd, bytes, n, offset) == static_cast<ssize_t>(n));
  ::close(fd);
}

/// A one-byte handshake between processes over a pipe (blocking; no loop needed here).

}  // namespace

TEST_CASE("a segment is created zeroed and aligned, and another process sees its bytes",
          "[shm_segment][process]") {
  const name_guard g(unique_name("seg"));
  shm_segment seg = shm_segment::create(g.name, small);
  REQUIRE(seg);
  CHECK(seg.name() == "/" + g.name);
  CHECK(seg.owns_name());
  CHECK(seg.payload().size() == 4096);
  CHECK(reinterpret_cast<std::uintptr_t>(seg.payload().data()) % 64 == 0);
  CHECK(
      std::all_of(seg.payload().begin(), seg.payload().end(), [](std::byte b) { return b == std::byte{0}; }));
  CHECK(seg.creator_pid() == ::getpid());
  CHECK(seg.creator_alive());
  CHECK(seg.layout().type_tag == tag);
  CHECK(seg.layout().version == 3);

  for (std::size_t i = 0; i < seg.payload().size(); ++i) seg.payload()[i] = static_cast<std::byte>(i * 7);

  child_process child([&] {
    shm_segment other = shm_segment::open(g.name, small);
    for (std::size_t i = 0; i < other.payload().size(); ++i) {
      if (other.payload()[i] != static_cast<std::byte>(i * 7)) return 1;
    }
    if (other.creator_pid() != ::getppid() || !other.creator_alive() || other.owns_name()) return 2;
    other.payload()[0] = std::byte{0xAB};
    return 0;
  });
  REQUIRE(child.wait() == 0);
  CHECK(seg.payload()[0] == std::byte{0xAB});
  CHECK(exists_in_dev_shm(g.name));
}

TEST_CASE("the creator removes the name on destruction, a forked child's copy does not",
          "[shm_segment][process]") {
  const name_guard g(unique_name("owner"));
  {
    shm_segment seg = shm_segment::create(g.name, small);
    child_process child([&] {
      shm_segment moved = std::move(seg);  // destroyed in the child: must not unlink
      return moved ? 0 : 1;
    });
    REQUIRE(child.wait() == 0);
    CHECK(exists_in_dev_shm(g.name));
  }
  CHECK_FALSE(exists_in_dev_shm(g.name));
}

TEST_CASE("release_name keeps the segment for another process, which removes it with unlink",
          "[shm_segment]") {
  const name_guard g(unique_name("release"));
  {
    shm_segment seg = shm_segment::create(g.name, small);
    seg.release_name();
    CHECK_FALSE(seg.owns_name());
  }
  REQUIRE(exists_in_dev_shm(g.name));
  shm_segment opened = shm_segment::open(g.name, small);
  CHECK(opened.creator_alive());  // created by this very process
  opened.unlink();
  CHECK_FALSE(exists_in_dev_shm(g.name));
  // The mapping outlives the name.
  opened.payload()[10] = std::byte{1};
  CHECK(opened.payload()[10] == std::byte{1});
}

TEST_CASE("the mode is applied exactly, whatever the umask", "[shm_segment]") {
  const name_guard g(unique_name("mode"));
  const mode_t old = ::umask(077);
  shm_segment seg = shm_segment::create(g.name, small, {.mode = 0640});
  ::umask(old);
  struct stat st {};
  REQUIRE(::stat(("/dev/shm/" + g.name).c_str(), &st) == 0);
  CHECK((st.st_mode & 0777) == 0640);

  const name_guard d(unique_name("default-mode"));
  shm_segment def = shm_segment::create(d.name, small);
  REQUIRE(::stat(("/dev/shm/" + d.name).c_str(), &st) == 0);
  CHECK((st.st_mode & 0777) == 0600);
}

TEST_CASE("create refuses a name that exists, naming its creator", "[shm_segment]") {
  const name_guard g(unique_name("exists"));
  shm_segment seg = shm_segment::create(g.name, small);
  const failure f = failure_of([&] { (void)shm_segment::create(g.name, small); });
  CHECK(f.code == EEXIST);
  CHECK(contains(f.what, "pid " + std::to_string(::getpid())));
  CHECK(contains(f.what, "alive"));
  CHECK(contains(f.what, "create_or_reclaim"));
  // The existing segment is untouched.
  CHECK(shm_segment::open(g.name, small).creator_pid() == ::getpid());
}

TEST_CASE("initialize runs on the payload before the segment gets its name", "[shm_segment]") {
  const name_guard g(unique_name("init"));
  bool named_during_initialize = true;
  shm_segment seg =
      shm_segment::create(g.name, small, {.mode = 0600, .initialize = [&](std::span<std::byte> p) {
                                            named_during_initialize = exists_in_dev_shm(g.name);
                                            p[0] = std::byte{9};
                                            p[p.size() - 1] = std::byte{8};
                                          }});
  CHECK_FALSE(named_during_initialize);
  const shm_segment opened = shm_segment::open(g.name, small);
  CHECK(opened.payload()[0] == std::byte{9});
  CHECK(opened.payload()[4095] == std::byte{8});

  const name_guard h(unique_name("init-throws"));
  CHECK_THROWS_AS(
      shm_segment::create(
          h.name, small,
          {.mode = 0600, .initialize = [](std::span<std::byte>) { throw std::runtime_error("refused"); }}),
      std::runtime_error);
  CHECK_FALSE(exists_in_dev_shm(h.name));
}

TEST_CASE("open refuses a missing segment with ENOENT naming /dev/shm", "[shm_segment]") {
  const std::string name = unique_name("missing");
  const failure f = failure_of([&] { (void)shm_segment::open(name, small); });
  CHECK(f.code == ENOENT);
  CHECK(contains(f.what, "/dev/shm/" + name));
  CHECK_FALSE(exists_in_dev_shm(name));
}

TEST_CASE("bad names, modes and sizes are refused before anything is created", "[shm_segment]") {
  CHECK(failure_of([] { (void)shm_segment::create("", small); }).code == EINVAL);
  CHECK(failure_of([] { (void)shm_segment::create("a/b", small); }).code == EINVAL);
  CHECK(failure_of([] { (void)shm_segment::create(std::string(300, 'x'), small); }).code == ENAMETOOLONG);
  const name_guard g(unique_name("bad"));
  CHECK(failure_of([&] { (void)shm_segment::create(g.name, small, {.mode = 01777}); }).code == EINVAL);
  CHECK(failure_of([&] { (void)shm_segment::create(g.name, {tag, 1, 0}); }).code == EINVAL);
  CHECK(failure_of([&] {
          (void)shm_segment::create(g.name, {tag, 1, std::numeric_limits<std::uint64_t>::max()});
        }).code == EINVAL);
  CHECK_FALSE(exists_in_dev_shm(g.name));
}

TEST_CASE("open refuses another type tag, layout version or payload size with EPROTO", "[shm_segment]") {
  const name_guard g(unique_name("layout"));
  shm_segment seg = shm_segment::create(g.name, small);

  failure f = failure_of([&] { (void)shm_segment::open(g.name, {tag + 1, 3, 4096}); });
  CHECK(f.code == EPROTO);
  CHECK(contains(f.what, "type tag"));
  f = failure_of([&] { (void)shm_segment::open(g.name, {tag, 4, 4096}); });
  CHECK(f.code == EPROTO);
  CHECK(contains(f.what, "layout version 3, expected 4"));
  f = failure_of([&] { (void)shm_segment::open(g.name, {tag, 3, 8192}); });
  CHECK(f.code == EPROTO);
  CHECK(contains(f.what, "4096"));

  // Size 0 accepts the creator's size.
  shm_segment any = shm_segment::open(g.name, {tag, 3, 0});
  CHECK(any.payload().size() == 4096);
  CHECK(any.layout().payload_size == 4096);
}

TEST_CASE("open refuses a segment whose header was corrupted", "[shm_segment]") {
  const name_guard g(unique_name("corrupt"));
  shm_segment seg = shm_segment::create(g.name, small);
  seg.release_name();

  SECTION("a flipped byte in the header fails the checksum") {
    const unsigned char junk = 0x5a;
    poke(g.name, 100, &junk, 1);  // inside the header's reserved bytes
    const failure f = failure_of([&] { (void)shm_segment::open(g.name, small); });
    CHECK(f.code == EBADMSG);
    CHECK(contains(f.what, "corrupt"));
  }
  SECTION("a wrong payload size in the header fails the checksum before it is used") {
    const std::uint64_t huge = 1ull << 40;
    poke(g.name, offsetof(ipcoro::detail::region_header, payload_size), &huge, sizeof huge);
    const failure f = failure_of([&] { (void)shm_segment::open(g.name, {tag, 3, 0}); });
    CHECK(f.code == EBADMSG);
  }
  SECTION("a wrong magic marks it as not an ipcoro segment") {
    const std::uint64_t magic = 0x1122334455667788ull;
    poke(g.name, 0, &magic, sizeof magic);
    const failure f = failure_of([&] { (void)shm_segment::open(g.name, small); });
    CHECK(f.code == EBADMSG);
    CHECK(contains(f.what, "not an ipcoro region"));
  }
  CHECK(exists_in_dev_shm(g.name));  // refusing to open never removes anything
}

TEST_CASE("open refuses a truncated segment", "[shm_segment]") {
  const name_guard g(unique_name("truncated"));
  shm_segment seg = shm_segment::create(g.name, small);
  const int fd = ::open(("/dev/shm/" + g.name).c_str(), O_RDWR | O_CLOEXEC);
  REQUIRE(fd >= 0);

  SECTION("shorter than its payload") {
    REQUIRE(::ftruncate(fd, 256 + 100) == 0);
    const failure f = failure_of([&] { (void)shm_segment::open(g.name, small); });
    CHECK(f.code == EBADMSG);
    CHECK(contains(f.what, "truncated"));
  }
  SECTION("shorter than the header") {
    REQUIRE(::ftruncate(fd, 10) == 0);
    const failure f = failure_of([&] { (void)shm_segment::open(g.name, small); });
    CHECK(f.code == EBADMSG);
    CHECK(contains(f.what, "smaller than the 256-byte"));
  }
  SECTION("grown after creation") {
    REQUIRE(::ftruncate(fd, 256 + 8192) == 0);
    const failure f = failure_of([&] { (void)shm_segment::open(g.name, small); });
    CHECK(f.code == EBADMSG);
    CHECK(contains(f.what, "resized"));
  }
  ::close(fd);
}

TEST_CASE("open refuses a foreign file in /dev/shm", "[shm_segment]") {
  const name_guard g(unique_name("foreign"));
  const int fd = ::shm_open(("/" + g.name).c_str(), O_CREAT | O_EXCL | O_RDWR | O_CLOEXEC, 0600);
  REQUIRE(fd >= 0);
  std::vector<unsigned char> bytes(8192);
  for (std::size_t i = 0; i < bytes.size(); ++i) bytes[i] = static_cast<unsigned char>(i * 31 + 7);
  REQUIRE(::write(fd, bytes.data(), bytes.size()) == static_cast<ssize_t>(bytes.size()));
  ::close(fd);

  failure f = failure_of([&] { (void)shm_segment::open(g.name, small); });
  CHECK(f.code == EBADMSG);
  CHECK(contains(f.what, "not an ipcoro region"));
  // Nor is it reclaimed: it is not ours to remove.
  f = failure_of([&] { (void)shm_segment::create_or_reclaim(g.name, small); });
  CHECK(f.code == EEXIST);
  CHECK(contains(f.what, "not a complete ipcoro segment"));
  CHECK(exists_in_dev_shm(g.name));
}

TEST_CASE("a segment larger than /dev/shm has room for is refused at creation", "[shm_segment]") {
  struct statvfs sv {};
  REQUIRE(::statvfs("/dev/shm", &sv) == 0);
  const std::uint64_t free_bytes = std::uint64_t{sv.f_bavail} * sv.f_frsize;
  const std::uint64_t total_bytes = std::uint64_t{sv.f_blocks} * sv.f_frsize;
  // Beyond the whole file system, so tmpfs refuses at once instead of filling it first.
  const std::uint64_t size = std::max(free_bytes, total_bytes) + (1ull << 30);
  const name_guard g(unique_name("huge"));
  const failure f = failure_of([&] { (void)shm_segment::create(g.name, {tag, 1, size}); });
  CHECK(f.code == ENOSPC);
  CHECK(contains(f.what, "/dev/shm"));
  CHECK(contains(f.what, "free of"));
  CHECK_FALSE(exists_in_dev_shm(g.name));
}

TEST_CASE("create_or_reclaim replaces the segment of a creator killed with SIGKILL",
          "[shm_segment][process]") {
  const name_guard g(unique_name("reclaim"));
  handshake created;
  child_process creator([&] {
    shm_segment seg = shm_segment::create(g.name, small);
    seg.payload()[0] = std::byte{42};
    created.signal();
    ::pause();  // until killed
    return 0;
  });
  REQUIRE(created.wait());

  // While the creator lives, its segment is not taken.
  shm_segment old = shm_segment::open(g.name, small);
  CHECK(old.creator_pid() == creator.pid());
  CHECK(old.creator_alive());
  failure f = failure_of([&] { (void)shm_segment::create_or_reclaim(g.name, small); });
  CHECK(f.code == EEXIST);
  CHECK(contains(f.what, "alive"));

  creator.kill(SIGKILL);
  CHECK(creator.wait() == 128 + SIGKILL);
  CHECK_FALSE(old.creator_alive());
  CHECK(old.payload()[0] == std::byte{42});  // the survivor's mapping still holds the data

  shm_segment fresh = shm_segment::create_or_reclaim(g.name, small);
  CHECK(fresh.creator_pid() == ::getpid());
  CHECK(fresh.owns_name());
  CHECK(fresh.payload()[0] == std::byte{0});
  // The old handle's unlink leaves the new segment under the name alone.
  old.unlink();
  CHECK(exists_in_dev_shm(g.name));
  CHECK(shm_segment::open(g.name, small).creator_pid() == ::getpid());
}

TEST_CASE("a creator that exited but was not yet reaped counts as dead", "[shm_segment][process]") {
  const name_guard g(unique_name("zombie"));
  child_process creator([&] {
    shm_segment seg = shm_segment::create(g.name, small);
    seg.release_name();
    return 0;
  });
  // Wait for the exit without reaping: the child stays a zombie with its pid.
  siginfo_t info{};
  REQUIRE(::waitid(P_PID, static_cast<id_t>(creator.pid()), &info, WEXITED | WNOWAIT) == 0);
  shm_segment seg = shm_segment::open(g.name, small);
  CHECK(seg.creator_pid() == creator.pid());
  CHECK_FALSE(seg.creator_alive());
  CHECK(creator.wait() == 0);
}

TEST_CASE("create_or_reclaim refuses a dead creator's segment of another type", "[shm_segment][process]") {
  const name_guard g(unique_name("othertype"));
  child_process creator([&] {
    shm_segment seg = shm_segment::create(g.name, {tag + 1, 1, 64});
    seg.release_name();
    return 0;
  });
  REQUIRE(creator.wait() == 0);
  const failure f = failure_of([&] { (void)shm_segment::create_or_reclaim(g.name, small); });
  CHECK(f.code == EEXIST);
  CHECK(contains(f.what, "type tag"));
  CHECK(exists_in_dev_shm(g.name));
}

TEST_CASE("two survivors reclaiming at once end with one segment", "[shm_segment][process]") {
  const name_guard g(unique_name("race"));
  child_process creator([&] {
    shm_segment seg = shm_segment::create(g.name, small);
    seg.release_name();
    return 0;
  });
  REQUIRE(creator.wait() == 0);
  handshake go;
  handshake finish;  // the winner must outlive the race, or its own segment becomes reclaimable
  int results[2] = {-1, -1};
  REQUIRE(::pipe2(results, O_CLOEXEC) == 0);
  std::vector<child_process> survivors;
  for (int i = 0; i < 2; ++i) {
    survivors.emplace_back([&] {
      if (!go.wait()) return 3;
      char outcome = 'w';
      try {
        shm_segment s = shm_segment::create_or_reclaim(g.name, small);
        s.release_name();  // the parent checks and removes it
      } catch (const std::system_error& e) {
        outcome = e.code().value() == EEXIST ? 'l' : 'e';
      }
      [[maybe_unused]] ssize_t n = ::write(results[1], &outcome, 1);
      return finish.wait() ? 0 : 4;
    });
  }
  go.signal();
  go.signal();
  int winners = 0;
  int losers = 0;
  for (int i = 0; i < 2; ++i) {
    char outcome = '?';
    REQUIRE(::read(results[0], &outcome, 1) == 1);
    winners += outcome == 'w';
    losers += outcome == 'l';
  }
  finish.signal();
  finish.signal();
  for (auto& s : survivors) CHECK(s.wait() == 0);
  ::close(results[0]);
  ::close(results[1]);
  CHECK(winners == 1);
  CHECK(losers == 1);
  const shm_segment now = shm_segment::open(g.name, small);
  CHECK(now.creator_pid() != creator.pid());
}

TEST_CASE("bounds checks refuse offsets and lengths outside the payload", "[shm_segment]") {
  const name_guard g(unique_name("bounds"));
  shm_segment seg = shm_segment::create(g.name, small);
  auto p = seg.payload();
  using ipcoro::detail::checked_subspan;
  CHECK(checked_subspan(p, 0, 4096, "all").size() == 4096);
  CHECK(checked_subspan(p, 4096, 0, "empty at the end").empty());
  CHECK(failure_of([&] { (void)checked_subspan(p, 4000, 97, "past the end"); }).code == EBADMSG);
  CHECK(failure_of([&] { (void)checked_subspan(p, 4097, 0, "start past the end"); }).code == EBADMSG);
  // Sums that wrap around must not slip through.
  CHECK(failure_of([&] {
          (void)checked_subspan(p, std::numeric_limits<std::uint64_t>::max() - 1, 16, "wrapping");
        }).code == EBADMSG);
  CHECK(failure_of([&] { (void)ipcoro::detail::checked_object<std::uint64_t>(p, 4092, "u64"); }).code ==
        EBADMSG);
  CHECK(failure_of([&] { (void)ipcoro::detail::checked_object<std::uint64_t>(p, 4, "u64"); }).code ==
        EBADMSG);
  CHECK(&ipcoro::detail::checked_object<std::uint64_t>(p, 4088, "u64") ==
        reinterpret_cast<std::uint64_t*>(p.data() + 4088));
  const failure f = failure_of([&] { (void)checked_subspan(p, 5000, 1, "message length"); });
  CHECK(contains(f.what, "message length"));
}

TEST_CASE("no segment of this test run is left in /dev/shm", "[shm_segment]") {
  const std::string prefix = "ipcoro-test-" + std::to_string(::getpid()) + "-";
  std::vector<std::string> left;
  for (const auto& entry : std::filesystem::directory_iterator("/dev/shm")) {
    const std::string n = entry.path().filename().string();
    if (n.rfind(prefix, 0) == 0) left.push_back(n);
  }
  INFO("left behind: " << left.size());
  CHECK(left.empty());
}
