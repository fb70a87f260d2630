// SPDX-License-Identifier: MIT
// stream_port: frames on a byte stream, a close that never blocks, a receiver that buffers.
#include "stream_port.hpp"

#include "ipcoro/channel.hpp"
#include "ipcoro/error.hpp"
#include "ipcoro/io_context.hpp"
#include "ipcoro/pipe.hpp"

#include "channel_wire.hpp"

#include <fmt/core.h>
#include <poll.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <vector>

namespace ipcoro::detail {

namespace {

/// How long a close waits for room for its end marker before giving up.
constexpr std::chrono::seconds end_patience{30};

/// True once `fd` can take a write of at most PIPE_BUF bytes without blocking (or would
/// fail at once: no reader left), waiting at most `wait` milliseconds for that.
bool writable_within(int fd, int wait) noexcept {
  pollfd pfd{fd, POLLOUT, 0};
  int n = 0;
  while ((n = ::poll(&pfd, 1, wait)) < 0 && errno == EINTR) {
  }
  return n > 0;
}

/// Writes a small frame (at most PIPE_BUF bytes: all or nothing) that poll() said fits.
void write_small(int fd, const void* data, std::size_t size) noexcept {
  while (::write(fd, data, size) < 0 && errno == EINTR) {
  }
}

/// Writes a close's last frames (at most PIPE_BUF bytes: all or nothing) once the pipe has
/// room, waiting for it at most `end_patience`; without room by then, or without a reader,
/// they are not written and the receiver reports a sender that went away.
void post_patiently(int fd, std::span<const std::byte> frames) noexcept {
  const auto patience = std::chrono::duration_cast<std::chrono::milliseconds>(end_patience);
  if (writable_within(fd, static_cast<int>(patience.count()))) write_small(fd, frames.data(), frames.size());
}

/// Writes a close's last frames through the ring once the pipe has room: the reader is
/// slow, and a close must not block the loop's thread waiting for it. It ends when they
/// are written or when the reader is gone (EPIPE). If the io_context shuts down first
/// (the process is most likely ending), it waits there, bounded, so that a clean close
/// still reads as one.
task<void> post_when_room(pooled_frame, unique_fd fd, write_path path, std::vector<std::byte> frames) {
  try {
    co_await write_all_operation{fd.get(), frames, path};
  } catch (const operation_cancelled&) {
    post_patiently(fd.get(), frames);
  } catch (...) {  // nobody reads any more: nothing to tell
  }
}

/// Posts a close's last frames (at most PIPE_BUF bytes) from a close(), which cannot
/// await. When the pipe is full, the write is handed to this thread's loop; with no loop
/// running here, it waits for room, bounded.
void post_at_close(unique_fd fd, write_path path, std::vector<std::byte> frames) noexcept {
  if (writable_within(fd.get(), 0)) {
    write_small(fd.get(), frames.data(), frames.size());
    return;
  }
  if (io_context* ctx = io_context::current_or_null(); ctx != nullptr && !ctx->stopping()) {
    try {
      ctx->spawn(post_when_room(pooled_frame{}, std::move(fd), path, std::move(frames)));
      return;
    } catch (...) {  // no memory for the task: fall back to waiting here, bounded
    }
  }
  post_patiently(fd.get(), frames);
}

class stream_send_port final : public send_port {
 public:
  /// `greet_at_open`: greet as soon as the end has its identity rather than with the first
  /// message (a FIFO opened by name, whose receiver waits for a greeting before it can
  /// tell a sender's end of file from "nobody came yet").
  stream_send_port(std::string address, unique_fd fd, write_path path, bool greet_at_open = false)
      : send_port(std::move(address)), fd_(std::move(fd)), path_(path), greet_at_open_(greet_at_open) {
    ignore_sigpipe();  // a close() may write without a loop
  }

  std::span<std::byte> prepare(std::size_t size) override {
    if (size > max_stream_payload) {
      throw channel_error(
          EMSGSIZE, fmt::format("channel {}: a message of {} bytes is larger than a stream frame allows ({})",
                                address(), size, max_stream_payload));
    }
    used_ = 0;
    if (!greeted_) put_greeting();
    buf_.grow(used_ + head_size + size, used_);
    put(frame_kind::data, size);
    std::span<std::byte> out{buf_.data() + used_, size};
    used_ += size;
    return out;
  }

