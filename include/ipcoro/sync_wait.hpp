// SPDX-License-Identifier: MIT
// sync_wait: run the event loop from ordinary code until a task finishes.
#pragma once

#include "ipcoro/detail/group.hpp"
#include "ipcoro/detail/root_task.hpp"
#include "ipcoro/export.hpp"
#include "ipcoro/io_context.hpp"
#include "ipcoro/task.hpp"

#include <exception>
#include <optional>
#include <stop_token>

namespace ipcoro {

namespace detail {
/// Runs `ctx` until `done`. If the loop throws (a detached task failed, or a deadlock),
/// stops the task through `source` and keeps the loop turning until it has unwound, so
/// that nothing the kernel may still write to is freed, then rethrows the first error.
IPCORO_API void drive(io_context& ctx, const bool& done, std::stop_source& source);

/// While it lives, `ctx` counts as a loop being turned: what the task starts before drive()
/// (its first steps run inline) may leave work in the loop, as it may once drive() runs.
class IPCORO_API drive_scope {
 public:
  explicit drive_scope(io_context& ctx) noexcept;
  ~drive_scope();
  drive_scope(const drive_scope&) = delete;
  drive_scope& operator=(const drive_scope&) = delete;

 private:
  io_context& ctx_;
};

template <class T>
root_task run_sync(task<T> t, std::optional<value_or_monostate<T>>& value, std::exception_ptr& error) {
  try {
    if constexpr (std::is_void_v<T>) {
      co_await std::move(t);
      value.emplace();
    } else {
      value.emplace(co_await std::move(t));
    }
  } catch (...) {
    error = std::current_exception();
  }
}

inline std::coroutine_handle<> mark_done(void* flag) noexcept {
  *static_cast<bool*>(flag) = true;
  return std::noop_coroutine();
}
}  // namespace detail

/// Runs `ctx` on this thread until `t` has finished, and returns its result or rethrows
/// its exception. Also rethrows the failure of a detached task spawned on `ctx` (after
/// cancelling `t` and letting it unwind), and throws std::logic_error on a deadlock: `t`
/// suspended with nothing in flight that could ever resume it.
template <class T>
T sync_wait(io_context& ctx, task<T> t) {
  std::optional<detail::value_or_monostate<T>> value;
  std::exception_ptr error;
  bool done = false;
  std::stop_source source;
  const detail::drive_scope driving(ctx);
  detail::run_sync(std::move(t), value, error).start(source.get_token(), &detail::mark_done, &done);
  detail::drive(ctx, done, source);  // also when done: what `t` sent reaches the kernel
  if (error) std::rethrow_exception(error);
  if constexpr (!std::is_void_v<T>) return std::move(*value);
}

}  // namespace ipcoro
