// SPDX-License-Identifier: MIT
// The thin liburing layer: ring setup with feature probing; -errno returns, no exceptions.
#pragma once

#include <liburing.h>

#include <cstdint>

namespace ipcoro::uring {

/// What the running kernel offers, probed once when a ring is set up.
struct features {
  unsigned setup_flags = 0;    ///< flags the ring was actually created with
  bool single_issuer = false;  ///< IORING_SETUP_SINGLE_ISSUER (6.0)
  bool defer_taskrun = false;  ///< IORING_SETUP_DEFER_TASKRUN (6.1)
  bool nodrop = false;         ///< IORING_FEAT_NODROP: CQ overflow is held, not lost (5.5)
  bool ext_arg = false;        ///< IORING_FEAT_EXT_ARG (5.11)
  bool op_async_cancel = false;
  bool op_link_timeout = false;
  bool op_splice = false;
  bool op_msg_ring = false;     ///< 5.18
  bool op_waitid = false;       ///< 6.7
  bool op_futex_wait = false;   ///< 6.7
  bool op_futex_wake = false;   ///< 6.7
  bool op_futex_waitv = false;  ///< 6.7
  int kernel_major = 0;
  int kernel_minor = 0;
};

/// How the caller would like the ring set up; the probe may grant less.
struct setup_request {
  unsigned entries = 256;
  unsigned cq_entries = 0;    ///< 0: four times `entries`
  bool single_issuer = true;  ///< ask for SINGLE_ISSUER | DEFER_TASKRUN
};

/// One io_uring instance. Not copyable, not movable (the kernel maps its memory).
class ring {
 public:
  ring() noexcept = default;
  ring(const ring&) = delete;
  ring& operator=(const ring&) = delete;
  ~ring();

  /// Sets the ring up, falling back to fewer setup flags when the kernel refuses them.
  /// Returns 0 or -errno.
  int init(const setup_request& req) noexcept;
  /// Unmaps and closes the ring. Safe to call twice.
  void exit() noexcept;
  bool initialised() const noexcept { return initialised_; }

  const features& probed() const noexcept { return features_; }
  ::io_uring* raw() noexcept { return &ring_; }

  unsigned sq_space_left() noexcept { return ::io_uring_sq_space_left(&ring_); }
  unsigned sq_ready() noexcept { return ::io_uring_sq_ready(&ring_); }
  /// A free SQE, zero-initialised by the prep helpers. nullptr when the SQ is full.
  ::io_uring_sqe* try_get_sqe() noexcept { return ::io_uring_get_sqe(&ring_); }

  /// Submits what is queued; returns the number submitted or -errno.
  int submit() noexcept;
  /// Submits and waits until at least `wait_nr` CQEs are ready (0: only flush pending
  /// completions). Returns the number submitted or -errno; -EINTR and -ETIME are not errors.
  int submit_and_wait(unsigned wait_nr) noexcept;

  /// True when the kernel holds completions the CQ had no room for.
  bool cq_overflow_pending() const noexcept { return ::io_uring_cq_has_overflow(&ring_); }
  /// Completions the kernel had to drop (only possible without IORING_FEAT_NODROP).
  unsigned cq_dropped() const noexcept { return *ring_.cq.koverflow; }
  unsigned peek_batch(::io_uring_cqe** cqes, unsigned count) noexcept {
    return ::io_uring_peek_batch_cqe(&ring_, cqes, count);
  }
  void advance(unsigned count) noexcept { ::io_uring_cq_advance(&ring_, count); }

 private:
  void probe_opcodes() noexcept;

  ::io_uring ring_{};
  features features_{};
  bool initialised_ = false;
};

}  // namespace ipcoro::uring
