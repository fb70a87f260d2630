// SPDX-License-Identifier: MIT
// Anonymous pipes: one-way byte streams between coroutines or forked processes, and a
// full-duplex pair built from two of them.
#pragma once

#include "ipcoro/export.hpp"
#include "ipcoro/fd_io.hpp"
#include "ipcoro/sigpipe.hpp"
#include "ipcoro/unique_fd.hpp"

#include <cstddef>
#include <span>

namespace ipcoro {

/// The reading end of a pipe. Owns its descriptor (close-on-exec).
class pipe_reader {
 public:
  pipe_reader() noexcept = default;
  explicit pipe_reader(unique_fd fd) noexcept : fd_(std::move(fd)) {}

  /// One read: the bytes read, 0 once every writer has closed.
  read_operation read(std::span<std::byte> buffer) const noexcept { return {fd_.get(), buffer}; }
  /// Fills `buffer` unless the stream ends first; returns the bytes read.
  read_exact_operation read_exact(std::span<std::byte> buffer) const noexcept { return {fd_.get(), buffer}; }
  int native_handle() const noexcept { return fd_.get(); }
  explicit operator bool() const noexcept { return static_cast<bool>(fd_); }
  /// Closes this end now (writers then get EPIPE once every reader has closed).
  void close() noexcept { fd_.reset(); }
  unique_fd release_fd() noexcept { return std::move(fd_); }

 private:
  unique_fd fd_;
};

/// The writing end of a pipe. Owns its descriptor (close-on-exec). Writing when every
/// reader has closed throws std::system_error(EPIPE); SIGPIPE is never raised by ipcoro.
class pipe_writer {
 public:
  pipe_writer() noexcept = default;
  /// `path`: whether writes first try RWF_NOWAIT (right for anonymous pipes, which
  /// make_pipe creates that way) or go straight to the ring (FIFOs, other files).
  explicit pipe_writer(unique_fd fd, write_path path = write_path::ring_only) noexcept
      : fd_(std::move(fd)), path_(path) {}

  /// One write: the bytes written, possibly fewer than asked.
  write_operation write(std::span<const std::byte> buffer) const noexcept {
    return {fd_.get(), buffer, path_};
  }
  /// Writes all of `buffer`. Writes of at most PIPE_BUF (4096) bytes are atomic.
  write_all_operation write_all(std::span<const std::byte> buffer) const noexcept {
    return {fd_.get(), buffer, path_};
  }
  int native_handle() const noexcept { return fd_.get(); }
  write_path path() const noexcept { return path_; }
  explicit operator bool() const noexcept { return static_cast<bool>(fd_); }
  /// Closes this end now: readers see end of stream once every writer has closed.
  void close() noexcept { fd_.reset(); }
  unique_fd release_fd() noexcept { return std::move(fd_); }

 private:
  unique_fd fd_;
  write_path path_ = write_path::ring_only;
};

struct pipe_options {
  /// Kernel buffer size in bytes; 0 keeps the default (64 KiB). Rounded up by the kernel
  /// to a power-of-two number of pages; at most /proc/sys/fs/pipe-max-size.
  std::size_t capacity = 0;
};

struct pipe_pair {
  pipe_reader reader;
  pipe_writer writer;
};

/// Creates a pipe (pipe2 with O_CLOEXEC). Throws std::system_error naming the limit hit:
/// EMFILE/ENFILE (descriptors), or a capacity above /proc/sys/fs/pipe-max-size.
IPCORO_API [[nodiscard]] pipe_pair make_pipe(const pipe_options& opts = {});

/// The buffer size of the pipe behind `fd` (F_GETPIPE_SZ).
IPCORO_API std::size_t pipe_capacity(int fd);
/// Sets the buffer size of the pipe behind `fd` and returns the size granted (the kernel
/// rounds up). Throws std::system_error that names /proc/sys/fs/pipe-max-size and its value
/// when `bytes` is above it, and /proc/sys/fs/pipe-user-pages-soft when this user's pipes
/// already use too much memory.
IPCORO_API std::size_t set_pipe_capacity(int fd, std::size_t bytes);
/// The system-wide limit from /proc/sys/fs/pipe-max-size.
IPCORO_API std::size_t pipe_max_size();

/// One end of a full-duplex channel made of two pipes: it reads what the other end
/// writes and writes what the other end reads. Pipes are one-way; this is the classic
/// answer. After fork(), each process keeps one end and drops the other.
class duplex_pipe {
 public:
  duplex_pipe() noexcept = default;
  duplex_pipe(pipe_reader in, pipe_writer out) noexcept : in_(std::move(in)), out_(std::move(out)) {}

  read_operation read(std::span<std::byte> buffer) const noexcept { return in_.read(buffer); }
  read_exact_operation read_exact(std::span<std::byte> buffer) const noexcept {
    return in_.read_exact(buffer);
  }
  write_operation write(std::span<const std::byte> buffer) const noexcept { return out_.write(buffer); }
  write_all_operation write_all(std::span<const std::byte> buffer) const noexcept {
    return out_.write_all(buffer);
  }
  /// Half-close: the peer reads end of stream, while this end can still read.
  void close_write() noexcept { out_.close(); }
  void close() noexcept {
    in_.close();
    out_.close();
  }
  pipe_reader& reader() noexcept { return in_; }
  pipe_writer& writer() noexcept { return out_; }

 private:
  pipe_reader in_;
  pipe_writer out_;
};

struct duplex_pair {
  duplex_pipe first;
  duplex_pipe second;
};

/// Two connected duplex ends, from two pipes.
IPCORO_API [[nodiscard]] duplex_pair make_duplex_pipe(const pipe_options& opts = {});

}  // namespace ipcoro
