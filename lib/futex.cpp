// SPDX-License-Identifier: MIT
// Futex waits through the ring or through helper threads (the fallback), and futex wakes.
#include "ipcoro/futex.hpp"

#include "ipcoro/error.hpp"
#include "ipcoro/io_context.hpp"
#include "loop.hpp"
#include "uring/prep.hpp"

#include <linux/futex.h>
#include <pthread.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <array>
#include <cerrno>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <system_error>
#include <thread>
#include <vector>

namespace ipcoro {

namespace {

std::uint32_t futex2_flags(futex_scope scope) noexcept {
  return uring::futex2_size_u32 | (scope == futex_scope::process_private ? uring::futex2_private : 0u);
}

std::int64_t monotonic_ns() noexcept {
  ::timespec ts{};
  ::clock_gettime(CLOCK_MONOTONIC, &ts);
  return std::int64_t{ts.tv_sec} * 1'000'000'000 + ts.tv_nsec;
}

// ---- which path ----

// -1: not yet decided in this process; 0: ring (if the kernel has it); 1: fallback forced.
std::atomic<int> fallback_forced{-1};

bool read_fallback_variable() noexcept {
  static std::once_flag registered;
  // A forked child decides again, so it can choose its own path before its first wait.
  std::call_once(registered, [] { ::pthread_atfork(nullptr, nullptr, [] { fallback_forced.store(-1); }); });
  const char* v = std::getenv("IPCORO_FUTEX_FALLBACK");
  const bool forced = v != nullptr && *v != '\0' && std::strcmp(v, "0") != 0;
  fallback_forced.store(forced ? 1 : 0, std::memory_order_relaxed);
  return forced;
}

}  // namespace

bool futex_waits_use_ring() noexcept {
  int forced = fallback_forced.load(std::memory_order_relaxed);
  if (forced < 0) forced = read_fallback_variable() ? 1 : 0;
  if (forced == 1) return false;
  io_context* ctx = io_context::current_or_null();
  return ctx != nullptr && ctx->features().futex;
}

// ---- the fallback ----
//
// Each parked wait is handed to a helper thread of its own, which blocks in futex_waitv
// (Linux 5.16) on two words: the awaited one and the helper's control word, with the
// wait's deadline as timeout. One wait per helper, because futex_waitv reports only one
// of the words that were woken: with several waits per thread, a wake could be lost. A
// cancellation changes the control word and wakes it. An outcome (woken, value changed,
// timed out) is written into the operation under the engine lock and handed to the
// waiter's loop with call_on_loop; the wait is counted with hold_work() meanwhile, so the
// loop keeps running for it. Idle helpers wait on their control word for the next wait;
// they live until the process exits, so a wait allocates nothing once enough helpers
// exist. The first wait starts several at once (initial_helpers): a wait parked while
// another helper is still handing its outcome back needs one more than the waits parked,
// a moment a warm-up may not meet, and a helper started later would allocate then.

namespace detail {

struct futex_fallback {
  struct helper {
    std::atomic<std::uint32_t> control{0};
    futex_wait_operation* op = nullptr;  // the wait it serves; null while idle
    std::uint64_t generation = 0;        // tells this wait from a later one at the same address
    helper* next_idle = nullptr;
    bool thread_running = false;
  };

  static constexpr std::size_t initial_helpers = 4;

  std::mutex lock;
  std::vector<std::unique_ptr<helper>> helpers;
  helper* idle = nullptr;

  static futex_fallback& get();
  static void run_helper(helper* h) noexcept;

  void make_idle_locked(helper& h) noexcept {
    h.op = nullptr;
    h.next_idle = idle;
    idle = &h;
  }

  // Under `lock`: records the outcome, frees the helper, and hands the wait to its loop.
  // Holding the lock across call_on_loop matters: complete_on_loop takes it first, so the
  // loop cannot finish the wait and destroy its io_context while call_on_loop is still
  // writing to that io_context's eventfd.
  void complete_locked(helper& h, int result) noexcept {
    futex_wait_operation* op = h.op;
    op->fallback_result_ = result;
    op->fallback_helper_ = nullptr;
    make_idle_locked(h);
    detail::loop::call_on_loop(*op->ctx_, &complete_on_loop, op);
  }

  static void complete_on_loop(void* arg) noexcept {
    auto* op = static_cast<futex_wait_operation*>(arg);
    { std::lock_guard barrier(get().lock); }
    detail::loop::release_work(*op->ctx_);
    detail::loop::schedule(*op->ctx_, op->resume_node_);
  }

  /// Hands `op` to an idle helper, starting one if none is idle. Throws when no thread can
  /// be started or the kernel has no futex_waitv.
  void add(futex_wait_operation& op) {
    helper* h = nullptr;
    {
      std::lock_guard guard(lock);
      if (idle == nullptr) {
        check_kernel();
        const std::size_t n = helpers.empty() ? initial_helpers : 1;
        for (std::size_t i = 0; i < n; ++i) {
          helpers.push_back(std::make_unique<helper>());
          make_idle_locked(*helpers.back());
        }
      }
      h = idle;
      if (!h->thread_running) {
        std::thread(&run_helper, h).detach();  // throws std::system_error (EAGAIN) if it cannot
        h->thread_running = true;
        start_idle_helpers_locked();
      }
      idle = h->next_idle;
      h->next_idle = nullptr;
      h->op = &op;
      ++h->generation;
      op.fallback_helper_ = h;
      h->control.fetch_add(1, std::memory_order_release);
    }
    wake_helper(*h);
  }

