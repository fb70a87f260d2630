// SPDX-License-Identifier: MIT
// event: a manual-reset event for coroutines on one io_context.
#pragma once

#include "ipcoro/deadline.hpp"
#include "ipcoro/detail/wait_list.hpp"

namespace ipcoro {

/// Coroutines `co_await ev.wait()` until another sets the event. Single-threaded: use it
/// from coroutines of one io_context. It must outlive its waiters. A stop request ends a
/// wait that is suspended; a wait that can complete at once completes regardless.
class event {
 public:
  explicit event(bool initially_set = false) noexcept : set_(initially_set) {}
  event(const event&) = delete;
  event& operator=(const event&) = delete;

  bool is_set() const noexcept { return set_; }
  /// Sets the event and schedules every waiter.
  void set() noexcept {
    set_ = true;
    waiters_.wake_all();
  }
  void reset() noexcept { set_ = false; }

  /// `.with_timeout(d)` / `.with_deadline(t)` bound the wait (`timed_out`).
  class [[nodiscard]] wait_operation : detail::waiter, public detail::timer_bounded<wait_operation, void> {
   public:
    explicit wait_operation(event& ev) noexcept : event_(ev) {}
    bool await_ready() const noexcept { return event_.set_; }
    template <class P>
    bool suspend_untimed(std::coroutine_handle<P> h) {
      return park(event_.waiters_, h, detail::stop_token_of(h));
    }
    /// Throws operation_cancelled when the awaiting task was stopped first.
    void resume_untimed() { unpark(); }

   private:
    event& event_;
  };
  /// Completes once the event is set (at once if it already is).
  wait_operation wait() noexcept { return wait_operation{*this}; }

 private:
  bool set_;
  detail::wait_list waiters_;
};

}  // namespace ipcoro
