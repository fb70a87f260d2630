// SPDX-License-Identifier: MIT
// stream_port: frames on a byte stream, a close that never blocks, a receiver that buffers.
#include "stream_port.hpp"

#include "ipcoro/channel.hpp"
#include "ipcoro/error.hpp"
#include "ipcoro/io_context.hpp"
#include "ipcoro/pipe.hpp"

#include "channel_wire.hpp"
#include "loop.hpp"
#include "page_lending.hpp"

#include <fcntl.h>
#include <fmt/core.h>
#include <poll.h>
#include <unistd.h>

#include <sys/uio.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <stdexcept>
#include <vector>

namespace ipcoro::detail {

namespace {

/// How long a write that cannot use the loop (it has shut down, or there is none) waits
/// for room before giving up.
constexpr std::chrono::seconds end_patience{30};

/// How many bytes a stream sender holds unwritten, at most, before a send waits for the
/// kernel to take some (the backpressure): the pipe's capacity, and no more than this.
constexpr std::size_t coalesce_bound = std::size_t{64} * 1024;

std::size_t bound_for(int fd) noexcept {
  const int capacity = ::fcntl(fd, F_GETPIPE_SZ);
  return capacity > 0 ? std::min(static_cast<std::size_t>(capacity), coalesce_bound) : coalesce_bound;
}

std::atomic<std::uint64_t> writes_made{0};
std::atomic<std::uint64_t> peak_held{0};
std::atomic<std::uint64_t> frames_lent{0};

/// True once `fd` can take a write of at most PIPE_BUF bytes without blocking (or would
/// fail at once: no reader left), waiting at most `wait` milliseconds for that.
bool writable_within(int fd, int wait) noexcept {
  pollfd pfd{fd, POLLOUT, 0};
  int n = 0;
  while ((n = ::poll(&pfd, 1, wait)) < 0 && errno == EINTR) {
  }
  return n > 0;
}

/// The bytes at `p` (whole frames, `n` in all) that go out in one write: as many whole
/// frames as fit in PIPE_BUF, so that several writers' frames never interleave (writes
/// of up to PIPE_BUF bytes are atomic); one frame alone when it is larger.
std::size_t next_chunk(const std::byte* p, std::size_t n) noexcept {
  std::size_t take = 0;
  while (take + head_size <= n) {
    const std::size_t frame = head_size + read_head<stream_head>(p + take).length;
    if (take > 0 && take + frame > PIPE_BUF) break;
    take += frame;
    if (take >= PIPE_BUF) break;
  }
  return std::min(take, n);
}

/// A stream sender's output, shared by the port, the end-of-turn hook and the task that
/// writes while the pipe is full, so that it outlives the port until it is written. Frames
/// accepted by a send wait in `pending`; a flush moves them to `writing` and writes them.
struct stream_out : turn_end_hook {
  stream_out(unique_fd f, write_path p) noexcept : fd(std::move(f)), path(p), bound(bound_for(fd.get())) {}

  std::size_t held() const noexcept { return used + (write_end - written); }

