// SPDX-License-Identifier: MIT
// group_state: the join counter, stop source and failure record shared by when_all,
// when_any and scopes.
#pragma once

#include "ipcoro/detail/root_task.hpp"
#include "ipcoro/export.hpp"
#include "ipcoro/version.hpp"

#include <coroutine>
#include <cstddef>
#include <exception>
#include <functional>
#include <optional>
#include <stop_token>
#include <type_traits>
#include <variant>

namespace ipcoro::detail {

/// How a task's result is held by sync_wait, when_all and when_any: `void` becomes
/// std::monostate and `U&` becomes std::reference_wrapper<U> (optionals, tuples of
/// results and variants cannot hold references).
template <class T>
using value_or_monostate = std::conditional_t<
    std::is_void_v<T>, std::monostate,
    std::conditional_t<std::is_reference_v<T>, std::reference_wrapper<std::remove_reference_t<T>>, T>>;

/// Children run under the group's stop token, which also follows the owner's token. The
/// owner must outlive every child: it awaits `join()` before leaving.
class IPCORO_API group_state {
 public:
  group_state() = default;
  group_state(const group_state&) = delete;
  group_state& operator=(const group_state&) = delete;

  std::stop_token token() const noexcept { return source_.get_token(); }
  void request_stop() noexcept { source_.request_stop(); }
  /// Makes a stop request on `parent` reach the children too.
  void follow(const std::stop_token& parent);

  /// Starts `child`; it runs until its first suspension before this returns.
  void launch(root_task child) {
    ++pending_;
    child.start(token(), &group_state::child_done, this);
  }

  /// Records how a child (or a scope's body) failed. A real error stops the siblings;
  /// operation_cancelled is kept apart, since stopping the siblings produces it.
  void record_failure(const std::exception_ptr& e) noexcept;
  /// The first child to finish claims the win (when_any); later ones return false.
  bool claim(std::size_t index) noexcept {
    if (winner_ != no_winner) return false;
    winner_ = index;
    source_.request_stop();
    return true;
  }
  std::size_t winner() const noexcept { return winner_; }

  void rethrow_error() const {
    if (error_) std::rethrow_exception(error_);
  }
  void rethrow_cancellation() const {
    if (cancelled_) std::rethrow_exception(cancelled_);
  }

  struct join_awaiter {
    group_state& group;
    bool await_ready() const noexcept { return false; }
    bool await_suspend(std::coroutine_handle<> owner) noexcept {
      group.waiter_ = owner;
      return --group.pending_ != 0;
    }
    void await_resume() const noexcept {}
  };
  /// Waits until every launched child has finished. Never throws.
  join_awaiter join() noexcept { return {*this}; }

  static constexpr std::size_t no_winner = static_cast<std::size_t>(-1);

 private:
  static std::coroutine_handle<> child_done(void* self) noexcept {
    auto& g = *static_cast<group_state*>(self);
    return --g.pending_ == 0 ? g.waiter_ : std::noop_coroutine();
  }

  struct forward_stop {
    std::stop_source* source;
    void operator()() const noexcept { source->request_stop(); }
  };

  std::size_t pending_ = 1;  // the owner's own count, given up in join()
  std::size_t winner_ = no_winner;
  std::coroutine_handle<> waiter_;
  std::stop_source source_;
  std::exception_ptr error_;
  std::exception_ptr cancelled_;
  std::optional<std::stop_callback<forward_stop>> parent_link_;
};

}  // namespace ipcoro::detail
