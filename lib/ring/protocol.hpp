// SPDX-License-Identifier: MIT
// The rings' protocol: non-blocking send and receive of both kinds, fences and wake-ups.
#pragma once

#include "ring/layout.hpp"
#include "truncation_guard.hpp"

#include <sys/types.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <system_error>

namespace ipcoro::detail {

/// A seq_cst fence. On x86-64 a locked no-op RMW on the stack orders exactly like mfence
/// for ordinary memory and costs less (it is Linux's smp_mb() there); it runs once per
/// message on each side.
inline void full_fence() noexcept {
#if defined(__x86_64__) && !defined(__SANITIZE_THREAD__)
  asm volatile("lock orq $0, (%%rsp)" ::: "memory", "cc");
#else
  std::atomic_thread_fence(std::memory_order_seq_cst);
#endif
}

/// The waker's half, after it published its position (and ordered that before this):
/// wakes the sleepers on `ev` if one announced itself since the last wake.
void wake_announced(event_count& ev) noexcept;

/// The sleeper's half: sets the bit (unless set) and returns the value to wait on. Must be
/// followed by a full fence (and, for fenceless wakers, the asymmetric barrier) before the
/// sleeper looks at the ring again.
std::uint32_t announce_sleeper(event_count& ev) noexcept;

/// Whether this process takes part in the asymmetric barrier: registered for
/// MEMBARRIER_CMD_GLOBAL_EXPEDITED (Linux 4.16), so that a sleeper's membarrier() executes a
/// full fence on this process's threads wherever they run. Asked once per process; the
/// environment variable IPCORO_RING_NO_MEMBARRIER (anything but "" or "0") makes the process
/// behave as if membarrier were missing (its rings then fence on every message).
bool asymmetric_barrier_registered() noexcept;

/// A full fence on every running thread of every registered process (and this one).
bool asymmetric_barrier() noexcept;

[[noreturn]] void throw_corrupt(const std::string& what);
[[noreturn]] void throw_invalid(const std::string& what);
void check_region(std::span<std::byte> region, std::size_t minimum, const char* what);
/// What the header of the ring in `region` says about checksums, unvalidated (attaching
/// validates it): for refusing an end that disagrees before it attaches.
ring_checksum ring_checksum_of(std::span<const std::byte> region) noexcept;

/// One side of a ring in a region: the geometry copied out and checked on attach, this
/// side's private positions, and the non-blocking send and receive of both kinds. It never
/// waits; ring_endpoint adds the sleeping, the liveness checks and the participant table.
class __attribute__((visibility("hidden"))) ring_protocol {
 public:
  enum class outcome : unsigned char { done, would_block, end_of_stream };

  /// Validates the ring in `region` (EINVAL naming what mismatched) and copies its geometry.
  ring_protocol(std::span<std::byte> region, std::uint32_t kind, std::uint32_t role, bool manual_ack);
  ring_protocol(const ring_protocol&) = delete;
  ring_protocol& operator=(const ring_protocol&) = delete;

  /// Both: after a truncation_guard absorbed a fault in this ring's file, the error that
  /// says so (EBADMSG), whatever the operation read or wrote in the zeros.
  outcome try_send(std::span<const std::byte> message) {
    return attempt([&] { return kind_ == kind_spsc ? spsc_try_send(message) : mpmc_try_send(message); });
  }
  outcome try_receive(std::span<std::byte> buffer, std::size_t& size) {
    return attempt(
        [&] { return kind_ == kind_spsc ? spsc_try_receive(buffer, size) : mpmc_try_receive(buffer, size); });
  }

  /// SPSC sender: room for a message of `size` bytes, not published: `space` is exactly
  /// where its payload goes. A reserve that wraps writes the padding record as try_send
  /// does; nothing is visible to the receiver until commit_reserved() moves the tail.
  /// While it is open, try_send and try_reserve throw EBUSY. Throws as try_send does.
  outcome try_reserve(std::size_t size, std::span<std::byte>& space);
  /// Publishes the first `length` bytes of the open reservation (EINVAL when more than it
  /// holds, naming both); with checks the record's check is computed over them now.
  void commit_reserved(std::size_t length);
  /// Gives the open reservation up: nothing is published.
  void drop_reserved() noexcept { loan_open_ = false; }
  /// Writes the `size` bytes of a message.
  using write_fn = void (*)(void* context, std::span<std::byte> out);
  /// SPSC sender: try_reserve, `write(context, space)` and commit_reserved in one call (no
  /// reservation stays open): the channel's path for a message that fits now. When `write`
  /// throws, nothing is published. Throws as try_reserve does.
  outcome try_write(std::size_t size, write_fn write, void* context);
  /// SPSC sender: one message made of the 8 bytes of `head` followed by `payload`, in one
  /// call (a channel's frame of a value that is its bytes). Throws as try_reserve does.
  outcome try_write_headed(std::uint64_t head, std::span<const std::byte> payload);
  bool reservation_open() const noexcept { return loan_open_; }
  /// SPSC sender: the next sends and commits are written but not published (the tail does
  /// not move) until publish_held(), until they reach held_publish_limit bytes, or until a
  /// send finds the ring full (which publishes them first: only the receiver frees room).
  /// One tail store and wake-up check per batch instead of per message.
  void hold_publication() noexcept { holding_ = kind_ == kind_spsc; }
  /// SPSC sender: publishes what is held, and sends publish at once again.
  void publish_held() noexcept {
    holding_ = false;
    if (tail_ != published_tail_) publish_tail();
  }
  /// SPSC receiver: the next message in place: `view` points into the ring, valid until
  /// release_peeked() or the next try_receive / try_peek, which release it first. Its
  /// space is not given back to the sender before then (with manual_ack: before ack).
  outcome try_peek(std::span<const std::byte>& view);
  /// Releases the message try_peek() gave, if `end` (read_position() right after it) is
  /// still the one open; anything else does nothing.
  void release_peeked(std::uint64_t end) noexcept {
    if (!peeked_ || end != read_pos_) return;
    peeked_ = false;
    if (!manual_ack_) release_read_position();
  }

