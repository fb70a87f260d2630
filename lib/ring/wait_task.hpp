// SPDX-License-Identifier: MIT
// The coroutine a ring's sleep runs in, with frames recycled per thread.
#pragma once

#include <algorithm>
#include <array>
#include <coroutine>
#include <cstddef>
#include <exception>
#include <new>
#include <stop_token>
#include <utility>

namespace ipcoro::detail {

/// Keeps a few freed coroutine frames for reuse, so that sleeping allocates nothing once
/// warm. Frames are allocated and freed on the loop's thread.
class ring_frame_pool {
 public:
  ring_frame_pool() = default;
  ring_frame_pool(const ring_frame_pool&) = delete;
  ring_frame_pool& operator=(const ring_frame_pool&) = delete;
  ~ring_frame_pool() {
    for (void* block : free_) ::operator delete(block);
  }

  void* allocate(std::size_t n) {
    const std::size_t need = n + prefix;
    for (void*& block : free_) {
      if (block != nullptr && *static_cast<std::size_t*>(block) >= need) {
        return static_cast<std::byte*>(std::exchange(block, nullptr)) + prefix;
      }
    }
    const std::size_t size = std::max<std::size_t>((need + 63) & ~std::size_t{63}, 512);
    void* block = ::operator new(size);
    *static_cast<std::size_t*>(block) = size;
    return static_cast<std::byte*>(block) + prefix;
  }

  void deallocate(void* frame) noexcept {
    void* block = static_cast<std::byte*>(frame) - prefix;
    for (void*& slot : free_) {
      if (slot == nullptr) {
        slot = block;
        return;
      }
    }
    ::operator delete(block);
  }

 private:
  static constexpr std::size_t prefix = alignof(std::max_align_t);
  std::array<void*, 4> free_{};
};

inline thread_local ring_frame_pool wait_frames;

// Where an operation's wait stands (the operations' state_ member).
inline constexpr unsigned char wait_idle = 0;
inline constexpr unsigned char wait_starting = 1;
inline constexpr unsigned char wait_suspended = 2;
inline constexpr unsigned char wait_done_inline = 3;

struct wait_promise;

/// A sleep in progress: owns its frame until started, then the frame frees itself at the
/// end and resumes the operation's awaiter (or returns to it, when it finished inline).
class wait_task {
 public:
  using promise_type = wait_promise;
  explicit wait_task(std::coroutine_handle<wait_promise> h) noexcept : h_(h) {}
  wait_task(wait_task&& other) noexcept : h_(std::exchange(other.h_, {})) {}
  wait_task& operator=(wait_task&&) = delete;
  ~wait_task() {
    if (h_) h_.destroy();
  }
  /// Runs the sleep until its first suspension. Returns true when the awaiter must suspend.
  bool start(std::coroutine_handle<> awaiter, std::stop_token token, unsigned char& state,
             std::exception_ptr& error);

 private:
  std::coroutine_handle<wait_promise> h_;
};

struct wait_promise {
  std::stop_token token_;
  std::coroutine_handle<> continuation_;
  unsigned char* state_ = nullptr;
  std::exception_ptr* error_ = nullptr;

  static void* operator new(std::size_t n) { return wait_frames.allocate(n); }
  static void operator delete(void* p) noexcept { wait_frames.deallocate(p); }

  wait_task get_return_object() noexcept {
    return wait_task{std::coroutine_handle<wait_promise>::from_promise(*this)};
  }
  std::suspend_always initial_suspend() const noexcept { return {}; }
  struct final_awaiter {
    bool await_ready() const noexcept { return false; }
    std::coroutine_handle<> await_suspend(std::coroutine_handle<wait_promise> h) const noexcept {
      unsigned char* state = h.promise().state_;
      const std::coroutine_handle<> continuation = h.promise().continuation_;
      h.destroy();
      if (*state == wait_suspended) return continuation;
      *state = wait_done_inline;  // finished inside start(): the awaiter does not suspend
      return std::noop_coroutine();
    }
    void await_resume() const noexcept {}
  };
  final_awaiter final_suspend() const noexcept { return {}; }
  void return_void() const noexcept {}
  void unhandled_exception() noexcept { *error_ = std::current_exception(); }
  const std::stop_token& stop_token() const noexcept { return token_; }
};

inline bool wait_task::start(std::coroutine_handle<> awaiter, std::stop_token token, unsigned char& state,
                             std::exception_ptr& error) {
  wait_promise& p = h_.promise();
  p.token_ = std::move(token);
  p.continuation_ = awaiter;
  p.state_ = &state;
  p.error_ = &error;
  state = wait_starting;
  std::exchange(h_, {}).resume();
  if (state == wait_done_inline) return false;
  state = wait_suspended;
  return true;
}

}  // namespace ipcoro::detail
