// SPDX-License-Identifier: MIT
// Memory-mapped files: validation on open, reopening after the creator died, sync, cleanup.
#include <ipcoro/mapped_file.hpp>

#include "process.hpp"

using ipcoro::test::contains;
using ipcoro::test::failure;
using ipcoro::test::failure_of;
using ipcoro::test::handshake;

#include <catch2/catch.hpp>

#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <stdexcept>
#include <string>
#include <system_error>
#include <vector>

namespace {

namespace fs = std::filesystem;
using ipcoro::mapped_file;
using ipcoro::region_layout;
using ipcoro::test::child_process;
using ipcoro::test::unique_name;

constexpr std::uint32_t tag = 0x6c6f6721;  // "log!"
constexpr region_layout layout{tag, 2, 64 * 1024};

/// A path in the temporary directory, removed when the test ends however it ends.
struct temp_path {
  std::string path;
  explicit temp_path(const std::string& tag_text)
      : path((fs::temp_directory_path() / unique_name(tag_text)).string()) {}
  ~temp_path() {
    std::error_code ec;
    fs::remove(path, ec);
  }
  temp_path(const temp_path&) = delete;
  temp_path& operator=(const temp_path&) = delete;
};

void poke(const std::string& path, off_t offset, const void* bytes, std::size_t n) {
  const int fd = ::open(path.c_str(), O_WRONLY | O_CLOEXEC);
  REQUIRE(fd >= 0);
  REQUIRE(::pwrite(fd, bytes, n, offset) == static_cast<ssize_t>(n));
  ::close(fd);
}

void fill(std::span<std::byte> out, std::uint64_t seed) { ipcoro::test::fill_pattern(out, seed, 0); }

bool holds_pattern(std::span<const std::byte> data, std::uint64_t seed) {
  std::vector<std::byte> expected(data.size());
  ipcoro::test::fill_pattern(expected, seed, 0);
  return std::memcmp(expected.data(), data.data(), data.size()) == 0;
}

}  // namespace

TEST_CASE("a created file is zeroed, sized, and reopened with its contents after its creator exited",
          "[mapped_file][process]") {
  const temp_path t("mf-reopen");
  child_process creator([&] {
    mapped_file f = mapped_file::create(t.path, layout);
    if (!f.created() || f.payload().size() != layout.payload_size) return 1;
    if (!std::all_of(f.payload().begin(), f.payload().end(), [](std::byte b) { return b == std::byte{0}; }))
      return 2;
    fill(f.payload(), 11);
    f.sync();
    return 0;
  });
  REQUIRE(creator.wait() == 0);
  REQUIRE(fs::exists(t.path));
  CHECK(fs::file_size(t.path) == 256 + layout.payload_size);

  mapped_file f = mapped_file::open(t.path, layout);
  CHECK(f.path() == t.path);
  CHECK_FALSE(f.created());
  CHECK(f.creator_pid() == creator.pid());
  CHECK_FALSE(f.creator_alive());
  CHECK(reinterpret_cast<std::uintptr_t>(f.payload().data()) % 64 == 0);
  CHECK(holds_pattern(f.payload(), 11));
}

TEST_CASE("everything written to the mapping survives the writer's SIGKILL, without a sync",
          "[mapped_file][process]") {
  const temp_path t("mf-kill");
  handshake written;
  child_process writer([&] {
    mapped_file f = mapped_file::create(t.path, layout);
    fill(f.payload(), 23);
    written.signal();
    ::pause();  // until killed
    return 0;
  });
  REQUIRE(written.wait());
  writer.kill(SIGKILL);
  REQUIRE(writer.wait() == 128 + SIGKILL);

  const mapped_file f = mapped_file::open(t.path, layout);
  CHECK(holds_pattern(f.payload(), 23));
}

TEST_CASE("two processes share one file mapping and see each other's writes", "[mapped_file][process]") {
  const temp_path t("mf-shared");
  mapped_file f = mapped_file::create(t.path, layout);
  child_process child([&] {
    mapped_file other = mapped_file::open(t.path, layout);
    if (other.creator_pid() != ::getppid() || !other.creator_alive()) return 1;
    fill(other.payload(), 5);
    return 0;
  });
  REQUIRE(child.wait() == 0);
  CHECK(holds_pattern(f.payload(), 5));
}

