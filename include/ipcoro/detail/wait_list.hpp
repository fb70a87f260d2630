// SPDX-License-Identifier: MIT
// wait_list: the FIFO of suspended coroutines behind event, semaphore and mutex.
#pragma once

#include "ipcoro/detail/intrusive_queue.hpp"
#include "ipcoro/detail/op_base.hpp"
#include "ipcoro/export.hpp"
#include "ipcoro/task.hpp"

#include <coroutine>
#include <optional>
#include <stop_token>

namespace ipcoro::detail {

class wait_list;

/// One coroutine waiting in a wait_list; lives in the awaiter (no allocation). A stop
/// request unlinks it and resumes it with operation_cancelled; a grant that came first wins.
class IPCORO_API waiter : public ready_node {
 public:
  waiter() = default;
  waiter(const waiter&) = delete;
  waiter& operator=(const waiter&) = delete;

 protected:
  /// Parks the coroutine in `list` unless its stop token is already stopped.
  bool park(wait_list& list, std::coroutine_handle<> h, const std::stop_token& token);
  /// Throws operation_cancelled if the wait was cancelled.
  void unpark();

 private:
  friend class wait_list;
  struct canceller {
    waiter* self;
    void operator()() const noexcept;
  };
  static void cancel_on_loop(void* arg) noexcept;

  waiter* prev_ = nullptr;
  waiter* next_ = nullptr;
  wait_list* list_ = nullptr;  // non-null while parked
  io_context* ctx_ = nullptr;
  bool cancelled_ = false;
  bool cancel_queued_remotely_ = false;
  std::optional<std::stop_callback<canceller>> stop_callback_;
};

class IPCORO_API wait_list {
 public:
  bool empty() const noexcept { return waiters_.empty(); }
  /// Unlinks the oldest waiter and schedules it on this thread's io_context.
  void wake_one() noexcept;
  void wake_all() noexcept;

 private:
  friend class waiter;
  void push_back(waiter& w) noexcept;
  void remove(waiter& w) noexcept;

  intrusive_queue<waiter, &waiter::next_, &waiter::prev_> waiters_;
};

}  // namespace ipcoro::detail
