// SPDX-License-Identifier: MIT
// The region header (create, validate, map) and bounds-check errors.
#include "ipcoro/detail/region.hpp"

#include "ipcoro/error.hpp"
#include "ipcoro/hash.hpp"
#include "ipcoro/unique_fd.hpp"

#include "liveness.hpp"

#include <fcntl.h>
#include <fmt/core.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstddef>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <limits>
#include <new>
#include <optional>
#include <span>
#include <string_view>
#include <utility>

namespace ipcoro::detail {

namespace {

constexpr std::size_t checksum_begin = offsetof(region_header, header_version);
constexpr std::size_t checksum_end = offsetof(region_header, checksum);

std::uint64_t header_checksum(const region_header& h) noexcept {
  return fnv1a(std::as_bytes(std::span{&h, 1}).subspan(checksum_begin, checksum_end - checksum_begin));
}

std::string size_text(std::uint64_t bytes) {
  constexpr std::uint64_t mib = std::uint64_t{1024} * 1024;
  constexpr std::uint64_t gib = 1024 * mib;
  if (bytes >= 10 * gib) return fmt::format("{} bytes ({} GiB)", bytes, bytes / gib);
  if (bytes >= 10 * mib) return fmt::format("{} bytes ({} MiB)", bytes, bytes / mib);
  return fmt::format("{} bytes", bytes);
}

}  // namespace

// ---- bounds ----

void throw_out_of_bounds(const char* what, std::uint64_t offset, std::uint64_t length, std::size_t size) {
  throw std::system_error(EBADMSG, std::system_category(),
                          fmt::format("{}: offset {} + length {} lies outside the {}-byte region; the shared "
                                      "memory was corrupted or written by an incompatible peer",
                                      what, offset, length, size));
}

void throw_misaligned(const char* what, std::uint64_t offset, std::size_t alignment) {
  throw std::system_error(
      EBADMSG, std::system_category(),
      fmt::format("{}: offset {} is not a multiple of {}; the shared memory was corrupted "
                  "or written by an incompatible peer",
                  what, offset, alignment));
}

// ---- mapped_region ----

mapped_region::mapped_region(mapped_region&& other) noexcept
    : base_(std::exchange(other.base_, nullptr)),
      size_(std::exchange(other.size_, 0)),
      payload_size_(std::exchange(other.payload_size_, 0)) {}

mapped_region& mapped_region::operator=(mapped_region&& other) noexcept {
  if (this != &other) {
    if (base_ != nullptr) ::munmap(base_, size_);
    base_ = std::exchange(other.base_, nullptr);
    size_ = std::exchange(other.size_, 0);
    payload_size_ = std::exchange(other.payload_size_, 0);
  }
  return *this;
}

mapped_region::~mapped_region() {
  if (base_ != nullptr) ::munmap(base_, size_);
}

region_layout mapped_region::layout() const noexcept {
  const region_header& h = header();
  return {h.type_tag, h.layout_version, payload_size_};
}

namespace {

std::byte* map_shared(int fd, std::size_t size, const region_origin& origin) {
  void* p = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (p == MAP_FAILED) {
    const int err = errno;
    if (err == ENOMEM) {
      throw std::system_error(err, std::system_category(),
                              fmt::format("{}: cannot map {}: out of address space or over "
                                          "/proc/sys/vm/max_map_count mappings (or RLIMIT_AS, ulimit -v)",
                                          origin.description, size_text(size)));
    }
    if (err == EACCES) {
      throw std::system_error(err, std::system_category(),
                              fmt::format("{}: cannot map it for reading and writing; it must be opened "
                                          "read-write and its file system must not be mounted noexec",
                                          origin.description));
    }
    throw_errno(err, fmt::format("{}: mmap of {}", origin.description, size_text(size)));
  }
  return static_cast<std::byte*>(p);
}

/// The space of the file system holding `dir` that this process may allocate: root may
/// use the blocks reserved for it.
struct space_figures {
  std::uint64_t free = 0;
  std::uint64_t total = 0;
};
std::optional<space_figures> space_of(const std::string& dir) noexcept {
  struct statvfs sv {};
  if (::statvfs(dir.c_str(), &sv) != 0) return std::nullopt;
  const std::uint64_t blocks = ::geteuid() == 0 ? sv.f_bfree : sv.f_bavail;
  return space_figures{blocks * sv.f_frsize, std::uint64_t{sv.f_blocks} * sv.f_frsize};
}

[[noreturn]] void throw_no_space(const region_origin& origin, std::uint64_t total,
                                 const std::optional<space_figures>& space) {
  const std::string room =
      space ? fmt::format("it has {} free of {}", size_text(space->free), size_text(space->total))
            : std::string("its free space is unknown");
  const std::string fix =
      origin.shm
          ? fmt::format(
                "free space in {} (remove stale segments) or enlarge it (mount -o remount,size=... {})",
                origin.space_dir, origin.space_dir)
          : fmt::format("free space on that file system or put the file elsewhere");
  throw std::system_error(ENOSPC, std::system_category(),
                          fmt::format("{}: cannot allocate {} in {}: {}; ask for less, or {}",
                                      origin.description, size_text(total), origin.space_dir, room, fix));
}

std::string hex(std::uint64_t v) { return fmt::format("{:#x}", v); }

[[noreturn]] void throw_bad(int err, const region_origin& origin, const std::string& why) {
  throw std::system_error(err, std::system_category(), fmt::format("{}: {}", origin.description, why));
}

}  // namespace

mapped_region mapped_region::create(int fd, const region_layout& layout, const region_origin& origin) {
  constexpr std::uint64_t max_total = static_cast<std::uint64_t>(std::numeric_limits<off_t>::max());
  if (layout.payload_size == 0 || layout.payload_size > max_total - region_payload_offset ||
      layout.payload_size > std::numeric_limits<std::size_t>::max() - region_payload_offset) {
    throw_bad(EINVAL, origin,
              fmt::format("payload size {} is not possible: it must be at least 1 byte and fit in a file",
                          layout.payload_size));
  }
  const std::uint64_t total = region_payload_offset + layout.payload_size;
  // Refused before allocating: posix_fallocate of more than is free fills the file system
  // first (ext4 keeps what it allocated until the file is gone; tmpfs gives it back), so
  // other processes would meet a full disk, and the free space read afterwards says 0.
  if (const std::optional<space_figures> space = space_of(origin.space_dir); space && total > space->free) {
    throw_no_space(origin, total, space);
  }
  // Allocating every block now is what turns a full /dev/shm into an error here rather
  // than a SIGBUS on first touch later: tmpfs files are sparse otherwise.
  int rc;
  do {
    rc = ::posix_fallocate(fd, 0, static_cast<off_t>(total));
  } while (rc == EINTR);
  if (rc == ENOSPC) {
    // Lost a race for the space: give back what was allocated before reading the figures.
    (void)::ftruncate(fd, 0);
    throw_no_space(origin, total, space_of(origin.space_dir));
  }
  if (rc == EFBIG) {
    throw_bad(rc, origin,
              fmt::format("{} is larger than its file system allows for one file (or than RLIMIT_FSIZE, "
                          "ulimit -f)",
                          size_text(total)));
  }
  if (rc != 0)
    throw_errno(rc, fmt::format("{}: posix_fallocate of {}", origin.description, size_text(total)));

  std::byte* base = map_shared(fd, static_cast<std::size_t>(total), origin);
  mapped_region region(base, static_cast<std::size_t>(total), static_cast<std::size_t>(layout.payload_size));
  auto* h = new (base) region_header{};
  h->header_version = region_header_version;
  h->header_size = sizeof(region_header);
  h->type_tag = layout.type_tag;
  h->layout_version = layout.version;
  h->payload_offset = region_payload_offset;
  h->payload_size = layout.payload_size;
  h->creator = this_process();
  ::timespec now{};
  ::clock_gettime(CLOCK_REALTIME, &now);
  h->created_unix_ns =
      static_cast<std::uint64_t>(now.tv_sec) * 1'000'000'000u + static_cast<std::uint64_t>(now.tv_nsec);
  h->checksum = header_checksum(*h);
  std::atomic_ref<std::uint64_t>(h->magic).store(region_magic, std::memory_order_release);
  return region;
}

bool mapped_region::peek(int fd, region_header& out) noexcept {
  struct stat st {};
  if (::fstat(fd, &st) != 0 || st.st_size < static_cast<off_t>(sizeof(region_header))) return false;
  ssize_t n;
  do {
    n = ::pread(fd, &out, sizeof out, 0);
  } while (n < 0 && errno == EINTR);
  return n == static_cast<ssize_t>(sizeof out) && out.magic == region_magic &&
         out.checksum == header_checksum(out);
}

mapped_region mapped_region::open(int fd, const region_layout& expected, const region_origin& origin) {
  struct stat st {};
  if (::fstat(fd, &st) != 0) throw_errno(errno, fmt::format("{}: fstat", origin.description));
  if (!S_ISREG(st.st_mode)) throw_bad(EBADMSG, origin, "is not a regular file");
  const auto file_size = static_cast<std::uint64_t>(st.st_size);
  if (file_size < sizeof(region_header)) {
    throw_bad(EBADMSG, origin,
              fmt::format("is {} bytes, smaller than the {}-byte ipcoro header: it is truncated, or not an "
                          "ipcoro region",
                          file_size, sizeof(region_header)));
  }
  region_header h{};
  ssize_t n;
  do {
    n = ::pread(fd, &h, sizeof h, 0);
  } while (n < 0 && errno == EINTR);
  if (n < 0) throw_errno(errno, fmt::format("{}: reading the header", origin.description));
  if (n != static_cast<ssize_t>(sizeof h)) throw_bad(EBADMSG, origin, "the header could not be read whole");

  if (h.magic != region_magic) {
    throw_bad(EBADMSG, origin,
              h.magic == 0
                  ? std::string("has no ipcoro header (its magic is zero): it was never completed, or "
                                "is not an ipcoro region")
                  : fmt::format("is not an ipcoro region (magic {}, expected {})", hex(h.magic),
                                hex(region_magic)));
  }
  if (h.header_version != region_header_version) {
    throw_bad(EPROTO, origin,
              fmt::format("has header version {}, this ipcoro reads version {}: create it with the same "
                          "ipcoro version",
                          h.header_version, region_header_version));
  }
  if (h.checksum != header_checksum(h)) {
    throw_bad(EBADMSG, origin, "its header is corrupt (checksum mismatch): remove it and create it again");
  }
  if (h.header_size != sizeof(region_header) || h.payload_offset != region_payload_offset) {
    throw_bad(
        EBADMSG, origin,
        fmt::format("its header claims a {}-byte header and a payload at offset {}; this ipcoro uses {} "
                    "and {}",
                    h.header_size, h.payload_offset, sizeof(region_header), region_payload_offset));
  }
  if (h.type_tag != expected.type_tag) {
    throw_bad(EPROTO, origin,
              fmt::format("holds type tag {}, expected {}: another kind of object uses this name",
                          hex(h.type_tag), hex(expected.type_tag)));
  }
  if (h.layout_version != expected.version) {
    throw_bad(
        EPROTO, origin,
        fmt::format("has layout version {}, expected {}: its creator runs another version of the program",
                    h.layout_version, expected.version));
  }
  if (expected.payload_size != 0 && h.payload_size != expected.payload_size) {
    throw_bad(EPROTO, origin,
              fmt::format("has a payload of {} bytes, expected {}: open it with the creator's size (or 0 to "
                          "accept any)",
                          h.payload_size, expected.payload_size));
  }
  if (h.payload_size > file_size - region_payload_offset) {
    throw_bad(EBADMSG, origin,
              fmt::format("is truncated: the file has {} bytes but its header says {}", file_size,
                          region_payload_offset + h.payload_size));
  }
  if (file_size != region_payload_offset + h.payload_size) {
    throw_bad(EBADMSG, origin,
              fmt::format("is {} bytes but its header says {}: it was resized after creation", file_size,
                          region_payload_offset + h.payload_size));
  }
  if (file_size > std::numeric_limits<std::size_t>::max()) throw_bad(EFBIG, origin, "is too large to map");

  std::byte* base = map_shared(fd, static_cast<std::size_t>(file_size), origin);
  // Sizes come from the copy validated above, never again from memory a peer can write.
  return mapped_region(base, static_cast<std::size_t>(file_size), static_cast<std::size_t>(h.payload_size));
}

void mapped_region::sync(std::span<const std::byte> range) const {
  if (base_ == nullptr) return;
  std::size_t begin = 0;
  std::size_t end = size_;
  if (!range.empty()) {
    const auto* first = range.data();
    if (first < base_ || first > base_ + size_ ||
        range.size() > static_cast<std::size_t>(base_ + size_ - first)) {
      throw std::system_error(EINVAL, std::system_category(), "sync: the range is outside the mapping");
    }
    begin = static_cast<std::size_t>(first - base_);
    end = begin + range.size();
  }
  const auto page = static_cast<std::size_t>(::sysconf(_SC_PAGESIZE));
  begin -= begin % page;
  if (::msync(base_ + begin, end - begin, MS_SYNC) != 0) throw_errno(errno, "msync (MS_SYNC)");
}

}  // namespace ipcoro::detail
