// SPDX-License-Identifier: MIT
// The io_context's entry points for the library's awaitables and spawn; not installed.
#pragma once

#include "ipcoro/detail/op_base.hpp"
#include "ipcoro/io_context.hpp"

#include <exception>
#include <stop_token>

namespace ipcoro::detail {

/// Work for the end of a loop turn: once the coroutines made ready have run, before the
/// loop submits what they queued and waits (a stream sender's coalesced write). Lives in
/// its owner, which keeps it alive while it is queued.
struct turn_end_hook {
  void (*fn)(turn_end_hook& self) noexcept = nullptr;
  turn_end_hook* next_hook = nullptr;
  bool queued = false;
};

/// What the library asks of an io_context beyond the public API (a friend of it). Every
/// function must be called on the context's own thread, except call_on_loop.
struct loop {
  /// Queues `op`'s SQE (and its linked timeout). Returns false when the context is
  /// shutting down; `op.result_` then holds -ECANCELED.
  static bool start_op(io_context& ctx, op_base& op);
  /// Asks the kernel to cancel `op`; its CQE still arrives and resumes it.
  static void cancel_op(io_context& ctx, op_base& op) noexcept;
  /// Resumes `node.handle` from the loop, after what is already queued.
  static void schedule(io_context& ctx, ready_node& node) noexcept;
  /// Runs `fn(arg)` on the loop's thread: at once when called there (returns true);
  /// from any other thread it is queued, the loop is woken through an eventfd, and it
  /// runs on the loop's next turn (returns false). This is how a std::stop_source
  /// triggered on another thread reaches the ring, which only its own thread may touch.
  static bool call_on_loop(io_context& ctx, void (*fn)(void*) noexcept, void* arg) noexcept;
  /// Drops queued calls whose argument is `arg`, before the object behind it goes away.
  static void forget_calls(io_context& ctx, void* arg) noexcept;
  /// Counts a wait that another thread will end through call_on_loop (a fallback that
  /// cannot use the ring): while held, run() keeps waiting and sync_wait sees no deadlock.
  static void hold_work(io_context& ctx) noexcept;
  static void release_work(io_context& ctx) noexcept;
  /// Runs `hook.fn` at the end of the current turn of the loop (once, however often it is
  /// asked before then); also when run() or sync_wait returns and when the context shuts down.
  static void at_turn_end(io_context& ctx, turn_end_hook& hook) noexcept;
  /// Runs the hooks queued for the turn's end now, and says whether there were any: what
  /// is about to wait for a peer (a ring receive that found nothing, a ring's spin) first
  /// sends what the turn held back, which may be what the peer, or itself, waits for.
  static bool end_turn_early(io_context& ctx) noexcept;
  /// end_turn_early on this thread's context, if it has one.
  static bool end_turn_early_here() noexcept;
  /// The loop's next wait sleeps without polling first (options::adaptive_poll): what waits
  /// knows that its answer comes from a thread on this CPU (an SPSC ring's peer), which
  /// cannot run while the loop polls.
  static void sleep_at_once(io_context& ctx) noexcept;
  /// Whether the loop is being turned: run(), sync_wait or poll() is on the stack, or another
  /// loop embeds this one (poll_fd). Work started on a context that is not may wait until the
  /// next sync_wait or the context's shutdown: a caller outside the loop must not rely on it.
  static bool driven(const io_context& ctx) noexcept;
  /// Counts (+1) or uncounts (-1) a caller that is about to turn the loop (sync_wait).
  static void count_driver(io_context& ctx, int delta) noexcept;
  /// Runs the loop until `done` turns true. Throws std::logic_error if nothing is left
  /// that could make it true (a deadlock), and rethrows detached-task failures.
  static void run_until(io_context& ctx, const bool& done);

  // ---- detached tasks (io_context::spawn, in spawn.cpp) ----
  /// Counts one more detached task; returns the token that stops them all at shutdown.
  static std::stop_token detached_started(io_context& ctx) noexcept;
  static void detached_finished(io_context& ctx) noexcept;
  /// A detached task ended with `e`: to the error handler, or rethrown from run(). An
  /// operation_cancelled (`cancelled`) during shutdown is the expected end, not a failure.
  static void detached_failed(io_context& ctx, std::exception_ptr e, bool cancelled) noexcept;
  /// A task started outside the loop queued work: an embedding loop must come back.
  static void started_outside_loop(io_context& ctx) noexcept;
};

}  // namespace ipcoro::detail
