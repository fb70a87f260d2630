// SPDX-License-Identifier: MIT
// Named pipes (FIFOs): pipes with a name in the file system, so that unrelated processes can
// find each other. Created and removed by an owner, opened through the ring, then read and
// written exactly like anonymous pipes.
//
// The rules, in one place:
//  - Creating: `fifo` makes the FIFO (mkfifo, mode 0600 unless asked otherwise) and removes
//    it when destroyed. Only the owner removes it; openers never do.
//  - Opening: `open_fifo_reader` / `open_fifo_writer` have the classic meaning (each waits
//    until some process opens the other end) but run in an io_uring worker, so the loop
//    keeps running; add `.with_timeout(d)`, or stop the awaiting task, to give up waiting.
//    The path is checked before and after the open: anything that is not a FIFO is refused
//    with EINVAL and a message naming the path and what it is.
//  - Reading and writing: the opened ends are `pipe_reader` / `pipe_writer`. A read returns
//    0 once every writer has closed (including writers that crashed: the kernel closes
//    their descriptors). A write when no reader is left throws EPIPE (never SIGPIPE).
//  - Many writers, one reader: writes of at most PIPE_BUF (4096) bytes are atomic, so many
//    processes may send messages into one FIFO without interleaving. `write_message`
//    writes one message in one write and refuses a larger one with EMSGSIZE instead of
//    letting it be torn. The reader still needs framing (a header with the length, or
//    fixed-size records): one read may return several messages, or the start of one.
//  - Servers: `open_fifo_server_reader` opens the well-known FIFO without waiting for a
//    client and keeps a write end of its own, so the server does not read end of stream
//    each time its last client goes away.
//  - Full duplex: FIFOs are one-way like pipes; `open_fifo_duplex` joins two of them and
//    opens both at once, so the two processes may name them in either order.
#pragma once

#include "ipcoro/export.hpp"
#include "ipcoro/fd_io.hpp"
#include "ipcoro/io_operation.hpp"
#include "ipcoro/pipe.hpp"
#include "ipcoro/task.hpp"
#include "ipcoro/unique_fd.hpp"

#include <sys/types.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <type_traits>

namespace ipcoro {

/// The largest message `write_message` accepts: PIPE_BUF, the largest write that a pipe or
/// FIFO takes atomically (4096 bytes on Linux, fixed by POSIX for a given system).
inline constexpr std::size_t fifo_message_max = 4096;

struct fifo_options {
  /// Permission bits (at most 0777), applied exactly: the process umask does not narrow
  /// them. The default lets only this user open the FIFO.
  unsigned mode = 0600;
  /// When the path already holds a FIFO that no process has open for reading (left behind
  /// by a process that died), reclaim it: replace it with a fresh one (created aside, then renamed over
  /// it) instead of failing with EEXIST. A FIFO some process is reading is never taken
  /// over (EBUSY), and anything that is not a FIFO is never removed. The check opens the
  /// FIFO for writing for a moment, so a reader waiting in open() on it would be woken
  /// and then read end of stream.
  bool reclaim = false;
};

/// Owns a FIFO in the file system: creates it and removes it when destroyed. Move-only.
/// Removing the name does not disturb processes that have the FIFO open; new opens fail
/// with ENOENT.
class IPCORO_API fifo {
 public:
  fifo() noexcept = default;
  /// Creates a FIFO at `path` (mkfifo). A relative path is made absolute against the
  /// current directory now, so the owner removes the right file even after a chdir.
  /// Throws std::system_error saying what to change: EEXIST when the path exists (naming
  /// what is there), EBUSY when `reclaim` meets a FIFO in use, ENOENT when the
  /// directory is missing, EACCES when this user may not create files there,
  /// ENAMETOOLONG naming the limit (NAME_MAX or PATH_MAX), EINVAL for a bad mode.
  explicit fifo(std::string path, const fifo_options& opts = {});
  fifo(fifo&& other) noexcept;
  fifo& operator=(fifo&& other) noexcept;
  fifo(const fifo&) = delete;
  fifo& operator=(const fifo&) = delete;
  /// Removes the FIFO (see unlink()).
  ~fifo();

