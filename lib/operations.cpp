// SPDX-License-Identifier: MIT
// The non-template parts of awaitable operations: begin/end, timeouts, and each opcode.
#include "ipcoro/error.hpp"
#include "ipcoro/fd_io.hpp"
#include "ipcoro/io_context.hpp"
#include "ipcoro/timer.hpp"
#include "loop.hpp"
#include "uring/prep.hpp"
#include "waitid_operation.hpp"

#include <liburing.h>
#include <poll.h>
#include <sys/uio.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <ctime>

namespace ipcoro {

namespace detail {

namespace {
::__kernel_timespec to_timespec(std::int64_t ns) noexcept { return {ns / 1'000'000'000, ns % 1'000'000'000}; }
std::int64_t monotonic_ns() noexcept {
  ::timespec ts{};
  ::clock_gettime(CLOCK_MONOTONIC, &ts);
  return std::int64_t{ts.tv_sec} * 1'000'000'000 + ts.tv_nsec;
}
}  // namespace

bool op_awaiter_base::begin(std::coroutine_handle<> waiter, const std::stop_token& token) {
  waiter_ = waiter;
  cancel_requested_ = false;
  timer_armed_ = waiting_for_timer_ = false;
  if (token.stop_requested()) {
    cancel_requested_ = true;
    result_ = -ECANCELED;
    return false;
  }
  if (attempt_ != nullptr) {
    const int res = attempt_(*this);
    if (res != -EAGAIN && (progress_ == nullptr || progress_(*this, res))) {
      result_ = res;
      return false;  // finished without the ring: no suspension, no syscall beyond the attempt
    }
  }
  io_context& ctx = io_context::current();
  ctx_ = &ctx;
  if (!loop::start_op(ctx, *this)) return false;
  if (token.stop_possible()) stop_callback_.emplace(token, canceller{this});
  return true;
}

int op_awaiter_base::end() {
  stop_callback_.reset();  // waits for a callback running on another thread to return
  if (cancel_queued_remotely_) {
    cancel_queued_remotely_ = false;
    loop::forget_calls(*ctx_, static_cast<op_base*>(this));
  }
  if (result_ == -ECANCELED) {
    const bool shutting_down = ctx_ != nullptr && ctx_->stopping();
    if (has_deadline() && !cancel_requested_ && !shutting_down) {
      if (timeout_is_result_) return -ETIMEDOUT;
      throw timed_out{};
    }
    throw operation_cancelled{};
  }
  return result_;
}

void op_awaiter_base::set_timeout(std::int64_t nanoseconds) noexcept {
  set_deadline(monotonic_ns() + std::max<std::int64_t>(nanoseconds, 1));
}

void op_awaiter_base::set_deadline(std::int64_t monotonic_nanoseconds) noexcept {
  // tv_sec == 0 && tv_nsec == 0 means "no deadline"; the epoch itself is long past anyway.
  deadline_ = to_timespec(std::max<std::int64_t>(monotonic_nanoseconds, 1));
}

void op_awaiter_base::canceller::operator()() const noexcept {
  if (!loop::call_on_loop(*op->ctx_, &cancel_on_loop, op)) op->cancel_queued_remotely_ = true;
}

void op_awaiter_base::cancel_on_loop(void* op) noexcept {
  auto* self = static_cast<op_base*>(op);
  loop::cancel_op(*self->ctx_, *self);
}

}  // namespace detail

namespace {
std::uint32_t clamp_len(std::size_t n) noexcept {
  // A single read/write moves at most INT_MAX bytes (the CQE result is an int).
  return static_cast<std::uint32_t>(std::min<std::size_t>(n, INT_MAX));
}
}  // namespace

// ---- read ----

// An empty read finishes at once: through the ring, a zero-length read of an empty pipe
// waits until data arrives.
int read_operation::attempt(detail::op_base& op) noexcept {
  return static_cast<read_operation&>(op).size_ == 0 ? 0 : -EAGAIN;
}

int read_exact_operation::attempt(detail::op_base& op) noexcept {
  return static_cast<read_exact_operation&>(op).size_ == 0 ? 0 : -EAGAIN;
}

read_operation::read_operation(int fd, std::span<std::byte> buffer) noexcept
    : io_operation(&prep, nullptr, &attempt), data_(buffer.data()), size_(clamp_len(buffer.size())), fd_(fd) {
  retry_fd_ = fd;
  retry_poll_events_ = POLLIN;
}

void read_operation::prep(detail::op_base& op, ::io_uring_sqe* sqe) noexcept {
  auto& self = static_cast<read_operation&>(op);
  ::io_uring_prep_read(sqe, self.fd_, self.data_, self.size_, static_cast<std::uint64_t>(-1));
}

std::size_t read_operation::finish(int res) const {
  if (res < 0) throw_errno(-res, "read");
  return static_cast<std::size_t>(res);
}

// ---- write ----

namespace {
// A write that never blocks: pipes and FIFOs honour RWF_NOWAIT (Linux 4.14+). Anything
// that cannot be done at once, or is not supported, goes through the ring instead.
int write_nowait(int fd, const std::byte* data, std::size_t size) noexcept {
  ::iovec iov{const_cast<std::byte*>(data), size};
  const ssize_t n = ::pwritev2(fd, &iov, 1, -1, RWF_NOWAIT);
  if (n >= 0) return static_cast<int>(n);
  const int err = errno;
  return (err == EAGAIN || err == EOPNOTSUPP || err == EINTR) ? -EAGAIN : -err;
}

[[noreturn]] void throw_write_error(int err) {
  if (err == EPIPE) throw_errno(err, "write: the reading end of the pipe is closed");
  throw_errno(err, "write");
}
}  // namespace

write_operation::write_operation(int fd, std::span<const std::byte> buffer, write_path path) noexcept
    : io_operation(&prep, nullptr, path == write_path::try_nowait_first ? &attempt : nullptr),
      data_(buffer.data()),
      size_(clamp_len(buffer.size())),
      fd_(fd) {
  retry_fd_ = fd;
  retry_poll_events_ = POLLOUT;
}

void write_operation::prep(detail::op_base& op, ::io_uring_sqe* sqe) noexcept {
  auto& self = static_cast<write_operation&>(op);
  ::io_uring_prep_write(sqe, self.fd_, self.data_, self.size_, static_cast<std::uint64_t>(-1));
}

int write_operation::attempt(detail::op_base& op) noexcept {
  auto& self = static_cast<write_operation&>(op);
  return write_nowait(self.fd_, self.data_, self.size_);
}

std::size_t write_operation::finish(int res) const {
  if (res < 0) throw_write_error(-res);
  return static_cast<std::size_t>(res);
}

// ---- read_exact ----

read_exact_operation::read_exact_operation(int fd, std::span<std::byte> buffer) noexcept
    : io_operation(&prep, &progress, &attempt), data_(buffer.data()), size_(buffer.size()), fd_(fd) {
  retry_fd_ = fd;
  retry_poll_events_ = POLLIN;
}

void read_exact_operation::prep(detail::op_base& op, ::io_uring_sqe* sqe) noexcept {
  auto& self = static_cast<read_exact_operation&>(op);
  ::io_uring_prep_read(sqe, self.fd_, self.data_ + self.done_, clamp_len(self.size_ - self.done_),
                       static_cast<std::uint64_t>(-1));
}

bool read_exact_operation::progress(detail::op_base& op, int res) noexcept {
  auto& self = static_cast<read_exact_operation&>(op);
  if (res <= 0) return true;
  self.done_ += static_cast<std::size_t>(res);
  return self.done_ >= self.size_;
}

std::size_t read_exact_operation::finish(int res) const {
  if (res < 0) throw_errno(-res, "read");
  return done_;
}

// ---- write_all ----

write_all_operation::write_all_operation(int fd, std::span<const std::byte> buffer, write_path path) noexcept
    : io_operation(&prep, &progress, path == write_path::try_nowait_first ? &attempt : nullptr),
      data_(buffer.data()),
      size_(buffer.size()),
      fd_(fd) {
  retry_fd_ = fd;
  retry_poll_events_ = POLLOUT;
}

void write_all_operation::prep(detail::op_base& op, ::io_uring_sqe* sqe) noexcept {
  auto& self = static_cast<write_all_operation&>(op);
  ::io_uring_prep_write(sqe, self.fd_, self.data_ + self.done_, clamp_len(self.size_ - self.done_),
                        static_cast<std::uint64_t>(-1));
}

int write_all_operation::attempt(detail::op_base& op) noexcept {
  auto& self = static_cast<write_all_operation&>(op);
  return write_nowait(self.fd_, self.data_, clamp_len(self.size_));
}

bool write_all_operation::progress(detail::op_base& op, int res) noexcept {
  auto& self = static_cast<write_all_operation&>(op);
  if (res < 0) return true;
  self.done_ += static_cast<std::size_t>(res);
  return self.done_ >= self.size_;
}

void write_all_operation::finish(int res) const {
  if (res < 0) throw_write_error(-res);
}

// ---- splice ----

splice_operation::splice_operation(int fd_in, std::int64_t off_in, int fd_out, std::int64_t off_out,
                                   std::uint32_t length, unsigned flags) noexcept
    : io_operation(&prep),
      off_in_(off_in),
      off_out_(off_out),
      fd_in_(fd_in),
      fd_out_(fd_out),
      length_(length),
      flags_(flags) {}

void splice_operation::prep(detail::op_base& op, ::io_uring_sqe* sqe) noexcept {
  auto& self = static_cast<splice_operation&>(op);
  ::io_uring_prep_splice(sqe, self.fd_in_, self.off_in_, self.fd_out_, self.off_out_, self.length_,
                         self.flags_);
}

std::size_t splice_operation::finish(int res) const {
  if (res == -EPIPE) throw_write_error(EPIPE);
  if (res < 0) throw_errno(-res, "splice");
  return static_cast<std::size_t>(res);
}

// ---- openat ----

openat_operation::openat_operation(int dir_fd, const char* path, int flags, unsigned mode) noexcept
    : io_operation(&prep), path_(path), dir_fd_(dir_fd), flags_(flags), mode_(mode) {
  worker_bound_ = true;
}

void openat_operation::prep(detail::op_base& op, ::io_uring_sqe* sqe) noexcept {
  auto& self = static_cast<openat_operation&>(op);
  ::io_uring_prep_openat(sqe, self.dir_fd_, self.path_, self.flags_, self.mode_);
  // Straight to an io-wq worker, where the open may block. Issued inline, io_uring first
  // tries the open with O_NONBLOCK (Linux 5.6+), and for a FIFO that changes its meaning:
  // a reader opens at once without waiting for a writer, and a writer fails with ENXIO
  // when no reader is there yet, instead of waiting for one.
  sqe->flags |= IOSQE_ASYNC;
}

int openat_operation::finish(int res) const {
  if (res < 0) throw_errno(-res, std::string("open ") + path_);
  return res;
}

// ---- poll ----

poll_operation::poll_operation(int fd, unsigned events) noexcept
    : io_operation(&prep), fd_(fd), events_(events) {}

void poll_operation::prep(detail::op_base& op, ::io_uring_sqe* sqe) noexcept {
  auto& self = static_cast<poll_operation&>(op);
  ::io_uring_prep_poll_add(sqe, self.fd_, self.events_);
}

unsigned poll_operation::finish(int res) const {
  if (res < 0) throw_errno(-res, "poll");
  return static_cast<unsigned>(res);
}

// ---- nop ----

nop_operation::nop_operation() noexcept : io_operation(&prep) {}

void nop_operation::prep(detail::op_base&, ::io_uring_sqe* sqe) noexcept { ::io_uring_prep_nop(sqe); }

void nop_operation::finish(int res) const {
  if (res < 0) throw_errno(-res, "nop");
}

// ---- waitid ----

void detail::waitid_operation::prep(op_base& op, ::io_uring_sqe* sqe) noexcept {
  auto& self = static_cast<waitid_operation&>(op);
  uring::prep_waitid(sqe, P_PIDFD, static_cast<id_t>(self.pidfd_), &self.info_, WEXITED | WNOWAIT);
}

// ---- timer ----

timer_operation::timer_operation(std::chrono::steady_clock::time_point when) noexcept : io_operation(&prep) {
  const auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(when.time_since_epoch()).count();
  when_ = {ns / 1'000'000'000, ns % 1'000'000'000};
}

void timer_operation::prep(detail::op_base& op, ::io_uring_sqe* sqe) noexcept {
  auto& self = static_cast<timer_operation&>(op);
  ::io_uring_prep_timeout(sqe, &self.when_, 0, IORING_TIMEOUT_ABS);
}

void timer_operation::finish(int res) const {
  if (res < 0 && res != -ETIME) throw_errno(-res, "timeout");
}

}  // namespace ipcoro