  std::uint64_t read_position() const noexcept { return read_pos_; }
  std::size_t max_message() const noexcept { return max_message_; }
  std::size_t capacity() const noexcept { return capacity_; }
  /// Whether the ring's records carry checks (feature_xxh3).
  bool record_checks() const noexcept { return checked_; }

 protected:
  ~ring_protocol() = default;

  /// Where an SPSC record of `size` payload bytes goes: its offset and ring position.
  struct spsc_slot {
    std::uint64_t offset = 0;
    std::uint64_t pos = 0;
    std::size_t size = 0;
  };

  void release_read_position() noexcept;
  /// SPSC sender: moves the shared tail to tail_ and wakes a sleeping receiver.
  void publish_tail() noexcept {
    published_tail_ = tail_;
    hdr_->tail.store(tail_, std::memory_order_release);
    notify(hdr_->data);
  }
  /// Wakes the sleepers on `ev`, after this side published a position. Without a fence
  /// when this process takes part in the asymmetric barrier: the sleeper's membarrier()
  /// orders the publication for it.
  void notify(event_count& ev) noexcept {
    if (fenceless_ && hdr_->fence_required.load(std::memory_order_relaxed) == 0) {
      std::atomic_signal_fence(std::memory_order_seq_cst);
    } else {
      full_fence();
    }
    wake_announced(ev);
  }
  /// MPMC: throws EBADMSG, naming the field, if the positions, or the words of the slots at
  /// `pos`, the tail and the head, describe a state the protocol cannot reach. Each bound is
  /// checked against positions read on the side that makes it sound while others move them,
  /// and a problem is reported only when a second look finds one too: a stale read is not
  /// corruption. For slow paths only (two fences and a few loads).
  [[gnu::cold]] void mpmc_validate(std::uint64_t pos) const;
  /// mpmc_validate() at the position this side works at (the tail or the head).
  void mpmc_validate_here() const {
    mpmc_validate((role_ == role_sender ? hdr_->tail : hdr_->head).load(std::memory_order_relaxed));
  }
  /// MPMC: every `polls_per_check` fruitless attempts (spinning, or a caller
  /// polling try_send / try_receive), the ring is validated, so that one polling without
  /// ever sleeping learns of a wedged ring too.
  void note_would_block() {
    constexpr std::uint32_t polls_per_check = 256;
    if (kind_ == kind_mpmc && ++fruitless_polls_ % polls_per_check == 0) mpmc_validate_here();
  }
  /// Moves ring_header::fence_required up to `to` (never down).
  void raise_fence_mode(std::uint32_t to) noexcept;
  /// While an SPSC receiver polls an empty ring: pulls in the lines the next record will
  /// occupy together with the tail, so that both arrive in one cache-miss time.
  void prefetch_next_record() const noexcept {
    if (kind_ != kind_spsc) return;
    __builtin_prefetch(data_ + (read_pos_ & mask_));
    __builtin_prefetch(data_ + ((read_pos_ + 64) & mask_));
  }
  slot_header& slot_at(std::uint64_t pos) const noexcept {
    return *reinterpret_cast<slot_header*>(data_ + (pos & mask_) * stride_);
  }
  std::byte* slot_payload(slot_header& s) const noexcept {
    return reinterpret_cast<std::byte*>(&s) + slot_header_size;
  }
  /// An SPSC record's size for `n` bytes of header and payload: checked records start
  /// 16-aligned, so that a padding record's header always fits before the end.
  std::uint64_t align_record(std::uint64_t n) const noexcept {
    return checked_ ? (n + 15) & ~std::uint64_t{15} : align8(n);
  }
  const char* role_name() const noexcept { return role_ == role_sender ? "sender" : "receiver"; }
  const char* kind_name() const noexcept { return kind_ == kind_spsc ? "SPSC" : "MPMC"; }