  /// The absolute path of the FIFO; empty when this object owns none.
  const std::string& path() const noexcept { return path_; }
  explicit operator bool() const noexcept { return !path_.empty(); }
  /// Removes the FIFO now, if this is the process that created it (a forked child's copy
  /// of the object removes nothing) and the path still names the FIFO it created (a file
  /// that has since replaced it is left alone). Errors are ignored. Idempotent.
  void unlink() noexcept;
  /// Stops owning the FIFO without removing it; returns its path.
  std::string release() noexcept;
  /// Whether `fd` is open on the FIFO this object created (not on one that has replaced
  /// it at the same path since).
  bool refers_to(int fd) const noexcept;

 private:
  std::string path_;
  // Which file we created: device, inode, and birth time (the change time where the file
  // system keeps no birth time), since a freed inode number is soon reused.
  std::uint64_t dev_ = 0;
  std::uint64_t ino_ = 0;
  std::int64_t born_ns_ = 0;
  pid_t owner_pid_ = 0;  // the process that created it: only it removes the name
};

namespace detail {
/// The state of one FIFO open, kept inside its operation (so inside the coroutine frame).
struct fifo_open_request {
  std::string path;
  bool for_writing = false;
  unsigned found_mode = 0;  ///< st_mode of a path that turned out not to be a FIFO
};
/// Fills the SQE: openat through an io_uring worker (IOSQE_ASYNC).
IPCORO_API void prep_fifo_open(fifo_open_request& req, ::io_uring_sqe* sqe) noexcept;
/// Checks the path before opening it: -EAGAIN when it is a FIFO (go on and open it),
/// otherwise the error to report (-EINVAL with `found_mode` set: not a FIFO).
IPCORO_API int check_fifo_path(fifo_open_request& req) noexcept;
/// Turns the open's result into an owned, validated descriptor, or throws the error with
/// the path and what to change.
IPCORO_API unique_fd finish_fifo_open(const fifo_open_request& req, int res);
}  // namespace detail

/// Opens a FIFO for reading (`End` = pipe_reader) or writing (`End` = pipe_writer) through
/// the ring. Like open(2), it waits until some process has the other end open; that wait
/// happens in an io_uring worker, never on the loop, and ends with the open, a timeout
/// (`.with_timeout(d)` / `.with_deadline(t)` -> `timed_out`), or a stop request
/// (`operation_cancelled`). Completes with the opened end (close-on-exec, blocking mode).
/// Throws std::system_error naming the path: EINVAL when the path exists but is not a FIFO
/// (saying what it is), ENOENT (saying whether the directory or the FIFO is missing),
/// EACCES (with the FIFO's mode and owner and this process's uid), ENAMETOOLONG (with the
/// limit). The operation keeps its own copy of the path.
template <class End>
class [[nodiscard]] fifo_open_operation : public io_operation<fifo_open_operation<End>> {
  static_assert(std::is_same_v<End, pipe_reader> || std::is_same_v<End, pipe_writer>,
                "fifo_open_operation opens a pipe_reader or a pipe_writer");

 public:
  explicit fifo_open_operation(std::string path)
      : io_operation<fifo_open_operation<End>>(&prep, nullptr, &attempt),
        request_{std::move(path), std::is_same_v<End, pipe_writer>} {
    this->worker_bound_ = true;
  }
  End finish(int res) const { return End{detail::finish_fifo_open(request_, res)}; }

 private:
  static void prep(detail::op_base& op, ::io_uring_sqe* sqe) noexcept {
    detail::prep_fifo_open(static_cast<fifo_open_operation&>(op).request_, sqe);
  }
  static int attempt(detail::op_base& op) noexcept {
    return detail::check_fifo_path(static_cast<fifo_open_operation&>(op).request_);
  }
  detail::fifo_open_request request_;
};

/// Opens the FIFO at `path` for reading; waits (in the ring) until a writer opens it.
[[nodiscard]] inline fifo_open_operation<pipe_reader> open_fifo_reader(std::string path) {
  return fifo_open_operation<pipe_reader>{std::move(path)};
}
/// Opens the FIFO at `path` for writing; waits (in the ring) until a reader opens it.
[[nodiscard]] inline fifo_open_operation<pipe_writer> open_fifo_writer(std::string path) {
  return fifo_open_operation<pipe_writer>{std::move(path)};
}

/// A server's end of a well-known FIFO: the reading end, plus a write end the server holds
/// on its own FIFO. Without that write end, a read returns 0 (end of stream) each time the
/// last client closes, and the server would have to reopen between clients; with it,
/// reads simply wait for the next client. Move-only.
class fifo_server_reader {
 public:
  fifo_server_reader() noexcept = default;
  fifo_server_reader(pipe_reader reader, pipe_writer own_writer) noexcept
      : reader_(std::move(reader)), own_writer_(std::move(own_writer)) {}

