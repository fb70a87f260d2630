// SPDX-License-Identifier: MIT
// io_context's public face: construction, run, poll and embedding, sync_wait's loop, and what the library
// asks of it.
#include "ipcoro/io_context.hpp"

#include "io_context_impl.hpp"
#include "ipcoro/detail/intrusive_queue.hpp"
#include "ipcoro/error.hpp"
#include "ipcoro/sigpipe.hpp"
#include "ipcoro/unique_fd.hpp"
#include "loop.hpp"
#include "setup_error.hpp"
#include "uring/ring.hpp"

#include <fmt/core.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <time.h>
#include <cerrno>
#include <cstdio>
#include <mutex>
#include <stdexcept>
#include <utility>
#include <vector>

namespace ipcoro {

namespace {

thread_local io_context* current_context = nullptr;

// A forked child inherits the parent's io_context object but must not drive its ring
// (the ring belongs to the parent's task); it starts its own.
void forget_context_in_child() noexcept { current_context = nullptr; }

}  // namespace

// ---- io_context ----

io_context::io_context() : io_context(options{}) {}

io_context::io_context(const options& opts) : impl_(std::make_unique<impl>()) {
  if (current_context != nullptr) {
    throw std::logic_error("ipcoro::io_context: this thread already has an io_context (one per thread)");
  }
  static std::once_flag once;
  std::call_once(once, [] { ::pthread_atfork(nullptr, nullptr, &forget_context_in_child); });
  ignore_sigpipe();

  // The kernel's limits (IORING_MAX_ENTRIES, IORING_MAX_CQ_ENTRIES); CLAMP would silently
  // shrink a larger request, so say it instead.
  if (opts.entries == 0 || opts.entries > 32768 || opts.cq_entries > 65536 ||
      (opts.cq_entries != 0 && opts.cq_entries < opts.entries)) {
    throw std::invalid_argument(fmt::format(
        "ipcoro::io_context: entries must be 1..32768 and cq_entries 0 (4 x entries) or entries..65536; got "
        "entries={}, cq_entries={}",
        opts.entries, opts.cq_entries));
  }
  uring::setup_request req;
  req.entries = opts.entries;
  req.cq_entries = opts.cq_entries;
  req.single_issuer = opts.single_issuer && !opts.embedded;
  if (int rc = impl_->ring.init(req); rc < 0) detail::throw_io_uring_setup_error(-rc);
  if (opts.busy_poll.count() > 0) {
    impl_->poll_budget_ns = std::chrono::duration_cast<std::chrono::nanoseconds>(opts.busy_poll).count();
  } else if (opts.adaptive_poll.count() > 0) {
    impl_->adaptive_poll_ns =
        std::chrono::duration_cast<std::chrono::nanoseconds>(opts.adaptive_poll).count();
    impl_->poll_budget_ns = impl_->adaptive_poll_ns;
  }
  impl_->wake_fd.reset(::eventfd(0, EFD_CLOEXEC));
  if (!impl_->wake_fd) throw_errno(errno, "eventfd (the io_context's cross-thread wake-up)");
  // Room in both vectors of calls from other threads (stop requests, futex fallback
  // completions), which trade places at every turn: queueing a call allocates nothing
  // unless more than this many arrive between two turns of the loop.
  impl_->remote_calls.reserve(64);
  impl_->remote_batch.reserve(64);

  const uring::features& f = impl_->ring.probed();
  auto& out = impl_->features;
  out.single_issuer = f.single_issuer;
  out.defer_taskrun = f.defer_taskrun;
  out.nodrop = f.nodrop;
  out.splice = f.op_splice;
  out.msg_ring = f.op_msg_ring;
  out.waitid = f.op_waitid;
  out.futex = f.op_futex_wait && f.op_futex_wake;
  out.kernel_major = f.kernel_major;
  out.kernel_minor = f.kernel_minor;
  if (!f.op_async_cancel || !f.op_link_timeout || !f.ext_arg) {
    throw std::system_error(ENOSYS, std::system_category(),
                            fmt::format("ipcoro needs Linux 5.11 or later (io_uring async cancel, linked "
                                        "timeouts, IORING_FEAT_EXT_ARG); this kernel is {}.{}",
                                        f.kernel_major, f.kernel_minor));
  }
  current_context = this;
}

io_context::~io_context() {
  if (impl_->owner_pid != ::getpid()) {
    // A copy inherited through fork(): the ring and its operations belong to the parent.
    // Unmapping our view is all that is ours to do; frames stay as they are.
    impl_->ring.exit();
    return;
  }
  impl_->shutdown();
  if (current_context == this) current_context = nullptr;
  if (impl_->leak_ring) {
    (void)impl_.release();
    return;
  }
}

io_context& io_context::current() {
  if (current_context == nullptr) {
    throw std::logic_error("ipcoro: no io_context on this thread; create one before awaiting I/O");
  }
  return *current_context;
}

io_context* io_context::current_or_null() noexcept { return current_context; }

void io_context::run() {
  impl_->stop_requested = false;
  {
    const impl::driven_scope driven = impl_->drive();
    while (!impl_->stop_requested) {
      const bool more = impl_->turn();
      impl_->rethrow_pending();
      if (!more) break;
    }
    impl_->run_turn_end();
  }
}

void io_context::stop() noexcept { impl_->stop_requested = true; }

bool io_context::poll() {
  impl& m = *impl_;
  if (m.notify_fd) {
    // Emptied before reaping: a completion posted from here on signals it again.
    std::uint64_t count = 0;
    [[maybe_unused]] ssize_t n = ::read(m.notify_fd.get(), &count, sizeof count);
    m.notify_pending = false;
  }
  bool more = false;
  {
    const impl::driven_scope driven = m.drive(true);
    more = m.turn_without_waiting();
  }
  // Coroutines made ready during this turn, or SQEs that found no room, are the next turn's:
  // the other loop must come back at once rather than sleep.
  if (!m.ready.empty() || !m.backlog.empty() || m.ring.sq_ready() > 0) m.notify();
  m.rethrow_pending();
  return more;
}

int io_context::poll_fd() {
  impl& m = *impl_;
  if (!m.notify_fd) {
    if (m.features.defer_taskrun) {
      // Measured on Linux 6.18: ~30 ms from a completion to the eventfd (or the ring's own
      // descriptor) turning readable, against ~10 us per round trip without DEFER_TASKRUN.
      throw std::logic_error(
          "ipcoro::io_context::poll_fd: make the context with options.embedded = true; its ring "
          "uses DEFER_TASKRUN, which would tell the other loop of completions only late");
    }
    unique_fd fd(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
    if (!fd) throw_errno(errno, "eventfd (io_context::poll_fd)");
    if (int rc = ::io_uring_register_eventfd(m.ring.raw(), fd.get()); rc < 0) {
      throw_errno(-rc, "io_uring_register_eventfd (io_context::poll_fd)");
    }
    m.notify_fd = std::move(fd);
    m.notify();  // whatever was queued before now waits for a poll()
  }
  return m.notify_fd.get();
}

void detail::loop::run_until(io_context& ctx, const bool& done) {
  io_context::impl& m = *ctx.impl_;
  m.stop_requested = false;
  struct restore {
    io_context::impl& m;
    const bool* outer;
    ~restore() { m.awaited_done = outer; }
  } restore_at_exit{m, std::exchange(m.awaited_done, &done)};
  {
    const io_context::impl::driven_scope driven = m.drive();
    while (!done) {
      if (m.stop_requested) {
        throw std::logic_error("ipcoro: io_context::stop() called while sync_wait was waiting");
      }
      const bool more = m.turn();
      m.rethrow_pending();
      if (!more && !done) {
        throw std::logic_error(
            "ipcoro: deadlock: the awaited task is suspended but nothing is in flight that could resume it");
      }
    }
    m.run_turn_end();  // what the task sent on its last step reaches the kernel before sync_wait returns
  }
}

std::stop_token detail::loop::detached_started(io_context& ctx) noexcept {
  ++ctx.impl_->detached_alive;
  return ctx.impl_->detached_stop.get_token();
}

void detail::loop::detached_finished(io_context& ctx) noexcept { --ctx.impl_->detached_alive; }

void detail::loop::detached_failed(io_context& ctx, std::exception_ptr e, bool cancelled) noexcept {
  if (cancelled && ctx.impl_->stopping) return;
  ctx.impl_->report(std::move(e));
}

void detail::loop::started_outside_loop(io_context& ctx) noexcept {
  if (ctx.impl_->notify_fd) ctx.impl_->notify();
}

void io_context::set_error_handler(std::function<void(std::exception_ptr)> handler) {
  impl_->error_handler = std::move(handler);
}

io_context::counters io_context::stats() const noexcept { return impl_->stats; }
const ring_features& io_context::features() const noexcept { return impl_->features; }
bool io_context::stopping() const noexcept { return impl_->stopping; }

bool detail::loop::start_op(io_context& ctx, op_base& op) {
  io_context::impl& m = *ctx.impl_;
  if (m.stopping) {
    op.result_ = -ECANCELED;
    return false;
  }
  op.ctx_ = &ctx;
  ++m.in_flight;
  m.submit_op(op);
  return true;
}

void detail::loop::cancel_op(io_context& ctx, op_base& op) noexcept {
  op.cancel_requested_ = true;
  if (op.waiting_for_timer_ || ctx.impl_->cancel_from_backlog(op)) return;
  ctx.impl_->cancel_now(op);
}

void detail::loop::schedule(io_context& ctx, ready_node& node) noexcept { ctx.impl_->push_ready(node); }

bool detail::loop::call_on_loop(io_context& ctx, void (*fn)(void*) noexcept, void* arg) noexcept {
  if (current_context == &ctx) {
    fn(arg);
    return true;
  }
  io_context::impl& m = *ctx.impl_;
  try {
    std::lock_guard lock(m.remote_mutex);
    m.remote_calls.push_back({fn, arg});
  } catch (...) {
    std::fprintf(stderr, "ipcoro: out of memory queueing a cross-thread stop request\n");
    std::terminate();
  }
  const std::uint64_t one = 1;
  [[maybe_unused]] ssize_t n = ::write(m.wake_fd.get(), &one, sizeof one);
  return false;
}

bool detail::loop::driven(const io_context& ctx) noexcept {
  return ctx.impl_->driving > 0 || ctx.impl_->notify_fd;
}

void detail::loop::count_driver(io_context& ctx, int delta) noexcept { ctx.impl_->driving += delta; }

void detail::loop::sleep_at_once(io_context& ctx) noexcept {
  if (ctx.impl_->polls_skipped == 0) ctx.impl_->polls_skipped = 1;
}

void detail::loop::at_turn_end(io_context& ctx, turn_end_hook& hook) noexcept {
  if (!hook.queued) hook.next_hook = std::exchange(ctx.impl_->turn_end, &hook);
  hook.queued = true;
}

bool detail::loop::end_turn_early(io_context& ctx) noexcept {
  if (ctx.impl_->turn_end == nullptr) return false;
  ctx.impl_->run_turn_end();
  return true;
}

bool detail::loop::end_turn_early_here() noexcept {
  io_context* ctx = current_context;
  return ctx != nullptr && end_turn_early(*ctx);
}

void detail::loop::hold_work(io_context& ctx) noexcept { ++ctx.impl_->external_work; }
void detail::loop::release_work(io_context& ctx) noexcept { --ctx.impl_->external_work; }

void detail::loop::forget_calls(io_context& ctx, void* arg) noexcept {
  io_context::impl& m = *ctx.impl_;
  std::lock_guard lock(m.remote_mutex);
  std::erase_if(m.remote_calls, [arg](const io_context::impl::remote_call& c) { return c.arg == arg; });
}

}  // namespace ipcoro
