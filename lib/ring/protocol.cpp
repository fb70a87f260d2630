// SPDX-License-Identifier: MIT
// The rings' protocol: formatting, attach-time validation, SPSC and MPMC send and receive.
#include "ring/protocol.hpp"

#include "ring/checksum.hpp"
#include "ring/spsc_path.hpp"

#include "ipcoro/futex.hpp"

#include <fmt/core.h>
#include <linux/membarrier.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cerrno>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <new>
#include <system_error>

namespace ipcoro::detail {

namespace {
ring_header& write_header(std::span<std::byte> region, const ring_config& geometry) {
  std::memset(region.data(), 0, ring_header_size);
  auto* h = new (region.data()) ring_header{};
  h->config = geometry;
  h->config.magic = 0;
  h->config.check = config_check(geometry);  // computed over the final magic
  return *h;
}

void publish_header(ring_header& h) noexcept {
  // Last, so that a process attaching early finds no magic rather than half a header.
  std::atomic_ref<std::uint64_t>(h.config.magic).store(ring_magic, std::memory_order_release);
}
}  // namespace

[[noreturn]] void throw_corrupt(const std::string& what) {
  throw std::system_error(EBADMSG, std::system_category(), "shm ring is corrupt: " + what);
}

[[noreturn]] void throw_invalid(const std::string& what) {
  throw std::system_error(EINVAL, std::system_category(), what);
}

void check_region(std::span<std::byte> region, std::size_t minimum, const char* what) {
  if (reinterpret_cast<std::uintptr_t>(region.data()) % 64 != 0) {
    throw_invalid(
        fmt::format("{}: the region must be 64-byte aligned (a segment's or mapping's payload is)", what));
  }
  if (region.size() < minimum) {
    throw_invalid(fmt::format("{}: the region has {} bytes; this ring needs at least {}", what, region.size(),
                              minimum));
  }
}

ring_checksum ring_checksum_of(std::span<const std::byte> region) noexcept {
  if (region.size() < sizeof(ring_config)) return ring_checksum::none;
  ring_config c{};
  std::memcpy(&c, region.data(), sizeof c);
  return c.version == ring_version_features && (c.features & feature_xxh3) != 0 ? ring_checksum::xxh3
                                                                                : ring_checksum::none;
}

void wake_announced(event_count& ev) noexcept {
  std::uint32_t v = ev.seq.load(std::memory_order_relaxed);
  while ((v & sleeper_bit) != 0) {
    if (ev.seq.compare_exchange_weak(v, v + 1, std::memory_order_release, std::memory_order_relaxed)) {
      futex_wake(ev.seq, INT_MAX);
      return;
    }
  }
}

std::uint32_t announce_sleeper(event_count& ev) noexcept {
  std::uint32_t v = ev.seq.load(std::memory_order_relaxed);
  while ((v & sleeper_bit) == 0) {
    if (ev.seq.compare_exchange_weak(v, v | sleeper_bit, std::memory_order_seq_cst,
                                     std::memory_order_relaxed)) {
      return v | sleeper_bit;
    }
  }
  return v;
}

bool asymmetric_barrier_registered() noexcept {
  static std::atomic<pid_t> cached_pid{0};
  static std::atomic<bool> cached{false};
  const pid_t me = ::getpid();
  if (cached_pid.load(std::memory_order_acquire) != me) {
    const char* off = std::getenv("IPCORO_RING_NO_MEMBARRIER");
    const long supported = off != nullptr && *off != '\0' && std::strcmp(off, "0") != 0
                               ? 0
                               : ::syscall(SYS_membarrier, MEMBARRIER_CMD_QUERY, 0, 0);
    const bool ok = supported > 0 && (supported & MEMBARRIER_CMD_GLOBAL_EXPEDITED) != 0 &&
                    (supported & MEMBARRIER_CMD_REGISTER_GLOBAL_EXPEDITED) != 0 &&
                    ::syscall(SYS_membarrier, MEMBARRIER_CMD_REGISTER_GLOBAL_EXPEDITED, 0, 0) == 0;
    cached.store(ok, std::memory_order_relaxed);
    cached_pid.store(me, std::memory_order_release);
  }
  return cached.load(std::memory_order_relaxed);
}

bool asymmetric_barrier() noexcept {
  return ::syscall(SYS_membarrier, MEMBARRIER_CMD_GLOBAL_EXPEDITED, 0, 0) == 0;
}

ring_protocol::ring_protocol(std::span<std::byte> region, std::uint32_t kind, std::uint32_t role,
                             bool manual_ack)
    : kind_(kind), role_(role), self_pid_(::getpid()), manual_ack_(manual_ack) {
  const char* what = kind == kind_spsc ? (role == role_sender ? "spsc_ring_sender" : "spsc_ring_receiver")
                                       : (role == role_sender ? "mpmc_ring_sender" : "mpmc_ring_receiver");
  check_region(region, ring_header_size, what);
  hdr_ = std::launder(reinterpret_cast<ring_header*>(region.data()));
  // Copy the description out once; from here on only the copy is used, so a peer that
  // rewrites the header cannot steer this process outside the region.
  ring_config c{};
  c.magic = std::atomic_ref<std::uint64_t>(hdr_->config.magic).load(std::memory_order_acquire);
  if (c.magic != ring_magic) {
    throw_invalid(
        fmt::format("{}: no ring in this region (magic {:#018x}, expected {:#018x}): not formatted yet, "
                    "or not a ring",
                    what, c.magic, ring_magic));
  }
  std::memcpy(reinterpret_cast<std::byte*>(&c) + sizeof c.magic,
              reinterpret_cast<const std::byte*>(&hdr_->config) + sizeof c.magic, sizeof c - sizeof c.magic);
  accept_features(c, what);
  if (c.kind != kind) {
    throw_invalid(fmt::format("{}: the region holds an {} ring, not an {} ring", what,
                              c.kind == kind_spsc ? "SPSC" : (c.kind == kind_mpmc ? "MPMC" : "unknown"),
                              kind == kind_spsc ? "SPSC" : "MPMC"));
  }
  if (c.header_size != ring_header_size || c.participants != participant_count) {
    throw_invalid(
        fmt::format("{}: the ring header has size {} and {} participant entries; expected {} and {}", what,
                    c.header_size, c.participants, ring_header_size, participant_count));
  }
  if (c.region_size > region.size() || c.region_size < ring_header_size) {
    throw_invalid(fmt::format("{}: the ring was formatted for a region of {} bytes, but this region has {}",
                              what, c.region_size, region.size()));
  }
  const std::uint64_t data_bytes = c.region_size - ring_header_size;
  if (kind == kind_spsc) {
    if (!std::has_single_bit(c.capacity) || c.capacity < min_spsc_capacity || c.capacity > data_bytes ||
        c.max_message != std::min<std::uint64_t>(c.capacity / 2 - record_size_, UINT32_MAX)) {
      throw_invalid(
          fmt::format("{}: the ring's geometry is inconsistent (capacity {}, max message {}, {} data bytes)",
                      what, c.capacity, c.max_message, data_bytes));
    }
  } else {
    if (!std::has_single_bit(c.capacity) || c.capacity < 2 || c.capacity > max_mpmc_slots ||
        c.max_message == 0 || c.max_message > max_mpmc_message ||
        c.slot_stride != mpmc_stride(c.max_message) || c.capacity > data_bytes / c.slot_stride) {
      throw_invalid(
          fmt::format("{}: the ring's geometry is inconsistent ({} slots of {} bytes for messages of {}, "
                      "{} data bytes)",
                      what, c.capacity, c.slot_stride, c.max_message, data_bytes));
    }
    stride_ = c.slot_stride;
  }
  data_ = region.data() + ring_header_size;
  capacity_ = c.capacity;
  mask_ = c.capacity - 1;
  max_message_ = c.max_message;
}

void ring_protocol::accept_features(ring_config& c, const char* what) {
  if (c.version != ring_version && c.version != ring_version_features) {
    throw_invalid(fmt::format("{}: the ring has layout version {}; this ipcoro reads versions {} and {}",
                              what, c.version, ring_version, ring_version_features));
  }
  if (c.version == ring_version) c.features = 0;  // not covered by a version 2 check word
  if (c.check != config_check(c)) {
    throw_invalid(
        fmt::format("{}: the ring header is corrupt: its check word does not match its fields", what));
  }
  if ((c.features & ~feature_xxh3) != 0 || (c.features != 0 && c.kind != kind_spsc)) {
    throw_invalid(
        fmt::format("{}: the ring uses features {:#x} that this ipcoro does not know", what, c.features));
  }
  checked_ = (c.features & feature_xxh3) != 0;
  if (checked_ && !record_checks_available()) {
    throw_invalid(
        fmt::format("{}: the ring's records carry xxh3 checksums, but this build of ipcoro has no "
                    "libxxhash to verify them (install libxxhash-dev and rebuild ipcoro)",
                    what));
  }
  record_size_ = checked_ ? sizeof(record_check_header) : sizeof(record_header);
}

void ring_protocol::spsc_check_record(std::uint64_t offset, std::uint32_t length, std::uint32_t type,
                                      std::span<const std::byte> payload) const {
  std::uint64_t check = 0;
  std::memcpy(&check, data_ + offset + offsetof(record_check_header, check), sizeof check);
  if (check != record_check(read_pos_, length, type, payload)) {
    throw_corrupt(fmt::format("the record at offset {} (position {}, {} bytes) fails its checksum", offset,
                              read_pos_, length));
  }
}

void ring_protocol::spsc_check_end() const {
  if (!checked_) return;
  if (hdr_->end_check.load(std::memory_order_relaxed) != end_mark(read_pos_)) {
    throw_corrupt(
        fmt::format("the end of stream at offset {} (position {}) fails its checksum: the close "
                    "flag or the sender's position was not written by the sender's close",
                    read_pos_ & mask_, read_pos_));
  }
}

void ring_protocol::release_read_position() noexcept {
  hdr_->head.store(read_pos_, std::memory_order_release);
  notify(hdr_->space);
}

void ring_protocol::raise_fence_mode(std::uint32_t to) noexcept {
  std::uint32_t mode = hdr_->fence_required.load(std::memory_order_relaxed);
  while (mode < to && !hdr_->fence_required.compare_exchange_weak(mode, to, std::memory_order_seq_cst)) {
  }
}

// ---- SPSC ----

void ring_protocol::throw_too_large(std::size_t size) const {
  throw std::system_error(EMSGSIZE, std::system_category(),
                          fmt::format("spsc ring send: a message of {} bytes exceeds this ring's limit of {} "
                                      "(capacity / 2 - 8); format a larger region",
                                      size, max_message_));
}

void ring_protocol::throw_receiver_closed() const {
  throw std::system_error(EPIPE, std::system_category(), "spsc ring send: the receiver closed the ring");
}

void ring_protocol::throw_bad_head(std::uint64_t head) const {
  throw_corrupt(
      fmt::format("the receiver's position {} is outside [{}, {}]", head, tail_ - capacity_, tail_));
}

void ring_protocol::throw_bad_tail(std::uint64_t tail) const {
  throw_corrupt(
      fmt::format("the sender's position {} is outside [{}, {}]", tail, read_pos_, read_pos_ + capacity_));
}

void ring_protocol::throw_bad_record(const record_header& rh, std::uint64_t offset, std::uint64_t to_end,
                                     std::uint64_t available) const {
  if (rh.type == record_padding) {
    throw_corrupt(fmt::format("a padding record of {} bytes at offset {} does not reach the end of the ring",
                              rh.length, offset));
  }
  if (rh.type != record_data)
    throw_corrupt(fmt::format("unknown record type {:#x} at offset {}", rh.type, offset));
  throw_corrupt(
      fmt::format("a record of {} bytes at offset {} overruns the ring ({} bytes to its end, {} published)",
                  rh.length, offset, to_end, available));
}

void ring_protocol::throw_bad_record_header(std::uint64_t offset, std::uint64_t to_end,
                                            std::uint64_t available) const {
  throw_corrupt(
      fmt::format("a record header at offset {} overruns the ring ({} bytes to its end, {} published)",
                  offset, to_end, available));
}

ring_protocol::outcome ring_protocol::spsc_try_send(std::span<const std::byte> message) {
  spsc_slot slot;
  const outcome r = spsc_reserve(message.size(), slot);
  if (r != outcome::done) return r;
  if (!message.empty()) std::memcpy(data_ + slot.offset + record_size_, message.data(), message.size());
  spsc_publish(slot, message.size());
  return outcome::done;
}

ring_protocol::outcome ring_protocol::spsc_try_receive(std::span<std::byte> buffer, std::size_t& size) {
  std::uint64_t offset = 0;
  std::uint32_t length = 0;
  const outcome r = spsc_next(offset, length);
  if (r != outcome::done) return r;
  const std::byte* payload = data_ + offset + record_size_;
  if (length > buffer.size()) {
    // A damaged length is EBADMSG, not advice to pass a larger buffer.
    if (checked_) spsc_check_record(offset, length, record_data, {payload, length});
    throw std::system_error(
        EMSGSIZE, std::system_category(),
        fmt::format("spsc ring receive: the next message has {} bytes but the buffer only {}; "
                    "it stays in the ring (max_message_size() is {})",
                    length, buffer.size(), max_message_));
  }
  if (length != 0) std::memcpy(buffer.data(), payload, length);
  // Over the copy, which is what the caller gets (and is in this CPU's cache now).
  if (checked_) spsc_check_record(offset, length, record_data, buffer.first(length));
  read_pos_ += align_record(record_size_ + std::uint64_t{length});
  size = length;
  if (!manual_ack_) release_read_position();
  return outcome::done;
}

// ---- MPMC ----

ring_protocol::outcome ring_protocol::mpmc_try_send(std::span<const std::byte> message) {
  if (message.size() > max_message_) {
    throw std::system_error(
        EMSGSIZE, std::system_category(),
        fmt::format("mpmc ring send: a message of {} bytes exceeds this ring's slot size of {}",
                    message.size(), max_message_));
  }
  if (hdr_->sender_closed.load(std::memory_order_acquire) != 0) {
    throw std::system_error(EPIPE, std::system_category(), "mpmc ring send: the ring was closed");
  }
  if (hdr_->receiver_closed.load(std::memory_order_acquire) != 0) {
    throw std::system_error(EPIPE, std::system_category(),
                            "mpmc ring send: every receiver has closed the ring (none is attached)");
  }
  std::atomic<std::uint64_t>& next = hdr_->tail;
  std::uint64_t pos = next.load(std::memory_order_relaxed);
  // Bounded, so that a peer scribbling on the positions cannot keep this loop turning.
  for (std::uint64_t round = 0; round < 4 * capacity_ + 64; ++round) {
    slot_header& s = slot_at(pos);
    std::uint64_t w = s.word.load(std::memory_order_acquire);
    const auto d = static_cast<std::int32_t>(slot_seq(w) - static_cast<std::uint32_t>(pos));
    if (d == 0 && slot_owner(w) == 0 && !slot_abandoned(w)) {
      // Claim the slot, recording who holds it, then move the shared position on
      // (someone else may already have, seeing the claim).
      if (s.word.compare_exchange_strong(
              w, make_slot_word(static_cast<std::uint32_t>(pos), static_cast<std::uint32_t>(self_pid_)),
              std::memory_order_acquire)) {
        std::uint64_t expected = pos;
        next.compare_exchange_strong(expected, pos + 1, std::memory_order_relaxed);
        s.size.store(static_cast<std::uint32_t>(message.size()), std::memory_order_relaxed);
        if (!message.empty()) std::memcpy(slot_payload(s), message.data(), message.size());
        s.word.store(make_slot_word(static_cast<std::uint32_t>(pos + 1), 0), std::memory_order_release);
        notify(hdr_->data);
        return outcome::done;
      }
      continue;
    }
    const auto laps = static_cast<std::int32_t>(capacity_);
    if (d < 0) {
      // The slot still holds the message of the previous lap: full, unless others moved on.
      const std::uint64_t now = next.load(std::memory_order_relaxed);
      if (now == pos) {
        // Full means the previous lap's message, or a slow sender's claim of that lap.
        if (d != 1 - laps && (d != -laps || slot_owner(w) == 0)) mpmc_validate(pos);
        return outcome::would_block;
      }
      pos = now;
      continue;
    }
    // Claimed for this position by another sender, or already past it: help move on.
    // Anything else (a read many laps late, or a slot no protocol step wrote) is looked at.
    if ((d != 0 || slot_abandoned(w)) && d != 1 && d != laps) mpmc_validate(pos);
    std::uint64_t expected = pos;
    next.compare_exchange_strong(expected, pos + 1, std::memory_order_relaxed);
    pos = next.load(std::memory_order_relaxed);
  }
  mpmc_validate(pos);
  return outcome::would_block;
}

ring_protocol::outcome ring_protocol::mpmc_try_receive(std::span<std::byte> buffer, std::size_t& size) {
  std::atomic<std::uint64_t>& next = hdr_->head;
  std::uint64_t pos = next.load(std::memory_order_relaxed);
  for (std::uint64_t round = 0; round < 4 * capacity_ + 64; ++round) {
    slot_header& s = slot_at(pos);
    std::uint64_t w = s.word.load(std::memory_order_acquire);
    const auto d = static_cast<std::int32_t>(slot_seq(w) - static_cast<std::uint32_t>(pos + 1));
    if (d == 0 && slot_owner(w) == 0) {
      const bool skip = slot_abandoned(w);
      const std::uint32_t length = s.size.load(std::memory_order_relaxed);
      if (!skip && (length > max_message_ || length > buffer.size())) {
        // Only meaningful if the slot still holds the message the length was read from.
        if (s.word.load(std::memory_order_acquire) != w) continue;
        if (length > max_message_) {
          throw_corrupt(fmt::format("slot {} holds a message of {} bytes, above the slot size {}",
                                    pos & mask_, length, max_message_));
        }
        throw std::system_error(
            EMSGSIZE, std::system_category(),
            fmt::format("mpmc ring receive: the next message has {} bytes but the buffer only {}; "
                        "it stays in the ring (max_message_size() is {})",
                        length, buffer.size(), max_message_));
      }
      if (s.word.compare_exchange_strong(
              w, make_slot_word(static_cast<std::uint32_t>(pos + 1), static_cast<std::uint32_t>(self_pid_)),
              std::memory_order_acquire)) {
        std::uint64_t expected = pos;
        next.compare_exchange_strong(expected, pos + 1, std::memory_order_relaxed);
        if (!skip && length != 0) std::memcpy(buffer.data(), slot_payload(s), length);
        s.word.store(make_slot_word(static_cast<std::uint32_t>(pos + capacity_), 0),
                     std::memory_order_release);
        notify(hdr_->space);
        if (skip) {
          pos = next.load(std::memory_order_relaxed);
          continue;
        }
        size = length;
        return outcome::done;
      }
      continue;
    }
    const auto laps = static_cast<std::int32_t>(capacity_);
    if (d < 0) {
      // Nothing published at this position yet: empty, unless others moved on.
      const std::uint64_t now = next.load(std::memory_order_relaxed);
      if (now != pos) {
        pos = now;
        continue;
      }
      // Empty means free for this position or being written at it, or a slow receiver's
      // claim of the previous lap.
      if ((d != -1 || slot_abandoned(w)) && (d != -laps || slot_owner(w) == 0)) mpmc_validate(pos);
      if (hdr_->sender_closed.load(std::memory_order_acquire) == 0) return outcome::would_block;
      const std::uint64_t again = s.word.load(std::memory_order_acquire);
      if (static_cast<std::int32_t>(slot_seq(again) - static_cast<std::uint32_t>(pos + 1)) >= 0) continue;
      // Closed and drained, unless a sender is still writing this slot.
      return slot_owner(again) == 0 ? outcome::end_of_stream : outcome::would_block;
    }
    // Claimed by another receiver, or (read late) already taken: help move on.
    if (d != 0 && d != laps - 1) mpmc_validate(pos);
    std::uint64_t expected = pos;
    next.compare_exchange_strong(expected, pos + 1, std::memory_order_relaxed);
    pos = next.load(std::memory_order_relaxed);
  }
  mpmc_validate(pos);
  return outcome::would_block;
}

namespace {

std::uint64_t saturating_add(std::uint64_t a, std::uint64_t b) noexcept {
  return a > UINT64_MAX - b ? UINT64_MAX : a + b;
}
std::uint64_t saturating_sub(std::uint64_t a, std::uint64_t b) noexcept { return a < b ? 0 : a - b; }

// Positions seen around the reads of the slot words: t0 and h0 before, t1 and h1 after.
// Both only grow, so a lower bound is sound against the earlier value, an upper bound
// against the later one, whatever moved in between.
struct mpmc_positions {
  std::uint64_t t0, h0, t1, h1;
};

// A slot word is in one of four states, each for one position P: free for P (the sequence
// is P), being written at P (P, with its sender's pid), holding the message of P (P + 1),
// or being read at P (P + 1, with its receiver's pid). Each state is reachable only with
// P in one range of the positions (see mpmc_try_send and mpmc_try_receive):
// - free: the tail has not passed P, and the message of P - C was taken (the head passed it);
// - being written: claimed at the tail, which receivers cannot pass before it is published;
// - holding: published at or before the tail, not taken yet (the head has not passed it);
// - being read: claimed at the head, not lapped by the tail yet.
// The tail may trail a claim by one position (the claimer moves it just after).
std::string slot_problem(std::uint64_t pos, std::uint64_t w, std::uint64_t capacity,
                         const mpmc_positions& v) {
  const std::uint64_t mask = capacity - 1;
  const std::uint32_t seq = slot_seq(w);
  const auto r = static_cast<std::uint32_t>((seq - static_cast<std::uint32_t>(pos)) & mask);
  const bool owned = slot_owner(w) != 0;
  if (r > 1 || (slot_abandoned(w) && (r == 0 || owned))) {
    return fmt::format("mpmc slot {} word {:#018x}: sequence {} cannot belong to slot {} of a {}-slot ring{}",
                       pos & mask, w, seq, pos & mask, capacity,
                       slot_abandoned(w) ? " (marked abandoned)" : "");
  }
  const std::uint64_t p = pos + static_cast<std::uint64_t>(static_cast<std::int64_t>(
                                    static_cast<std::int32_t>(seq - r - static_cast<std::uint32_t>(pos))));
  std::uint64_t lo = 0;
  std::uint64_t hi = 0;
  const char* state = nullptr;
  if (r == 0 && !owned) {
    state = "free for";
    lo = v.t0;
    hi = std::min(saturating_add(v.t1, capacity), saturating_add(v.h1, capacity - 1));
  } else if (r == 0) {
    state = "being written at";
    lo = v.h0;
    hi = v.t1;
  } else if (!owned) {
    state = "holding the message of";
    lo = v.h0;
    hi = std::min(v.t1, saturating_add(v.h1, capacity - 1));
  } else {
    state = "being read at";
    lo = saturating_sub(v.t0, capacity);
    hi = v.h1;
  }
  if (p >= lo && p <= hi) return {};
  return fmt::format("mpmc slot {} sequence {} ({} position {}) cannot follow tail {} and head {}",
                     pos & mask, seq, state, p, v.t1, v.h1);
}

}  // namespace

std::string ring_protocol::mpmc_problem(std::uint64_t pos) const {
  full_fence();
  mpmc_positions v{};
  v.t0 = hdr_->tail.load(std::memory_order_seq_cst);
  v.h0 = hdr_->head.load(std::memory_order_seq_cst);
  const std::uint64_t at[3] = {pos, v.t0, v.h0};
  std::uint64_t words[3];
  for (int i = 0; i < 3; ++i) words[i] = slot_at(at[i]).word.load(std::memory_order_seq_cst);
  v.t1 = hdr_->tail.load(std::memory_order_seq_cst);
  v.h1 = hdr_->head.load(std::memory_order_seq_cst);
  // At most C messages are in flight; the head passes the tail by one at most, when a
  // sender died between claiming a slot and moving the tail and receivers skipped its slot.
  if (v.t0 > v.h1 && v.t0 - v.h1 > capacity_) {
    return fmt::format("mpmc tail {} is ahead of head {} by more than the ring's {} slots", v.t0, v.h1,
                       capacity_);
  }
  if (v.h0 > v.t1 && v.h0 - v.t1 > 1) return fmt::format("mpmc tail {} is behind head {}", v.t1, v.h0);
  for (int i = 0; i < 3; ++i) {
    std::string problem = slot_problem(at[i], words[i], capacity_, v);
    if (!problem.empty()) return problem;
  }
  return {};
}

void ring_protocol::mpmc_validate(std::uint64_t pos) const {
  if (mpmc_problem(pos).empty()) return;
  // Every bound holds for any moment between the reads; look once more all the same, so
  // that only a state that stays impossible is reported.
  const std::string problem = mpmc_problem(pos);
  if (!problem.empty()) throw_corrupt(problem);
}

}  // namespace ipcoro::detail