  /// One read: the bytes read. Returns 0 only after close_own_writer() and once every
  /// client has closed.
  read_operation read(std::span<std::byte> buffer) const noexcept { return reader_.read(buffer); }
  /// Fills `buffer` unless the stream ends first; returns the bytes read.
  read_exact_operation read_exact(std::span<std::byte> buffer) const noexcept {
    return reader_.read_exact(buffer);
  }
  int native_handle() const noexcept { return reader_.native_handle(); }
  explicit operator bool() const noexcept { return static_cast<bool>(reader_); }
  /// Lets the stream end: closes the server's own write end, so reads return 0 once every
  /// client has closed too (a graceful drain before shutting down).
  void close_own_writer() noexcept { own_writer_.close(); }
  /// Closes both ends. Clients writing to the FIFO then get EPIPE.
  void close() noexcept {
    own_writer_.close();
    reader_.close();
  }
  pipe_reader& reader() noexcept { return reader_; }
  /// The server's own write end: a server can send itself a message through it.
  pipe_writer& own_writer() noexcept { return own_writer_; }

 private:
  pipe_reader reader_;
  pipe_writer own_writer_;
};

/// Opens the FIFO at `path` as a server: its reading end at once (without waiting for a
/// client: O_NONBLOCK, cleared afterwards), then a write end of its own on the same FIFO.
/// Neither open can wait, so this is a plain call. Throws std::system_error like
/// `open_fifo_reader` (EINVAL for a path that is not a FIFO, ENOENT, EACCES —
/// the server needs read and write permission — ENAMETOOLONG).
IPCORO_API [[nodiscard]] fifo_server_reader open_fifo_server_reader(const std::string& path);

/// Writes one message of at most `fifo_message_max` (PIPE_BUF, 4096) bytes in a single
/// write, which the kernel makes atomic on a pipe or FIFO: other writers' messages come
/// before or after it, never inside it. It waits (in the ring) while the FIFO is too full
/// to take the whole message. A larger message is refused with EMSGSIZE before anything
/// is written. Throws EPIPE when no process has the FIFO open for reading. `message` must
/// stay valid until the operation completes.
class [[nodiscard]] IPCORO_API message_write_operation : public io_operation<message_write_operation> {
 public:
  message_write_operation(int fd, std::span<const std::byte> message) noexcept;
  void finish(int res) const;

 private:
  static void prep(detail::op_base& op, ::io_uring_sqe* sqe) noexcept;
  static int attempt(detail::op_base& op) noexcept;
  const std::byte* data_;
  std::size_t size_;
  int fd_;
};

/// Writes `message` atomically into the pipe or FIFO behind `writer` (see
/// message_write_operation).
[[nodiscard]] inline message_write_operation write_message(const pipe_writer& writer,
                                                           std::span<const std::byte> message) noexcept {
  return {writer.native_handle(), message};
}
/// Writes `message` atomically into the pipe or FIFO `fd`.
[[nodiscard]] inline message_write_operation write_message(int fd,
                                                           std::span<const std::byte> message) noexcept {
  return {fd, message};
}

/// Opens one end of a full-duplex connection made of two FIFOs: it reads from the FIFO at
/// `read_path` and writes to the one at `write_path`; the peer passes the same two paths
/// the other way round. Both opens run at once, so neither side has to open them in a
/// particular order (opening them one after the other in the same order on both sides
/// would deadlock). A `timeout` above zero bounds each open (`timed_out`); a stop request
/// cancels them. If either open fails, the other end is closed and the error rethrown.
IPCORO_API [[nodiscard]] task<duplex_pipe> open_fifo_duplex(
    std::string read_path, std::string write_path,
    std::chrono::milliseconds timeout = std::chrono::milliseconds::zero());

}  // namespace ipcoro
