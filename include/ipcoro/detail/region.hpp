// SPDX-License-Identifier: MIT
// The validated header shared by shm segments and mapped files, process identities that
// survive pid reuse, and bounds-checked access to memory another process can write.
#pragma once

#include "ipcoro/export.hpp"
#include "ipcoro/region_layout.hpp"

#include <sys/types.h>

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <type_traits>

namespace ipcoro::detail {

/// A process, named so that a reused pid is not mistaken for it: the pid, the start time
/// of that process (clock ticks after boot, /proc/<pid>/stat field 22) and the boot it ran
/// in (a hash of /proc/sys/kernel/random/boot_id). Trivially copyable: it lives in shared
/// memory. All zero means "nobody".
struct process_identity {
  std::int32_t pid = 0;
  std::uint32_t reserved = 0;
  std::uint64_t start_time = 0;
  std::uint64_t boot_id = 0;

  friend bool operator==(const process_identity&, const process_identity&) = default;
};
static_assert(std::is_trivially_copyable_v<process_identity> && sizeof(process_identity) == 24);

/// The header at offset 0 of every region. The magic is written last (a release store
/// through std::atomic_ref), so a reader that sees it sees a complete header; the checksum
/// catches corruption of the rest. Plain data, so it can be copied out and checked.
struct region_header {
  std::uint64_t magic;
  std::uint32_t header_version;
  std::uint32_t header_size;
  std::uint32_t type_tag;
  std::uint32_t layout_version;
  std::uint64_t payload_offset;
  std::uint64_t payload_size;
  process_identity creator;
  std::uint64_t created_unix_ns;
  std::byte reserved[176];
  std::uint64_t checksum;  ///< FNV-1a over the bytes between magic and checksum
};
static_assert(sizeof(region_header) == 256 && std::is_trivially_copyable_v<region_header>);

inline constexpr std::uint64_t region_magic = 0x3147'4552'4f52'4350ull;  // "PCROREG1"
inline constexpr std::uint32_t region_header_version = 1;
/// The payload starts here: cache-line aligned, after the header.
inline constexpr std::uint64_t region_payload_offset = sizeof(region_header);

/// How a region's backing file came to be, for error messages: what to call it and which
/// directory's free space a failed allocation should report.
struct region_origin {
  std::string description;  ///< e.g. "shm segment /frames (/dev/shm/frames)"
  std::string space_dir;    ///< e.g. "/dev/shm", or the file's directory
  bool shm = false;         ///< a tmpfs in /dev/shm rather than an ordinary file system
};

/// An owned MAP_SHARED mapping of a whole region (header + payload). Move-only.
class IPCORO_API mapped_region {
 public:
  mapped_region() noexcept = default;
  mapped_region(mapped_region&& other) noexcept;
  mapped_region& operator=(mapped_region&& other) noexcept;
  mapped_region(const mapped_region&) = delete;
  mapped_region& operator=(const mapped_region&) = delete;
  ~mapped_region();

  /// Allocates the whole region in `fd` (an empty file, not yet visible under its name)
  /// with posix_fallocate, maps it and writes the header, magic last. Throws
  /// std::system_error: ENOSPC naming the directory and its free space, EINVAL for a
  /// payload size of 0 or beyond what a file can hold.
  static mapped_region create(int fd, const region_layout& layout, const region_origin& origin);
  /// Validates the region in `fd` against `expected` (magic, header version, checksum,
  /// type tag, layout version, payload size, file size) before mapping it, and maps it.
  /// Throws std::system_error naming what mismatched: EBADMSG for a truncated, corrupt or
  /// foreign file, EPROTO for another type tag, layout version or payload size.
  static mapped_region open(int fd, const region_layout& expected, const region_origin& origin);
  /// The header in `fd` if it is a complete, uncorrupted region header (not checked
  /// against any layout); false otherwise. Reads with pread: nothing is mapped.
  static bool peek(int fd, region_header& out) noexcept;

  std::span<std::byte> payload() const noexcept { return {base_ + region_payload_offset, payload_size_}; }
  const region_header& header() const noexcept { return *reinterpret_cast<const region_header*>(base_); }
  region_layout layout() const noexcept;
  std::span<std::byte> whole() const noexcept { return {base_, size_}; }
  explicit operator bool() const noexcept { return base_ != nullptr; }

  /// msync(MS_SYNC) of the pages covering `range` (inside the mapping); all when empty.
  void sync(std::span<const std::byte> range = {}) const;

 private:
  mapped_region(std::byte* base, std::size_t size, std::size_t payload_size) noexcept
      : base_(base), size_(size), payload_size_(payload_size) {}
  std::byte* base_ = nullptr;
  std::size_t size_ = 0;
  std::size_t payload_size_ = 0;
};

IPCORO_API [[noreturn]] void throw_out_of_bounds(const char* what, std::uint64_t offset, std::uint64_t length,
                                                 std::size_t size);
IPCORO_API [[noreturn]] void throw_misaligned(const char* what, std::uint64_t offset, std::size_t alignment);

/// Throws std::system_error(EBADMSG) naming `what` unless [offset, offset + length) lies
/// inside `region`. For offsets and lengths read from memory another process can write.
inline void check_bounds(std::span<const std::byte> region, std::uint64_t offset, std::uint64_t length,
                         const char* what) {
  if (offset > region.size() || length > region.size() - offset) {
    throw_out_of_bounds(what, offset, length, region.size());
  }
}

/// `region[offset, offset + length)`, bounds-checked as above.
inline std::span<std::byte> checked_subspan(std::span<std::byte> region, std::uint64_t offset,
                                            std::uint64_t length, const char* what) {
  check_bounds(region, offset, length, what);
  return region.subspan(static_cast<std::size_t>(offset), static_cast<std::size_t>(length));
}

/// The T at `offset` in `region`, bounds- and alignment-checked (EBADMSG naming `what`).
/// T must be an implicit-lifetime type made for shared memory (plain data, atomics).
template <class T>
T& checked_object(std::span<std::byte> region, std::uint64_t offset, const char* what) {
  static_assert(std::is_standard_layout_v<T>, "only plain data belongs in shared memory");
  check_bounds(region, offset, sizeof(T), what);
  if ((reinterpret_cast<std::uintptr_t>(region.data()) + offset) % alignof(T) != 0) {
    throw_misaligned(what, offset, alignof(T));
  }
  return *reinterpret_cast<T*>(region.data() + offset);
}

}  // namespace ipcoro::detail
