// SPDX-License-Identifier: MIT
// Named POSIX shared memory segments: allocated up front, validated on open, removed by
// their owner, reclaimable when their creator died.
//
// The rules, in one place:
//  - Naming: "frames" and "/frames" name the same segment, /dev/shm/frames (at most
//    NAME_MAX bytes, no other '/').
//  - Creating: the whole segment is allocated at creation (posix_fallocate), so a full
//    /dev/shm is an ENOSPC error there, never a SIGBUS later. It is built unnamed
//    (O_TMPFILE) and given its name only once its header is complete, so no process ever
//    opens a half-made segment. Mode 0600 unless asked otherwise, exactly (no umask).
//  - Opening: the header is checked (magic, header version, checksum, type tag, layout
//    version, payload size, file size) and a mismatch is refused with a message naming it.
//    Sizes used afterwards come from that validated copy, never again from shared memory.
//  - Removing: the creating process owns the name and removes it on destruction (a forked
//    child's copy never does); openers remove it only by calling unlink().
//  - Reclaiming: the creator's pid, start time and boot are in the header, so a survivor
//    can tell that the creator is gone even if its pid was reused (creator_alive()), and
//    create_or_reclaim() replaces a dead creator's segment.
//  - Trust: the payload is memory another process writes. Read offsets, lengths and
//    indices from it through detail::checked_subspan / checked_object (region.hpp). A
//    peer that truncates the file under a mapping makes later accesses fault (SIGBUS):
//    the kernel offers no way to forbid that for shm_open segments.
#pragma once

#include "ipcoro/detail/region.hpp"
#include "ipcoro/export.hpp"
#include "ipcoro/region_layout.hpp"

#include <sys/types.h>

#include <cstddef>
#include <functional>
#include <span>
#include <string>

namespace ipcoro {

/// A mapped shared memory segment: a validated header, then `payload()`. Move-only.
class IPCORO_API shm_segment {
 public:
  struct options {
    unsigned mode = 0600;  ///< permission bits, at most 0777, applied exactly
    /// Runs on the zeroed payload before the segment gets its name, so no other process
    /// ever sees the payload uninitialised (e.g. constructs the object that lives there).
    /// If it throws, nothing is created and the exception propagates.
    std::function<void(std::span<std::byte>)> initialize = nullptr;
  };

  shm_segment() noexcept = default;
  shm_segment(shm_segment&& other) noexcept;
  shm_segment& operator=(shm_segment&& other) noexcept;
  shm_segment(const shm_segment&) = delete;
  shm_segment& operator=(const shm_segment&) = delete;
  /// Unmaps; the creating process also removes the name unless release_name() was called.
  ~shm_segment();

  /// Creates the segment `name` holding `layout.payload_size` zeroed bytes. Throws
  /// std::system_error saying what to change: EEXIST naming the existing segment's
  /// creator and whether it is alive, ENOSPC naming /dev/shm and its free space, EINVAL
  /// for a bad name, mode or size, EACCES when /dev/shm refuses this user.
  [[nodiscard]] static shm_segment create(const std::string& name, const region_layout& layout,
                                          const options& opts);
  [[nodiscard]] static shm_segment create(const std::string& name, const region_layout& layout) {
    return create(name, layout, options{});
  }
  /// Opens and validates an existing segment (`expected.payload_size == 0` accepts any
  /// size). Throws std::system_error: ENOENT when there is none, EACCES naming its mode and
  /// owner, EBADMSG when it is truncated, corrupt or not an ipcoro segment, EPROTO when it
  /// holds another type tag, layout version or payload size.
  [[nodiscard]] static shm_segment open(const std::string& name, const region_layout& expected);
  /// create(); but when `name` exists, holds the same type tag, and its creator is dead
  /// (see creator_alive()), removes it and creates anew. Throws EEXIST when the creator
  /// is alive or the existing file is not an ipcoro segment of this type (it is never
  /// removed then), and what create() throws. Two survivors racing to reclaim the same
  /// name end with one segment: the loser gets EEXIST naming the winner.
  [[nodiscard]] static shm_segment create_or_reclaim(const std::string& name, const region_layout& layout,
                                                     const options& opts);
  [[nodiscard]] static shm_segment create_or_reclaim(const std::string& name, const region_layout& layout) {
    return create_or_reclaim(name, layout, options{});
  }
  /// Removes the segment `name` if it exists (shm_unlink); returns whether it did. For
  /// cleanup by name; processes that have it mapped keep their mapping.
  static bool unlink(const std::string& name);

  /// The payload: 64-byte aligned, `layout().payload_size` bytes, zeroed at creation.
  std::span<std::byte> payload() const noexcept { return region_.payload(); }
  /// The layout found in the header (the actual payload size when opened with 0).
  region_layout layout() const noexcept { return region_.layout(); }
  /// The name with its leading '/', as shm_open takes it.
  const std::string& name() const noexcept { return name_; }
  pid_t creator_pid() const noexcept { return creator_.pid; }
  /// Whether the process that created the segment still runs (same pid, start time and
  /// boot; a zombie counts as dead).
  bool creator_alive() const noexcept;
  /// True when this object removes the name on destruction.
  bool owns_name() const noexcept { return owns_name_; }
  explicit operator bool() const noexcept { return static_cast<bool>(region_); }

  /// Removes the name now, if it still names this segment (a segment created anew under
  /// the same name after a reclaim is left alone). Mappings stay valid.
  void unlink();
  /// Keeps the name after destruction: another process will open and remove it.
  void release_name() noexcept { owns_name_ = false; }

 private:
  static shm_segment create_impl(const std::string& name, const region_layout& layout, const options& opts,
                                 bool reclaim);
  /// Records the name, the creator and the file identity of the mapped region behind `fd`.
  void adopt(int fd, const std::string& name);

  detail::mapped_region region_;
  std::string name_;
  detail::process_identity creator_;
  dev_t dev_ = 0;
  ino_t ino_ = 0;
  pid_t owner_pid_ = 0;
  bool owns_name_ = false;
};

}  // namespace ipcoro
