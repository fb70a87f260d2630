// SPDX-License-Identifier: MIT
// The event loop's state and its turn (io_context::impl): submission, reaping, the ready queue, shutdown.
// Private to io_context.cpp, which holds the public API and the thread's current context.
#pragma once

#include "ipcoro/detail/intrusive_queue.hpp"
#include "ipcoro/error.hpp"
#include "ipcoro/io_context.hpp"
#include "ipcoro/unique_fd.hpp"
#include "loop.hpp"
#include "uring/ring.hpp"

#include <poll.h>
#include <sched.h>
#include <unistd.h>

#include <time.h>
#include <cerrno>
#include <cstdio>
#include <mutex>
#include <utility>
#include <vector>

namespace ipcoro {

// Included by io_context.cpp alone, so these stay that file's own.
namespace {

// user_data of the loop's own eventfd read; operation addresses are never this small.
constexpr std::uint64_t wake_tag = 1;
// Operations are 8-byte aligned: the low bit of user_data marks a worker-bound
// operation's deadline timer (see op_base::worker_bound_).
constexpr std::uint64_t timer_bit = 1;

constexpr int erestartsys = 512;  // leaks out of io-wq when a blocked open is interrupted

std::int64_t monotonic_now_ns() noexcept {
  ::timespec ts{};
  ::clock_gettime(CLOCK_MONOTONIC, &ts);
  return std::int64_t{ts.tv_sec} * 1'000'000'000 + ts.tv_nsec;
}

}  // namespace

struct __attribute__((visibility("hidden"))) io_context::impl {  // never exported (see IPCORO_API)
  uring::ring ring;
  ring_features features;
  counters stats;
  std::size_t in_flight = 0;      // operations started whose last CQE is not yet reaped
  std::size_t external_work = 0;  // waits that other threads end through call_on_loop
  // Operations waiting for SQ space, and coroutines waiting to be resumed.
  detail::intrusive_queue<detail::op_base, &detail::op_base::next_pending_> backlog;
  detail::intrusive_queue<detail::ready_node, &detail::ready_node::next_ready> ready;
  detail::turn_end_hook* turn_end = nullptr;  // what runs once the ready have run (a stack)
  const bool* awaited_done = nullptr;         // sync_wait's flag, while it runs the loop
  bool stop_requested = false;
  bool stopping = false;
  int driving = 0;  // run(), sync_wait and poll() on the stack
  pid_t owner_pid = ::getpid();
  std::size_t detached_alive = 0;
  std::stop_source detached_stop;
  std::function<void(std::exception_ptr)> error_handler;
  std::exception_ptr pending_error;

  // Calls queued by other threads (stop requests), and the eventfd that wakes the loop.
  struct remote_call {
    void (*fn)(void*) noexcept;
    void* arg;
  };
  std::mutex remote_mutex;
  std::vector<remote_call> remote_calls;
  std::vector<remote_call> remote_batch;  // swapped in, so the lock is not held while calling
  unique_fd wake_fd;
  std::uint64_t wake_value = 0;  // the kernel writes the eventfd counter here
  bool wake_armed = false;

  // Embedding in another loop (poll_fd, poll): an eventfd registered with the ring, which the
  // kernel signals for every completion (with DEFER_TASKRUN: as soon as one is waiting to be
  // posted), and which notify() signals for work that begins outside poll().
  unique_fd notify_fd;
  bool in_poll = false;
  bool notify_pending = false;  // notify() wrote and poll() has not read since

  void notify() noexcept {
    if (!notify_fd || in_poll || notify_pending) return;
    const std::uint64_t one = 1;
    [[maybe_unused]] ssize_t n = ::write(notify_fd.get(), &one, sizeof one);
    notify_pending = true;
  }

  void arm_wake() noexcept {
    // While shutting down, only waits ended by other threads still need waking.
    if (wake_armed || !wake_fd || (stopping && external_work == 0)) return;
    ::io_uring_sqe* sqe = take_sqes(1);
    if (sqe == nullptr) return;  // re-armed on the next turn
    ::io_uring_prep_read(sqe, wake_fd.get(), &wake_value, sizeof wake_value, 0);
    ::io_uring_sqe_set_data64(sqe, wake_tag);
    wake_armed = true;
  }

