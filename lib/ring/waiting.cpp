// SPDX-License-Identifier: MIT
// The rings' waiting: spinning, sleeping on the futex words, and checking that peers live.
#include "ring/endpoint.hpp"

#include "ipcoro/error.hpp"
#include "ipcoro/futex.hpp"

#include "liveness.hpp"
#include "loop.hpp"

#include <fmt/core.h>
#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>

namespace ipcoro::detail {

namespace {

// The room a spinning SPSC sender waits for once the ring was full (at most a quarter of it).
constexpr std::uint64_t spin_batch_bytes = std::uint64_t{32} * 1024;

inline void cpu_relax() noexcept {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield" ::: "memory");
#endif
}

}  // namespace

bool participant_alive(std::uint64_t v) noexcept {
  return v != 0 && pid_alive(participant_pid(v), participant_start(v), start_mask);
}

std::int32_t current_cpu_tag() noexcept {
  const int cpu = ::sched_getcpu();
  return cpu < 0 ? 0 : cpu + 1;
}

bool ring_endpoint::slot_owner_alive(std::uint32_t pid) const noexcept {
  for (const participant_word& entry : hdr_->participants) {
    const std::uint64_t v = entry.load(std::memory_order_acquire);
    if (v != 0 && static_cast<std::uint32_t>(participant_pid(v)) == pid) {
      return pid_alive(static_cast<pid_t>(pid), participant_start(v), start_mask);
    }
  }
  return pid_running(static_cast<pid_t>(pid));
}

pid_t ring_endpoint::dead_peer() {
  const std::uint32_t peer_role = role_ == role_sender ? role_receiver : role_sender;
  if (kind_ == kind_spsc) {
    participant_word& entry = hdr_->participants[role_ == role_sender ? 1 : 0];
    std::uint64_t v = entry.load(std::memory_order_acquire);
    if (v == 0) {
      // No peer attached: not yet, or never.
      if (!peer_claims_gone()) return 0;
      // A process that attached, and then let its claim go, did so in that order: seen now.
      v = entry.load(std::memory_order_seq_cst);
      if (v == 0) return peer_never_came;
    }
    if (participant_alive(v)) return 0;
    return participant_pid(v);
  }
  if (role_ == role_receiver) {
    // A sender killed between claiming a slot and publishing it blocks every receiver at
    // that position: mark its message abandoned so that receivers skip it.
    const std::uint64_t pos = hdr_->head.load(std::memory_order_relaxed);
    slot_header& s = slot_at(pos);
    std::uint64_t w = s.word.load(std::memory_order_acquire);
    if (slot_seq(w) == static_cast<std::uint32_t>(pos) && slot_owner(w) != 0 &&
        !slot_owner_alive(slot_owner(w))) {
      if (s.word.compare_exchange_strong(w, make_slot_word(static_cast<std::uint32_t>(pos + 1), 0, true),
                                         std::memory_order_acq_rel)) {
        notify(hdr_->data);
      }
    }
  } else {
    // A receiver killed while copying a message out holds its slot: free it (the message
    // went with the receiver). Killed before it moved the head past its claim, it leaves
    // that to the next receiver; with none there, the tail would lap the head by one once
    // the slot is free. Move the head on first, as a receiver that saw the claim would.
    const std::uint64_t pos = hdr_->tail.load(std::memory_order_relaxed);
    slot_header& s = slot_at(pos);
    std::uint64_t w = s.word.load(std::memory_order_acquire);
    if (slot_seq(w) == static_cast<std::uint32_t>(pos - capacity_ + 1) && slot_owner(w) != 0 &&
        !slot_owner_alive(slot_owner(w))) {
      std::uint64_t claimed = pos - capacity_;
      hdr_->head.compare_exchange_strong(claimed, claimed + 1, std::memory_order_seq_cst);
      if (s.word.compare_exchange_strong(w, make_slot_word(static_cast<std::uint32_t>(pos), 0),
                                         std::memory_order_acq_rel)) {
        notify(hdr_->space);
      }
    }
  }
  const auto scan = [this, peer_role](bool& recorded) -> pid_t {
    pid_t dead = 0;
    recorded = false;
    for (const participant_word& entry : hdr_->participants) {
      const std::uint64_t v = entry.load(std::memory_order_seq_cst);
      if (v == 0 || participant_role(v) != peer_role) continue;
      recorded = true;
      if (participant_alive(v)) return 0;
      dead = participant_pid(v);
    }
    return dead;
  };
  bool recorded = false;
  const pid_t dead = scan(recorded);
  if (recorded || !peer_claims_gone()) return dead;
  // As for SPSC: a process that attached before letting its claim go is seen now.
  const pid_t again = scan(recorded);
  return recorded ? again : peer_never_came;
}

bool ring_endpoint::peer_claims_gone() const noexcept {
  return options_.peer_claim_fd >= 0 && write_ends_closed(options_.peer_claim_fd);
}

// ---- waiting ----

std::uint32_t ring_endpoint::prepare_sleep(event_count& ev) noexcept {
  const std::uint32_t key = announce_sleeper(ev);
  full_fence();
  // A waker that publishes without a fence may still hold its position in its store
  // buffer, and may have read the futex word before the bit was set: membarrier() runs a
  // fence on it, so that after it the waker either sees the bit or its position is visible.
  // Once fences are in force, every waker fences: the classic pairing with ours above.
  const std::uint32_t mode = hdr_->fence_required.load(std::memory_order_acquire);
  if (mode == fence_in_force || !fenceless_) return key;
  if (asymmetric_barrier()) {
    if (mode == fence_requested) raise_fence_mode(fence_in_force);
  } else {
    // membarrier() failed (a seccomp filter, say): fence like a process without it.
    fenceless_ = false;
    raise_fence_mode(fence_requested);
  }
  return key;
}

void ring_endpoint::note_wait(clock::time_point now) noexcept {
  // Request/response traffic sleeps after every message or two; streaming sleeps rarely.
  // After `sleepy_waits` waits in a row that each came soon after the last, fences per
  // message are cheaper than a membarrier() per sleep (about 1 us here, and an
  // interruption of every CPU running a registered process).
  constexpr unsigned sleepy_waits = 8;
  constexpr std::uint64_t few_messages = 64;
  constexpr auto soon = std::chrono::milliseconds(2);
  const bool short_wait = moved_ - moved_at_last_wait_ < few_messages && now - last_wait_ < soon;
  short_waits_ = short_wait ? short_waits_ + 1 : 0;
  moved_at_last_wait_ = moved_;
  last_wait_ = now;
  if (short_waits_ >= sleepy_waits && fenceless_ && options_.adaptive_fences &&
      hdr_->fence_required.load(std::memory_order_relaxed) == fence_off) {
    raise_fence_mode(fence_requested);  // the next prepare_sleep puts it in force
  }
}

bool ring_endpoint::worth_spinning() noexcept {
  const int mine = role_ == role_sender ? 0 : 1;
  const std::int32_t cpu = current_cpu_tag();
  if (cpu != cpu_tag_) {
    cpu_tag_ = cpu;
    hdr_->cpu[mine].store(cpu, std::memory_order_relaxed);
  }
  // On the same CPU the peer cannot run while this spins, nor while the loop polls.
  const std::int32_t peer = hdr_->cpu[1 - mine].load(std::memory_order_relaxed);
  if (peer == 0 || peer != cpu) return spin_budget_ > std::chrono::nanoseconds::zero();
  if (io_context* ctx = io_context::current_or_null()) loop::sleep_at_once(*ctx);
  return false;
}

template <class Attempt>
unsigned ring_endpoint::spin(Attempt attempt) {
  if (!worth_spinning()) return 0;
  // The peer may be waiting for what this thread's senders hold until the turn's end.
  loop::end_turn_early_here();
  // The clock is read only once the answer did not come within the first few polls.
  clock::time_point start{};
  for (unsigned i = 1;; ++i) {
    cpu_relax();
    if (attempt()) {
      spin_budget_ = std::min(options_.spin, spin_budget_ * 2);
      return i;
    }
    if (i % 16 == 0) {
      const auto now = clock::now();
      if (i == 16) {
        start = now;
      } else if (now - start >= spin_budget_) {
        // Did not pay off: spin less next time, but keep a floor so that it can recover.
        spin_budget_ = std::max(options_.spin / 16, spin_budget_ / 2);
        return 0;
      }
    }
  }
}

void ring_endpoint::throw_peer_died(pid_t dead, const char* waiting) const {
  const char* peer = role_ == role_sender ? "receiver" : "sender";
  if (dead == peer_never_came) {
    throw peer_died(0,
                    fmt::format("{} ring {}: no {} is attached and none can attach any more: every process "
                                "that could take that end (of a channel_link) has exited or let it go",
                                kind_name(), waiting, peer));
  }
  if (role_ == role_sender) {
    throw peer_died(dead,
                    fmt::format("{} ring send: peer process {} died (it was the ring's {}receiver) while "
                                "this waited for space",
                                kind_name(), dead, kind_ == kind_mpmc ? "last " : ""));
  }
  throw peer_died(dead,
                  fmt::format("{} ring receive: peer process {} died (it was the ring's {}sender) without "
                              "closing the ring",
                              kind_name(), dead, kind_ == kind_mpmc ? "last " : ""));
}

template <class Attempt>
task<> ring_endpoint::sleep_on(pooled_frame, event_count& ev, clock::time_point deadline, bool watch_peer,
                               const char* waiting, Attempt attempt) {
  pid_t dead = 0;
  for (;;) {
    const std::uint32_t key = prepare_sleep(ev);
    if (attempt()) {
      withdraw_sleep(ev, key);
      co_return;
    }
    // A ring a peer scribbled on can look full or empty forever: each time this side goes
    // to sleep, and after each liveness check, make sure that its state is one it can be in.
    if (kind_ == kind_mpmc) mpmc_validate_here();
    // Dead and drained (receive): it can send no more, and everything it sent has been received.
    if (dead != 0) throw_peer_died(dead, waiting);
    const auto now = clock::now();
    if (now >= deadline) throw timed_out{};
    const auto wait = std::min<std::chrono::nanoseconds>(options_.liveness_check_interval, deadline - now);
    if (co_await futex_wait(ev.seq, key, wait) == futex_wait_result::timed_out && watch_peer) {
      dead = dead_peer();
    }
  }
}

void ring_endpoint::withdraw_sleep(event_count& ev, std::uint32_t key) noexcept {
  // SPSC only: the bit is this side's alone, so taking it back spares the other side one
  // futex_wake. On MPMC another sleeper may wait on the same value: leave it to the waker.
  if (kind_ != kind_spsc) return;
  std::uint32_t expected = key;
  ev.seq.compare_exchange_strong(expected, key & ~sleeper_bit, std::memory_order_relaxed);
}

template <class Attempt>
bool ring_endpoint::wait_for_room(task<>& wait, clock::time_point deadline, std::coroutine_handle<> h,
                                  std::stop_token token, Attempt attempt) {
  // A sender that went on as soon as one record's room was free would write into the lines
  // the receiver is reading at that moment, and both would stall on every line: while
  // spinning, wait until a batch's room is free (the sleeping path takes any room).
  const std::uint64_t batch =
      kind_ == kind_spsc ? std::min<std::uint64_t>(capacity_ / 4, spin_batch_bytes) : 0;
  if (spin([&] {
        if (batch != 0 && tail_ - hdr_->head.load(std::memory_order_relaxed) > capacity_ - batch)
          return false;
        return attempt();
      }) != 0) {
    return false;
  }
  note_wait(clock::now());
  const bool watch_peer = !(kind_ == kind_spsc && options_.wait_for_new_receiver);
  wait = sleep_on(pooled_frame{}, hdr_->space, deadline, watch_peer, "send", attempt);
  return start_wait(wait, h, std::move(token));
}

template <class Attempt>
bool ring_endpoint::wait_for_data(task<>& wait, clock::time_point deadline, std::coroutine_handle<> h,
                                  std::stop_token token, Attempt attempt) {
  if (spin([&] {
        prefetch_next_record();
        return attempt();
      }) != 0) {
    return false;
  }
  note_wait(clock::now());
  wait = sleep_on(pooled_frame{}, hdr_->data, deadline, true, "receive", attempt);
  return start_wait(wait, h, std::move(token));
}

bool ring_endpoint::start_send_wait(ring_send_operation& op, std::coroutine_handle<> h,
                                    std::stop_token token) {
  const clock::time_point deadline = deadline_of(op);  // the send first has to wait here
  return wait_for_room(op.wait_, deadline, h, std::move(token),
                       [this, &op] { return try_send(op.message_) == outcome::done; });
}

bool ring_endpoint::start_loan_wait(ring_loan_operation& op, std::coroutine_handle<> h,
                                    std::stop_token token) {
  const clock::time_point deadline = deadline_of(op);  // the loan first has to wait here
  return wait_for_room(op.wait_, deadline, h, std::move(token),
                       [this, &op] { return try_reserve(op.size_, op.space_) == outcome::done; });
}

bool ring_endpoint::start_receive_wait(ring_receive_operation& op, std::coroutine_handle<> h,
                                       std::stop_token token) {
  const clock::time_point deadline = deadline_of(op);  // the receive first has to wait here
  return wait_for_data(op.wait_, deadline, h, std::move(token), [this, &op] {
    const outcome r = try_receive(op.buffer_, op.size_);
    op.end_of_stream_ = r == outcome::end_of_stream;
    return r != outcome::would_block;
  });
}

bool ring_endpoint::start_view_wait(ring_view_operation& op, std::coroutine_handle<> h,
                                    std::stop_token token) {
  const clock::time_point deadline = deadline_of(op);  // the view first has to wait here
  return wait_for_data(op.wait_, deadline, h, std::move(token), [&op] { return op.attempt(); });
}

bool ring_endpoint::start_wait(task<>& wait, std::coroutine_handle<> h, std::stop_token token) {
  detail::task_promise<void>& p = wait.handle().promise();
  p.adopt_stop_token(std::move(token));
  return p.start_for(h, wait.handle());
}

}  // namespace ipcoro::detail