  /// On the loop's thread: takes `op` back from its helper unless an outcome came first.
  /// Returns true when it did (the wait is cancelled).
  bool remove(futex_wait_operation& op) noexcept {
    helper* h = nullptr;
    {
      std::lock_guard guard(lock);
      h = static_cast<helper*>(op.fallback_helper_);
      if (h == nullptr) return false;  // completed; its call to the loop is queued
      op.fallback_helper_ = nullptr;
      make_idle_locked(*h);
      h->control.fetch_add(1, std::memory_order_release);
    }
    wake_helper(*h);
    return true;
  }

  /// Starts the threads of the idle helpers that have none (new ones, or all of them in a
  /// forked child), now rather than at a later wait.
  void start_idle_helpers_locked() noexcept {
    for (helper* h = idle; h != nullptr; h = h->next_idle) {
      if (h->thread_running) continue;
      try {
        std::thread(&run_helper, h).detach();
        h->thread_running = true;
      } catch (...) {  // no thread now (EAGAIN, memory): a wait that needs it starts it
        return;
      }
    }
  }

  static void wake_helper(helper& h) noexcept {
    ::syscall(SYS_futex, reinterpret_cast<std::uint32_t*>(&h.control), FUTEX_WAKE | FUTEX_PRIVATE_FLAG, 1,
              nullptr, nullptr, 0);
  }

  static void check_kernel() {
    static const int probe = [] {
      // Zero futexes is invalid (EINVAL) for a kernel that has the call at all.
      const long rc = ::syscall(SYS_futex_waitv, nullptr, 0, 0, nullptr, CLOCK_MONOTONIC);
      return rc < 0 && errno == ENOSYS ? ENOSYS : 0;
    }();
    if (probe == ENOSYS) {
      throw std::system_error(ENOSYS, std::system_category(),
                              "futex wait: this kernel has neither IORING_OP_FUTEX_WAIT (Linux 6.7) nor "
                              "futex_waitv (Linux 5.16), which the fallback uses; upgrade the kernel");
    }
  }

