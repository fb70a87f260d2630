// SPDX-License-Identifier: MIT
// Memory-mapped files: the same validated region as a shm segment, backed by a file that
// outlives every process and, once synced, a machine crash.
//
// Durability, stated once:
//  - A process crash loses nothing written to the mapping: the pages belong to the kernel's
//    page cache, not to the process, and reach the file even if no process syncs them.
//  - A machine crash (power loss, kernel panic) loses whatever was written after the last
//    sync() that covered it; sync() returns once those pages are on stable storage
//    (msync MS_SYNC). Pages may also be written back earlier, in any order: a format that
//    must survive a machine crash orders its writes with sync() (e.g. data, sync, then
//    the index that publishes it, sync).
//  - Creation is atomic: the file is built unnamed (O_TMPFILE) in its directory, allocated
//    (posix_fallocate, so a full disk is an error at creation, not a SIGBUS later), given
//    its header, synced, and only then linked under its path. A path never names a
//    half-made region, even after a machine crash.
//
// Truncation: a process that may write the file can shorten it while it is mapped. The
// kernel then drops the lost pages from every mapping, and touching a page that lies wholly
// past the new end raises SIGBUS, which kills the process unless it handles the signal.
// Files cannot be sealed against this (only memfd/tmpfs objects made for sealing can): keep
// the file where only trusted processes can write it (mode 0600), or handle SIGBUS. A file:
// channel does the latter for its own mapping: the ring operation that touches a lost page
// fails with EBADMSG naming the file and its new size (docs/shared-memory.md, "Truncation
// of a mapped file").
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

/// A file mapped MAP_SHARED: a validated header, then `payload()`. Move-only. The file is
/// never removed by this class: it is meant to persist (remove it with std::filesystem).
class IPCORO_API mapped_file {
 public:
  mapped_file() noexcept = default;
  mapped_file(mapped_file&&) noexcept = default;
  mapped_file& operator=(mapped_file&&) noexcept = default;
  mapped_file(const mapped_file&) = delete;
  mapped_file& operator=(const mapped_file&) = delete;
  ~mapped_file() = default;

  /// Creates the file `path` (made absolute against the current directory) holding
  /// `layout.payload_size` zeroed bytes, with permission bits `mode` applied exactly.
  /// Throws std::system_error saying what to change: EEXIST when the path exists, ENOSPC
  /// naming the directory and its free space, ENOENT when the directory is missing,
  /// EACCES when this user may not create files there, EINVAL for a size of 0 or a mode
  /// beyond 0777. Nothing is left at `path` when it throws. `initialize`, if given, runs
  /// on the zeroed payload before the file gets its name (and before the sync that makes
  /// it durable), so no process ever sees the payload uninitialised.
  [[nodiscard]] static mapped_file create(const std::string& path, const region_layout& layout,
                                          unsigned mode = 0600,
                                          const std::function<void(std::span<std::byte>)>& initialize = {});
  /// Opens and validates an existing file (`expected.payload_size == 0` accepts any size),
  /// whoever created it and whether or not its creator still runs. Throws
  /// std::system_error: ENOENT naming the path, EACCES naming its mode and owner, EBADMSG
  /// when it is truncated, corrupt or not an ipcoro file, EPROTO when it holds another
  /// type tag, layout version or payload size.
  [[nodiscard]] static mapped_file open(const std::string& path, const region_layout& expected);
  /// open() if the file exists, create() otherwise (`layout.payload_size` must not be 0);
  /// safe when several processes race to do it. `created()` tells which happened.
  [[nodiscard]] static mapped_file open_or_create(
      const std::string& path, const region_layout& layout, unsigned mode = 0600,
      const std::function<void(std::span<std::byte>)>& initialize = {});

  /// create(); but when `path` holds an ipcoro file of the same type tag whose creator is
  /// dead (see creator_alive()), removes it and creates anew: for a file that belongs to
  /// the process that created it, such as a channel's. Throws EEXIST when the creator is
  /// alive or the file is not an ipcoro file of this type (it is never removed then), and
  /// what create() throws. Of two processes racing to reclaim one path, one creates the
  /// file and the other gets EEXIST naming it as the live creator.
  [[nodiscard]] static mapped_file create_or_reclaim(
      const std::string& path, const region_layout& layout, unsigned mode = 0600,
      const std::function<void(std::span<std::byte>)>& initialize = {});

  /// The payload: 64-byte aligned, `layout().payload_size` bytes.
  std::span<std::byte> payload() const noexcept { return region_.payload(); }
  region_layout layout() const noexcept { return region_.layout(); }
  /// The absolute path.
  const std::string& path() const noexcept { return path_; }
  pid_t creator_pid() const noexcept { return creator_.pid; }
  /// Whether the creating process still runs (pid, start time and boot all match).
  bool creator_alive() const noexcept;
  /// True when this object's open_or_create() (or create()) made the file.
  bool created() const noexcept { return created_; }
  explicit operator bool() const noexcept { return static_cast<bool>(region_); }

  /// Writes every dirty page of the mapping (header and payload) to stable storage
  /// (msync MS_SYNC); what survives a machine crash. Throws std::system_error (EIO).
  void sync() const { region_.sync(); }
  /// The same for the pages covering `range`, which must lie inside payload() (EINVAL).
  void sync(std::span<const std::byte> range) const;

 private:
  detail::mapped_region region_;
  std::string path_;
  detail::process_identity creator_;
  bool created_ = false;
};

}  // namespace ipcoro
