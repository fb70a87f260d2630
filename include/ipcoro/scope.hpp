// SPDX-License-Identifier: MIT
// scope / with_scope: structured concurrency; every task spawned in a scope is joined.
#pragma once

#include "ipcoro/detail/group.hpp"
#include "ipcoro/task.hpp"

#include <concepts>
#include <functional>
#include <utility>

namespace ipcoro {

template <class F>
task<void> with_scope(F body);

/// A set of concurrently running tasks that `with_scope` joins before it returns. Only
/// `with_scope` creates one, so no child can outlive its scope.
class scope {
 public:
  scope(const scope&) = delete;
  scope& operator=(const scope&) = delete;

  /// Starts `t` now (it runs until its first suspension before spawn returns), under the
  /// scope's stop token. Its value is discarded; its failure cancels the scope.
  template <class T>
  void spawn(task<T> t) {
    group_.launch(run_child(std::move(t), group_));
  }

  /// The token every child runs under: stopped when the scope is cancelled, when a child
  /// or the body fails, or when the enclosing task is cancelled.
  std::stop_token stop_token() const noexcept { return group_.token(); }
  /// Cancels every child and the body.
  void request_stop() noexcept { group_.request_stop(); }

 private:
  template <class F>
  friend task<void> with_scope(F body);
  scope() = default;

  template <class T>
  static detail::root_task run_child(task<T> t, detail::group_state& group) {
    try {
      co_await std::move(t);
    } catch (...) {
      group.record_failure(std::current_exception());
    }
  }

  detail::group_state group_;
};

/// Runs `body(scope&)` (a callable returning task<void>) and then waits for every task it
/// spawned, even when the body throws. The first failure (of the body or of any child)
/// cancels the rest and is rethrown once all have finished.
template <class F>
[[nodiscard]] task<void> with_scope(F body) {
  static_assert(std::is_invocable_r_v<task<void>, F&, scope&>,
                "with_scope: the body must be callable as task<void>(ipcoro::scope&)");
  scope s;
  s.group_.follow(co_await get_stop_token());
  try {
    co_await std::invoke(body, s).with_stop_token(s.stop_token());
  } catch (...) {
    s.group_.record_failure(std::current_exception());
    s.request_stop();
  }
  co_await s.group_.join();
  s.group_.rethrow_error();
  s.group_.rethrow_cancellation();
}

}  // namespace ipcoro
