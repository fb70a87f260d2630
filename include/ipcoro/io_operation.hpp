// SPDX-License-Identifier: MIT
// io_operation<Derived>: the awaitable shape shared by every io_uring operation.
#pragma once

#include "ipcoro/detail/op_base.hpp"
#include "ipcoro/detail/op_deadline.hpp"
#include "ipcoro/task.hpp"

#include <chrono>

namespace ipcoro {

/// Base of every operation type. `Derived` provides `finish(int res)`, which turns the
/// CQE result into the value of `co_await` or throws. The operation's state lives in the
/// awaiter, so awaiting it allocates nothing. While suspended it can end four ways: the
/// kernel completes it, its timeout expires (`timed_out`), the awaiting task's stop token
/// is triggered (`operation_cancelled`), or the io_context shuts down
/// (`operation_cancelled`). In every case the awaiter stays suspended until the kernel has
/// posted the final completion, so buffers passed to the operation stay in use until then.
template <class Derived>
class [[nodiscard]] io_operation : public detail::op_awaiter_base, public detail::deadline_methods<Derived> {
 public:
  bool await_ready() const noexcept { return false; }
  template <class P>
  bool await_suspend(std::coroutine_handle<P> h) {
    arm_deadline();
    return begin(h, detail::stop_token_of(h));
  }
  decltype(auto) await_resume() { return static_cast<Derived*>(this)->finish(end()); }

 protected:
  using detail::op_awaiter_base::op_awaiter_base;
  /// Turns with_timeout / with_deadline into the request's absolute deadline (a linked
  /// timeout), keeping an earlier one the operation set itself (whose expiry may be an
  /// ordinary result, as a futex wait's own timeout is; with_timeout's is timed_out).
  void arm_deadline() noexcept {
    if (!this->limit_.bounded()) return;
    const std::int64_t when = this->limit_.resolve_ns();
    if (!has_deadline() || when < deadline_.tv_sec * 1'000'000'000 + deadline_.tv_nsec) {
      set_deadline(when);
      timeout_is_result_ = false;
    }
  }
};

}  // namespace ipcoro
