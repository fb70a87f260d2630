// SPDX-License-Identifier: MIT
// stream_receive_port: a channel's receiving end over a byte stream: frames read in large
// chunks, and a large value's payload read straight from the pipe into the value.
#include "stream_port.hpp"

#include "ipcoro/channel.hpp"
#include "ipcoro/error.hpp"
#include "ipcoro/pipe.hpp"

#include "channel_wire.hpp"

#include <fmt/core.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>

namespace ipcoro::detail {

std::atomic<std::uint64_t> direct_payloads{0};

namespace {

class stream_receive_port final : public receive_port {
  static constexpr std::size_t large_frame = std::size_t{16} * 1024;
  /// From this payload size on, a message whose value takes its bytes as they are
  /// (direct_size) is read straight into the value: a read system call then costs less than
  /// the copy it saves.
  static constexpr std::size_t direct_frame = std::size_t{32} * 1024;

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

  std::span<const std::byte> current() override {
    if (pending_payload != 0) read_rest();
    return {buf_.data() + begin_ + head_size, length_};
  }
  void consume() noexcept override {
    if (pending_payload != 0) {
      // Not taken (read_pending): the payload is read past. A stream that fails there is
      // reported by the next receive, which finds the rest of it missing.
      try {
        read_rest();
      } catch (...) {
        pending_payload = 0;
        end_ = begin_ + head_size + length_;
        broken_ = true;
      }
    }
    begin_ += head_size + length_;
    current_ = false;
    if (begin_ == end_) begin_ = end_ = 0;
  }

  /// The pending payload, the part read with the frame's head first, then the rest straight
  /// from the pipe, which holds all of it (see parse).
  void read_pending(std::span<std::byte> into) override {
    const std::size_t have = end_ - begin_ - head_size;
    std::memcpy(into.data(), buf_.data() + begin_ + head_size, have);
    read_held(into.subspan(have));
    end_ = begin_ + head_size + length_;  // consume() moves past it as if read in
    pending_payload = 0;
    direct_payloads.fetch_add(1, std::memory_order_relaxed);
  }

 protected:
  /// A message already read needs no wait (and no task): each read takes in up to 64 KiB,
  /// which may hold hundreds of frames.
  bool try_next() override {
    if (current_) return true;
    if (ended_) return false;
    check_broken();
    std::size_t need = 0;
    return parse(need);
  }

  task<bool> fill(pooled_frame) override {
    if (current_) co_return true;
    if (ended_) co_return false;
    check_broken();
    for (;;) {
      std::size_t need = 0;
      if (parse(need)) co_return true;
      const std::size_t avail = end_ - begin_;
      if (begin_ + need > buf_.size()) {
        std::memmove(buf_.data(), buf_.data() + begin_, avail);
        begin_ = 0;
        end_ = avail;
        // Room grows with what has arrived, not with what a frame head announces: a
        // head alone must not make this process reserve a gigabyte.
        if (end_ == buf_.size()) buf_.grow(std::min(need, 2 * buf_.size()), avail);
      }
      // A large frame is read up to its end and no further: the next one then starts at
      // the buffer's front instead of being moved there.
      std::size_t room = buf_.size() - end_;
      if (need >= large_frame) room = std::min(room, begin_ + need - end_);
      // A receiver that takes large payloads straight into its values reads a frame's head
      // alone first: the payload can then stay in the pipe for read_pending.
      if (direct_size >= direct_frame && avail == 0) room = head_size;
      const std::size_t n =
          co_await read_operation{fd_.get(), std::span<std::byte>{buf_.data() + end_, room}};
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
  /// Makes the next data frame already read current, taking greetings and goodbyes on the
  /// way: true when there is one; false when more must be read (`need` bytes from begin_).
  bool parse(std::size_t& need) {
    for (;;) {
      const std::size_t avail = end_ - begin_;
      need = head_size;
      if (avail < head_size) return false;
      const auto h = read_head<stream_head>(buf_.data() + begin_);
      if (h.length > max_stream_payload) {
        throw channel_error(EBADMSG,
                            fmt::format("channel {}: a frame announces {} bytes: the peer is not an ipcoro "
                                        "channel sender, or the stream is corrupt",
                                        address(), h.length));
      }
      need = head_size + h.length;
      if (avail < need)
        return h.kind == static_cast<std::uint32_t>(frame_kind::data) && leave_pending(h.length);
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
      return true;
    }
  }

  /// A data frame of direct_size whose payload the pipe holds in full (by FIONREAD, with
  /// this end its only reader) is made current with its payload left there: true.
  bool leave_pending(std::size_t length) {
    if (length != direct_size || length < direct_frame || greetings_ == 0) return false;
    const std::size_t rest = head_size + length - (end_ - begin_);
    int queued = 0;
    if (::ioctl(fd_.get(), FIONREAD, &queued) != 0 || static_cast<std::size_t>(queued) < rest) return false;
    if (begin_ + head_size + length > buf_.size()) {  // room to read it in if it is not taken
      std::memmove(buf_.data(), buf_.data() + begin_, end_ - begin_);
      end_ -= begin_;
      begin_ = 0;
      buf_.grow(head_size + length, end_);
    }
    length_ = length;
    pending_payload = length;
    current_ = true;
    return true;
  }

  /// The pending payload's rest, read into the buffer (current() of a message not taken
  /// by read_pending, or one consumed without being taken).
  void read_rest() {
    read_held({buf_.data() + end_, begin_ + head_size + length_ - end_});
    end_ = begin_ + head_size + length_;
    pending_payload = 0;
  }

  /// Reads `out` whole from the pipe, which holds it: without waiting, as FIONREAD said.
  /// Another reader of the pipe (not a channel's) could take bytes meanwhile: the pipe is
  /// then found short, and this fails rather than wait.
  void read_held(std::span<std::byte> out) {
    bool first = true;
    while (!out.empty()) {
      int queued = 0;
      if (!first && (::ioctl(fd_.get(), FIONREAD, &queued) != 0 || queued == 0)) {
        throw channel_error(EPROTO, fmt::format("channel {}: the pipe held less of a message than it "
                                                "counted: another process reads this channel's pipe",
                                                address()));
      }
      first = false;
      const ssize_t n = ::read(fd_.get(), out.data(), out.size());
      if (n > 0) {
        out = out.subspan(static_cast<std::size_t>(n));
      } else if (n == 0 || errno != EINTR) {
        throw channel_error(n == 0 ? ECONNRESET : errno,
                            fmt::format("channel {}: reading a message the pipe held failed", address()));
      }
    }
  }

  /// A payload consumed without being taken could not be read past: the stream is cut.
  void check_broken() const {
    if (!broken_) return;
    throw channel_error(ECONNRESET, fmt::format("channel {}: the stream failed inside a message", address()));
  }

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
  bool broken_ = false;  // see consume()
};

}  // namespace

std::unique_ptr<receive_port> make_stream_receiver(std::string address, unique_fd fd,
                                                   std::shared_ptr<void> keep, unique_fd placeholder) {
  return std::make_unique<stream_receive_port>(std::move(address), std::move(fd), std::move(keep),
                                               std::move(placeholder));
}

}  // namespace ipcoro::detail
