// SPDX-License-Identifier: MIT
// ipcoro/asio.hpp: runs an ipcoro io_context inside a standalone Asio loop on the same thread.
#pragma once

// Optional: installed only where standalone Asio (<asio.hpp>, Debian's libasio-dev) was found.
#include "ipcoro/io_context.hpp"
#include "ipcoro/task.hpp"

#include <asio/associated_cancellation_slot.hpp>
#include <asio/associated_executor.hpp>
#include <asio/async_result.hpp>
#include <asio/cancellation_type.hpp>
#include <asio/error.hpp>
#include <asio/executor_work_guard.hpp>
#include <asio/io_context.hpp>
#include <asio/posix/stream_descriptor.hpp>
#include <asio/post.hpp>
#include <asio/use_awaitable.hpp>

#include <cstddef>
#include <exception>
#include <memory>
#include <optional>
#include <stop_token>
#include <system_error>
#include <type_traits>
#include <utility>

namespace ipcoro {

namespace detail {
/// What an asio_driver shares with the handlers and tasks it started, which may outlive it.
struct asio_driver_state {
  bool alive = true;
  std::size_t waiting = 0;  ///< as_asio operations whose result is not posted yet
};

/// Turns an Asio cancellation, or the context's stop request, into a stop request of `source`.
struct asio_stop_forward {
  std::stop_source* source;
  void operator()(asio::cancellation_type = asio::cancellation_type::terminal) const noexcept {
    source->request_stop();
  }
};

template <class T>
struct asio_signature {
  using type = void(std::exception_ptr, T);
};
template <>
struct asio_signature<void> {
  using type = void(std::exception_ptr);
};
}  // namespace detail

/// Drives an ipcoro io_context from an Asio io_context on the same thread: it watches
/// `ctx.poll_fd()` with an `asio::posix::stream_descriptor` and calls `ctx.poll()` each time
/// the descriptor is readable, so `io.run()` serves both loops and no thread is added.
///
/// The wait stays armed while the ipcoro context has work (as `ipcoro::io_context::run()`
/// would keep running) or an as_asio() operation is outstanding; after that it lapses, so that
/// `io.run()` can return. spawn() and as_asio() arm it again; call wake() after giving the
/// context work some other way (e.g. `ctx.spawn`). A failure of a detached ipcoro task, which
/// `poll()` rethrows, propagates out of `io.run()` (call wake() before running `io` again).
///
/// `ctx` must be made with `io_context::options::embedded` on the thread that runs `io`, and
/// must outlive the driver; `io` must outlive it too. Make `io` before `ctx`: a task that `ctx`
/// cancels as it goes away still posts its as_asio outcome to `io`. Destroying the driver stops
/// the watch (the descriptor stays open: it is the context's).
class asio_driver {
 public:
  /// Throws what `ctx.poll_fd()` throws (std::logic_error for a context not made embedded).
  asio_driver(asio::io_context& io, io_context& ctx)
      : ctx_(ctx), watch_(io, ctx.poll_fd()), state_(std::make_shared<detail::asio_driver_state>()) {}
  ~asio_driver() {
    state_->alive = false;
    // release() cancels the wait without closing the descriptor; the aborted handler sees
    // `alive` false and never touches this object.
    (void)watch_.release();
  }
  asio_driver(const asio_driver&) = delete;
  asio_driver& operator=(const asio_driver&) = delete;

  /// Starts `t` detached on the context (see io_context::spawn) and arms the watch.
  void spawn(task<void> t) {
    ctx_.spawn(std::move(t));
    wake();
  }
  /// Arms the watch if it had lapsed because the context was idle.
  void wake() {
    if (!armed_) arm();
  }
  /// The ipcoro context being driven.
  io_context& context() noexcept { return ctx_; }
  /// The executor of the Asio io_context doing the driving.
  asio::io_context::executor_type get_executor() noexcept { return watch_.get_executor(); }

  /// For as_asio(): runs `t` on the context and hands its outcome to `handler`, posted to the
  /// handler's associated executor.
  template <class T, class Handler>
  void start(task<T> t, Handler handler) {
    auto ex = asio::get_associated_executor(handler, get_executor());
    task<void> run = complete(std::move(t), std::move(handler), asio::make_work_guard(ex), state_);
    ++state_->waiting;  // before spawn: the task may finish inside it
    ctx_.spawn(std::move(run));
    wake();
  }

