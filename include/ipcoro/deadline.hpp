// SPDX-License-Identifier: MIT
// deadline: task::with_timeout and task::with_deadline, a task raced against a timer.
#pragma once

#include "ipcoro/error.hpp"
#include "ipcoro/task.hpp"
#include "ipcoro/timer.hpp"
#include "ipcoro/when_any.hpp"

#include <chrono>
#include <type_traits>
#include <utility>
#include <variant>

namespace ipcoro::detail {

inline task<void> sleep_until_task(pooled_frame, std::chrono::steady_clock::time_point when) {
  co_await sleep_until(when);
}

/// The timer and the task race through when_any: whichever finishes first stops the
/// other. A task that is a channel receive checks its stop token before it takes a
/// message, so a receive that loses to the timer leaves its message in the channel.
template <class T>
struct deadline_runner {
  static task<T> run(task<T> t, std::chrono::steady_clock::time_point when) {
    return race(pooled_frame{}, std::move(t), when);
  }

 private:
  static task<T> race(pooled_frame, task<T> t, std::chrono::steady_clock::time_point when) {
    task<void> timer = sleep_until_task(pooled_frame{}, when);
    auto result = co_await when_any(std::move(t), std::move(timer));
    if (result.index() == 1) throw timed_out{};
    if constexpr (!std::is_void_v<T>) co_return static_cast<T&&>(std::get<0>(result));
  }
};

}  // namespace ipcoro::detail
