// SPDX-License-Identifier: MIT
// deadline: a task or a wait run against a timer, for what cannot carry a deadline itself.
#pragma once

#include "ipcoro/detail/group.hpp"
#include "ipcoro/detail/op_deadline.hpp"
#include "ipcoro/error.hpp"
#include "ipcoro/task.hpp"
#include "ipcoro/timer.hpp"

#include <exception>
#include <optional>
#include <type_traits>
#include <utility>

namespace ipcoro::detail {

/// Runs `work` and a timer side by side. The timer, when it expires first, stops the work
/// through its stop token; the work is always awaited to its end and its outcome wins:
/// a value that arrives after the timer fired is returned, not dropped (a lock granted,
/// a message taken). Only when the work ends in operation_cancelled because the timer
/// stopped it does the caller get `timed_out`; a stop request from the caller still gives
/// operation_cancelled.
template <class T>
struct deadline_runner {
  static task<T> run(task<T> work, op_deadline limit) { return race(pooled_frame{}, std::move(work), limit); }

 private:
  struct outcome {
    std::optional<value_or_monostate<T>> value;
    std::exception_ptr failure;
    bool done = false;
    bool expired = false;
  };

  static root_task run_work(task<T> work, outcome& out, group_state& group) {
    try {
      if constexpr (std::is_void_v<T>) {
        co_await std::move(work);
        out.value.emplace();
      } else {
        decltype(auto) v = co_await std::move(work);  // T& stays a reference
        out.value.emplace(static_cast<T&&>(v));
      }
    } catch (...) {
      out.failure = std::current_exception();
    }
    out.done = true;
    group.request_stop();  // ends the timer
  }

  static root_task run_timer(std::chrono::steady_clock::time_point when, outcome& out, group_state& group) {
    try {
      co_await sleep_until(when);
      out.expired = true;
      group.request_stop();  // stops the work
    } catch (...) {
      // Stopped: the work finished first, or the caller stopped both.
    }
  }

  static bool cancelled(const std::exception_ptr& e) {
    try {
      std::rethrow_exception(e);
    } catch (const operation_cancelled&) {
      return true;
    } catch (...) {
      return false;
    }
  }

  static task<T> race(pooled_frame, task<T> work, op_deadline limit) {
    const auto when = limit.resolve();
    const std::stop_token caller = co_await get_stop_token();
    group_state group;
    group.follow(caller);
    outcome out;
    group.launch(run_work(std::move(work), out, group));
    if (!out.done) group.launch(run_timer(when, out, group));
    co_await group.join();
    if (out.value) {
      if constexpr (std::is_void_v<T>) {
        co_return;
      } else {
        co_return static_cast<T&&>(*out.value);
      }
    }
    if (out.expired && !caller.stop_requested() && cancelled(out.failure)) throw timed_out{};
    std::rethrow_exception(out.failure);
  }
};

/// The deadline half of an awaitable whose wait cannot carry a deadline itself (a wait in
/// an in-process wait list). `Derived` provides `await_ready()` (the fast path),
/// `suspend_untimed(handle)` and `resume_untimed()`; with no deadline set, awaiting
/// it is exactly that. With one, the wait runs on a pooled frame against a timer
/// (deadline_runner), with the meaning documented on deadline_methods.
template <class Derived, class R>
class timer_bounded : public deadline_methods<Derived> {
 public:
  template <class P>
  bool await_suspend(std::coroutine_handle<P> h) {
    if (!this->limit_.bounded()) return self().suspend_untimed(h);
    race_.emplace(deadline_runner<R>::run(wait_untimed(pooled_frame{}, self()), this->limit_));
    inner_.emplace(std::move(*race_).operator co_await());
    return inner_->await_suspend(h);
  }
  R await_resume() {
    if (inner_) return inner_->await_resume();
    return self().resume_untimed();
  }

 private:
  struct untimed {
    Derived& op;
    bool await_ready() { return op.await_ready(); }
    template <class P>
    bool await_suspend(std::coroutine_handle<P> h) {
      return op.suspend_untimed(h);
    }
    R await_resume() { return op.resume_untimed(); }
  };
  static task<R> wait_untimed(pooled_frame, Derived& op) {
    untimed wait{op};  // named: GCC 12 mishandles temporaries in co_await
    co_return co_await wait;
  }

  Derived& self() noexcept { return static_cast<Derived&>(*this); }

  std::optional<task<R>> race_;
  std::optional<typename task<R>::awaiter> inner_;
};

}  // namespace ipcoro::detail