  void run_remote_calls() {
    {
      std::lock_guard lock(remote_mutex);
      remote_batch.swap(remote_calls);
    }
    for (const remote_call& c : remote_batch) c.fn(c.arg);
    remote_batch.clear();
  }

  // ---- submission ----

  ::io_uring_sqe* take_sqes(unsigned n) noexcept {
    if (ring.sq_space_left() < n) {
      int rc = ring.submit();
      if (rc > 0) stats.submitted += static_cast<unsigned>(rc);
      if (ring.sq_space_left() < n) return nullptr;
    }
    return ring.try_get_sqe();
  }

  void prepare(detail::op_base& op, ::io_uring_sqe* sqe) noexcept {
    const bool poll_first = op.retry_poll_events_ != 0 && op.result_ == -EAGAIN;
    if (poll_first) {
      // The descriptor is non-blocking: wait for readiness, then retry in the same chain.
      ::io_uring_prep_poll_add(sqe, op.retry_fd_, op.retry_poll_events_);
      ::io_uring_sqe_set_data64(sqe, 0);
      sqe->flags |= IOSQE_IO_LINK;
      sqe = ring.try_get_sqe();
    }
    op.prep_(op, sqe);
    ::io_uring_sqe_set_data(sqe, &op);
    if (op.has_deadline() && op.worker_bound_) {
      // Measured on 6.18: a linked timeout does not interrupt a FIFO open blocked in an
      // io-wq worker, while IORING_OP_ASYNC_CANCEL does. So: a plain timer that cancels.
      if (!op.timer_armed_) {
        ::io_uring_sqe* t = ring.try_get_sqe();
        ::io_uring_prep_timeout(t, &op.deadline_, 0, IORING_TIMEOUT_ABS);
        ::io_uring_sqe_set_data64(t, reinterpret_cast<std::uintptr_t>(&op) | timer_bit);
        op.timer_armed_ = true;
      }
    } else if (op.has_deadline()) {
      sqe->flags |= IOSQE_IO_LINK;
      ::io_uring_sqe* t = ring.try_get_sqe();
      ::io_uring_prep_link_timeout(t, &op.deadline_, IORING_TIMEOUT_ABS);
      ::io_uring_sqe_set_data64(t, 0);
    }
  }

  static unsigned sqes_needed(const detail::op_base& op) noexcept {
    return 1u + (op.has_deadline() ? 1u : 0u) +
           (op.retry_poll_events_ != 0 && op.result_ == -EAGAIN ? 1u : 0u);
  }

  /// Queues `op`'s SQEs, or parks it in the backlog when the SQ is full and the kernel
  /// cannot take more right now.
  void submit_op(detail::op_base& op) noexcept {
    const unsigned n = sqes_needed(op);
    if (backlog.empty()) {
      if (::io_uring_sqe* sqe = take_sqes(n)) {
        prepare(op, sqe);
        return;
      }
    }
    backlog.push_back(op);
  }

  void flush_backlog() {
    while (detail::op_base* op = backlog.front()) {
      if (op->cancel_requested_ || stopping) {
        backlog.pop_front();
        finish_op(*op, -ECANCELED);
        continue;
      }
      ::io_uring_sqe* sqe = take_sqes(sqes_needed(*op));
      if (sqe == nullptr) return;
      backlog.pop_front();
      prepare(*op, sqe);
    }
  }

  // flush_backlog completes a cancelled operation it holds with -ECANCELED.
  bool cancel_from_backlog(detail::op_base& op) noexcept { return backlog.contains(op); }

  // ---- completion ----

  void finish_op(detail::op_base& op, int res) {
    op.result_ = res;
    if (op.timer_armed_) {
      // The timer's CQE names this operation: resume only once it has been reaped.
      op.waiting_for_timer_ = true;
      if (::io_uring_sqe* sqe = take_sqes(1)) {
        ::io_uring_prep_timeout_remove(sqe, reinterpret_cast<std::uintptr_t>(&op) | timer_bit, 0);
        ::io_uring_sqe_set_data64(sqe, 0);
      }
      return;
    }
    --in_flight;
    op.waiter_.resume();
  }

