// SPDX-License-Identifier: MIT
// task<T>: a lazy coroutine that starts when awaited and hands its result to its awaiter.
#pragma once

#include "ipcoro/detail/frame_pool.hpp"
#include "ipcoro/detail/op_deadline.hpp"
#include "ipcoro/export.hpp"
#include "ipcoro/version.hpp"

#include <chrono>
#include <concepts>
#include <coroutine>
#include <cstddef>
#include <exception>
#include <memory>
#include <new>
#include <stdexcept>
#include <stop_token>
#include <type_traits>
#include <utility>

namespace ipcoro {

template <class T = void>
class task;

/// The query for a stop token in the environment of another library's coroutine (the P2300 /
/// std::execution convention, with ipcoro's tag since no std::execution is available): a
/// coroutine whose promise `p` has `p.get_env()` returning an environment `e` on which
/// `e.query(ipcoro::get_stop_token_t{})` gives something convertible to std::stop_token has
/// that token honoured by every ipcoro awaitable it awaits, as an ipcoro task's own token is:
/// a stop request ends the wait with operation_cancelled, and an awaited task inherits the
/// token. The environment is asked each time an awaitable suspends; the query must not throw.
/// `struct env { std::stop_token t; std::stop_token query(ipcoro::get_stop_token_t) const noexcept
/// { return t; } };`
struct get_stop_token_t {
  explicit get_stop_token_t() = default;
};

namespace detail {

/// A promise that carries a stop token: operations awaited in the coroutine read it. The
/// token is returned by reference to the promise's own storage, so that child tasks can
/// refer to it for as long as the coroutine is suspended awaiting them.
template <class P>
concept stop_token_carrier = requires(P& p) {
  { p.stop_token() } -> std::same_as<const std::stop_token&>;
};

/// Another library's promise whose environment answers get_stop_token_t (see there).
template <class P>
concept env_stop_token_carrier = !stop_token_carrier<P> && requires(P & p) {
  { p.get_env().query(get_stop_token_t{}) } -> std::convertible_to<std::stop_token>;
};

/// The stop token of the coroutine behind `h`: its promise's own (ipcoro's promises), the one
/// its environment gives (env_stop_token_carrier), or an empty one for other coroutines.
template <class P>
std::stop_token stop_token_of(std::coroutine_handle<P> h) noexcept {
  if constexpr (stop_token_carrier<P>) {
    return h.promise().stop_token();
  } else if constexpr (env_stop_token_carrier<P>) {
    return h.promise().get_env().query(get_stop_token_t{});
  } else {
    return {};
  }
}

/// `co_await detail::stop_requested()`: whether the current task has been asked to stop.
/// An operation that consumes (takes a message off a channel) asks this at the moment it
/// would commit, and leaves the message where it is when the answer is yes: that is what
/// makes a receive that loses a when_any race, a timeout or a stop request lose nothing.
/// Whether the coroutine behind `h` has been asked to stop: read in place for ipcoro's
/// promises (no token copy, so no atomic increment and decrement).
template <class P>
bool stop_requested_of(std::coroutine_handle<P> h) noexcept {
  if constexpr (stop_token_carrier<P>) {
    return h.promise().stop_token().stop_requested();
  } else if constexpr (env_stop_token_carrier<P>) {
    return stop_token_of(h).stop_requested();
  } else {
    return false;
  }
}

struct [[nodiscard]] stop_requested_awaiter {
  bool requested = false;
  bool await_ready() const noexcept { return false; }
  template <class P>
  bool await_suspend(std::coroutine_handle<P> h) noexcept {
    requested = stop_requested_of(h);
    return false;
  }
  bool await_resume() const noexcept { return requested; }
};
[[nodiscard]] inline stop_requested_awaiter stop_requested() noexcept { return {}; }

/// Runs a task against a deadline; defined in ipcoro/deadline.hpp, which every header
/// that returns tasks includes (an "incomplete type" error here means: include it).
template <class T>
struct deadline_runner;

class IPCORO_API task_promise_base {
 public:
  struct final_awaiter {
    bool await_ready() const noexcept { return false; }
    template <class P>
    std::coroutine_handle<> await_suspend(std::coroutine_handle<P> h) const noexcept {
      task_promise_base& p = h.promise();
      if (p.state_ == state::awaiter_suspended) {
        // Finished after its awaiter suspended: transfer to it (a tail call where the
        // compiler makes one).
        return p.continuation_;
      }
      // Finished inside the awaiter's await_suspend: return there, which continues the
      // awaiter without suspending it. No stack is used per await, so a loop awaiting a
      // million synchronously-completing tasks runs in constant stack even in builds
      // (-O0, sanitizers) where GCC does not turn symmetric transfer into a tail call.
      p.state_ = state::completed_inline;
      return std::noop_coroutine();
    }
    void await_resume() const noexcept {}
  };

