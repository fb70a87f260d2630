// SPDX-License-Identifier: MIT
// ring_endpoint: one attached side of a ring, its participant record, and its waits.
#pragma once

#include "ipcoro/detail/frame_pool.hpp"
#include "ipcoro/shm_ring.hpp"
#include "ipcoro/task.hpp"
#include "ring/protocol.hpp"

#include <sys/types.h>

#include <chrono>
#include <coroutine>
#include <cstddef>
#include <cstdint>
#include <span>
#include <stop_token>

namespace ipcoro::detail {

using clock = std::chrono::steady_clock;

/// Whether the process a participant word records lives (by the rule of liveness.hpp).
bool participant_alive(std::uint64_t v) noexcept;

/// The CPU this thread runs on (+1, so that 0 means unknown); through rseq, cheap.
std::int32_t current_cpu_tag() noexcept;

class __attribute__((visibility("hidden"))) ring_endpoint : public ring_protocol {
 public:
  ring_endpoint(std::span<std::byte> region, std::uint32_t kind, std::uint32_t role,
                const ring_options& options);
  ~ring_endpoint() { detach(); }

  /// Polls `attempt` for at most the spin budget: the number of polls it took, 0 if it
  /// did not succeed (or spinning cannot pay).
  template <class Attempt>
  unsigned spin(Attempt attempt);

  bool start_send_wait(ring_send_operation& op, std::coroutine_handle<> h, std::stop_token token);
  bool start_receive_wait(ring_receive_operation& op, std::coroutine_handle<> h, std::stop_token token);
  bool start_loan_wait(ring_loan_operation& op, std::coroutine_handle<> h, std::stop_token token);
  bool start_view_wait(ring_view_operation& op, std::coroutine_handle<> h, std::stop_token token);

  void close() noexcept;
  void detach() noexcept;
  /// MPMC receivers: detaches, and closes the receiving side when no receiver is left.
  void leave_receiving() noexcept;
  /// Goes without removing this process's record, so that the other side takes the
  /// process's exit for the death of a peer.
  void abort() noexcept {
    if (kind_ == kind_spsc && role_ == role_sender) publish_held();
    participant_index_ = -1;
  }
  void ack() noexcept;
  void ack_through(std::uint64_t position) noexcept;

 private:
  /// Sleeps on `ev` until `attempt()` (one try of the waiting operation) succeeds, waking
  /// at least every peer check interval (then, when `watch_peer`, looking for a dead peer)
  /// and giving up with timed_out at `deadline`. Runs on the core's pooled frames: no
  /// allocation once the pool is warm.
  template <class Attempt>
  task<> sleep_on(pooled_frame, event_count& ev, clock::time_point deadline, bool watch_peer,
                  const char* waiting, Attempt attempt);
  /// The slow path of a sender's operation: spins (for a batch's room), then sleeps on the
  /// space word until `attempt()` succeeds; true when `h` must suspend.
  template <class Attempt>
  bool wait_for_room(task<>& wait, clock::time_point deadline, std::coroutine_handle<> h,
                     std::stop_token token, Attempt attempt);
  /// The same for a receiver's operation, on the data word.
  template <class Attempt>
  bool wait_for_data(task<>& wait, clock::time_point deadline, std::coroutine_handle<> h,
                     std::stop_token token, Attempt attempt);
  /// Starts `wait` for the operation awaited by `h`: true when `h` must suspend.
  static bool start_wait(task<>& wait, std::coroutine_handle<> h, std::stop_token token);

  void attach();
  void attach_spsc();
  void attach_mpmc();
  /// The sleeper's half: announce on `ev`, then make every waker's earlier publication
  /// visible here. Returns the value to wait on.
  std::uint32_t prepare_sleep(event_count& ev) noexcept;
  /// Counts a wait starting `now`; asks for fence mode when this side sleeps often.
  void note_wait(clock::time_point now) noexcept;
  /// When the operation's wait must end (time_point::max(): never). Called where it first
  /// has to wait, so that a timeout counts from there; reads the clock only for a timeout.
  template <class Operation>
  static clock::time_point deadline_of(const Operation& op) noexcept {
    return op.limit_.resolve();
  }
  /// Takes back the announcement of a sleep that turned out not to be needed.
  void withdraw_sleep(event_count& ev, std::uint32_t key) noexcept;
  /// Whether spinning can pay: a budget is left and the other side last ran on another CPU.
  bool worth_spinning() noexcept;
  /// After a sleep timed out: the pid of a dead peer when the other side is gone (every
  /// process recorded for it died without closing), else 0. For MPMC it first releases a
  /// slot that blocks this side and is held by a dead process.
  pid_t dead_peer();
  /// dead_peer(): the other side has no record, and no process can attach as it any more.
  static constexpr pid_t peer_never_came = -1;
  /// Whether every process that could still attach as the other side is gone
  /// (ring_options::peer_claim_fd hung up); false without a claim descriptor.
  bool peer_claims_gone() const noexcept;
  /// The peer_died for a wait that dead_peer() answered with `dead`.
  [[noreturn]] void throw_peer_died(pid_t dead, const char* waiting) const;
  bool slot_owner_alive(std::uint32_t pid) const noexcept;
  /// Whether the table records a receiver, alive or not.
  bool receiver_recorded() const noexcept;

  ring_options options_;
  std::uint64_t identity_ = 0;  // our participant word
  int participant_index_ = -1;  // -1: detached
  std::chrono::nanoseconds spin_budget_;
  // How often this side sleeps: messages it moved (ring_protocol::moved_), and the last wait's start.
  std::uint64_t moved_at_last_wait_ = 0;
  clock::time_point last_wait_{};
  unsigned short_waits_ = 0;  // consecutive waits soon after the previous one
  std::int32_t cpu_tag_ = 0;  // what this side last wrote into hdr_->cpu
};

/// The library's own way to a ring end's endpoint: a channel over an SPSC ring reserves,
/// commits and holds publication on it directly, without the public ring_loan objects.
struct ring_access {
  /// Null for an empty end (moved from, or aborted).
  template <ring_kind Kind, ring_role Role>
  static ring_endpoint* endpoint(basic_ring_end<Kind, Role>& end) noexcept {
    return end.endpoint_.get();
  }
  template <ring_kind Kind, ring_role Role>
  static const ring_endpoint* endpoint(const basic_ring_end<Kind, Role>& end) noexcept {
    return end.endpoint_.get();
  }
};

}  // namespace ipcoro::detail
