// SPDX-License-Identifier: MIT
// sleep_for / sleep_until: timers on the io_uring loop.
#pragma once

#include "ipcoro/export.hpp"
#include "ipcoro/io_operation.hpp"

#include <chrono>

namespace ipcoro {

/// Suspends the awaiting coroutine until a CLOCK_MONOTONIC instant (IORING_OP_TIMEOUT).
class [[nodiscard]] IPCORO_API timer_operation : public io_operation<timer_operation> {
 public:
  explicit timer_operation(std::chrono::steady_clock::time_point when) noexcept;
  void finish(int res) const;

 private:
  static void prep(detail::op_base& op, ::io_uring_sqe* sqe) noexcept;
  ::__kernel_timespec when_{};
};

/// Completes after `d`. Throws operation_cancelled when stopped.
template <class Rep, class Period>
[[nodiscard]] timer_operation sleep_for(std::chrono::duration<Rep, Period> d) noexcept {
  return timer_operation{std::chrono::steady_clock::now() +
                         std::chrono::duration_cast<std::chrono::steady_clock::duration>(d)};
}

/// Completes at `when` (immediately if it has passed).
[[nodiscard]] inline timer_operation sleep_until(std::chrono::steady_clock::time_point when) noexcept {
  return timer_operation{when};
}

}  // namespace ipcoro
