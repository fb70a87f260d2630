// SPDX-License-Identifier: MIT
// stream_port: a channel's ends over any byte stream (pipe, FIFO, inherited descriptor, socket).
#pragma once

#include "ipcoro/detail/channel_port.hpp"
#include "ipcoro/fd_io.hpp"
#include "ipcoro/transport.hpp"
#include "ipcoro/unique_fd.hpp"

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>

namespace ipcoro::detail {

/// The sending end of a channel over the stream `fd`. `greet_at_open`: greet as soon as
/// the end has its identity rather than with the first message (a FIFO opened by name,
/// whose receiver waits for a greeting before it can tell a sender's end of file from
/// "nobody came yet"). `lend_pages`: large frames are lent to the pipe with vmsplice
/// instead of copied into it (page_lending.hpp), for a pipe whose reader is known to be an
/// ipcoro receiver (a pipe: link).
std::unique_ptr<send_port> make_stream_sender(std::string address, unique_fd fd, write_path path,
                                              bool greet_at_open = false, bool lend_pages = false);
/// The receiving end of a channel over the stream `fd`. `keep`: what must live as long as
/// the end (a FIFO's name). `placeholder`: a writer of our own that keeps end of file away
/// until the first sender has greeted (a FIFO receiver opened before any sender).
std::unique_ptr<receive_port> make_stream_receiver(std::string address, unique_fd fd,
                                                   std::shared_ptr<void> keep = {},
                                                   unique_fd placeholder = {});

/// Payloads stream receivers of this process read straight into values (stream_counts).
extern std::atomic<std::uint64_t> direct_payloads;

/// The capacity a channel gives a pipe or FIFO whose address names none: four times the
/// kernel's default, so that a 64 KiB message and its frame head fit, with room for the
/// next while the receiver reads (the sender still holds at most 64 KiB unwritten). A
/// quarter of the 1 MiB that
/// /proc/sys/fs/pipe-max-size allows by default, so that a user's many channels do not use
/// up /proc/sys/fs/pipe-user-pages-soft (64 MiB), past which the kernel makes every new
/// pipe of that user small.
inline constexpr std::size_t default_stream_capacity = std::size_t{256} * 1024;
/// Gives the pipe `fd` default_stream_capacity where the kernel allows it; where it does
/// not (a lower pipe-max-size, the user's pipe pages used up), the pipe keeps the size it has.
void widen_stream_pipe(int fd) noexcept;

/// A link over a stream: its two connected descriptors, each taken once.
class stream_link final : public link_ends {
 public:
  /// `lend_pages`: see make_stream_sender.
  stream_link(std::string address, unique_fd read, unique_fd write, write_path path,
              bool lend_pages = false) noexcept
      : address_(std::move(address)),
        read_(std::move(read)),
        write_(std::move(write)),
        path_(path),
        lend_pages_(lend_pages) {}
  std::unique_ptr<send_port> take_sender() override {
    return make_stream_sender(address_, std::move(write_), path_, false, lend_pages_);
  }
  std::unique_ptr<receive_port> take_receiver() override {
    return make_stream_receiver(address_, std::move(read_));
  }

 private:
  std::string address_;
  unique_fd read_;
  unique_fd write_;
  write_path path_;
  bool lend_pages_;
};

}  // namespace ipcoro::detail