  /// In a forked child: the helper threads did not come along, and the waits they served
  /// belong to the parent's loops. Every helper becomes idle, to be started on first use.
  void reset_in_child() noexcept {
    idle = nullptr;
    for (auto& h : helpers) {
      h->thread_running = false;
      make_idle_locked(*h);
    }
  }
};

futex_fallback& futex_fallback::get() {
  static futex_fallback* engine = [] {
    auto* e = new futex_fallback;  // never destroyed: its detached threads use it until _exit
    ::pthread_atfork([] { get().lock.lock(); }, [] { get().lock.unlock(); },
                     [] {
                       get().reset_in_child();
                       get().lock.unlock();
                     });
    return e;
  }();
  return *engine;
}

void futex_fallback::run_helper(helper* h) noexcept {
  std::array<::futex_waitv, 2> waits{};
  futex_fallback& engine = get();
  for (;;) {
    unsigned n = 1;
    std::uint64_t generation = 0;
    ::timespec deadline{};
    bool has_deadline = false;
    {
      std::lock_guard guard(engine.lock);
      waits[0] = {};
      waits[0].val = h->control.load(std::memory_order_acquire);
      waits[0].uaddr = reinterpret_cast<std::uintptr_t>(&h->control);
      waits[0].flags = FUTEX_32 | FUTEX_PRIVATE_FLAG;
      if (futex_wait_operation* op = h->op) {
        const std::int64_t due = op->deadline_.tv_sec * 1'000'000'000 + op->deadline_.tv_nsec;
        if (op->word_->load(std::memory_order_acquire) != op->expected_) {
          engine.complete_locked(*h, -EAGAIN);
          continue;
        }
        if (due <= monotonic_ns()) {
          engine.complete_locked(*h, -ETIMEDOUT);
          continue;
        }
        waits[1] = {};
        waits[1].val = op->expected_;
        waits[1].uaddr = reinterpret_cast<std::uintptr_t>(op->word_);
        waits[1].flags = FUTEX_32 | (op->scope_ == futex_scope::process_private ? FUTEX_PRIVATE_FLAG : 0u);
        n = 2;
        generation = h->generation;
        deadline = {static_cast<time_t>(due / 1'000'000'000), static_cast<long>(due % 1'000'000'000)};
        has_deadline = true;
      }
    }
    const long rc =
        ::syscall(SYS_futex_waitv, waits.data(), n, 0, has_deadline ? &deadline : nullptr, CLOCK_MONOTONIC);
    const int err = rc < 0 ? errno : 0;
    if (rc == 1 || err == EFAULT) {
      // The awaited word was woken (if the control word was too, the kernel reports the
      // last one woken: this one), or it is not mapped. A cancellation that came first
      // already took the wait, and a cancelled wait's memory may be gone: look again then.
      std::lock_guard guard(engine.lock);
      if (h->op != nullptr && h->generation == generation) engine.complete_locked(*h, rc == 1 ? 0 : -EFAULT);
    } else if (rc < 0 && err != EAGAIN && err != ETIMEDOUT && err != EINTR) {
      std::fprintf(stderr, "ipcoro: futex_waitv failed in the futex fallback: %s\n", std::strerror(err));
      std::abort();
    }
    // rc == 0 (the control word: a new wait or a cancellation), EAGAIN (a word changed),
    // ETIMEDOUT, EINTR: look again.
  }
}

}  // namespace detail

// ---- futex_wait_operation ----

futex_wait_operation::futex_wait_operation(std::atomic<std::uint32_t>& word, std::uint32_t expected,
                                           futex_scope scope, std::chrono::nanoseconds timeout) noexcept
    : io_operation(&prep), word_(&word), expected_(expected), scope_(scope) {
  timeout_is_result_ = true;
  set_timeout(timeout.count());
}

bool futex_wait_operation::start(std::coroutine_handle<> waiter, const std::stop_token& token) {
  if (futex_waits_use_ring()) return begin(waiter, token);

  fallback_ = true;
  if (token.stop_requested()) {
    fallback_result_ = -ECANCELED;
    return false;
  }
  io_context& ctx = io_context::current();
  if (ctx.stopping()) {
    fallback_result_ = -ECANCELED;
    return false;
  }
  // The cheap outcomes need no helper.
  if (word_->load(std::memory_order_acquire) != expected_) {
    fallback_result_ = -EAGAIN;
    return false;
  }
  if (deadline_.tv_sec * 1'000'000'000 + deadline_.tv_nsec <= monotonic_ns()) {
    fallback_result_ = -ETIMEDOUT;
    return false;
  }
  waiter_ = waiter;
  ctx_ = &ctx;
  resume_node_.handle = waiter;
  detail::futex_fallback::get().add(*this);
  detail::loop::hold_work(ctx);
  // May run at once (a stop requested meanwhile): it then schedules the resumption.
  if (token.stop_possible()) fallback_stop_.emplace(token, fallback_canceller{this});
  return true;
}

void futex_wait_operation::fallback_canceller::operator()() const noexcept {
  auto cancel_on_loop = [](void* arg) noexcept {
    auto* self = static_cast<futex_wait_operation*>(arg);
    if (!detail::futex_fallback::get().remove(*self)) return;  // the outcome came first and stands
    self->fallback_result_ = -ECANCELED;
    detail::loop::release_work(*self->ctx_);
    detail::loop::schedule(*self->ctx_, self->resume_node_);
  };
  if (!detail::loop::call_on_loop(*op->ctx_, cancel_on_loop, op)) op->fallback_cancel_queued_ = true;
}

futex_wait_result futex_wait_operation::finish_fallback() {
  fallback_stop_.reset();  // waits for a callback running on another thread to return
  if (fallback_cancel_queued_) {
    fallback_cancel_queued_ = false;
    detail::loop::forget_calls(*ctx_, this);
  }
  switch (fallback_result_) {
    case 0:
      return futex_wait_result::woken;
    case -EAGAIN:
      return futex_wait_result::value_changed;
    case -ETIMEDOUT:
      if (!timeout_is_result_) throw timed_out{};  // with_timeout / with_deadline came first
      return futex_wait_result::timed_out;
    case -ECANCELED:
      throw operation_cancelled{};
    default:
      throw_errno(-fallback_result_, "futex wait (fallback): the word's memory is not mapped");
  }
}

void futex_wait_operation::prep(detail::op_base& op, ::io_uring_sqe* sqe) noexcept {
  auto& self = static_cast<futex_wait_operation&>(op);
  static_assert(sizeof(std::atomic<std::uint32_t>) == sizeof(std::uint32_t));
  uring::prep_futex_wait(sqe, reinterpret_cast<std::uint32_t*>(self.word_), self.expected_,
                         uring::futex_bitset_match_any, futex2_flags(self.scope_));
}

futex_wait_result futex_wait_operation::finish(int res) const {
  if (res >= 0) return futex_wait_result::woken;
  if (res == -EAGAIN) return futex_wait_result::value_changed;
  if (res == -ETIMEDOUT) return futex_wait_result::timed_out;
  throw_errno(-res, "futex wait");
}

int futex_wake(std::atomic<std::uint32_t>& word, int count, futex_scope scope) noexcept {
  const int op = FUTEX_WAKE | (scope == futex_scope::process_private ? FUTEX_PRIVATE_FLAG : 0);
  const long n =
      ::syscall(SYS_futex, reinterpret_cast<std::uint32_t*>(&word), op, count, nullptr, nullptr, 0);
  return n < 0 ? 0 : static_cast<int>(n);
}

}  // namespace ipcoro
