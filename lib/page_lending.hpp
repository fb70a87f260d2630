// SPDX-License-Identifier: MIT
// lent_pages: where a pipe's sender builds a large frame that it lends to the pipe
// (vmsplice) instead of copying it in, and when that memory may be written again.
#pragma once

#include <sys/types.h>

#include <array>
#include <cstddef>
#include <cstdint>
#include <span>

namespace ipcoro::detail {

/// A pipe sender's staging memory for frames it lends to the pipe with vmsplice(2): the
/// pipe then refers to these pages instead of holding a copy, until its reader has read
/// them. So a region is written again only once everything lent from it has been read,
/// which the pipe's count of unread bytes (FIONREAD) tells: of what this sender has put
/// into the pipe, all but the unread bytes has been read (other writers' unread bytes only
/// make that estimate smaller, never larger). Sound for a reader that reads, as an ipcoro
/// receiver does; a reader that spliced the pages on to another pipe would still refer to
/// them, so only senders whose receiver is an ipcoro channel lend (pipe: links).
class lent_pages {
 public:
  /// Frames from this size up are lent: below it, copying into the pipe costs less than
  /// pinning the pages and the extra system calls.
  static constexpr std::size_t min_frame = std::size_t{32} * 1024;
  static constexpr std::size_t arena_size = std::size_t{1024} * 1024;
  /// Larger frames are copied: a quarter of the staging memory, so that several lent
  /// frames can be in the pipe while the next is built.
  static constexpr std::size_t max_frame = arena_size / 4;

  lent_pages() noexcept = default;
  lent_pages(const lent_pages&) = delete;
  lent_pages& operator=(const lent_pages&) = delete;
  ~lent_pages();

  /// Room for a frame of `n` bytes that no lent page of the pipe `fd` refers to any more
  /// (`put`: what this sender has put into the pipe so far), the frame being lent from now
  /// on; empty when `n` is out of the lent sizes, when every region is still in the pipe,
  /// or without memory: the frame is copied then.
  std::span<std::byte> claim(int fd, std::size_t n, std::uint64_t put) noexcept;
  /// Lends bytes [from, n) of the claimed frame to the pipe `fd` without waiting: how many
  /// the pipe took (0 when it is full), or -errno.
  ssize_t lend(int fd, std::size_t from) noexcept;
  /// The claimed frame's first `lent` bytes are in the pipe, ending at `put` (what this
  /// sender has put into the pipe, with them); the rest, if any, is copied by the caller.
  void settle(std::size_t lent, std::uint64_t put) noexcept;
  /// The claimed frame's bytes.
  std::span<std::byte> claimed() const noexcept { return {base_ + at_, n_}; }

 private:
  struct region {
    std::size_t begin = 0;
    std::size_t end = 0;
    std::uint64_t put = 0;  // what the sender had put into the pipe once this was lent
  };
  /// True when a region still in the pipe (as far as `read_` shows) overlaps [at, at + n).
  bool in_use(std::size_t at, std::size_t n) const noexcept;

  std::byte* base_ = nullptr;
  bool failed_ = false;  // no memory once: copy from then on
  std::size_t next_ = 0;
  std::size_t at_ = 0;  // the claimed frame
  std::size_t n_ = 0;
  std::array<region, arena_size / min_frame + 1> regions_{};  // a ring, oldest first
  std::size_t first_ = 0;
  std::size_t count_ = 0;
  std::uint64_t read_ = 0;  // of what this sender put, the reader has read at least this
};

}  // namespace ipcoro::detail