  ring_header* hdr_;
  std::byte* data_;
  std::uint32_t kind_;
  std::uint32_t role_;
  std::uint64_t capacity_;  // SPSC: bytes; MPMC: slots
  std::uint64_t mask_;
  std::size_t stride_ = 0;
  std::size_t max_message_;
  pid_t self_pid_;
  // SPSC positions kept privately: only this side moves them.
  std::uint64_t tail_ = 0;            // sender: bytes written
  std::uint64_t published_tail_ = 0;  // sender: what hdr_->tail holds (tail_ unless holding_)
  std::uint64_t head_cache_ = 0;      // sender: last seen release position of the receiver
  std::uint64_t read_pos_ = 0;        // receiver: next record
  std::uint64_t tail_cache_ = 0;      // receiver: last seen tail
  std::uint64_t moved_ = 0;           // messages this side moved
  bool manual_ack_;
  bool checked_ = false;  // feature_xxh3: records carry record_check_header's check
  std::size_t record_size_ = sizeof(record_header);  // SPSC: bytes of a record's header
  bool fenceless_ = false;                           // this process is registered for the asymmetric barrier
  spsc_slot loan_{};                                 // sender: the open reservation (loan_open_)
  bool loan_open_ = false;                           // sender: a reservation is open
  bool holding_ = false;                             // sender: commits are not published yet
  bool peeked_ = false;  // receiver: try_peek() gave the record before read_pos_, unreleased
  // MPMC: attempts that found the ring full (sender) or empty (receiver), for note_would_block().
  std::uint32_t fruitless_polls_ = 0;

 private:
  /// One non-blocking try of either direction. A page of the ring's file that vanished
  /// under it (truncation) is reported as that, not as the corruption its zeros look like,
  /// and not as a success that wrote nowhere; the outcome is counted.
  template <class Try>
  outcome attempt(Try try_once) {
    outcome r;
    try {
      r = try_once();
    } catch (const std::system_error&) {
      throw_if_truncated(hdr_);
      throw;
    }
    if (truncation_faults.load(std::memory_order_relaxed) != 0) [[unlikely]]
      throw_if_truncated(hdr_);
    moved_ += r == outcome::done;
    if (r == outcome::would_block) note_would_block();
    return r;
  }
  // The halves shared with the loans are inline in ring/spsc_path.hpp.
  /// try_send's first half: the checks, the room, the padding record of a wrap.
  outcome spsc_reserve(std::size_t size, spsc_slot& slot);
  /// try_send's second half: the header (and its check) over the payload in place, the tail.
  void spsc_publish(const spsc_slot& slot, std::size_t length) noexcept;
  outcome spsc_try_send(std::span<const std::byte> message);
  /// try_receive's first half: the next data record (after padding), validated; `offset`
  /// of its header and its `length`. read_pos_ is at it.
  outcome spsc_next(std::uint64_t& offset, std::uint32_t& length);
  outcome spsc_try_receive(std::span<std::byte> buffer, std::size_t& size);
  [[noreturn, gnu::cold]] void throw_loan_open() const;
  // The error paths of the functions above (ring/spsc_path.hpp), out of line.
  [[noreturn, gnu::cold]] void throw_too_large(std::size_t size) const;
  [[noreturn, gnu::cold]] void throw_receiver_closed() const;
  [[noreturn, gnu::cold]] void throw_bad_head(std::uint64_t head) const;
  [[noreturn, gnu::cold]] void throw_bad_tail(std::uint64_t tail) const;
  [[noreturn, gnu::cold]] void throw_bad_record_header(std::uint64_t offset, std::uint64_t to_end,
                                                       std::uint64_t available) const;
  /// EBADMSG for a record whose type, or length against where it lies, is impossible.
  [[noreturn, gnu::cold]] void throw_bad_record(const record_header& rh, std::uint64_t offset,
                                                std::uint64_t to_end, std::uint64_t available) const;
  /// EOPNOTSUPP for a loan or view on an MPMC ring.
  [[noreturn]] void throw_no_loans(const char* what) const;
  /// Writes the header of a record (with its check when checked_) at `offset`, for ring position `pos`.
  void spsc_put_header(std::uint64_t offset, std::uint64_t pos, std::uint32_t length, std::uint32_t type,
                       std::span<const std::byte> payload) noexcept;
  /// With checks: EBADMSG unless ring_header::end_check vouches for an end at read_pos_.
  void spsc_check_end() const;
  /// EBADMSG naming the record at `offset` unless its check (in the header at `offset`) holds.
  void spsc_check_record(std::uint64_t offset, std::uint32_t length, std::uint32_t type,
                         std::span<const std::byte> payload) const;
  /// Validates ring_config::version and features of `c` (EINVAL naming what).
  void accept_features(ring_config& c, const char* what);
  outcome mpmc_try_send(std::span<const std::byte> message);
  outcome mpmc_try_receive(std::span<std::byte> buffer, std::size_t& size);
  /// One look for mpmc_validate(): what is impossible, or "".
  std::string mpmc_problem(std::uint64_t pos) const;
};

}  // namespace ipcoro::detail