  /// The CQE of a worker-bound operation's deadline timer.
  void timer_fired(detail::op_base& op, int res) {
    op.timer_armed_ = false;
    if (op.waiting_for_timer_) {
      op.waiting_for_timer_ = false;
      --in_flight;
      op.waiter_.resume();
    } else if (res == -ETIME) {
      cancel_now(op);  // its CQE follows, as -ECANCELED or an interrupted -EINTR
    }
  }

  void cancel_now(detail::op_base& op) noexcept {
    ::io_uring_sqe* sqe = take_sqes(1);
    if (sqe == nullptr) return;  // the kernel is refusing work; the op still ends by itself
    ::io_uring_prep_cancel(sqe, &op, 0);
    ::io_uring_sqe_set_data64(sqe, 0);
    // Submit now, not at the next turn: by then this op may have completed and its awaiter
    // reused the address for a new operation that the request would wrongly cancel.
    const int rc = ring.submit();
    if (rc > 0) stats.submitted += static_cast<unsigned>(rc);
  }

  void complete(detail::op_base& op, int res) {
    const bool cancelled = op.cancel_requested_ || stopping;
    if (res == -EINTR || res == -erestartsys) {
      // An io-wq worker interrupted by a cancellation reports EINTR; otherwise retry.
      const bool expired = op.has_deadline() &&
                           monotonic_now_ns() >= op.deadline_.tv_sec * 1'000'000'000 + op.deadline_.tv_nsec;
      if (cancelled || expired) {
        finish_op(op, -ECANCELED);
      } else {
        submit_op(op);
      }
      return;
    }
    if (res == -EAGAIN && op.retry_poll_events_ != 0 && !cancelled) {
      op.result_ = -EAGAIN;  // makes prepare() link a poll in front
      submit_op(op);
      return;
    }
    if (op.progress_ != nullptr && !op.progress_(op, res)) {
      op.result_ = 0;
      if (cancelled) {
        finish_op(op, -ECANCELED);
      } else {
        submit_op(op);
      }
      return;
    }
    finish_op(op, res);
  }

  // ---- the ready queue ----

  void push_ready(detail::ready_node& node) noexcept {
    ready.push_back(node);
    if (notify_fd) notify();
  }

  /// Resumes what was ready when called; what those coroutines schedule waits a turn,
  /// so I/O completions are not starved.
  void drain_ready() {
    auto batch = ready.take_all();
    while (detail::ready_node* node = batch.pop_front()) node->handle.resume();  // may free `node`
  }

  /// For the extent of a caller of turn(): counted in `driving`, and for poll() in_poll set.
  struct driven_scope {
    impl& m;
    bool polling;
    ~driven_scope() {
      --m.driving;
      if (polling) m.in_poll = false;
    }
  };
  driven_scope drive(bool polling = false) noexcept {
    ++driving;
    in_poll = in_poll || polling;
    return {*this, polling};
  }

  void run_turn_end() noexcept {
    while (detail::turn_end_hook* h = turn_end) {
      turn_end = h->next_hook;
      h->next_hook = nullptr;
      h->queued = false;
      h->fn(*h);
    }
  }

  // ---- the loop ----

  void reap() {
    constexpr unsigned batch = 64;
    ::io_uring_cqe* cqes[batch];
    struct completion {
      std::uint64_t user_data;
      int res;
    } done[batch];
    for (;;) {
      if (ring.cq_overflow_pending()) {
        ++stats.overflowed;
        // Pull the kernel's backlog of completions into the CQ as room appears.
        (void)ring.submit_and_wait(0);
      }
      const unsigned n = ring.peek_batch(cqes, batch);
      if (n == 0) return;
      // Copy and release the slots first: resumed coroutines may need the CQ.
      for (unsigned i = 0; i < n; ++i) done[i] = {cqes[i]->user_data, cqes[i]->res};
      ring.advance(n);
      stats.completed += n;
      for (unsigned i = 0; i < n; ++i) {
        if (done[i].user_data == wake_tag) {
          wake_armed = false;
          run_remote_calls();
        } else if ((done[i].user_data & timer_bit) != 0) {
          timer_fired(*reinterpret_cast<detail::op_base*>(done[i].user_data & ~timer_bit), done[i].res);
        } else if (done[i].user_data != 0) {
          complete(*reinterpret_cast<detail::op_base*>(done[i].user_data), done[i].res);
        }
      }
      if (n < batch && !ring.cq_overflow_pending()) return;
    }
  }

