// SPDX-License-Identifier: MIT
// semaphore: a counting semaphore for coroutines on one io_context.
#pragma once

#include "ipcoro/deadline.hpp"
#include "ipcoro/detail/wait_list.hpp"

#include <cstddef>

namespace ipcoro {

/// Counts permits; `co_await sem.acquire()` takes one, waiting in FIFO order when none is
/// left. Single-threaded; must outlive its waiters. A stop request ends a suspended
/// acquire; an acquire that can take a permit at once takes it regardless.
class semaphore {
 public:
  explicit semaphore(std::size_t initial) noexcept : count_(initial) {}
  semaphore(const semaphore&) = delete;
  semaphore& operator=(const semaphore&) = delete;

  std::size_t available() const noexcept { return count_; }
  bool try_acquire() noexcept {
    if (count_ == 0) return false;
    --count_;
    return true;
  }
  /// Returns `n` permits; each goes straight to the oldest waiter, if any.
  void release(std::size_t n = 1) noexcept {
    for (; n > 0 && !waiters_.empty(); --n) waiters_.wake_one();
    count_ += n;
  }

  /// `.with_timeout(d)` / `.with_deadline(t)` bound the wait (`timed_out`, holding no permit).
  class [[nodiscard]] acquire_operation : detail::waiter,
                                          public detail::timer_bounded<acquire_operation, void> {
   public:
    explicit acquire_operation(semaphore& s) noexcept : sem_(s) {}
    bool await_ready() noexcept { return sem_.try_acquire(); }
    template <class P>
    bool suspend_untimed(std::coroutine_handle<P> h) {
      return park(sem_.waiters_, h, detail::stop_token_of(h));
    }
    /// Throws operation_cancelled (holding no permit) when stopped before a permit came.
    void resume_untimed() { unpark(); }

   private:
    semaphore& sem_;
  };
  acquire_operation acquire() noexcept { return acquire_operation{*this}; }

 private:
  std::size_t count_;
  detail::wait_list waiters_;
};

}  // namespace ipcoro
