// SPDX-License-Identifier: MIT
// The process mutex: a futex word holding the holder's pid, parked waits that check the
// holder's liveness on every timeout, and takeover from a dead holder.
#include "ipcoro/process_mutex.hpp"

#include "ipcoro/error.hpp"

#include "liveness.hpp"

#include <fmt/core.h>
#include <time.h>

#include <algorithm>
#include <cerrno>
#include <system_error>

namespace ipcoro {

namespace {

// Linux pids stay below PID_MAX_LIMIT (4194304 = 1 << 22); bit 31 says someone may wait.
constexpr std::uint32_t pid_mask = (1u << 22) - 1;
constexpr std::uint32_t waiters_bit = 1u << 31;
constexpr unsigned start_time_shift = 22;

std::int64_t monotonic_ns() noexcept {
  ::timespec ts{};
  ::clock_gettime(CLOCK_MONOTONIC, &ts);
  return std::int64_t{ts.tv_sec} * 1'000'000'000 + ts.tv_nsec;
}

void cpu_relax() noexcept {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield" ::: "memory");
#endif
}

std::uint32_t my_word() { return static_cast<std::uint32_t>(detail::this_process().pid) & pid_mask; }

/// Whether the holder named by lock word `word` is gone. Its start time is trusted only
/// when the record names the same pid (the holder writes it just after acquiring; if it
/// died in between, only "no such pid" can tell).
bool holder_dead(const process_mutex_state& s, std::uint32_t word) noexcept {
  const auto pid = static_cast<pid_t>(word & pid_mask);
  const std::uint64_t record = s.holder.load(std::memory_order_acquire);
  const std::uint64_t boot = s.holder_boot.load(std::memory_order_acquire);
  if ((record & pid_mask) != static_cast<std::uint64_t>(pid)) return !detail::pid_running(pid);
  const detail::process_identity who{pid, 0, record >> start_time_shift, boot};
  if (detail::process_alive(who)) return false;
  // A record torn by a hand-over in the meantime proves nothing: the caller's
  // compare-and-swap on the word would fail anyway, but do not even try.
  return s.holder.load(std::memory_order_acquire) == record;
}

}  // namespace

// ---- guard ----

process_mutex_guard process_mutex_guard::record_holder(process_mutex_state& s, bool took_over) {
  const detail::process_identity& me = detail::this_process();
  s.holder_boot.store(me.boot_id, std::memory_order_relaxed);
  s.holder.store((me.start_time << start_time_shift) | (static_cast<std::uint64_t>(me.pid) & pid_mask),
                 std::memory_order_release);
  if (took_over) {
    s.inconsistent.store(1, std::memory_order_relaxed);
    s.takeovers.fetch_add(1, std::memory_order_relaxed);
  }
  return {&s, s.inconsistent.load(std::memory_order_relaxed) != 0, took_over};
}

void process_mutex_guard::mark_consistent() noexcept {
  if (state_ == nullptr) return;
  state_->inconsistent.store(0, std::memory_order_relaxed);
  inconsistent_ = false;
}

void process_mutex_guard::unlock() {
  if (state_ == nullptr) return;
  process_mutex_state& s = *std::exchange(state_, nullptr);
  const std::uint32_t me = my_word();
  std::uint32_t c = s.word.load(std::memory_order_relaxed);
  do {
    if ((c & pid_mask) != me) {
      throw std::system_error(
          EPERM, std::system_category(),
          fmt::format("process_mutex unlock: pid {} no longer holds the lock (pid {} does); it "
                      "was taken over while this process held it: is every process in the "
                      "same pid namespace, and is liveness_check_interval longer than a stall?",
                      me, c & pid_mask));
    }
  } while (!s.word.compare_exchange_weak(c, 0, std::memory_order_release, std::memory_order_relaxed));
  if ((c & waiters_bit) != 0) futex_wake(s.word, 1);
}

void process_mutex_guard::release_quietly() noexcept {
  try {
    unlock();
  } catch (...) {
    // A destructor must not throw; the lock belongs to its new holder anyway.
  }
}

// ---- locking ----

bool process_mutex_lock_operation::await_ready() {
  std::uint32_t c = 0;
  if (!state_->word.compare_exchange_strong(c, my_word(), std::memory_order_acquire,
                                            std::memory_order_relaxed)) {
    return false;
  }
  fast_ = process_mutex_guard::record_holder(*state_, false);
  return true;
}

process_mutex_guard process_mutex_lock_operation::await_resume() {
  if (fast_.owns_lock()) return std::move(fast_);
  return inner_->await_resume();
}

task<process_mutex_guard> process_mutex_lock_operation::lock_contended(detail::pooled_frame,
                                                                       process_mutex_state& s,
                                                                       process_mutex_options opts,
                                                                       std::int64_t deadline_ns) {
  const std::uint32_t me = my_word();
  const std::int64_t check_ns = std::max<std::int64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(opts.liveness_check_interval).count(), 1);
  for (;;) {
    for (unsigned i = 0; i < opts.spin; ++i) {
      std::uint32_t c = s.word.load(std::memory_order_relaxed);
      if (c == 0 &&
          s.word.compare_exchange_weak(c, me, std::memory_order_acquire, std::memory_order_relaxed)) {
        co_return process_mutex_guard::record_holder(s, false);
      }
      cpu_relax();
    }
    std::uint32_t c = s.word.load(std::memory_order_acquire);
    if (c == 0) {
      // Taken with the waiters bit: others may be parked, and this unlock must wake them.
      if (s.word.compare_exchange_strong(c, me | waiters_bit, std::memory_order_acquire,
                                         std::memory_order_relaxed)) {
        co_return process_mutex_guard::record_holder(s, false);
      }
      continue;
    }
    if ((c & waiters_bit) == 0) {
      if (!s.word.compare_exchange_strong(c, c | waiters_bit, std::memory_order_relaxed)) continue;
      c |= waiters_bit;
    }
    const std::int64_t now = monotonic_ns();
    if (now >= deadline_ns) throw timed_out{};
    const std::int64_t wait_ns = std::min(check_ns, deadline_ns - now);
    const futex_wait_result r = co_await futex_wait(s.word, c, std::chrono::nanoseconds(wait_ns));
    if (r == futex_wait_result::timed_out && s.word.load(std::memory_order_acquire) == c &&
        holder_dead(s, c)) {
      // Exactly the word judged dead: two waiters that both saw the death cannot both win.
      std::uint32_t expected = c;
      if (s.word.compare_exchange_strong(expected, me | waiters_bit, std::memory_order_acq_rel,
                                         std::memory_order_relaxed)) {
        co_return process_mutex_guard::record_holder(s, true);
      }
    }
    std::uint32_t free_word = 0;
    if (s.word.compare_exchange_strong(free_word, me | waiters_bit, std::memory_order_acquire,
                                       std::memory_order_relaxed)) {
      co_return process_mutex_guard::record_holder(s, false);
    }
  }
}

// ---- process_mutex ----

std::optional<process_mutex_guard> process_mutex::try_lock() const {
  std::uint32_t c = 0;
  if (!state_->word.compare_exchange_strong(c, my_word(), std::memory_order_acquire,
                                            std::memory_order_relaxed)) {
    return std::nullopt;
  }
  return process_mutex_guard::record_holder(*state_, false);
}

pid_t process_mutex::holder_pid() const noexcept {
  return static_cast<pid_t>(state_->word.load(std::memory_order_acquire) & pid_mask);
}

bool process_mutex::holder_alive() const noexcept {
  const std::uint32_t c = state_->word.load(std::memory_order_acquire);
  return c != 0 && !holder_dead(*state_, c);
}

}  // namespace ipcoro