TEST_CASE("open_or_create creates once, then opens what is there", "[mapped_file]") {
  const temp_path t("mf-ooc");
  {
    mapped_file first = mapped_file::open_or_create(t.path, layout);
    CHECK(first.created());
    fill(first.payload().first(4096), 99);
  }
  mapped_file second = mapped_file::open_or_create(t.path, layout);
  CHECK_FALSE(second.created());
  CHECK(holds_pattern(second.payload().first(4096), 99));
  // A mismatch is an error, not a silent re-creation.
  CHECK(failure_of([&] {
          (void)mapped_file::open_or_create(t.path, {tag, 3, layout.payload_size});
        }).code == EPROTO);
}

TEST_CASE("processes racing through open_or_create share one file", "[mapped_file][process]") {
  const temp_path t("mf-race");
  handshake go;
  std::vector<child_process> racers;
  for (int i = 0; i < 4; ++i) {
    racers.emplace_back([&, i] {
      if (!go.wait()) return 3;
      mapped_file f = mapped_file::open_or_create(t.path, layout);
      // Each racer marks its own byte; a racer that re-created the file would wipe others'.
      f.payload()[static_cast<std::size_t>(i)] = std::byte{1};
      return f.created() ? 0 : 1;
    });
  }
  for (int i = 0; i < 4; ++i) go.signal();
  int creators = 0;
  for (auto& r : racers) {
    const int code = r.wait();
    CHECK((code == 0 || code == 1));
    creators += code == 0;
  }
  CHECK(creators == 1);
  const mapped_file f = mapped_file::open(t.path, layout);
  for (std::size_t i = 0; i < 4; ++i) CHECK(f.payload()[i] == std::byte{1});
}

TEST_CASE("initialize runs on the payload before the file gets its name", "[mapped_file]") {
  const temp_path t("mf-init");
  bool named_during_initialize = true;
  {
    mapped_file f = mapped_file::create(t.path, layout, 0600, [&](std::span<std::byte> p) {
      named_during_initialize = fs::exists(t.path);
      fill(p, 77);
    });
  }
  CHECK_FALSE(named_during_initialize);
  CHECK(holds_pattern(mapped_file::open(t.path, layout).payload(), 77));

  const temp_path u("mf-init-throws");
  CHECK_THROWS_AS(
      mapped_file::create(u.path, layout, 0600, [](std::span<std::byte>) { throw std::runtime_error("no"); }),
      std::runtime_error);
  CHECK_FALSE(fs::exists(u.path));
}

TEST_CASE("create refuses an existing path and leaves it as it was", "[mapped_file]") {
  const temp_path t("mf-exists");
  { std::ofstream(t.path) << "precious"; }
  const failure f = failure_of([&] { (void)mapped_file::create(t.path, layout); });
  CHECK(f.code == EEXIST);
  CHECK(contains(f.what, t.path));
  std::ifstream in(t.path);
  std::string content;
  in >> content;
  CHECK(content == "precious");
}

TEST_CASE("open refuses a missing file, another layout, a foreign file, a truncated or corrupt one",
          "[mapped_file]") {
  const temp_path t("mf-validate");
  failure f = failure_of([&] { (void)mapped_file::open(t.path, layout); });
  CHECK(f.code == ENOENT);
  CHECK(contains(f.what, t.path));

  { mapped_file created = mapped_file::create(t.path, layout); }
  CHECK(failure_of([&] {
          (void)mapped_file::open(t.path, {tag ^ 1, 2, layout.payload_size});
        }).code == EPROTO);
  CHECK(failure_of([&] { (void)mapped_file::open(t.path, {tag, 1, layout.payload_size}); }).code == EPROTO);
  CHECK(failure_of([&] { (void)mapped_file::open(t.path, {tag, 2, 4096}); }).code == EPROTO);
  CHECK(mapped_file::open(t.path, {tag, 2, 0}).payload().size() == layout.payload_size);

  SECTION("corrupt header") {
    const std::uint32_t other_tag = tag ^ 0x100;
    poke(t.path, offsetof(ipcoro::detail::region_header, type_tag), &other_tag, sizeof other_tag);
    f = failure_of([&] { (void)mapped_file::open(t.path, layout); });
    CHECK(f.code == EBADMSG);
    CHECK(contains(f.what, "checksum"));
  }
  SECTION("truncated") {
    fs::resize_file(t.path, 256 + 1000);
    f = failure_of([&] { (void)mapped_file::open(t.path, layout); });
    CHECK(f.code == EBADMSG);
    CHECK(contains(f.what, "truncated"));
  }
  SECTION("foreign") {
    fs::remove(t.path);
    { std::ofstream(t.path) << std::string(100000, 'z'); }
    f = failure_of([&] { (void)mapped_file::open(t.path, layout); });
    CHECK(f.code == EBADMSG);
    CHECK(contains(f.what, "not an ipcoro region"));
  }
  SECTION("empty") {
    fs::resize_file(t.path, 0);
    f = failure_of([&] { (void)mapped_file::open(t.path, layout); });
    CHECK(f.code == EBADMSG);
  }
}

