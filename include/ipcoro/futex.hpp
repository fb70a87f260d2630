// SPDX-License-Identifier: MIT
// Futex waits through the ring (IORING_OP_FUTEX_WAIT) and wakes, on 32-bit words in memory
// shared between processes or private to one.
#pragma once

#include "ipcoro/export.hpp"
#include "ipcoro/io_operation.hpp"

#include <atomic>
#include <chrono>
#include <cstdint>
#include <optional>
#include <stop_token>

namespace ipcoro {

namespace detail {
struct futex_fallback;
}

/// Whether other processes may wait on or wake the word. `shared` is right for words in
/// MAP_SHARED memory (shm segments, mapped files); `process_private` is cheaper for
/// words only this process uses.
enum class futex_scope : unsigned char { shared, process_private };

/// How a futex wait ended. None of them proves the awaited condition: re-read the word.
enum class futex_wait_result : unsigned char {
  woken,          ///< a futex_wake reached this waiter
  value_changed,  ///< the word no longer held `expected` when the wait began (or, on the
                  ///< fallback path, when its helper looked again)
  timed_out,      ///< the timeout expired first
};

/// Sleeps while `word` holds `expected`, until a futex_wake on the same word, or the
/// timeout. Parks through IORING_OP_FUTEX_WAIT (Linux 6.7); on older kernels, or when the
/// environment sets IPCORO_FUTEX_FALLBACK=1, through a fallback with the same behaviour
/// (see futex_waits_use_ring()). A timeout is mandatory: a waiter must never depend on a
/// peer that may have died. Throws operation_cancelled when the awaiting task is stopped
/// or its io_context shuts down (on the fallback path, shutdown reaches the wait through
/// the task's stop token, as for event waits; a wait under a token shutdown does not stop
/// ends at its timeout). `word` must stay mapped until the wait completes: the fallback
/// throws std::system_error(EFAULT) when it is not.
///
/// Wakes are not stored: a wake that comes before the wait has reached the kernel is
/// lost. So change the word first, then wake: the wait then ends with value_changed
/// instead. A wake that futex_wake counted as reaching a waiter is never lost, on either
/// path.
class [[nodiscard]] IPCORO_API futex_wait_operation : public io_operation<futex_wait_operation> {
 public:
  futex_wait_operation(std::atomic<std::uint32_t>& word, std::uint32_t expected, futex_scope scope,
                       std::chrono::nanoseconds timeout) noexcept;
  futex_wait_result finish(int res) const;

  template <class P>
  bool await_suspend(std::coroutine_handle<P> h) {
    arm_deadline();
    return start(h, detail::stop_token_of(h));
  }
  futex_wait_result await_resume() { return fallback_ ? finish_fallback() : finish(end()); }

 private:
  friend struct detail::futex_fallback;
  struct fallback_canceller {
    futex_wait_operation* op;
    void operator()() const noexcept;
  };

  /// Through the ring when the kernel has futex ops, otherwise through the fallback.
  bool start(std::coroutine_handle<> waiter, const std::stop_token& token);
  futex_wait_result finish_fallback();
  static void prep(detail::op_base& op, ::io_uring_sqe* sqe) noexcept;
  std::atomic<std::uint32_t>* word_;
  std::uint32_t expected_;
  futex_scope scope_;

  // The fallback's state: served by a helper thread, ended on the loop's thread.
  bool fallback_ = false;
  bool fallback_cancel_queued_ = false;  ///< a stop request from another thread is queued
  int fallback_result_ = 0;              ///< 0 (woken) or -errno, as a CQE would carry
  void* fallback_helper_ = nullptr;      ///< the helper thread serving it, while one does
  detail::ready_node resume_node_;
  std::optional<std::stop_callback<fallback_canceller>> fallback_stop_;
};

template <class Rep, class Period>
[[nodiscard]] futex_wait_operation futex_wait(std::atomic<std::uint32_t>& word, std::uint32_t expected,
                                              std::chrono::duration<Rep, Period> timeout,
                                              futex_scope scope = futex_scope::shared) noexcept {
  return {word, expected, scope, std::chrono::duration_cast<std::chrono::nanoseconds>(timeout)};
}

/// Wakes up to `count` waiters on `word` (FUTEX_WAKE, a syscall that never blocks) in any
/// process, whether they wait through the ring or through the fallback. Returns the number
/// woken.
IPCORO_API int futex_wake(std::atomic<std::uint32_t>& word, int count,
                          futex_scope scope = futex_scope::shared) noexcept;

/// True when futex waits on this thread go through the ring; false when the fallback is
/// in use: the kernel lacks IORING_OP_FUTEX_WAIT (Linux 6.7), or the environment sets
/// IPCORO_FUTEX_FALLBACK to anything but "" or "0". The variable is read at the first wait
/// of each process, so a forked child may set it before its own first wait. The fallback
/// parks each wait in a helper thread (futex_waitv, Linux 5.16, on the word and a control
/// word) that hands the outcome to the waiting loop; helpers are reused, so a process has
/// as many as it ever had waits parked at once.
IPCORO_API bool futex_waits_use_ring() noexcept;

}  // namespace ipcoro
