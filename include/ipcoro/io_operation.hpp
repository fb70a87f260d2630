// SPDX-License-Identifier: MIT
// io_operation<Derived>: the awaitable shape shared by every io_uring operation.
#pragma once

#include "ipcoro/detail/op_base.hpp"
#include "ipcoro/task.hpp"

#include <chrono>

namespace ipcoro {

namespace detail {
/// Awaits an operation that lives elsewhere (a temporary of the same full-expression).
/// Operations are not movable, and GCC 12 copies an awaiter given as a reference to a
/// temporary; this copyable handle sidesteps that.
template <class Op>
struct [[nodiscard]] awaiter_ref {
  Op& op;
  bool await_ready() const noexcept { return false; }
  template <class P>
  bool await_suspend(std::coroutine_handle<P> h) {
    return op.await_suspend(h);
  }
  decltype(auto) await_resume() { return op.await_resume(); }
};
}  // namespace detail

/// Base of every operation type. `Derived` provides `finish(int res)`, which turns the
/// CQE result into the value of `co_await` or throws. The operation's state lives in the
/// awaiter, so awaiting it allocates nothing. While suspended it can end four ways: the
/// kernel completes it, its timeout expires (`timed_out`), the awaiting task's stop token
/// is triggered (`operation_cancelled`), or the io_context shuts down
/// (`operation_cancelled`). In every case the awaiter stays suspended until the kernel has
/// posted the final completion, so buffers passed to the operation stay in use until then.
template <class Derived>
class [[nodiscard]] io_operation : public detail::op_awaiter_base {
 public:
  bool await_ready() const noexcept { return false; }
  template <class P>
  bool await_suspend(std::coroutine_handle<P> h) {
    return begin(h, detail::stop_token_of(h));
  }
  decltype(auto) await_resume() { return static_cast<Derived*>(this)->finish(end()); }

  /// Fails with `timed_out` unless the operation completes within `d` from now.
  /// `co_await read(fd, buf).with_timeout(50ms)`.
  template <class Rep, class Period>
  detail::awaiter_ref<Derived> with_timeout(std::chrono::duration<Rep, Period> d) noexcept {
    set_timeout(std::chrono::duration_cast<std::chrono::nanoseconds>(d).count());
    return {static_cast<Derived&>(*this)};
  }
  /// Fails with `timed_out` unless the operation completes by `when`.
  template <class Duration>
  detail::awaiter_ref<Derived> with_deadline(
      std::chrono::time_point<std::chrono::steady_clock, Duration> when) noexcept {
    set_deadline(std::chrono::duration_cast<std::chrono::nanoseconds>(when.time_since_epoch()).count());
    return {static_cast<Derived&>(*this)};
  }

 protected:
  using detail::op_awaiter_base::op_awaiter_base;
};

}  // namespace ipcoro