  /// Frames come from the heap; pooled_task_promise takes them from the thread's pool.
  static void* operator new(std::size_t size) { return allocate_frame(size, false); }
  static void operator delete(void* frame) noexcept { deallocate_frame(frame); }

  std::suspend_always initial_suspend() const noexcept { return {}; }
  final_awaiter final_suspend() const noexcept { return {}; }

  const std::stop_token& stop_token() const noexcept { return *token_; }
  void set_stop_token(std::stop_token token) noexcept {
    own_token_ = std::move(token);
    token_ = &own_token_;
    token_fixed_ = true;
  }
  /// Follows the awaiter's token. It is referred to, not copied (a copy costs two atomic
  /// operations per await): the token lives in an awaiting frame, which outlives this
  /// task's run.
  void inherit_stop_token(const std::stop_token& token) noexcept {
    if (!token_fixed_) token_ = &token;
  }
  /// Follows a token that nothing else keeps (a foreign awaiter's): a copy is kept here.
  void adopt_stop_token(std::stop_token token) noexcept {
    if (!token_fixed_) {
      own_token_ = std::move(token);
      token_ = &own_token_;
    }
  }
  /// Starts the task on behalf of `awaiter`. Returns true when the awaiter must suspend
  /// (the task is still running), false when the task has already finished.
  [[gnu::always_inline]] bool start_for(std::coroutine_handle<> awaiter, std::coroutine_handle<> self) {
    continuation_ = awaiter;
    state_ = state::starting;
    self.resume();
    if (state_ == state::completed_inline) return false;
    state_ = state::awaiter_suspended;
    return true;
  }

 private:
  enum class state : unsigned char { starting, awaiter_suspended, completed_inline };

  static constinit inline const std::stop_token no_token_{};

  std::coroutine_handle<> continuation_ = std::noop_coroutine();
  const std::stop_token* token_ = &no_token_;
  std::stop_token own_token_;
  state state_ = state::starting;
  bool token_fixed_ = false;
};

template <class T>
class task_promise : public task_promise_base {
  using stored = std::conditional_t<std::is_reference_v<T>, std::add_pointer_t<T>, T>;

 public:
  // Not `= default`: that is deleted, as value_ is a union member with a non-trivial type.
  task_promise() noexcept {}  // NOLINT(modernize-use-equals-default)
  task_promise(const task_promise&) = delete;
  task_promise& operator=(const task_promise&) = delete;
  ~task_promise() {
    if (has_value_) value_.~stored();
  }

  task<T> get_return_object() noexcept;
  void unhandled_exception() noexcept { exception_ = std::current_exception(); }

  template <class U>
  requires std::is_convertible_v<U&&, T>
  void return_value(U&& value) noexcept(std::is_nothrow_constructible_v<T, U&&>) {
    if constexpr (std::is_reference_v<T>) {
      T ref = std::forward<U>(value);
      ::new (static_cast<void*>(std::addressof(value_))) stored(std::addressof(ref));
    } else {
      ::new (static_cast<void*>(std::addressof(value_))) stored(std::forward<U>(value));
    }
    has_value_ = true;
  }

  [[gnu::always_inline]] T take_result() {
    if (exception_) std::rethrow_exception(exception_);
    if constexpr (std::is_reference_v<T>) {
      return static_cast<T>(*value_);
    } else {
      return std::move(value_);
    }
  }

