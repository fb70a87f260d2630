// SPDX-License-Identifier: MIT
// io_context: the per-thread io_uring event loop that resumes coroutines.
#pragma once

#include "ipcoro/export.hpp"
#include "ipcoro/version.hpp"

#include <chrono>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>

namespace ipcoro {

template <class T>
class task;

namespace detail {
struct loop;
}

/// What the kernel offered when the ring was set up (probed once, at construction).
struct ring_features {
  bool single_issuer = false;  ///< IORING_SETUP_SINGLE_ISSUER (Linux 6.0)
  bool defer_taskrun = false;  ///< IORING_SETUP_DEFER_TASKRUN (Linux 6.1)
  bool nodrop = false;         ///< completions survive a full CQ (Linux 5.5)
  bool splice = false;         ///< IORING_OP_SPLICE (Linux 5.7)
  bool msg_ring = false;       ///< IORING_OP_MSG_RING (Linux 5.18)
  bool waitid = false;         ///< IORING_OP_WAITID (Linux 6.7)
  bool futex = false;          ///< IORING_OP_FUTEX_WAIT / WAKE (Linux 6.7)
  int kernel_major = 0;
  int kernel_minor = 0;
};

/// The event loop. One per thread, owning one io_uring. Awaitables started on a thread
/// use that thread's io_context (`io_context::current()`).
///
/// Shutdown: destroying an io_context with operations in flight cancels them all, keeps
/// reaping until the kernel has posted every completion (so no buffer is written after
/// its coroutine is gone), lets the coroutines unwind with `operation_cancelled`, and only
/// then unmaps the ring. Detached tasks are stopped through their stop token, so waits on
/// events, semaphores and mutexes end too. A detached task still suspended after that
/// (on an awaitable that ignores cancellation) is reported on stderr and left alone:
/// destroying a frame that something may still resume would be worse than leaking it.
class IPCORO_API io_context {
 public:
  struct options {
    unsigned entries = 256;   ///< submission queue size
    unsigned cq_entries = 0;  ///< completion queue size; 0 means 4 × entries
    /// Use SINGLE_ISSUER | DEFER_TASKRUN where the kernel has them, and unless the
    /// environment sets IPCORO_NO_DEFER_TASKRUN=1 (which makes the ring as on Linux 5.19).
    bool single_issuer = true;
    /// Opt-in busy polling: before sleeping in the kernel, keep collecting completions
    /// without sleeping for up to this long. Waking a sleeping thread on another CPU costs
    /// ~20 us here, so an answer that comes within the budget arrives far sooner — at the
    /// price of a CPU kept busy meanwhile (see `counters::busy_polls`). Zero: off.
    std::chrono::microseconds busy_poll{0};
    /// Adaptive polling, on by default (busy_poll, when set, replaces it): before sleeping,
    /// collect completions without sleeping for a budget that starts here and adapts, as
    /// an SPSC ring's spin does. It doubles back towards this each time a completion came
    /// within it and halves, to a sixteenth of this, each time none did. A peer that
    /// answers within microseconds is met awake (a round trip across CPUs then costs less
    /// CPU, not more: no sleep and wake-up); a loop whose waits are long polls about once
    /// before it sleeps. Zero: sleep at once.
    std::chrono::microseconds adaptive_poll{32};
    /// The context will be driven by another event loop through poll_fd() and poll(). The
    /// ring is then set up without DEFER_TASKRUN: with it, the kernel tells a waiter other
    /// than io_uring_enter of a completion only late (about 30 ms on Linux 6.18).
    bool embedded = false;
  };
  struct counters {
    std::uint64_t submitted = 0;   ///< SQEs handed to the kernel
    std::uint64_t completed = 0;   ///< CQEs reaped
    std::uint64_t overflowed = 0;  ///< times the CQ was full and the kernel's backlog was flushed
    std::uint64_t busy_polls = 0;  ///< non-sleeping checks for completions made by busy polling
    std::uint64_t poll_hits = 0;   ///< polls (busy or adaptive) that found a completion: waits not slept
  };

  /// Sets up the ring. Throws std::system_error when io_uring is unavailable (naming
  /// what to change), std::invalid_argument for queue sizes the kernel cannot have, and
  /// std::logic_error when this thread already has an io_context.
  io_context();
  explicit io_context(const options& opts);
  ~io_context();
  io_context(const io_context&) = delete;
  io_context& operator=(const io_context&) = delete;

  /// This thread's io_context. Throws std::logic_error when there is none.
  static io_context& current();
  static io_context* current_or_null() noexcept;

  /// Runs until no operation is in flight and no coroutine is ready, or `stop()`.
  /// Rethrows the first failure of a detached task unless an error handler is set.
  void run();
  /// Runs one turn without sleeping: resumes the coroutines that are ready, submits what they
  /// queued and reaps the completions already there. Returns true while the context still has
  /// work (operations in flight or coroutines ready), false when it is idle. Rethrows a
  /// detached task's failure as run() does. For running the context inside another event loop
  /// on the same thread: call it whenever poll_fd() is readable.
  bool poll();
  /// A descriptor that becomes readable when poll() has something to do: a completion was
  /// posted, a call came from another thread, or a coroutine was made ready or spawned from
  /// outside poll(). Watch it for reading in the other loop (epoll, Asio, libuv, Qt, GLib)
  /// and call poll() when it is; poll() clears it, and makes it readable again at once when
  /// ready coroutines are left for the next turn. Created on first call (an eventfd
  /// registered with the ring; a context that never calls this does not pay for it); owned
  /// by the context, valid until it is destroyed. Throws std::logic_error unless the context
  /// was made with `options::embedded` (or without DEFER_TASKRUN).
  [[nodiscard]] int poll_fd();
  /// Makes `run()` return after the current iteration. Call it on the loop's thread.
  void stop() noexcept;

  /// Starts `t` detached: the io_context owns it until it finishes. Its failure goes to
  /// the error handler (by default: rethrown from `run()` / `sync_wait`), never swallowed.
  /// (Declared with task incomplete: whoever makes a task has included ipcoro/task.hpp.)
  void spawn(task<void> t);
  /// Receives every exception a detached task ends with.
  void set_error_handler(std::function<void(std::exception_ptr)> handler);

  counters stats() const noexcept;
  const ring_features& features() const noexcept;
  /// True while the destructor cancels and drains.
  bool stopping() const noexcept;

 private:
  struct impl;
  friend struct detail::loop;  // the library's awaitables reach the ring through it (lib/loop.hpp)
  std::unique_ptr<impl> impl_;
};

}  // namespace ipcoro
