// SPDX-License-Identifier: MIT
// Out-of-line parts of wait lists (event, semaphore, mutex) and task groups.
#include "ipcoro/detail/group.hpp"
#include "ipcoro/detail/wait_list.hpp"
#include "ipcoro/error.hpp"
#include "ipcoro/io_context.hpp"
#include "loop.hpp"

namespace ipcoro::detail {

// ---- wait_list ----

bool waiter::park(wait_list& list, std::coroutine_handle<> h, const std::stop_token& token) {
  handle = h;
  cancelled_ = false;
  ctx_ = &io_context::current();
  if (token.stop_requested()) {
    cancelled_ = true;
    return false;
  }
  list.push_back(*this);
  if (token.stop_possible()) stop_callback_.emplace(token, canceller{this});
  return true;
}

void waiter::unpark() {
  stop_callback_.reset();  // waits for a callback running on another thread to return
  if (cancel_queued_remotely_) {
    cancel_queued_remotely_ = false;
    loop::forget_calls(*ctx_, this);
  }
  if (cancelled_) throw operation_cancelled{};
}

void waiter::canceller::operator()() const noexcept {
  if (!loop::call_on_loop(*self->ctx_, &cancel_on_loop, self)) self->cancel_queued_remotely_ = true;
}

void waiter::cancel_on_loop(void* arg) noexcept {
  auto* self = static_cast<waiter*>(arg);
  // Already granted (unlinked and scheduled): the grant stands.
  if (self->list_ == nullptr) return;
  self->list_->remove(*self);
  self->cancelled_ = true;
  loop::schedule(*self->ctx_, *self);
}

void wait_list::push_back(waiter& w) noexcept {
  w.list_ = this;
  waiters_.push_back(w);
}

void wait_list::remove(waiter& w) noexcept {
  waiters_.remove(w);
  w.list_ = nullptr;
}

void wait_list::wake_one() noexcept {
  waiter* w = waiters_.pop_front();
  if (w == nullptr) return;
  w->list_ = nullptr;
  loop::schedule(*w->ctx_, *w);
}

void wait_list::wake_all() noexcept {
  while (!waiters_.empty()) wake_one();
}

// ---- group_state ----

void group_state::follow(const std::stop_token& parent) {
  if (parent.stop_possible()) parent_link_.emplace(parent, forward_stop{&source_});
}

void group_state::record_failure(const std::exception_ptr& e) noexcept {
  try {
    std::rethrow_exception(e);
  } catch (const operation_cancelled&) {
    if (!cancelled_) cancelled_ = e;
    return;
  } catch (...) {
    if (!error_) error_ = e;
  }
  source_.request_stop();
}

}  // namespace ipcoro::detail