TEST_CASE("a failed creation leaves nothing behind", "[mapped_file]") {
  const temp_path t("mf-fail");
  CHECK(failure_of([&] { (void)mapped_file::create(t.path, {tag, 1, 0}); }).code == EINVAL);
  CHECK(failure_of([&] { (void)mapped_file::create(t.path, layout, 04777); }).code == EINVAL);
  CHECK_FALSE(fs::exists(t.path));

  // A file bigger than its file system: /dev/shm is a tmpfs with a known size.
  const std::string big = "/dev/shm/" + unique_name("mf-big");
  const failure f = failure_of([&] { (void)mapped_file::create(big, {tag, 1, 1ull << 50}); });
  CHECK(f.code == ENOSPC);
  CHECK(contains(f.what, "/dev/shm"));
  CHECK_FALSE(fs::exists(big));

  const std::string nodir = (fs::temp_directory_path() / unique_name("no-such-dir") / "f").string();
  const failure g = failure_of([&] { (void)mapped_file::create(nodir, layout); });
  CHECK(g.code == ENOENT);
  CHECK(contains(g.what, "does not exist"));
}

TEST_CASE("the mode is applied exactly and relative paths are made absolute", "[mapped_file]") {
  const temp_path t("mf-mode");
  const auto saved = fs::current_path();
  fs::current_path(fs::path(t.path).parent_path());
  const mode_t old = ::umask(077);
  mapped_file f = mapped_file::create(fs::path(t.path).filename().string(), layout, 0644);
  ::umask(old);
  fs::current_path(saved);
  CHECK(f.path() == t.path);
  struct stat st {};
  REQUIRE(::stat(t.path.c_str(), &st) == 0);
  CHECK((st.st_mode & 0777) == 0644);
}

TEST_CASE("sync writes the payload back and refuses ranges outside it", "[mapped_file]") {
  const temp_path t("mf-sync");
  mapped_file f = mapped_file::create(t.path, layout);
  fill(f.payload(), 3);
  f.sync(f.payload().subspan(5000, 100));
  f.sync();
  // What the file holds through read(2) is what was written through the mapping.
  std::vector<std::byte> on_disk(layout.payload_size);
  const int fd = ::open(t.path.c_str(), O_RDONLY | O_CLOEXEC);
  REQUIRE(fd >= 0);
  CHECK(::pread(fd, on_disk.data(), on_disk.size(), 256) == static_cast<ssize_t>(on_disk.size()));
  ::close(fd);
  CHECK(holds_pattern(on_disk, 3));

  std::vector<std::byte> elsewhere(16);
  CHECK(failure_of([&] { f.sync(elsewhere); }).code == EINVAL);
  CHECK(failure_of([&] {
          f.sync(std::span<const std::byte>(f.payload().data() + 100, layout.payload_size));
        }).code == EINVAL);
}

TEST_CASE("no file of this test run is left in the temporary directory", "[mapped_file]") {
  const std::string prefix = "ipcoro-test-" + std::to_string(::getpid()) + "-";
  std::vector<std::string> left;
  for (const auto& dir : {fs::temp_directory_path(), fs::path("/dev/shm")}) {
    for (const auto& entry : fs::directory_iterator(dir)) {
      const std::string n = entry.path().filename().string();
      if (n.rfind(prefix, 0) == 0) left.push_back(n);
    }
  }
  INFO("left behind: " << left.size());
  CHECK(left.empty());
}
