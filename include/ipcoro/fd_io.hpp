// SPDX-License-Identifier: MIT
// Awaitable reads, writes and splices on any file descriptor, through the io_uring loop.
#pragma once

#include "ipcoro/export.hpp"
#include "ipcoro/io_operation.hpp"

#include <cstddef>
#include <cstdint>
#include <span>

namespace ipcoro {

/// How a write starts. Anonymous pipes take RWF_NOWAIT, so a write with room completes
/// at once without the ring; files that refuse it (FIFOs on Linux 6.18 return EOPNOTSUPP)
/// would pay a wasted syscall per write, so their writers go straight to the ring.
enum class write_path : unsigned char { try_nowait_first, ring_only };

/// One read(2): completes with the number of bytes read, 0 at end of stream. An empty
/// buffer completes at once with 0 (through the ring it would wait for data).
class [[nodiscard]] IPCORO_API read_operation : public io_operation<read_operation> {
 public:
  read_operation(int fd, std::span<std::byte> buffer) noexcept;
  std::size_t finish(int res) const;

 private:
  static void prep(detail::op_base& op, ::io_uring_sqe* sqe) noexcept;
  static int attempt(detail::op_base& op) noexcept;
  std::byte* data_;
  std::uint32_t size_;
  int fd_;
};

/// One write(2): completes with the number of bytes written, which may be short. When the
/// descriptor can take the bytes at once (RWF_NOWAIT), the write is done without the ring
/// and without suspending; otherwise it waits in the ring.
/// Writing to a pipe or FIFO with no reader throws std::system_error with EPIPE.
class [[nodiscard]] IPCORO_API write_operation : public io_operation<write_operation> {
 public:
  write_operation(int fd, std::span<const std::byte> buffer,
                  write_path path = write_path::try_nowait_first) noexcept;
  std::size_t finish(int res) const;

 private:
  static void prep(detail::op_base& op, ::io_uring_sqe* sqe) noexcept;
  static int attempt(detail::op_base& op) noexcept;
  const std::byte* data_;
  std::uint32_t size_;
  int fd_;
};

/// Reads until the buffer is full or the stream ends, resubmitting after short reads
/// without resuming the coroutine. Completes with the bytes read: `buffer.size()`, or
/// fewer only when end of stream came first.
class [[nodiscard]] IPCORO_API read_exact_operation : public io_operation<read_exact_operation> {
 public:
  read_exact_operation(int fd, std::span<std::byte> buffer) noexcept;
  std::size_t finish(int res) const;

 private:
  static void prep(detail::op_base& op, ::io_uring_sqe* sqe) noexcept;
  static int attempt(detail::op_base& op) noexcept;
  static bool progress(detail::op_base& op, int res) noexcept;
  std::byte* data_;
  std::size_t size_;
  std::size_t done_ = 0;
  int fd_;
};

/// Writes the whole buffer, resubmitting after short writes (first trying, like
/// write_operation, to write without the ring). Throws on error (EPIPE when
/// the reader is gone); on error the bytes already written are not reported by the
/// error, but written() still says how many there were.
class [[nodiscard]] IPCORO_API write_all_operation : public io_operation<write_all_operation> {
 public:
  write_all_operation(int fd, std::span<const std::byte> buffer,
                      write_path path = write_path::try_nowait_first) noexcept;
  void finish(int res) const;
  /// The bytes written so far: after a cancellation, whether (and where) the write was cut.
  std::size_t written() const noexcept { return done_; }

 private:
  static void prep(detail::op_base& op, ::io_uring_sqe* sqe) noexcept;
  static bool progress(detail::op_base& op, int res) noexcept;
  static int attempt(detail::op_base& op) noexcept;
  const std::byte* data_;
  std::size_t size_;
  std::size_t done_ = 0;
  int fd_;
};

/// splice(2) through the ring: moves up to `length` bytes from `fd_in` to `fd_out`
/// without copying them through user space; one of the two must be a pipe. An offset of
/// -1 means "the descriptor's current position" (required for pipes). Completes with the
/// bytes moved, 0 at end of input.
class [[nodiscard]] IPCORO_API splice_operation : public io_operation<splice_operation> {
 public:
  splice_operation(int fd_in, std::int64_t off_in, int fd_out, std::int64_t off_out, std::uint32_t length,
                   unsigned flags) noexcept;
  std::size_t finish(int res) const;

 private:
  static void prep(detail::op_base& op, ::io_uring_sqe* sqe) noexcept;
  std::int64_t off_in_;
  std::int64_t off_out_;
  int fd_in_;
  int fd_out_;
  std::uint32_t length_;
  unsigned flags_;
};

/// openat(2) through the ring (IORING_OP_OPENAT), run by an io_uring worker thread: an
/// open that blocks — a FIFO waiting for its other end — has the classic blocking meaning
/// but never blocks the loop, and can be timed out or cancelled. Completes with the new descriptor,
/// owned by the caller; throws std::system_error with the errno otherwise. `path` must
/// stay valid until the operation completes.
class [[nodiscard]] IPCORO_API openat_operation : public io_operation<openat_operation> {
 public:
  openat_operation(int dir_fd, const char* path, int flags, unsigned mode) noexcept;
  int finish(int res) const;

 private:
  static void prep(detail::op_base& op, ::io_uring_sqe* sqe) noexcept;
  const char* path_;
  int dir_fd_;
  int flags_;
  unsigned mode_;
};

/// Waits until `fd` is ready for `events` (POLLIN, POLLOUT, ...; IORING_OP_POLL_ADD, one
/// shot). Completes with the returned events, which may include POLLERR or POLLHUP.
class [[nodiscard]] IPCORO_API poll_operation : public io_operation<poll_operation> {
 public:
  poll_operation(int fd, unsigned events) noexcept;
  unsigned finish(int res) const;

 private:
  static void prep(detail::op_base& op, ::io_uring_sqe* sqe) noexcept;
  int fd_;
  unsigned events_;
};

/// IORING_OP_NOP: a round trip through the kernel that does nothing.
class [[nodiscard]] IPCORO_API nop_operation : public io_operation<nop_operation> {
 public:
  nop_operation() noexcept;
  void finish(int res) const;

 private:
  static void prep(detail::op_base& op, ::io_uring_sqe* sqe) noexcept;
};

[[nodiscard]] inline read_operation read(int fd, std::span<std::byte> buffer) noexcept {
  return {fd, buffer};
}
[[nodiscard]] inline write_operation write(int fd, std::span<const std::byte> buffer) noexcept {
  return {fd, buffer};
}
[[nodiscard]] inline read_exact_operation read_exact(int fd, std::span<std::byte> buffer) noexcept {
  return {fd, buffer};
}
[[nodiscard]] inline write_all_operation write_all(int fd, std::span<const std::byte> buffer) noexcept {
  return {fd, buffer};
}
[[nodiscard]] inline splice_operation splice(int fd_in, std::int64_t off_in, int fd_out, std::int64_t off_out,
                                             std::uint32_t length, unsigned flags = 0) noexcept {
  return {fd_in, off_in, fd_out, off_out, length, flags};
}
[[nodiscard]] inline nop_operation nop() noexcept { return {}; }
/// Opens `path` (relative to `dir_fd`, or AT_FDCWD) through the ring; add O_CLOEXEC yourself.
[[nodiscard]] inline openat_operation openat(int dir_fd, const char* path, int flags,
                                             unsigned mode = 0) noexcept {
  return {dir_fd, path, flags, mode};
}
[[nodiscard]] inline poll_operation poll(int fd, unsigned events) noexcept { return {fd, events}; }

}  // namespace ipcoro