  unique_fd fd;
  write_path path;
  std::size_t bound;
  byte_buffer pending;
  std::size_t used = 0;
  byte_buffer writing;
  std::size_t write_end = 0;
  std::size_t written = 0;
  std::uint64_t put = 0;             // bytes put into the pipe in all (written and lent)
  wait_list progress;                // sends waiting for room, flushes waiting for the kernel
  std::shared_ptr<stream_out> keep;  // while the hook is queued
  int error = 0;                     // a deferred write's errno, for the next send or flush
  bool flushing = false;             // a task is writing `writing`
  bool drained = false;              // set when that task ends (for finish() outside the loop)
};

/// Makes room for `need` bytes of held frames in `b`, keeping its first `keep`: small while
/// a turn holds little; past 4 KiB, the whole bound at once. A busy sender's two buffers
/// thus stop growing after their first bursts (no allocation later, at a new high of what
/// a turn holds), and a sender of lone messages keeps small ones.
void reserve_held(byte_buffer& b, std::size_t need, std::size_t keep, std::size_t bound) {
  constexpr std::size_t small = 4096;
  b.grow(need > small ? std::max(need, bound) : need, keep);
}

/// `n` more bytes are in the kernel, in one system call.
void note_write(stream_out& o, std::size_t n) noexcept {
  o.put += n;
  writes_made.fetch_add(1, std::memory_order_relaxed);
}

/// A deferred write failed: what is held is lost; the next send or flush reports `err`.
void fail(stream_out& o, int err) noexcept {
  o.error = err;
  o.used = o.write_end = o.written = 0;
  o.progress.wake_all();
}

/// Moves the pending frames to `writing` once the previous ones are written.
bool take_pending(stream_out& o) noexcept {
  if (o.written < o.write_end || o.used == 0) return o.written < o.write_end;
  std::swap(o.pending, o.writing);
  o.write_end = std::exchange(o.used, 0);
  o.written = 0;
  return true;
}

/// Writes what it can without waiting. True when all is written (or failed).
bool write_now(stream_out& o) noexcept {
  while (take_pending(o)) {
    const std::byte* p = o.writing.data() + o.written;
    const std::size_t chunk = next_chunk(p, o.write_end - o.written);
    ssize_t n = -1;
    if (o.path == write_path::try_nowait_first) {
      ::iovec iov{const_cast<std::byte*>(p), chunk};
      n = ::pwritev2(o.fd.get(), &iov, 1, -1, RWF_NOWAIT);
    } else if (chunk <= PIPE_BUF && writable_within(o.fd.get(), 0)) {
      n = ::write(o.fd.get(), p, chunk);  // atomic, and poll() said it fits
    } else {
      return false;
    }
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EOPNOTSUPP) return false;
      fail(o, errno);
      return true;
    }
    note_write(o, static_cast<std::size_t>(n));
    o.written += static_cast<std::size_t>(n);
    if (static_cast<std::size_t>(n) < chunk) return false;
  }
  return true;
}

/// Writes everything held, waiting for room without the loop, at most `end_patience`
/// in all: for a loop that has shut down (the process is most likely ending) or none.
void write_patiently(stream_out& o) noexcept {
  const auto until = std::chrono::steady_clock::now() + end_patience;
  while (take_pending(o)) {
    const auto left =
        std::chrono::duration_cast<std::chrono::milliseconds>(until - std::chrono::steady_clock::now());
    if (left.count() <= 0 || !writable_within(o.fd.get(), static_cast<int>(left.count()))) {
      fail(o, ETIMEDOUT);
      return;
    }
    const std::size_t piece =
        std::min<std::size_t>(next_chunk(o.writing.data() + o.written, o.write_end - o.written), PIPE_BUF);
    const ssize_t n = ::write(o.fd.get(), o.writing.data() + o.written, piece);
    if (n < 0 && (errno == EINTR || errno == EAGAIN)) continue;
    if (n < 0) {
      fail(o, errno);
      return;
    }
    note_write(o, static_cast<std::size_t>(n));
    o.written += static_cast<std::size_t>(n);
  }
}

/// Writes through the ring what could not be written at once, and what is sent meanwhile,
/// waking the sends and flushes that wait for it as it goes.
task<void> keep_writing(pooled_frame, std::shared_ptr<stream_out> out) {
  stream_out& o = *out;
  bool cancelled = false;
  while (!cancelled && o.error == 0 && take_pending(o)) {
    const std::size_t chunk = next_chunk(o.writing.data() + o.written, o.write_end - o.written);
    write_all_operation write{o.fd.get(), std::span<const std::byte>{o.writing.data() + o.written, chunk},
                              o.path};
    try {
      co_await write;
      o.written += chunk;
      note_write(o, chunk);
    } catch (const operation_cancelled&) {
      o.written += write.written();
      o.put += write.written();
      cancelled = true;  // the loop is shutting down
    } catch (const std::system_error& e) {
      fail(o, e.code().value());
    } catch (...) {
      fail(o, ENOMEM);
    }
    o.progress.wake_all();
  }
  if (cancelled) write_patiently(o);
  o.flushing = false;
  o.drained = true;
  o.progress.wake_all();
}

