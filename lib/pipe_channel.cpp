// SPDX-License-Identifier: MIT
// pipe_channel: the pipe: scheme (anonymous pipes, for links) and fd: (an inherited descriptor).
#include "ipcoro/channel.hpp"
#include "ipcoro/pipe.hpp"
#include "ipcoro/transport.hpp"

#include "channel_wire.hpp"
#include "stream_port.hpp"

#include <fcntl.h>
#include <fmt/core.h>

#include <cerrno>
#include <charconv>
#include <cstring>
#include <string>

namespace ipcoro::detail {
namespace {

[[noreturn]] void pipe_has_no_name(const channel_address& a) {
  throw bad_channel_address(
      fmt::format("channel address \"{}\": a pipe has no name another process could open; "
                  "make a channel_link before fork, or pass a descriptor as fd:N",
                  a.text));
}

task<std::unique_ptr<send_port>> open_pipe_sender(channel_address a) {
  pipe_has_no_name(a);
  co_return nullptr;
}
task<std::unique_ptr<receive_port>> open_pipe_receiver(channel_address a) {
  pipe_has_no_name(a);
  co_return nullptr;
}

std::unique_ptr<link_ends> make_pipe_link(const channel_address& a) {
  pipe_pair p = make_pipe(pipe_options{a.capacity.value_or(0)});
  if (!a.capacity) widen_stream_pipe(p.writer.native_handle());
  const write_path path = p.writer.path();
  // Both ends are ipcoro's, and its receiver reads: the sender may lend large frames.
  return std::make_unique<stream_link>(a.text, p.reader.release_fd(), p.writer.release_fd(), path, true);
}

int checked_fd(const channel_address& a, int access) {
  const int fd = a.fd();
  const int flags = ::fcntl(fd, F_GETFL);
  if (flags < 0) {
    const int err = errno;
    throw channel_error(err, fmt::format("channel {}: descriptor {} is not open in this process ({}); pass a "
                                         "descriptor the process has, such as one process::exec wired in",
                                         a.text, fd, std::strerror(err)));
  }
  const int mode = flags & O_ACCMODE;
  if (mode != O_RDWR && mode != access) {
    throw channel_error(
        EBADF,
        fmt::format("channel {}: descriptor {} is open for {} only, and a {} needs to {} it", a.text, fd,
                    mode == O_RDONLY ? "reading" : "writing", access == O_RDONLY ? "receiver" : "sender",
                    access == O_RDONLY ? "read" : "write"));
  }
  return fd;
}

task<std::unique_ptr<send_port>> open_fd_sender(channel_address a) {
  co_return make_stream_sender(a.text, unique_fd{checked_fd(a, O_WRONLY)}, write_path::ring_only);
}
task<std::unique_ptr<receive_port>> open_fd_receiver(channel_address a) {
  co_return make_stream_receiver(a.text, unique_fd{checked_fd(a, O_RDONLY)});
}

std::unique_ptr<link_ends> make_fd_link(const channel_address& a) {
  throw bad_channel_address(
      fmt::format("channel address \"{}\": an fd: address names one end of an existing "
                  "stream; open it with open_sender / open_receiver",
                  a.text));
}

}  // namespace

extern const channel_scheme pipe_scheme{
    .name = "pipe",
    .example = "pipe:",
    .about = "an anonymous pipe (links only)",
    .name_form = address_name::none,
    .options = address_option::capacity,
    .option_notes = "capacity= is the pipe capacity",
    .check = nullptr,
    .open_sender = open_pipe_sender,
    .open_receiver = open_pipe_receiver,
    .make_link = make_pipe_link,
    .list = nullptr,
    .inspect = nullptr,
};

extern const channel_scheme fd_scheme{
    .name = "fd",
    .example = "fd:3",
    .about = "one end of a stream this process has as a descriptor",
    .name_form = address_name::number,
    .options = 0,
    .option_notes = "",
    .check = nullptr,
    .open_sender = open_fd_sender,
    .open_receiver = open_fd_receiver,
    .make_link = make_fd_link,
    .list = nullptr,
    .inspect = nullptr,
};

}  // namespace ipcoro::detail
