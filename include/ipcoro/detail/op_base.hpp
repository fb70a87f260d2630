// SPDX-License-Identifier: MIT
// The state every io_uring operation keeps inside its awaiter (so inside the coroutine frame).
#pragma once

#include "ipcoro/export.hpp"
#include "ipcoro/version.hpp"

#include <linux/time_types.h>

#include <coroutine>
#include <cstdint>
#include <optional>
#include <stop_token>

struct io_uring_sqe;

namespace ipcoro {
class io_context;
}

namespace ipcoro::detail {

struct loop;

/// An entry in the io_context's queue of coroutines to resume; lives in an awaiter.
struct ready_node {
  ready_node* next_ready = nullptr;
  std::coroutine_handle<> handle;
};

/// One io_uring request. Its address is the SQE's user_data, so it must not move or die
/// between submission and the reaping of its CQE: awaiters guarantee that by staying
/// suspended until then, cancelled or not.
class op_base {
 public:
  /// Fills the SQE for (re)submission.
  using prep_fn = void (*)(op_base&, ::io_uring_sqe*) noexcept;
  /// Sees each CQE result first. Returns true when the operation is finished; false after
  /// updating its state to be submitted again (short reads and writes).
  using progress_fn = bool (*)(op_base&, int res) noexcept;
  /// The cheap path, tried before the ring: a non-blocking attempt (e.g. RWF_NOWAIT)
  /// whose result is handled like a CQE's. Returns -EAGAIN to go through the ring.
  using attempt_fn = int (*)(op_base&) noexcept;

  explicit op_base(prep_fn prep, progress_fn progress = nullptr, attempt_fn attempt = nullptr) noexcept
      : prep_(prep), progress_(progress), attempt_(attempt) {}
  op_base(const op_base&) = delete;
  op_base& operator=(const op_base&) = delete;

  bool has_deadline() const noexcept { return deadline_.tv_sec != 0 || deadline_.tv_nsec != 0; }

 protected:
  // What an operation sets up before it is submitted, and reads back after.
  std::coroutine_handle<> waiter_;
  io_context* ctx_ = nullptr;
  ::__kernel_timespec deadline_{};  ///< absolute CLOCK_MONOTONIC; tv_sec == 0: no deadline
  int result_ = 0;
  int retry_fd_ = -1;                    ///< descriptor to poll before retrying -EAGAIN
  std::uint16_t retry_poll_events_ = 0;  ///< POLLIN/POLLOUT to await before retrying -EAGAIN
  /// The request runs in an io_uring worker thread (IOSQE_ASYNC), where a linked timeout
  /// does not interrupt it; its deadline is a separate timer that cancels it explicitly.
  bool worker_bound_ = false;
  /// An expired deadline is an ordinary outcome (finish() sees -ETIMEDOUT), not timed_out.
  bool timeout_is_result_ = false;

 private:
  // The loop's bookkeeping: only the io_context (lib/io_context.cpp, lib/loop.hpp) and the
  // awaiter base (lib/operations.cpp) touch it.
  friend class ipcoro::io_context;
  friend struct loop;
  friend class op_awaiter_base;

  prep_fn prep_;
  progress_fn progress_;
  attempt_fn attempt_;
  op_base* next_pending_ = nullptr;  ///< link in the io_context's backlog while the SQ is full
  bool cancel_requested_ = false;
  bool cancel_queued_remotely_ = false;  ///< a stop request from another thread is queued
  bool timer_armed_ = false;             ///< the separate deadline timer's CQE is still to come
  bool waiting_for_timer_ = false;       ///< finished, but the timer's CQE must be reaped first
};

/// The non-template half of every awaitable operation: starting, cancelling, finishing.
class IPCORO_API op_awaiter_base : public op_base {
 public:
  using op_base::op_base;

 protected:
  /// Submits the operation for `waiter`. Returns false when the awaiter must not suspend
  /// (stop already requested, or the io_context is shutting down).
  bool begin(std::coroutine_handle<> waiter, const std::stop_token& token);
  /// Ends the wait: throws operation_cancelled or timed_out; returns the CQE result otherwise.
  int end();
  void set_timeout(std::int64_t nanoseconds) noexcept;
  void set_deadline(std::int64_t monotonic_nanoseconds) noexcept;

 private:
  struct canceller {
    op_base* op;
    void operator()() const noexcept;
  };
  static void cancel_on_loop(void* op) noexcept;
  std::optional<std::stop_callback<canceller>> stop_callback_;
};

}  // namespace ipcoro::detail
