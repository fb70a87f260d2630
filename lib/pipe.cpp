// SPDX-License-Identifier: MIT
// Anonymous pipes: creation, capacity and the duplex pair.
#include "ipcoro/pipe.hpp"

#include "ipcoro/error.hpp"
#include "proc_value.hpp"

#include <fcntl.h>
#include <fmt/core.h>
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <cstdio>

namespace ipcoro {

namespace {
std::size_t read_proc_size(const char* path, std::size_t fallback) {
  const long v = detail::read_proc_long(path);
  return v >= 0 ? static_cast<std::size_t>(v) : fallback;
}
}  // namespace

std::size_t pipe_max_size() { return read_proc_size("/proc/sys/fs/pipe-max-size", 1u << 20); }

std::size_t pipe_capacity(int fd) {
  const int rc = ::fcntl(fd, F_GETPIPE_SZ);
  if (rc < 0) throw_errno(errno, "fcntl(F_GETPIPE_SZ)");
  return static_cast<std::size_t>(rc);
}

std::size_t set_pipe_capacity(int fd, std::size_t bytes) {
  const std::size_t max = pipe_max_size();
  // Refused even for a privileged process (which the kernel would let through), so a
  // program behaves the same whoever runs it.
  if (bytes > max || bytes > static_cast<std::size_t>(INT_MAX)) {
    throw std::system_error(EINVAL, std::system_category(),
                            fmt::format("pipe capacity {} bytes is above /proc/sys/fs/pipe-max-size ({}); "
                                        "ask for less or raise it (sysctl fs.pipe-max-size={})",
                                        bytes, max, bytes));
  }
  const int rc = ::fcntl(fd, F_SETPIPE_SZ, static_cast<int>(bytes));
  if (rc < 0) {
    const int err = errno;
    if (err == EPERM) {
      throw std::system_error(err, std::system_category(),
                              fmt::format("pipe capacity {} bytes: this user's pipes already use the memory "
                                          "allowed by /proc/sys/fs/pipe-user-pages-soft ({} pages)",
                                          bytes, read_proc_size("/proc/sys/fs/pipe-user-pages-soft", 0)));
    }
    if (err == EBUSY) {
      throw std::system_error(
          err, std::system_category(),
          fmt::format("pipe capacity {} bytes is smaller than the data already in the pipe", bytes));
    }
    throw_errno(err, "fcntl(F_SETPIPE_SZ)");
  }
  return static_cast<std::size_t>(rc);
}

pipe_pair make_pipe(const pipe_options& opts) {
  ignore_sigpipe();
  int fds[2];
  if (::pipe2(fds, O_CLOEXEC) != 0) {
    const int err = errno;
    if (err == EMFILE) {
      throw_errno(err, "pipe2: this process has too many open descriptors (raise RLIMIT_NOFILE, ulimit -n)");
    }
    if (err == ENFILE) throw_errno(err, "pipe2: the system file table is full (/proc/sys/fs/file-max)");
    throw_errno(err, "pipe2");
  }
  pipe_pair p{pipe_reader{unique_fd{fds[0]}}, pipe_writer{unique_fd{fds[1]}, write_path::try_nowait_first}};
  if (opts.capacity != 0) set_pipe_capacity(p.writer.native_handle(), opts.capacity);
  return p;
}

duplex_pair make_duplex_pipe(const pipe_options& opts) {
  pipe_pair a = make_pipe(opts);
  pipe_pair b = make_pipe(opts);
  return {duplex_pipe{std::move(a.reader), std::move(b.writer)},
          duplex_pipe{std::move(b.reader), std::move(a.writer)}};
}

}  // namespace ipcoro