namespace ipcoro {

using namespace detail;

std::size_t spsc_ring_region_size(std::size_t capacity) noexcept {
  return ring_header_size + std::bit_ceil(std::clamp(capacity, min_spsc_capacity, max_spsc_capacity));
}

std::size_t mpmc_ring_region_size(std::size_t slots, std::size_t max_message) noexcept {
  return ring_header_size + std::bit_ceil(std::clamp<std::size_t>(slots, 2, max_mpmc_slots)) *
                                mpmc_stride(std::clamp<std::size_t>(max_message, 1, max_mpmc_message));
}

namespace {
void format_spsc(std::span<std::byte> region, bool checked) {
  check_region(region, ring_header_size + min_spsc_capacity, "format_spsc_ring");
  if (checked && !record_checks_available()) {
    throw_invalid(
        "format_spsc_ring_with_checksums: xxh3 checksums need libxxhash, which this build of ipcoro was "
        "built "
        "without (install libxxhash-dev and rebuild ipcoro)");
  }
  const std::size_t header = checked ? sizeof(record_check_header) : sizeof(record_header);
  const std::size_t capacity = std::min(std::bit_floor(region.size() - ring_header_size), max_spsc_capacity);
  ring_config c{};
  c.magic = ring_magic;
  c.version = checked ? ring_version_features : ring_version;
  c.features = checked ? feature_xxh3 : 0;
  c.kind = kind_spsc;
  c.region_size = ring_header_size + capacity;
  c.capacity = capacity;
  c.slot_stride = 0;
  c.max_message = static_cast<std::uint32_t>(std::min<std::uint64_t>(capacity / 2 - header, UINT32_MAX));
  c.header_size = ring_header_size;
  c.participants = participant_count;
  publish_header(write_header(region, c));
}
}  // namespace

void format_spsc_ring(std::span<std::byte> region) { format_spsc(region, false); }

void format_spsc_ring_with_checksums(std::span<std::byte> region) { format_spsc(region, true); }

void format_mpmc_ring(std::span<std::byte> region, std::size_t max_message) {
  if (max_message == 0 || max_message > max_mpmc_message) {
    throw_invalid(fmt::format("format_mpmc_ring: max_message {} must be between 1 and {}", max_message,
                              max_mpmc_message));
  }
  const std::size_t stride = mpmc_stride(max_message);
  check_region(region, ring_header_size + 2 * stride, "format_mpmc_ring");
  const std::size_t slots =
      std::min(std::bit_floor((region.size() - ring_header_size) / stride), max_mpmc_slots);
  ring_config c{};
  c.magic = ring_magic;
  c.version = ring_version;
  c.kind = kind_mpmc;
  c.region_size = ring_header_size + slots * stride;
  c.capacity = slots;
  c.slot_stride = static_cast<std::uint32_t>(stride);
  c.max_message = static_cast<std::uint32_t>(max_message);
  c.header_size = ring_header_size;
  c.participants = participant_count;
  ring_header& h = write_header(region, c);
  std::byte* data = region.data() + ring_header_size;
  for (std::size_t i = 0; i < slots; ++i) {
    auto* s = new (data + i * stride) slot_header{};
    s->word.store(make_slot_word(static_cast<std::uint32_t>(i), 0), std::memory_order_relaxed);
  }
  publish_header(h);
}

}  // namespace ipcoro