 private:
  // A union and a flag rather than std::variant: the same states, a few instructions
  // less on every await (the task switch is measured by bench/ipcoro-bench).
  union {
    stored value_;
  };
  std::exception_ptr exception_;
  bool has_value_ = false;
};

template <>
class task_promise<void> : public task_promise_base {
 public:
  task<void> get_return_object() noexcept;
  void unhandled_exception() noexcept { exception_ = std::current_exception(); }
  void return_void() const noexcept {}
  [[gnu::always_inline]] void take_result() {
    if (exception_) std::rethrow_exception(exception_);
  }

 private:
  std::exception_ptr exception_;
};

}  // namespace detail

/// A lazy coroutine producing a `T`. It starts when first awaited, runs on the awaiting
/// coroutine's thread, and rethrows its exception in the awaiter. The awaiting coroutine's
/// stop token is passed down (for another library's coroutine, the one its environment gives:
/// see get_stop_token_t), so cancelling a parent cancels the operation the child is waiting
/// on. Move-only; await it once.
template <class T>
class [[nodiscard]] task {
 public:
  using promise_type = detail::task_promise<T>;
  using value_type = T;
  using handle_type = std::coroutine_handle<promise_type>;

  task() noexcept = default;
  explicit task(handle_type h) noexcept : handle_(h) {}
  task(task&& other) noexcept : handle_(other.take()) {}
  task& operator=(task&& other) noexcept {
    if (this != &other) {
      destroy();
      handle_ = other.take();
    }
    return *this;
  }
  task(const task&) = delete;
  task& operator=(const task&) = delete;
  [[gnu::always_inline]] ~task() { destroy(); }

  /// False for a default-constructed or moved-from task.
  bool valid() const noexcept { return handle_ || make_ != nullptr; }
  bool done() const noexcept { return handle_ && handle_.done(); }

  /// Runs the task under `token` instead of the stop token of whoever awaits it.
  task&& with_stop_token(std::stop_token token) && {
    make_now();
    if (handle_) handle_.promise().set_stop_token(std::move(token));
    return std::move(*this);
  }

  /// Fails with `timed_out` unless the task finishes within `d` of the start of its
  /// `co_await`: once the time is up, the task is stopped through its stop token and
  /// awaited. What it was waiting for is left undone (a channel receive leaves its message
  /// to the next one); a result it reached anyway is returned, never dropped. A stop
  /// request from the awaiter still gives operation_cancelled. The same meaning as every
  /// awaitable's with_timeout (detail::deadline_methods).
  /// `co_await rx.receive().with_timeout(50ms)`.
  template <class Rep, class Period>
  [[nodiscard]] task with_timeout(std::chrono::duration<Rep, Period> d) && {
    detail::op_deadline limit;
    limit.limit_after(d);
    return detail::deadline_runner<T>::run(std::move(*this), limit);
  }
  /// As with_timeout, with an absolute CLOCK_MONOTONIC deadline.
  template <class Duration>
  [[nodiscard]] task with_deadline(std::chrono::time_point<std::chrono::steady_clock, Duration> when) && {
    detail::op_deadline limit;
    limit.limit_at(when);
    return detail::deadline_runner<T>::run(std::move(*this), limit);
  }

  struct awaiter {
    handle_type handle;

    bool await_ready() const noexcept { return false; }
    // Always inline, as the rest of an await's common path (take_result, ~task): GCC 12
    // otherwise leaves it a call in a large translation unit (ipcoro-bench's was one).
    template <class P>
    [[gnu::always_inline]] bool await_suspend(std::coroutine_handle<P> parent) {
      if (!handle) throw_empty();
      if constexpr (detail::stop_token_carrier<P>) {
        handle.promise().inherit_stop_token(parent.promise().stop_token());
      } else if constexpr (detail::env_stop_token_carrier<P>) {
        // The environment gives a token by value, which no frame keeps: the task keeps a copy.
        handle.promise().adopt_stop_token(detail::stop_token_of(parent));
      }
      return handle.promise().start_for(parent, handle);
    }
    [[gnu::always_inline]] T await_resume() { return handle.promise().take_result(); }
  };

