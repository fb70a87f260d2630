// SPDX-License-Identifier: MIT
// The ring endpoints: attaching and leaving, the operations' fast paths, the public ends.
#include "ring/endpoint.hpp"

#include "liveness.hpp"
#include "loop.hpp"
#include "ring/checksum.hpp"

#include <fmt/core.h>

#include <atomic>
#include <cerrno>
#include <memory>
#include <system_error>
#include <utility>

namespace ipcoro {

peer_died::peer_died(pid_t pid, const std::string& what)
    : std::system_error(ECONNRESET, std::system_category(), what), pid_(pid) {}

namespace detail {

ring_endpoint::ring_endpoint(std::span<std::byte> region, std::uint32_t kind, std::uint32_t role,
                             const ring_options& options)
    : ring_protocol(region, kind, role, options.manual_ack), options_(options), spin_budget_(options.spin) {
  if (options_.liveness_check_interval <= std::chrono::milliseconds::zero()) {
    options_.liveness_check_interval = std::chrono::milliseconds(1);
  }
  attach();
}

void ring_endpoint::attach() {
  identity_ = pack_participant(self_pid_, role_, this_process_start_time());
  fenceless_ = asymmetric_barrier_registered();
  // A process that cannot issue membarrier() makes every waker fence. (A waker that
  // published without a fence just before seeing this delays that one wake-up by at most
  // a peer check interval.)
  if (!fenceless_) raise_fence_mode(fence_requested);
  cpu_tag_ = current_cpu_tag();
  hdr_->cpu[role_ == role_sender ? 0 : 1].store(cpu_tag_, std::memory_order_relaxed);
  if (kind_ == kind_spsc) {
    attach_spsc();
  } else {
    attach_mpmc();
  }
}

void ring_endpoint::attach_spsc() {
  const int index = role_ == role_sender ? 0 : 1;
  participant_word& entry = hdr_->participants[index];
  std::uint64_t current = entry.load(std::memory_order_acquire);
  for (;;) {
    if (current != 0 && participant_alive(current)) {
      throw std::system_error(EBUSY, std::system_category(),
                              fmt::format("spsc_ring_{}: the ring already has a {}: process {} is alive",
                                          role_name(), role_name(), participant_pid(current)));
    }
    if (entry.compare_exchange_weak(current, identity_, std::memory_order_acq_rel)) break;
  }
  participant_index_ = index;
  const std::uint64_t head = hdr_->head.load(std::memory_order_acquire);
  const std::uint64_t tail = hdr_->tail.load(std::memory_order_acquire);
  if (head > tail || tail - head > capacity_ || head % 8 != 0 || tail % 8 != 0) {
    detach();
    throw_corrupt(fmt::format("positions {} (receiver) and {} (sender) do not fit a ring of {} bytes", head,
                              tail, capacity_));
  }
  if (role_ == role_sender) {
    hdr_->sender_closed.store(0, std::memory_order_release);
    tail_ = tail;
    published_tail_ = tail;
    head_cache_ = head;
  } else {
    hdr_->receiver_closed.store(0, std::memory_order_release);
    read_pos_ = head;  // resume after the last acknowledged message
    tail_cache_ = head;
  }
}

void ring_endpoint::attach_mpmc() {
  // A dead process's entry is the only evidence that it was attached: a receiver that took
  // over the entry of the ring's last (killed) sender would find no sender recorded, take
  // that for "no sender attached yet" (dead_peer) and sleep until its own timeout instead of
  // throwing peer_died. So take a free entry first, then one left by a dead process of this
  // side, and one of the other side only when the table holds no other choice and that side
  // keeps another entry.
  const auto role_recorded_elsewhere = [this](int except, std::uint32_t role) {
    for (int j = 0; j < static_cast<int>(participant_count); ++j) {
      const std::uint64_t v = hdr_->participants[j].load(std::memory_order_acquire);
      if (j != except && v != 0 && participant_role(v) == role) return true;
    }
    return false;
  };
  for (int pass = 0; pass < 3; ++pass) {
    for (int i = 0; i < static_cast<int>(participant_count); ++i) {
      participant_word& entry = hdr_->participants[i];
      std::uint64_t current = entry.load(std::memory_order_acquire);
      for (;;) {
        if (current != 0) {
          if (pass == 0) break;
          const bool own_side = participant_role(current) == role_;
          if (pass == 1 && !own_side) break;
          if (!own_side && !role_recorded_elsewhere(i, participant_role(current))) break;
          if (participant_alive(current)) break;
        }
        if (entry.compare_exchange_weak(current, identity_, std::memory_order_seq_cst)) {
          participant_index_ = i;
          // After the entry (see leave_receiving): the receiving side is open again.
          if (role_ == role_receiver) hdr_->receiver_closed.store(0, std::memory_order_seq_cst);
          return;
        }
      }
    }
  }
  throw std::system_error(
      EUSERS, std::system_category(),
      fmt::format("mpmc_ring_{}: the ring's table of {} attached endpoints is full (all alive, or "
                  "the last record of a dead other side); "
                  "detach some first",
                  role_name(), participant_count));
}

void ring_endpoint::detach() noexcept {
  if (participant_index_ < 0) return;
  if (kind_ == kind_spsc && role_ == role_sender) publish_held();
  std::uint64_t expected = identity_;
  hdr_->participants[participant_index_].compare_exchange_strong(expected, 0, std::memory_order_acq_rel);
  participant_index_ = -1;
}

bool ring_endpoint::receiver_recorded() const noexcept {
  for (const participant_word& entry : hdr_->participants) {
    const std::uint64_t v = entry.load(std::memory_order_seq_cst);
    if (v != 0 && participant_role(v) == role_receiver) return true;
  }
  return false;
}

void ring_endpoint::leave_receiving() noexcept {
  if (participant_index_ < 0) return;
  std::uint64_t expected = identity_;
  hdr_->participants[participant_index_].compare_exchange_strong(expected, 0, std::memory_order_seq_cst);
  participant_index_ = -1;
  // Dekker with attach(), which records its entry and then clears the flag: if the second
  // look misses a receiver attaching now, that receiver's clear comes after our store. Of
  // two receivers leaving at once, at least one sees the other gone. A receiver recorded
  // but dead keeps the flag down: its senders learn of the death (peer_died) instead.
  if (receiver_recorded()) return;
  hdr_->receiver_closed.store(1, std::memory_order_seq_cst);
  if (receiver_recorded()) {
    hdr_->receiver_closed.store(0, std::memory_order_seq_cst);
    return;
  }
  notify(hdr_->space);
}

void ring_endpoint::close() noexcept {
  if (kind_ == kind_mpmc) {
    hdr_->sender_closed.store(1, std::memory_order_release);
    notify(hdr_->data);
    notify(hdr_->space);
    return;
  }
  if (participant_index_ < 0) return;
  if (role_ == role_sender) {
    drop_reserved();  // an open loan is never published after the close
    publish_held();
    // After the last tail store: a receiver that sees the flag sees every message (and
    // the end check, which vouches that this close, at this position, set it).
    if (checked_) hdr_->end_check.store(end_mark(tail_), std::memory_order_relaxed);
    hdr_->sender_closed.store(1, std::memory_order_release);
    notify(hdr_->data);
  } else {
    hdr_->receiver_closed.store(1, std::memory_order_release);
    notify(hdr_->space);
  }
  detach();
}

void ring_endpoint::ack() noexcept {
  if (kind_ == kind_spsc && role_ == role_receiver) release_read_position();
}

void ring_endpoint::ack_through(std::uint64_t position) noexcept {
  if (kind_ != kind_spsc || role_ != role_receiver || position > read_pos_) return;
  if (position <= hdr_->head.load(std::memory_order_relaxed)) return;  // only the receiver moves it
  hdr_->head.store(position, std::memory_order_release);
  notify(hdr_->space);
}

}  // namespace detail

// ---- operations ----

namespace {
using detail::kind_mpmc;
using detail::kind_spsc;
using detail::role_receiver;
using detail::role_sender;

[[noreturn]] void throw_no_endpoint(const char* what) {
  throw std::system_error(
      EBADF, std::system_category(),
      fmt::format("{} on an empty ring endpoint (default-constructed or moved from)", what));
}

/// Ends an operation's finished wait: its frame goes back to the pool, and what ended the
/// wait (an error, a timeout, a cancellation) is rethrown.
void end_wait(task<>& pending) {
  const task<> wait = std::move(pending);
  wait.handle().promise().take_result();
}
}  // namespace

bool ring_send_operation::await_ready() {
  if (endpoint_ == nullptr) throw_no_endpoint("ring send");
  return endpoint_->try_send(message_) == detail::ring_endpoint::outcome::done;
}

bool ring_send_operation::suspend(std::coroutine_handle<> h, std::stop_token token) {
  return endpoint_->start_send_wait(*this, h, std::move(token));
}

void ring_send_operation::await_resume() {
  if (wait_.valid()) end_wait(wait_);  // else done without sleeping
}

bool ring_receive_operation::await_ready() {
  if (endpoint_ == nullptr) throw_no_endpoint("ring receive");
  auto r = endpoint_->try_receive(buffer_, size_);
  // Found empty: once this thread's loop published what it held for its turn's end (the
  // sender may be on this thread), look again before making a wait.
  if (r == detail::ring_endpoint::outcome::would_block && detail::loop::end_turn_early_here())
    r = endpoint_->try_receive(buffer_, size_);
  end_of_stream_ = r == detail::ring_endpoint::outcome::end_of_stream;
  return r != detail::ring_endpoint::outcome::would_block;
}

bool ring_receive_operation::suspend(std::coroutine_handle<> h, std::stop_token token) {
  return endpoint_->start_receive_wait(*this, h, std::move(token));
}

std::optional<std::size_t> ring_receive_operation::await_resume() {
  if (wait_.valid()) end_wait(wait_);
  if (end_of_stream_) return std::nullopt;
  return size_;
}

bool ring_loan_operation::await_ready() {
  if (endpoint_ == nullptr) throw_no_endpoint("ring loan");
  return endpoint_->try_reserve(size_, space_) == detail::ring_endpoint::outcome::done;
}

bool ring_loan_operation::suspend(std::coroutine_handle<> h, std::stop_token token) {
  return endpoint_->start_loan_wait(*this, h, std::move(token));
}

void ring_loan_operation::finish_wait() { end_wait(wait_); }

void ring_loan::commit(std::size_t size) {
  if (endpoint_ == nullptr) throw_no_endpoint("ring loan commit");
  endpoint_->commit_reserved(size);  // throws (and keeps the loan) for a size above it
  endpoint_ = nullptr;
}

void ring_loan::drop_open() noexcept {
  endpoint_->drop_reserved();
  endpoint_ = nullptr;
}

bool ring_view_operation::attempt() {
  auto r = endpoint_->try_peek(bytes_);
  if (r == detail::ring_endpoint::outcome::would_block && detail::loop::end_turn_early_here())
    r = endpoint_->try_peek(bytes_);  // as in ring_receive_operation::await_ready
  end_of_stream_ = r == detail::ring_endpoint::outcome::end_of_stream;
  end_ = endpoint_->read_position();
  return r != detail::ring_endpoint::outcome::would_block;
}

bool ring_view_operation::await_ready() {
  if (endpoint_ == nullptr) throw_no_endpoint("ring receive_view");
  return attempt();
}

bool ring_view_operation::suspend(std::coroutine_handle<> h, std::stop_token token) {
  return endpoint_->start_view_wait(*this, h, std::move(token));
}

void ring_view_operation::finish_wait() { end_wait(wait_); }

void ring_view::release_open() noexcept {
  endpoint_->release_peeked(end_);
  endpoint_ = nullptr;
}

// ---- endpoints ----

template <ring_kind Kind, ring_role Role>
basic_ring_end<Kind, Role>::basic_ring_end() noexcept = default;

template <ring_kind Kind, ring_role Role>
basic_ring_end<Kind, Role>::basic_ring_end(std::span<std::byte> region, const ring_options& options)
    : endpoint_(std::make_unique<detail::ring_endpoint>(region, spsc ? kind_spsc : kind_mpmc,
                                                        sender ? role_sender : role_receiver, options)) {}

template <ring_kind Kind, ring_role Role>
basic_ring_end<Kind, Role>::basic_ring_end(basic_ring_end&&) noexcept = default;

template <ring_kind Kind, ring_role Role>
basic_ring_end<Kind, Role>& basic_ring_end<Kind, Role>::operator=(basic_ring_end&& other) noexcept {
  if (this != &other) {
    if constexpr (spsc) close();
    endpoint_ = std::move(other.endpoint_);  // an MPMC end detaches as its endpoint goes
    uncaught_ = other.uncaught_;
  }
  return *this;
}

template <ring_kind Kind, ring_role Role>
basic_ring_end<Kind, Role>::~basic_ring_end() {
  if constexpr (spsc && sender) {
    if (std::uncaught_exceptions() > uncaught_) {
      abort();
    } else {
      close();
    }
  } else if constexpr (spsc) {
    close();
  }
}

template <ring_kind Kind, ring_role Role>
void basic_ring_end<Kind, Role>::ack_all() noexcept {
  if (endpoint_) endpoint_->ack();
}

template <ring_kind Kind, ring_role Role>
std::uint64_t basic_ring_end<Kind, Role>::read_position() const noexcept {
  return endpoint_ ? endpoint_->read_position() : 0;
}

template <ring_kind Kind, ring_role Role>
void basic_ring_end<Kind, Role>::ack_through(std::uint64_t position) noexcept {
  if (endpoint_) endpoint_->ack_through(position);
}

template <ring_kind Kind, ring_role Role>
void basic_ring_end<Kind, Role>::close() noexcept {
  if (endpoint_) endpoint_->close();
}

template <ring_kind Kind, ring_role Role>
void basic_ring_end<Kind, Role>::detach() noexcept {
  if constexpr (spsc) {
    if (endpoint_) endpoint_->detach();
  } else {
    endpoint_.reset();
  }
}

template <ring_kind Kind, ring_role Role>
void basic_ring_end<Kind, Role>::abort_end() noexcept {
  if (!endpoint_) return;
  endpoint_->abort();
  endpoint_.reset();
}

template <ring_kind Kind, ring_role Role>
void basic_ring_end<Kind, Role>::hold_end() noexcept {
  if (endpoint_) endpoint_->hold_publication();
}

template <ring_kind Kind, ring_role Role>
void basic_ring_end<Kind, Role>::publish_end() noexcept {
  if (endpoint_) endpoint_->publish_held();
}

template <ring_kind Kind, ring_role Role>
void basic_ring_end<Kind, Role>::leave_end() noexcept {
  if (!endpoint_) return;
  endpoint_->leave_receiving();
  endpoint_.reset();
}

template <ring_kind Kind, ring_role Role>
std::size_t basic_ring_end<Kind, Role>::max_message_size() const noexcept {
  return endpoint_ ? endpoint_->max_message() : 0;
}

template <ring_kind Kind, ring_role Role>
std::size_t basic_ring_end<Kind, Role>::capacity() const noexcept {
  return endpoint_ ? endpoint_->capacity() : 0;
}

template <ring_kind Kind, ring_role Role>
ring_checksum basic_ring_end<Kind, Role>::checksum() const noexcept {
  return endpoint_ && endpoint_->record_checks() ? ring_checksum::xxh3 : ring_checksum::none;
}

template class basic_ring_end<ring_kind::spsc, ring_role::sender>;
template class basic_ring_end<ring_kind::spsc, ring_role::receiver>;
template class basic_ring_end<ring_kind::mpmc, ring_role::sender>;
template class basic_ring_end<ring_kind::mpmc, ring_role::receiver>;

}  // namespace ipcoro
