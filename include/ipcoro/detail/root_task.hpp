// SPDX-License-Identifier: MIT
// root_task: a self-owning coroutine that runs a task to completion and then calls back.
#pragma once

#include "ipcoro/detail/frame_pool.hpp"

#include <coroutine>
#include <exception>
#include <stop_token>
#include <utility>

namespace ipcoro::detail {

/// The outermost frame of a chain of tasks started by the library (sync_wait, spawn,
/// when_all, when_any, scopes). Once started it owns itself: at its end it calls
/// `on_done(arg)`, frees its frame, and transfers to the coroutine that `on_done` returns.
/// Its body must catch every exception.
class root_task {
 public:
  using on_done_fn = std::coroutine_handle<> (*)(void* arg) noexcept;

  struct promise_type {
    std::stop_token token_;
    on_done_fn on_done_ = nullptr;
    void* arg_ = nullptr;

    // From the thread's frame pool: a detached task started once per loop turn (a stream
    // sender's flush through the ring) allocates nothing once the pool is warm.
    static void* operator new(std::size_t size) { return allocate_frame(size, true); }
    static void operator delete(void* frame) noexcept { deallocate_frame(frame); }

    root_task get_return_object() noexcept {
      return root_task{std::coroutine_handle<promise_type>::from_promise(*this)};
    }
    std::suspend_always initial_suspend() const noexcept { return {}; }
    struct final_awaiter {
      bool await_ready() const noexcept { return false; }
      std::coroutine_handle<> await_suspend(std::coroutine_handle<promise_type> h) const noexcept {
        on_done_fn fn = h.promise().on_done_;
        void* arg = h.promise().arg_;
        h.destroy();
        return fn != nullptr ? fn(arg) : std::noop_coroutine();
      }
      void await_resume() const noexcept {}
    };
    final_awaiter final_suspend() const noexcept { return {}; }
    void return_void() const noexcept {}
    [[noreturn]] void unhandled_exception() const noexcept { std::terminate(); }
    const std::stop_token& stop_token() const noexcept { return token_; }
  };

  explicit root_task(std::coroutine_handle<promise_type> h) noexcept : handle_(h) {}
  root_task(root_task&& other) noexcept : handle_(std::exchange(other.handle_, {})) {}
  root_task& operator=(root_task&&) = delete;
  ~root_task() {
    if (handle_) handle_.destroy();  // never started
  }

  /// Runs the body until its first suspension; from then on it frees itself.
  void start(std::stop_token token, on_done_fn on_done, void* arg) {
    auto h = std::exchange(handle_, {});
    h.promise().token_ = std::move(token);
    h.promise().on_done_ = on_done;
    h.promise().arg_ = arg;
    h.resume();
  }

 private:
  std::coroutine_handle<promise_type> handle_;
};

}  // namespace ipcoro::detail