  std::size_t max_payload() const noexcept override { return max_stream_payload; }

 protected:
  task<void> commit(pooled_frame) override {
    if (cut_) {
      throw channel_error(
          EPROTO, fmt::format("channel {}: an earlier send was cancelled half way through its message; "
                              "the stream cannot go on (close() now aborts it)",
                              address()));
    }
    write_all_operation write{fd_.get(), std::span<const std::byte>{buf_.data(), used_}, path_};
    try {
      co_await write;
    } catch (const operation_cancelled&) {
      // Part of a frame is in the pipe: whatever follows would be read as the rest of it.
      // Writes of up to PIPE_BUF bytes are atomic, so only large messages get here.
      if (write.written() > 0) cut_ = true;
      throw;
    } catch (const std::system_error& e) {
      if (e.code() == std::errc::broken_pipe) {
        throw channel_closed(e.code(),
                             fmt::format("channel {}: the receiver has gone: it closed the channel, or its "
                                         "process ended",
                                         address()));
      }
      throw;
    }
    greeted_ = true;
  }

  /// A byte stream's end of file cannot tell a closed sender from a dead one, so a sender
  /// that has spoken says goodbye with an end frame; a receiver that sees end of file
  /// without it knows the sender died mid-stream. A stream with a cut frame can only be
  /// aborted: the receiver then reports the cut instead of misreading what follows.
  void finish(port_exit how) noexcept override {
    if (how != port_exit::abort && fd_ && !cut_) {
      try {
        // A sender that never sent still greets first: end of file before any greeting
        // means a sender that died before it started.
        used_ = 0;
        if (!greeted_) put_greeting();
        buf_.grow(used_ + head_size, used_);
        put(frame_kind::end, 0);
        post_at_close(std::move(fd_), path_, std::vector<std::byte>(buf_.data(), buf_.data() + used_));
      } catch (...) {  // no memory: the receiver reports a sender that went away
      }
    }
    fd_.reset();
  }

  /// Greets at once when asked to and the pipe has room (it nearly always has), so that
  /// the receiver can tell this sender's death from its not having come yet.
  void opened() noexcept override {
    if (!greet_at_open_ || greeted_ || !fd_ || !writable_within(fd_.get(), 0)) return;
    try {
      used_ = 0;
      put_greeting();
      if (used_ > PIPE_BUF) return;  // not atomic: it goes with the first message
      const ssize_t n = ::write(fd_.get(), buf_.data(), used_);
      greeted_ = n == static_cast<ssize_t>(used_);
    } catch (...) {  // no memory: it goes with the first message
    }
  }

 private:
  void put(frame_kind kind, std::size_t length) noexcept {
    const stream_head h{static_cast<std::uint32_t>(length), static_cast<std::uint32_t>(kind)};
    std::memcpy(buf_.data() + used_, &h, sizeof h);
    used_ += sizeof h;
  }
  /// Puts the greeting frame at the start of the (empty) buffer.
  void put_greeting() {
    const std::span<const std::byte> g = greeting();
    buf_.grow(head_size + g.size(), 0);
    put(frame_kind::hello, g.size());
    std::memcpy(buf_.data() + used_, g.data(), g.size());
    used_ += g.size();
  }

  unique_fd fd_;
  write_path path_;
  byte_buffer buf_;
  std::size_t used_ = 0;
  bool greet_at_open_ = false;
  bool greeted_ = false;
  bool cut_ = false;
};

class stream_receive_port final : public receive_port {
 public:
  /// `placeholder`: a writer of our own that keeps end of file away until the first
  /// sender has greeted (a FIFO receiver opened before any sender).
  stream_receive_port(std::string address, unique_fd fd, std::shared_ptr<void> keep = {},
                      unique_fd placeholder = {})
      : receive_port(std::move(address)),
        keep_(std::move(keep)),
        fd_(std::move(fd)),
        placeholder_(std::move(placeholder)) {
    buf_.grow(std::size_t{64} * 1024, 0);
  }

  std::span<const std::byte> current() const noexcept override {
    return {buf_data() + begin_ + head_size, length_};
  }
  void consume() noexcept override {
    begin_ += head_size + length_;
    current_ = false;
    if (begin_ == end_) begin_ = end_ = 0;
  }

