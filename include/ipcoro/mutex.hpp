// SPDX-License-Identifier: MIT
// mutex: an async mutual-exclusion lock for coroutines on one io_context.
#pragma once

#include "ipcoro/semaphore.hpp"

#include <utility>

namespace ipcoro {

/// `auto guard = co_await m.lock();` suspends until the lock is free (FIFO, no barging);
/// the guard unlocks when destroyed. Single-threaded; must outlive its waiters.
class mutex {
 public:
  mutex() noexcept = default;

  /// Owns the lock until destroyed or `unlock()`ed. Move-only.
  class [[nodiscard]] guard {
   public:
    explicit guard(mutex& m) noexcept : mutex_(&m) {}
    guard(guard&& other) noexcept : mutex_(std::exchange(other.mutex_, nullptr)) {}
    guard& operator=(guard&&) = delete;
    ~guard() { unlock(); }
    void unlock() noexcept {
      if (mutex_ != nullptr) std::exchange(mutex_, nullptr)->unlock();
    }
    bool owns_lock() const noexcept { return mutex_ != nullptr; }

   private:
    mutex* mutex_;
  };

  /// `.with_timeout(d)` / `.with_deadline(t)` bound the wait (`timed_out`, without the lock).
  class [[nodiscard]] lock_operation : public detail::timer_bounded<lock_operation, guard> {
   public:
    explicit lock_operation(mutex& m) noexcept : mutex_(m), acquire_(m.permits_) {}
    bool await_ready() noexcept { return acquire_.await_ready(); }
    template <class P>
    bool suspend_untimed(std::coroutine_handle<P> h) {
      return acquire_.suspend_untimed(h);
    }
    /// Throws operation_cancelled (without the lock) when stopped first.
    guard resume_untimed() {
      acquire_.resume_untimed();
      return guard{mutex_};
    }

   private:
    mutex& mutex_;
    semaphore::acquire_operation acquire_;
  };

  lock_operation lock() noexcept { return lock_operation{*this}; }
  bool try_lock() noexcept { return permits_.try_acquire(); }
  /// Hands the lock to the oldest waiter, or frees it.
  void unlock() noexcept { permits_.release(); }
  bool locked() const noexcept { return permits_.available() == 0; }

 private:
  semaphore permits_{1};
};

}  // namespace ipcoro
