// SPDX-License-Identifier: MIT
// An in-process channel's shared state, and the parking of coroutines that wait on it.
#pragma once

#include "ipcoro/detail/wait_list.hpp"
#include "ipcoro/task.hpp"

#include <coroutine>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <vector>

namespace ipcoro::detail {

/// Parks a coroutine in a wait_list until woken (or cancelled).
class [[nodiscard]] park_operation : waiter {
 public:
  explicit park_operation(wait_list& list) noexcept : list_(list) {}
  bool await_ready() const noexcept { return false; }
  template <class P>
  bool await_suspend(std::coroutine_handle<P> h) {
    return park(list_, h, stop_token_of(h));
  }
  void await_resume() { unpark(); }

 private:
  wait_list& list_;
};

/// The shared state of an in-process channel: a bounded ring of values and the
/// coroutines waiting for space or for data. Lives on one loop's thread.
template <class T>
struct local_channel {
  explicit local_channel(std::size_t capacity) : slots(capacity) {}
  std::vector<std::optional<T>> slots;
  std::size_t head = 0;
  std::size_t count = 0;
  std::uint64_t sent = 0;
  std::uint64_t received = 0;
  bool sender_closed = false;
  bool sender_aborted = false;
  bool receiver_closed = false;
  wait_list senders;
  wait_list receivers;

  bool readable() const noexcept { return count > 0 || sender_closed || receiver_closed; }
};

}  // namespace ipcoro::detail