 private:
  void arm() {
    armed_ = true;
    watch_.async_wait(asio::posix::descriptor_base::wait_read,
                      [this, state = state_](const asio::error_code& ec) {
                        if (!state->alive) return;
                        armed_ = false;
                        if (ec == asio::error::operation_aborted) return;
                        if (ec) throw std::system_error(ec, "ipcoro::asio_driver: waiting on poll_fd");
                        if (ctx_.poll() || state->waiting > 0) arm();
                      });
  }

  template <class T, class Handler, class WorkGuard>
  static task<void> complete(task<T> t, Handler handler, WorkGuard work,
                             std::shared_ptr<detail::asio_driver_state> state) {
    std::exception_ptr error;
    std::optional<std::conditional_t<std::is_void_v<T>, bool, T>> value;
    // Asio's per-operation cancellation (awaitable operators, bind_cancellation_slot) becomes a
    // stop request; the task then also follows the context's own token through `source`.
    auto slot = asio::get_associated_cancellation_slot(handler);
    std::optional<std::stop_source> source;
    std::optional<std::stop_callback<detail::asio_stop_forward>> follow;
    if (slot.is_connected()) {
      source.emplace();
      slot.assign(detail::asio_stop_forward{&*source});
      get_stop_token_awaiter ask = get_stop_token();
      const std::stop_token outer = co_await ask;
      follow.emplace(outer, detail::asio_stop_forward{&*source});
      (void)std::move(t).with_stop_token(source->get_token());  // sets it in place
    }
    try {
      if constexpr (std::is_void_v<T>) {
        co_await std::move(t);
      } else {
        value.emplace(co_await std::move(t));
      }
    } catch (...) {
      error = std::current_exception();
    }
    if (slot.is_connected()) slot.clear();  // before the handler may run, as Asio requires
    --state->waiting;
    // Posted, never called from here: the handler would otherwise run inside ctx.poll().
    auto ex = work.get_executor();
    asio::post(ex,
               [h = std::move(handler), error, value = std::move(value), work = std::move(work)]() mutable {
                 work.reset();
                 if constexpr (std::is_void_v<T>) {
                   std::move(h)(error);
                 } else if (value) {
                   std::move(h)(error, std::move(*value));
                 } else {
                   std::move(h)(error, T{});  // as asio::co_spawn does for an awaitable<T> that threw
                 }
               });
  }

  io_context& ctx_;
  asio::posix::basic_stream_descriptor<asio::io_context::executor_type> watch_;
  std::shared_ptr<detail::asio_driver_state> state_;
  bool armed_ = false;
};

/// Awaits an ipcoro task from Asio code: `T v = co_await ipcoro::as_asio(driver, rx.receive());`
/// in an `asio::awaitable` coroutine (the default token is `asio::use_awaitable`; any Asio
/// completion token works, with the signature `void(std::exception_ptr, T)`, or
/// `void(std::exception_ptr)` for `task<void>`). The task runs on the driver's ipcoro context
/// under the context's stop token, and its result or exception is posted to the completion
/// handler's associated executor. An exception comes back as the exception_ptr, which
/// `use_awaitable` rethrows. `T` must be default-constructible (the value passed alongside an
/// exception), as for `asio::co_spawn`. Asio's per-operation cancellation (a cancellation slot
/// associated with the handler, as `asio::experimental::awaitable_operators` and
/// `asio::bind_cancellation_slot` give) of any type is a stop request to the task: it then ends
/// as a stop ends it (`operation_cancelled`; a channel receive takes no message).
template <class T, class CompletionToken = asio::use_awaitable_t<>>
auto as_asio(asio_driver& driver, task<T> t, CompletionToken&& token = CompletionToken{}) {
  static_assert(std::is_void_v<T> || (std::is_default_constructible_v<T> && !std::is_reference_v<T>),
                "ipcoro::as_asio: the task's result must be void or a default-constructible value");
  return asio::async_initiate<CompletionToken, typename detail::asio_signature<T>::type>(
      [&driver](auto handler, task<T> started) { driver.start(std::move(started), std::move(handler)); },
      token, std::move(t));
}

}  // namespace ipcoro