/// finish() outside a running loop, while a write task that an earlier turn left in the loop
/// still holds frames: nothing else may turn the loop before this process waits for its peer,
/// so this turns it until the task has written everything (or failed), as a blocking write
/// would wait.
void drain_outside_loop(stream_out& o) noexcept {
  io_context* ctx = io_context::current_or_null();
  if (!o.flushing || ctx == nullptr || ctx->stopping() || loop::driven(*ctx)) return;
  o.drained = false;
  while (!o.drained) {
    try {
      loop::run_until(*ctx, o.drained);
    } catch (const std::logic_error&) {  // nothing left that could finish it: give up
      return;
    } catch (...) {  // another task's failure: reported as it would have been, and on
      loop::detached_failed(*ctx, std::current_exception(), false);
    }
  }
}

/// Starts writing what is held: at once as far as the pipe takes it without waiting, the
/// rest through the ring (or, with no loop to use, waiting here, bounded).
void start_flush(stream_out& o, const std::shared_ptr<stream_out>& self) noexcept {
  if (o.flushing || o.error != 0 || write_now(o)) {
    if (!o.flushing) o.progress.wake_all();
    return;
  }
  if (io_context* ctx = io_context::current_or_null();
      ctx != nullptr && !ctx->stopping() && loop::driven(*ctx)) {
    try {
      o.flushing = true;
      ctx->spawn(keep_writing(pooled_frame{}, self));
      return;
    } catch (...) {  // no memory for the task: wait here, bounded
      o.flushing = false;
    }
  }
  write_patiently(o);
  o.progress.wake_all();
}

void flush_at_turn_end(turn_end_hook& hook) noexcept {
  auto& o = static_cast<stream_out&>(hook);
  const std::shared_ptr<stream_out> self = std::move(o.keep);
  start_flush(o, self);
}

class stream_send_port final : public send_port {
 public:
  /// `greet_at_open`: greet as soon as the end has its identity rather than with the first
  /// message (a FIFO opened by name, whose receiver waits for a greeting before it can
  /// tell a sender's end of file from "nobody came yet").
  /// `lend`: large frames are lent to the pipe (lent_pages), for a receiver known to read.
  stream_send_port(std::string address, unique_fd fd, write_path path, bool greet_at_open, bool lend)
      : send_port(std::move(address)),
        out_(std::make_shared<stream_out>(std::move(fd), path)),
        greet_at_open_(greet_at_open),
        lend_(lend) {
    out_->fn = &flush_at_turn_end;
    ignore_sigpipe();  // a close() may write without a loop
  }

  /// Frames the message where it will wait: in memory lent to the pipe when it is large
  /// and the receiver is ours; otherwise behind what is held while that stays within the
  /// bound (or nothing is held), else aside until there is room.
  std::span<std::byte> prepare(std::size_t size) override {
    if (size > max_stream_payload) {
      throw channel_error(
          EMSGSIZE, fmt::format("channel {}: a message of {} bytes is larger than a stream frame allows ({})",
                                address(), size, max_stream_payload));
    }
    stream_out& o = *out_;
    finish_lent();
    frame_ = head_size + size + (greeted_ ? 0 : head_size + greeting().size());
    if (lend_ && greeted_) {
      const std::span<std::byte> lent = pages_.claim(o.fd.get(), frame_, o.put);
      lending_ = !lent.empty();
      lent_ = 0;
      if (lending_) return {put(lent.data(), frame_kind::data, size), size};
    }
    aside_ = o.held() > 0 && o.held() + frame_ > o.bound;
    byte_buffer& to = aside_ ? aside_buf_ : o.pending;
    const std::size_t at = aside_ ? 0 : o.used;
    reserve_held(to, at + frame_, at, aside_ ? 0 : o.bound);  // the aside buffer: one frame
    std::byte* p = to.data() + at;
    if (!greeted_) p = put_greeting(p);
    p = put(p, frame_kind::data, size);
    return {p, size};
  }

  /// Takes the message when it went behind what is held: it goes out at the end of this
  /// turn of the loop, with whatever else is sent meanwhile.
  bool try_send_prepared() override {
    check();
    if (lending_) return lend_now();
    if (aside_) return false;
    accept(frame_);
    return true;
  }

  std::size_t max_payload() const noexcept override { return max_stream_payload; }

