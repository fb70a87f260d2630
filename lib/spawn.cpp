// SPDX-License-Identifier: MIT
// io_context::spawn: detached tasks, in the coroutine core above the loop that owns them.
#include "ipcoro/detail/root_task.hpp"
#include "ipcoro/error.hpp"
#include "ipcoro/io_context.hpp"
#include "ipcoro/task.hpp"
#include "loop.hpp"

#include <coroutine>
#include <exception>
#include <stdexcept>
#include <utility>

namespace ipcoro {

namespace {

detail::root_task run_detached(task<void> t, io_context* owner) {
  try {
    co_await std::move(t);
  } catch (const operation_cancelled&) {
    detail::loop::detached_failed(*owner, std::current_exception(), true);
  } catch (...) {
    detail::loop::detached_failed(*owner, std::current_exception(), false);
  }
}

std::coroutine_handle<> detached_done(void* owner) noexcept {
  detail::loop::detached_finished(*static_cast<io_context*>(owner));
  return std::noop_coroutine();
}

}  // namespace

void io_context::spawn(task<void> t) {
  if (!t.valid()) throw std::invalid_argument("ipcoro::io_context::spawn: empty task");
  std::stop_token token = detail::loop::detached_started(*this);
  run_detached(std::move(t), this).start(std::move(token), &detached_done, this);
  // It ran up to its first wait here, outside the loop: what it queued waits for a turn.
  detail::loop::started_outside_loop(*this);
}

}  // namespace ipcoro