 protected:
  task<bool> fill(pooled_frame) override {
    if (current_) co_return true;
    if (ended_) co_return false;
    for (;;) {
      const std::size_t avail = end_ - begin_;
      std::size_t need = head_size;
      if (avail >= head_size) {
        const auto h = read_head<stream_head>(buf_.data() + begin_);
        if (h.length > max_stream_payload) {
          throw channel_error(EBADMSG,
                              fmt::format("channel {}: a frame announces {} bytes: the peer is not an ipcoro "
                                          "channel sender, or the stream is corrupt",
                                          address(), h.length));
        }
        need = head_size + h.length;
        if (avail >= need) {
          const std::span<const std::byte> payload{buf_.data() + begin_ + head_size, h.length};
          if (h.kind == static_cast<std::uint32_t>(frame_kind::hello)) {
            check_greeting(payload);
            ++greetings_;
            placeholder_.reset();
            begin_ += need;
            continue;
          }
          if (h.kind == static_cast<std::uint32_t>(frame_kind::end) && greetings_ > goodbyes_) {
            ++goodbyes_;
            begin_ += need;
            continue;
          }
          if (greetings_ == 0 || h.kind != static_cast<std::uint32_t>(frame_kind::data)) {
            throw channel_error(EPROTO,
                                fmt::format("channel {}: the peer is not an ipcoro channel sender (its first "
                                            "message is not a greeting)",
                                            address()));
          }
          length_ = h.length;
          current_ = true;
          co_return true;
        }
      }
      if (begin_ + need > buf_.size()) {
        std::memmove(buf_.data(), buf_.data() + begin_, avail);
        begin_ = 0;
        end_ = avail;
        // Room grows with what has arrived, not with what a frame head announces: a
        // head alone must not make this process reserve a gigabyte.
        if (end_ == buf_.size()) buf_.grow(std::min(need, 2 * buf_.size()), avail);
      }
      const std::size_t n =
          co_await read_operation{fd_.get(), std::span<std::byte>{buf_.data() + end_, buf_.size() - end_}};
      if (n == 0) {
        if (avail > 0) {
          throw channel_error(
              ECONNRESET, fmt::format("channel {}: the stream ended inside a message ({} of {} bytes came)",
                                      address(), avail, need));
        }
        if (greetings_ > goodbyes_) {
          throw channel_error(
              ECONNRESET, fmt::format("channel {}: the sender went away without closing the channel: it died "
                                      "or was killed mid-stream",
                                      address()));
        }
        if (greetings_ == 0) {
          // Every sender greets before it can close, so this one never started.
          throw channel_error(
              ECONNRESET,
              fmt::format("channel {}: the sender went away before its greeting: it died or was "
                          "killed before it began (or the writer is not an ipcoro channel sender)",
                          address()));
        }
        ended_ = true;
        co_return false;
      }
      end_ += n;
    }
  }

  void finish(port_exit) noexcept override {
    placeholder_.reset();
    fd_.reset();
    ended_ = true;
    current_ = false;
  }

 private:
  const std::byte* buf_data() const noexcept { return const_cast<byte_buffer&>(buf_).data(); }

  std::shared_ptr<void> keep_;
  unique_fd fd_;
  unique_fd placeholder_;
  byte_buffer buf_;
  std::size_t begin_ = 0;
  std::size_t end_ = 0;
  std::size_t length_ = 0;
  std::size_t greetings_ = 0;
  std::size_t goodbyes_ = 0;
  bool current_ = false;
  bool ended_ = false;
};

}  // namespace

std::unique_ptr<send_port> make_stream_sender(std::string address, unique_fd fd, write_path path,
                                              bool greet_at_open) {
  return std::make_unique<stream_send_port>(std::move(address), std::move(fd), path, greet_at_open);
}

std::unique_ptr<receive_port> make_stream_receiver(std::string address, unique_fd fd,
                                                   std::shared_ptr<void> keep, unique_fd placeholder) {
  return std::make_unique<stream_receive_port>(std::move(address), std::move(fd), std::move(keep),
                                               std::move(placeholder));
}

}  // namespace ipcoro::detail