 protected:
  /// A message set aside waits until what is held leaves room for it.
  task<void> commit(pooled_frame) override {
    check();
    stream_out& o = *out_;
    if (lending_) {
      // What is held goes first; then the frame as the pipe takes it. Once part of it is
      // in the pipe the send is done even when this end leaves meanwhile: the rest is
      // copied and written before the end frame, so the stream never stops mid-frame.
      try {
        while (!lend_now()) {
          if (o.held() > 0 || o.flushing) {
            start_flush(o, out_);
            check();
            if (o.held() > 0 || o.flushing) co_await park_operation{o.progress};
          } else {
            (void)co_await poll(o.fd.get(), POLLOUT);
          }
          check();
        }
      } catch (...) {
        if (lent_ == 0 || o.error != 0) {
          lending_ = false;
          throw;
        }
        copy_rest();
      }
      co_return;
    }
    while (o.held() > 0 && o.held() + frame_ > o.bound) {
      start_flush(o, out_);
      check();
      if (o.held() > 0 && o.held() + frame_ > o.bound) co_await park_operation{o.progress};
      check();
    }
    if (o.used == 0) {
      std::swap(o.pending, aside_buf_);  // the frame becomes what is held, without a copy
    } else {
      reserve_held(o.pending, o.used + frame_, o.used, o.bound);
      std::memcpy(o.pending.data() + o.used, aside_buf_.data(), frame_);
    }
    aside_ = false;
    accept(frame_);
  }

  task<void> drain(pooled_frame) override {
    check();
    stream_out& o = *out_;
    while (o.held() > 0 || o.flushing) {
      start_flush(o, out_);
      check();
      if (o.held() > 0 || o.flushing) co_await park_operation{o.progress};
      check();
    }
  }

  /// A byte stream's end of file cannot tell a closed sender from a dead one, so a sender
  /// that has spoken says goodbye with an end frame; a receiver that sees end of file
  /// without it knows the sender died mid-stream. What is held is written first, also on
  /// abort (without the end frame): a message whose send completed is never dropped
  /// here. Never blocks the loop: what the pipe cannot take now is written through the
  /// ring. Outside a running loop it is waited for here: bounded when no write task is in
  /// the loop, and by turning the loop until that task is done when one is.
  void finish(port_exit how) noexcept override {
    stream_out& o = *out_;
    if (o.fd && o.error == 0) {
      try {
        finish_lent();
      } catch (...) {  // no memory: the receiver reports a frame cut short
      }
      if (how != port_exit::abort) {
        try {
          // A sender that never sent still greets first: end of file before any greeting
          // means a sender that died before it started.
          frame_ = head_size + (greeted_ ? 0 : head_size + greeting().size());
          o.pending.grow(o.used + frame_, o.used);
          std::byte* p = o.pending.data() + o.used;
          if (!greeted_) p = put_greeting(p);
          put(p, frame_kind::end, 0);
          o.used += frame_;
        } catch (...) {  // no memory: the receiver reports a sender that went away
        }
      }
      start_flush(o, out_);
      drain_outside_loop(o);
    }
    out_.reset();  // the descriptor closes once what is held is written
  }

  /// Greets at once when asked to and the pipe has room (it nearly always has), so that
  /// the receiver can tell this sender's death from its not having come yet.
  void opened() noexcept override {
    stream_out& o = *out_;
    if (!greet_at_open_ || greeted_ || !o.fd || o.held() > 0 || !writable_within(o.fd.get(), 0)) return;
    try {
      byte_buffer b;
      b.grow(head_size + greeting().size(), 0);
      const std::size_t n = static_cast<std::size_t>(put_greeting(b.data()) - b.data());
      if (n > PIPE_BUF) return;  // not atomic: it goes with the first message
      greeted_ = ::write(o.fd.get(), b.data(), n) == static_cast<ssize_t>(n);
    } catch (...) {  // no memory: it goes with the first message
    }
  }

 private:
  static std::byte* put(std::byte* p, frame_kind kind, std::size_t length) noexcept {
    const stream_head h{static_cast<std::uint32_t>(length), static_cast<std::uint32_t>(kind)};
    std::memcpy(p, &h, sizeof h);
    return p + sizeof h;
  }
  std::byte* put_greeting(std::byte* p) {
    const std::span<const std::byte> g = greeting();
    p = put(p, frame_kind::hello, g.size());
    std::memcpy(p, g.data(), g.size());
    return p + g.size();
  }