  /// What every turn does before it may wait: resume the ready, run the turn's end, submit,
  /// and arm the cross-thread wake. False when nothing at all is left to wait for.
  bool start_turn() {
    flush_backlog();
    drain_ready();
    run_turn_end();
    flush_backlog();
    if (in_flight == 0 && external_work == 0 && ready.empty()) return false;
    arm_wake();
    return true;
  }

  /// One turn: resume the ready, submit, wait if nothing else is runnable, reap.
  /// Returns false when there is nothing at all to wait for.
  bool turn() {
    if (!start_turn()) return false;
    const bool must_not_wait = !ready.empty() || !backlog.empty() || (awaited_done && *awaited_done);
    if (must_not_wait && backlog.empty() && ring.sq_ready() == 0 && ++turns_without_enter < enter_every) {
      // Only coroutines to resume and nothing to submit: a hand-over between coroutines
      // (an event, an in-process channel) needs no syscall. Entering at least every
      // `enter_every` turns keeps I/O completions from starving: with DEFER_TASKRUN the
      // kernel posts them only when this thread enters.
      reap();
      return true;
    }
    turns_without_enter = 0;
    if (!must_not_wait && poll_first() && busy_poll()) {
      reap();
      return true;
    }
    if (must_not_wait || adaptive_poll_ns == 0) {
      enter(must_not_wait ? 0 : 1);
    } else {
      // A sleep that ended within the ceiling is a wait that polling would have met
      // awake: the budget grows back. This is also how two loops that answer each other
      // leave the state where each sleeps because the other did (a sleeping peer's answer
      // takes its wake-up, more than a small budget).
      const std::int64_t slept_at = monotonic_now_ns();
      enter(1);
      if (monotonic_now_ns() - slept_at < adaptive_poll_ns)
        poll_budget_ns = std::min(adaptive_poll_ns, poll_budget_ns * 2);
    }
    reap();
    return true;
  }

  /// poll()'s turn: as turn(), but never sleeping. Returns true while work remains.
  bool turn_without_waiting() {
    if (!start_turn()) return false;
    enter(0);
    reap();
    return in_flight > 0 || external_work > 0 || !ready.empty();
  }

  void enter(unsigned wait_nr) {
    const int rc = ring.submit_and_wait(wait_nr);
    if (rc > 0)
      stats.submitted += static_cast<unsigned>(rc);
    else if (rc < 0 && rc != -EBUSY && rc != -EAGAIN)
      throw_errno(-rc, "io_uring_enter");
  }

  /// Collects completions without sleeping until one is ready or the budget is spent.
  /// Returns true when a completion is ready. An adaptive budget (options::adaptive_poll)
  /// doubles, up to its ceiling, each time a completion came within it, and halves, down
  /// to a sixteenth of the ceiling, each time none did: a loop whose answers come within
  /// microseconds stays awake for them, and one whose waits are long soon polls about
  /// once before it sleeps. Answers that keep coming while a yield ran another thread on
  /// this CPU (shared_cpu_signs in a row) come from a peer that shares it: there polling
  /// only adds system calls to what a sleep and a wake-up cost, so the next
  /// shared_cpu_rest waits sleep at once. (Across CPUs, fewer than 1 % of answers came
  /// during such a yield in a pipe ping-pong here, so several in a row are rare.)
  bool busy_poll() {
    std::int64_t now = monotonic_now_ns();
    const std::int64_t deadline = now + poll_budget_ns;
    bool shared_cpu = false;
    for (;;) {
      // With DEFER_TASKRUN, completions are only posted when this thread enters the
      // kernel, so each check is an io_uring_enter that never sleeps.
      enter(0);
      ++stats.busy_polls;
      if (::io_uring_cq_ready(ring.raw()) > 0) {
        ++stats.poll_hits;
        if (adaptive_poll_ns > 0) {
          shared_cpu_answers = shared_cpu ? shared_cpu_answers + 1 : 0;
          if (shared_cpu_answers >= shared_cpu_signs) {
            shared_cpu_answers = 0;
            polls_skipped = shared_cpu_rest;
          }
          if (!shared_cpu) poll_budget_ns = std::min(adaptive_poll_ns, poll_budget_ns * 2);
        }
        return true;
      }
      if (now >= deadline) {
        if (adaptive_poll_ns > 0) poll_budget_ns = std::max(adaptive_poll_ns / 16, poll_budget_ns / 2);
        return false;
      }
      // When the peer shares this CPU, spinning would only delay its answer: yielding lets
      // it run, and costs almost nothing when nothing else is runnable here. A yield that
      // took 2 us or more ran another thread (here a yield that switches to a peer's turn
      // takes 2-5 us, one that does not well under 1 us).
      ::sched_yield();
      const std::int64_t before = now;
      now = monotonic_now_ns();
      if (now - before >= 2000) shared_cpu = true;
    }
  }

