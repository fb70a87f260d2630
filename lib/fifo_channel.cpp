// SPDX-License-Identifier: MIT
// fifo_channel: the fifo: scheme, a byte stream through a named pipe.
#include "ipcoro/channel.hpp"
#include "ipcoro/fifo.hpp"
#include "ipcoro/pipe.hpp"
#include "ipcoro/transport.hpp"

#include "channel_wire.hpp"
#include "stream_port.hpp"

#include <fcntl.h>
#include <fmt/core.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <string>

namespace ipcoro::detail {
namespace {

struct fifo_ends {
  unique_fd read;
  unique_fd write;
};

/// Both ends of an existing FIFO, opened without waiting: the reader first, non-blocking
/// (then made blocking again, for the ring), so that the writer's open finds it.
fifo_ends open_fifo_ends(const channel_address& a) {
  fifo_ends ends;
  const int r = ::open(a.name.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC);
  if (r < 0) throw_errno(errno, fmt::format("channel {}: opening the FIFO for reading", a.text));
  ends.read = unique_fd{r};
  const int w = ::open(a.name.c_str(), O_WRONLY | O_CLOEXEC);
  if (w < 0) throw_errno(errno, fmt::format("channel {}: opening the FIFO for writing", a.text));
  ends.write = unique_fd{w};
  if (::fcntl(r, F_SETFL, ::fcntl(r, F_GETFL) & ~O_NONBLOCK) != 0) {
    throw_errno(errno, fmt::format("channel {}: fcntl", a.text));
  }
  if (a.capacity) {
    set_pipe_capacity(w, *a.capacity);
  } else {
    widen_stream_pipe(w);
  }
  return ends;
}

/// The descriptor of an fd: address, once it is known to be open in this process for

task<std::unique_ptr<receive_port>> open_fifo_receiver(channel_address a) {
  // Opened at once, not when the first sender comes: a writer of our own stands in
  // until that sender has greeted, so the read end sees no end of file before it.
  // A FIFO that nobody reads is a dead receiver's: it is replaced (reclaim).
  std::shared_ptr<fifo> node;
  try {
    node = std::make_shared<fifo>(a.name, fifo_options{a.mode, true});
  } catch (const std::system_error& e) {
    if (has_errno(e, EEXIST) || has_errno(e, EBUSY)) rethrow_for(a, e);
    throw;
  }
  fifo_ends ends = open_fifo_ends(a);
  if (!node->refers_to(ends.read.get())) {
    // Another receiver starting at the same moment found ours unread and replaced it.
    node->release();
    throw std::system_error(EBUSY, std::system_category(),
                            fmt::format("channel {}: another receiver took the FIFO over as it was being "
                                        "opened; it is in use",
                                        a.text));
  }
  co_return make_stream_receiver(a.text, std::move(ends.read), std::move(node), std::move(ends.write));
}

task<std::unique_ptr<send_port>> open_fifo_sender(channel_address a) {
  if (::access(a.name.c_str(), F_OK) != 0 && errno == ENOENT) {
    throw channel_error(
        ENOENT, fmt::format("no channel at \"{}\": nobody has opened its receiver (no such FIFO)", a.text));
  }
  pipe_writer writer = co_await open_fifo_writer(a.name);
  co_return make_stream_sender(a.text, writer.release_fd(), write_path::ring_only, true);
}

/// Both ends are opened here, then the name goes: the link needs nobody to open it.
std::unique_ptr<link_ends> make_fifo_link(const channel_address& a) {
  fifo node(a.name, fifo_options{a.mode, false});
  fifo_ends ends = open_fifo_ends(a);
  node.unlink();
  // As a pipe: link: both ends are ipcoro's (the name was there only while they were
  // opened), and its receiver reads, so the sender may lend large frames.
  return std::make_unique<stream_link>(a.text, std::move(ends.read), std::move(ends.write),
                                       write_path::ring_only, true);
}

std::string inspect_fifo(const channel_address& a) {
  struct stat st {};
  if (::stat(a.name.c_str(), &st) != 0) throw_errno(errno, fmt::format("channel {}: stat", a.text));
  if (!S_ISFIFO(st.st_mode)) {
    throw std::system_error(ENOTSUP, std::system_category(), fmt::format("channel {}: not a FIFO", a.text));
  }
  // Opening for writing without blocking succeeds only while somebody reads.
  const int w = ::open(a.name.c_str(), O_WRONLY | O_NONBLOCK | O_CLOEXEC);
  if (w >= 0) ::close(w);
  return fmt::format("{}: FIFO, {}", a.text, w >= 0 ? "a receiver has it open" : "nobody reads it");
}

}  // namespace

extern const channel_scheme fifo_scheme{
    .name = "fifo",
    .example = "fifo:/tmp/jobs",
    .about = "a named pipe (FIFO)",
    .name_form = address_name::path,
    .options = address_option::capacity | address_option::mode,
    .option_notes = "capacity= is the pipe capacity",
    .check = nullptr,
    .open_sender = open_fifo_sender,
    .open_receiver = open_fifo_receiver,
    .make_link = make_fifo_link,
    .list = nullptr,
    .inspect = inspect_fifo,
};

}  // namespace ipcoro::detail