  /// Reports what a deferred write found: the receiver gone (channel_closed), or another error.
  void check() const {
    const int err = out_->error;
    if (err == 0) return;
    if (err == EPIPE) {
      throw channel_closed(std::error_code(EPIPE, std::system_category()),
                           fmt::format("channel {}: the receiver has gone: it closed the channel, or its "
                                       "process ended",
                                       address()));
    }
    throw channel_error(err, fmt::format("channel {}: writing earlier messages failed", address()));
  }

  /// Lends the prepared frame to the pipe as far as it takes it now, once nothing is held
  /// before it: true when all of it is in (or lending failed and it was copied).
  bool lend_now() {
    stream_out& o = *out_;
    if (o.held() > 0 || o.flushing) return false;
    while (lent_ < frame_) {
      const ssize_t n = pages_.lend(o.fd.get(), lent_);
      if (n == 0) return false;
      if (n == -EPIPE) {  // the receiver has gone: reported as a write would be
        fail(o, EPIPE);
        lending_ = false;
        check();  // throws
      }
      if (n < 0) {  // the pipe takes no lent pages (now): this frame's rest and later ones are copied
        lend_ = false;
        copy_rest();
        return true;
      }
      lent_ += static_cast<std::size_t>(n);
      note_write(o, static_cast<std::size_t>(n));
    }
    pages_.settle(lent_, o.put);
    lending_ = false;
    greeted_ = true;
    frames_lent.fetch_add(1, std::memory_order_relaxed);
    return true;
  }

  /// A frame prepared for lending and then left (its send failed or was never finished):
  /// dropped when none of it is in the pipe, otherwise its rest follows (copy_rest).
  void finish_lent() {
    if (lending_ && lent_ == 0) lending_ = false;
    copy_rest();
  }

  /// The rest of a frame being lent, copied to `pending`: for a sender that leaves, or a
  /// pipe that does not take lent pages, partway through it.
  void copy_rest() {
    if (!lending_) return;
    stream_out& o = *out_;
    const std::size_t rest = frame_ - lent_;
    reserve_held(o.pending, o.used + rest, o.used, o.bound);
    std::memcpy(o.pending.data() + o.used, pages_.claimed().data() + lent_, rest);
    pages_.settle(lent_, o.put);
    lending_ = false;
    accept(rest);
  }

  /// `n` bytes of the prepared frame now wait in `pending`, to go out at the end of this
  /// loop turn.
  void accept(std::size_t n) noexcept {
    stream_out& o = *out_;
    o.used += n;
    greeted_ = true;
    if (o.held() > peak_held.load(std::memory_order_relaxed))
      peak_held.store(o.held(), std::memory_order_relaxed);
    if (o.flushing || o.queued) return;  // the write in flight takes it next
    if (io_context* ctx = io_context::current_or_null(); ctx != nullptr) {
      o.keep = out_;
      loop::at_turn_end(*ctx, o);
    } else {
      start_flush(o, out_);
    }
  }

  std::shared_ptr<stream_out> out_;
  byte_buffer aside_buf_;  // a message waiting for room
  std::size_t frame_ = 0;  // the prepared frame's size (with the greeting before it, if any)
  bool aside_ = false;
  bool greet_at_open_ = false;
  bool greeted_ = false;
  bool lend_ = false;     // large frames are lent to the pipe
  bool lending_ = false;  // the prepared frame is in pages_, its first lent_ bytes in the pipe
  std::size_t lent_ = 0;
  lent_pages pages_;
};

}  // namespace

void widen_stream_pipe(int fd) noexcept {
  const int now = ::fcntl(fd, F_GETPIPE_SZ);
  if (now < 0 || static_cast<std::size_t>(now) >= default_stream_capacity) return;
  (void)::fcntl(fd, F_SETPIPE_SZ, static_cast<int>(default_stream_capacity));  // best effort
}

stream_stats stream_counts() noexcept {
  return {writes_made.load(std::memory_order_relaxed), peak_held.load(std::memory_order_relaxed),
          frames_lent.load(std::memory_order_relaxed), direct_payloads.load(std::memory_order_relaxed)};
}

std::unique_ptr<send_port> make_stream_sender(std::string address, unique_fd fd, write_path path,
                                              bool greet_at_open, bool lend_pages) {
  return std::make_unique<stream_send_port>(std::move(address), std::move(fd), path, greet_at_open,
                                            lend_pages);
}

}  // namespace ipcoro::detail