  awaiter operator co_await() && noexcept { return awaiter{handle_}; }
  awaiter operator co_await() & noexcept { return awaiter{handle_}; }

  /// For the library's own runners: the coroutine handle, still owned by this task.
  handle_type handle() const noexcept { return handle_; }

 protected:
  /// Makes the coroutine of a deferred task (see below) from the object it is given.
  using make_fn = task (*)(task&);

  /// A deferred task: an awaitable that derives from task and makes a coroutine only when
  /// it cannot complete at once (a channel operation). Awaiting it is up to the derived
  /// type; moving it into a task (passing it to sync_wait, when_any, a vector<task>...)
  /// calls `make` on it, which must not throw other than std::bad_alloc (and that ends
  /// the program: a task's move is noexcept).
  explicit task(make_fn make) noexcept : make_(make) {}
  /// Whether this is a deferred task that has made no coroutine yet.
  bool deferred() const noexcept { return make_ != nullptr; }
  /// Makes the coroutine of a deferred task now, keeping it here.
  void make_now() {
    if (make_ != nullptr) handle_ = take();
  }
  /// A deferred task that completed without a coroutine: it cannot be made any more.
  void settle() noexcept { make_ = nullptr; }

 private:
  handle_type take() noexcept {
    if (make_ == nullptr) return std::exchange(handle_, {});
    task made = std::exchange(make_, nullptr)(*this);
    return std::exchange(made.handle_, {});
  }
  [[gnu::always_inline]] void destroy() noexcept {
    if (handle_) std::exchange(handle_, {}).destroy();
  }
  [[noreturn, gnu::cold, gnu::noinline]] static void throw_empty() {
    throw std::logic_error("ipcoro::task: awaiting an empty or moved-from task");
  }

  handle_type handle_;
  make_fn make_ = nullptr;
};

namespace detail {
template <class T>
task<T> task_promise<T>::get_return_object() noexcept {
  return task<T>{std::coroutine_handle<task_promise<T>>::from_promise(*this)};
}
inline task<void> task_promise<void>::get_return_object() noexcept {
  return task<void>{std::coroutine_handle<task_promise<void>>::from_promise(*this)};
}

/// The promise of a task coroutine that opted into the frame pool (see pooled_frame): the
/// same promise, with its frame taken from and returned to the thread's pool. It adds no
/// members, so the task's handle to the base promise names the same frame.
template <class T>
class pooled_task_promise final : public task_promise<T> {
 public:
  static void* operator new(std::size_t size) { return allocate_frame(size, true); }
  static void operator delete(void* frame) noexcept { deallocate_frame(frame); }
  task<T> get_return_object() noexcept {
    return task<T>{std::coroutine_handle<task_promise<T>>::from_promise(*this)};
  }
};
}  // namespace detail

/// `co_await get_stop_token()` gives the stop token of the current task.
struct [[nodiscard]] get_stop_token_awaiter {
  std::stop_token token;
  bool await_ready() const noexcept { return false; }
  template <class P>
  bool await_suspend(std::coroutine_handle<P> h) noexcept {
    token = detail::stop_token_of(h);
    return false;
  }
  std::stop_token await_resume() noexcept { return std::move(token); }
};
[[nodiscard]] inline get_stop_token_awaiter get_stop_token() noexcept { return {}; }

}  // namespace ipcoro

/// \cond IPCORO_DETAIL
/// A task coroutine whose first parameter (after the object, for a member coroutine) is a
/// detail::pooled_frame gets pooled_task_promise. (Left out of the API reference: machinery.)
template <class T, class... Args>
struct std::coroutine_traits<ipcoro::task<T>, ipcoro::detail::pooled_frame, Args...> {
  using promise_type = ipcoro::detail::pooled_task_promise<T>;
};
template <class T, class Owner, class... Args>
struct std::coroutine_traits<ipcoro::task<T>, Owner, ipcoro::detail::pooled_frame, Args...> {
  using promise_type = ipcoro::detail::pooled_task_promise<T>;
};
/// \endcond
