// SPDX-License-Identifier: MIT
// op_deadline and deadline_methods: the one with_timeout / with_deadline of every awaitable.
#pragma once

#include <algorithm>
#include <chrono>
#include <coroutine>
#include <cstdint>
#include <type_traits>

namespace ipcoro::detail {

/// When an awaitable must have finished: a relative timeout, an absolute steady_clock
/// deadline, both (the earlier wins), or neither. A relative timeout counts from the moment
/// the awaitable first has to wait, so an awaitable that completes on its fast path never
/// reads the clock; since a fast path never blocks, that is the moment of the `co_await`
/// to within its own run time.
class op_deadline {
 public:
  using clock = std::chrono::steady_clock;

  template <class Rep, class Period>
  void limit_after(std::chrono::duration<Rep, Period> d) noexcept {
    timeout_ = std::min(timeout_, saturating_ns(d));
  }
  template <class Duration>
  void limit_at(std::chrono::time_point<clock, Duration> when) noexcept {
    deadline_ = std::min(deadline_, std::chrono::ceil<clock::duration>(when));
  }

  /// Whether a timeout or a deadline was set.
  bool bounded() const noexcept { return timeout_ != no_timeout || deadline_ != clock::time_point::max(); }
  /// The absolute deadline for a wait that starts at `now` (time_point::max() when unbounded).
  clock::time_point resolve(clock::time_point now) const noexcept {
    if (timeout_ == no_timeout || deadline_ <= now) return deadline_;
    return timeout_ < deadline_ - now ? now + timeout_ : deadline_;
  }
  /// As above, reading the clock only when a relative timeout needs it.
  clock::time_point resolve() const noexcept {
    return timeout_ == no_timeout ? deadline_ : resolve(clock::now());
  }
  /// resolve() as CLOCK_MONOTONIC nanoseconds (steady_clock is CLOCK_MONOTONIC on Linux).
  std::int64_t resolve_ns() const noexcept {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(resolve().time_since_epoch()).count();
  }

 private:
  static constexpr auto no_timeout = std::chrono::nanoseconds::max();

  template <class Rep, class Period>
  static std::chrono::nanoseconds saturating_ns(std::chrono::duration<Rep, Period> d) noexcept {
    using std::chrono::duration;
    using wide = duration<long double, std::nano>;
    const wide w = std::chrono::duration_cast<wide>(d);
    if (w <= wide::zero()) return std::chrono::nanoseconds::zero();
    if (w >= std::chrono::duration_cast<wide>(no_timeout)) return no_timeout - std::chrono::nanoseconds{1};
    return std::chrono::ceil<std::chrono::nanoseconds>(w);
  }

  std::chrono::nanoseconds timeout_ = no_timeout;
  clock::time_point deadline_ = clock::time_point::max();
};

/// Awaits an awaitable that lives elsewhere (a temporary of the same full-expression).
/// Operations are not movable, and GCC 12 copies an awaiter given as a reference to a
/// temporary; this copyable handle sidesteps that.
template <class Op>
struct [[nodiscard]] awaiter_ref {
  Op& op;
  bool await_ready() { return op.await_ready(); }
  template <class P>
  decltype(auto) await_suspend(std::coroutine_handle<P> h) {
    return op.await_suspend(h);
  }
  decltype(auto) await_resume() { return op.await_resume(); }
};

/// with_timeout and with_deadline, the same for every awaitable. `Derived` reads
/// `limit_` when it first has to wait: awaitables whose wait can carry a deadline (an
/// io_uring request, a futex wait) enforce it there; the others run their wait against a
/// timer (ipcoro/deadline.hpp). Either way the outcome is one of: finished in time (even if
/// the deadline passes while its result is handed over, nothing is lost), `timed_out`
/// (nothing was done: no message taken, no lock held), or `operation_cancelled` when the
/// awaiting task is stopped first.
template <class Derived>
class deadline_methods {
 public:
  /// Fails with `timed_out` unless the operation completes within `d` of starting to wait.
  /// `co_await op.with_timeout(50ms)`; calling both this and with_deadline keeps the earlier.
  /// On a temporary that can move (`co_await ring.receive(buf).with_timeout(50ms)`), the
  /// result is the operation itself, which may be kept and returned; otherwise it refers to
  /// the operation, and must be awaited while that lives (in the same expression).
  template <class Rep, class Period>
  auto with_timeout(std::chrono::duration<Rep, Period> d) & noexcept {
    limit_.limit_after(d);
    return awaiter_ref<Derived>{self()};
  }
  template <class Rep, class Period>
  auto with_timeout(std::chrono::duration<Rep, Period> d) && noexcept {
    limit_.limit_after(d);
    return moved_or_ref();
  }
  /// Fails with `timed_out` unless the operation completes by `when` (CLOCK_MONOTONIC).
  template <class Duration>
  auto with_deadline(std::chrono::time_point<std::chrono::steady_clock, Duration> when) & noexcept {
    limit_.limit_at(when);
    return awaiter_ref<Derived>{self()};
  }
  template <class Duration>
  auto with_deadline(std::chrono::time_point<std::chrono::steady_clock, Duration> when) && noexcept {
    limit_.limit_at(when);
    return moved_or_ref();
  }

 protected:
  op_deadline limit_;

 private:
  Derived& self() noexcept { return static_cast<Derived&>(*this); }
  auto moved_or_ref() noexcept {
    if constexpr (std::is_nothrow_move_constructible_v<Derived>) {
      return Derived(std::move(self()));
    } else {
      return awaiter_ref<Derived>{self()};
    }
  }
};

}  // namespace ipcoro::detail