  /// Whether this wait polls first: a budget is set, and no recent answer came from a
  /// thread on this CPU (which skips the next shared_cpu_rest waits, then tries again).
  bool poll_first() noexcept {
    if (poll_budget_ns == 0) return false;
    if (polls_skipped == 0) return true;
    --polls_skipped;
    return false;
  }
  static constexpr unsigned shared_cpu_signs = 4;
  static constexpr unsigned shared_cpu_rest = 64;
  unsigned shared_cpu_answers = 0;
  unsigned polls_skipped = 0;

  /// What busy_poll() spends before the loop sleeps: options::busy_poll when set (fixed),
  /// else the adaptive budget, whose ceiling is adaptive_poll_ns (0: off).
  std::int64_t poll_budget_ns = 0;
  std::int64_t adaptive_poll_ns = 0;
  static constexpr unsigned enter_every = 64;
  unsigned turns_without_enter = 0;

  void rethrow_pending() {
    if (pending_error) std::rethrow_exception(std::exchange(pending_error, nullptr));
  }

  void report(std::exception_ptr e) noexcept {
    if (error_handler) {
      try {
        error_handler(e);
        return;
      } catch (...) {
        e = std::current_exception();
      }
    }
    if (!pending_error && !stopping) {
      pending_error = e;
      return;
    }
    try {
      std::rethrow_exception(e);
    } catch (const std::exception& ex) {
      std::fprintf(stderr, "ipcoro: a detached task failed: %s\n", ex.what());
    } catch (...) {
      std::fprintf(stderr, "ipcoro: a detached task failed with a non-standard exception\n");
    }
  }

  void shutdown() noexcept {
    stopping = true;
    detached_stop.request_stop();
    if (in_flight > 0 || wake_armed) {
      if (::io_uring_sqe* sqe = take_sqes(1)) {
        ::io_uring_prep_cancel64(sqe, 0, IORING_ASYNC_CANCEL_ANY);
        ::io_uring_sqe_set_data64(sqe, 0);
      }
    }
    while (in_flight > 0 || !ready.empty() || !backlog.empty() || external_work > 0 || turn_end != nullptr) {
      try {
        if (!turn()) break;
      } catch (const std::exception& ex) {
        std::fprintf(stderr, "ipcoro: while shutting down: %s\n", ex.what());
        if (in_flight > 0) {
          // The ring is broken; waiting more could hang. Leak the frames rather than let
          // the kernel write into freed memory.
          std::fprintf(stderr, "ipcoro: %zu operations still in flight; leaking the ring\n", in_flight);
          leak_ring = true;
          return;
        }
      }
    }
    // The wake read's buffer lives here: cancel it and wait for its CQE as for any operation's.
    if (wake_armed) {
      if (::io_uring_sqe* sqe = take_sqes(1)) {
        ::io_uring_prep_cancel64(sqe, wake_tag, 0);
        ::io_uring_sqe_set_data64(sqe, 0);
      }
    }
    while (wake_armed) {
      if (ring.submit_and_wait(1) < 0) {
        leak_ring = true;
        return;
      }
      reap();
    }
    if (pending_error) report(std::exchange(pending_error, nullptr));
    if (detached_alive > 0) {
      std::fprintf(stderr,
                   "ipcoro: %zu detached tasks were still suspended at shutdown on something that "
                   "ignores cancellation; they were not destroyed\n",
                   detached_alive);
    }
  }

  bool leak_ring = false;
};

}  // namespace ipcoro
