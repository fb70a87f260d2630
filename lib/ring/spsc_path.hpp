// SPDX-License-Identifier: MIT
// The halves that an SPSC ring's copying send / receive share with its loans and views, inline.
#pragma once

#include "ring/checksum.hpp"
#include "ring/protocol.hpp"

#include <cstring>

// Included by protocol.cpp (try_send, try_receive) and loan.cpp (try_reserve, try_peek) only:
// inline, so that the copying hot paths pay no call for sharing them; the error paths are
// out-of-line cold functions.

namespace ipcoro::detail {

// How far ahead of its position each SPSC side prefetches, in bytes. The sender takes
// the lines it will write two lines ahead: further ahead (four, eight, sixteen lines) cost
// a 64-byte channel pair 10-35 % of its messages/s here, as the receiver reading at four
// lines ahead is best for it (closer, or none, cost 10 %).
inline constexpr std::uint64_t send_prefetch_distance = 128;
inline constexpr std::uint64_t receive_prefetch_distance = 256;
// How many bytes a sender that holds publication (hold_publication) writes before it
// publishes them anyway: the receiver works on one batch while the next is written.
inline constexpr std::uint64_t held_publish_limit = 4096;

inline void ring_protocol::spsc_put_header(std::uint64_t offset, std::uint64_t pos, std::uint32_t length,
                                           std::uint32_t type, std::span<const std::byte> payload) noexcept {
  if (!checked_) {
    const record_header rh{length, type};
    std::memcpy(data_ + offset, &rh, sizeof rh);
    return;
  }
  const record_check_header rh{length, type, record_check(pos, length, type, payload)};
  std::memcpy(data_ + offset, &rh, sizeof rh);
}

inline ring_protocol::outcome ring_protocol::spsc_reserve(std::size_t size, spsc_slot& slot) {
  if (size > max_message_) throw_too_large(size);
  if (loan_open_) throw_loan_open();
  if (hdr_->receiver_closed.load(std::memory_order_acquire) != 0) throw_receiver_closed();
  const std::uint64_t record = align_record(record_size_ + size);
  std::uint64_t offset = tail_ & mask_;
  const std::uint64_t to_end = capacity_ - offset;
  const std::uint64_t needed = record <= to_end ? record : to_end + record;
  if (tail_ - head_cache_ + needed > capacity_) {
    const std::uint64_t head = hdr_->head.load(std::memory_order_acquire);
    if (head > tail_ || tail_ - head > capacity_) throw_bad_head(head);
    head_cache_ = head;
    if (tail_ - head_cache_ + needed > capacity_) {
      if (tail_ != published_tail_) publish_tail();  // what is held must reach the receiver
      return outcome::would_block;
    }
  }
  std::uint64_t tail = tail_;
  if (record > to_end) {
    // Does not fit before the end: pad to the end, start over at offset 0. (Unpublished
    // until the record after it is: a dropped loan leaves it unseen.)
    spsc_put_header(offset, tail, static_cast<std::uint32_t>(to_end - record_size_), record_padding, {});
    tail += to_end;
    offset = 0;
  }
  if (tail + record + send_prefetch_distance + 64 <= head_cache_ + capacity_) {
    // Free room further on: take ownership of its lines now, so that later records are
    // not written into lines the receiver still holds.
    __builtin_prefetch(data_ + ((tail + send_prefetch_distance) & mask_), 1);
    __builtin_prefetch(data_ + ((tail + send_prefetch_distance + 64) & mask_), 1);
  }
  slot = {offset, tail, size};
  return outcome::done;
}

inline void ring_protocol::spsc_publish(const spsc_slot& slot, std::size_t length) noexcept {
  const std::span<const std::byte> payload{data_ + slot.offset + record_size_, length};
  spsc_put_header(slot.offset, slot.pos, static_cast<std::uint32_t>(length), record_data, payload);
  tail_ = slot.pos + align_record(record_size_ + length);
  if (holding_ && tail_ - published_tail_ < held_publish_limit) return;
  publish_tail();
}

inline ring_protocol::outcome ring_protocol::spsc_next(std::uint64_t& offset, std::uint32_t& length) {
  if (peeked_) release_peeked(read_pos_);  // the next receive frees the view's space first
  const auto refresh_tail = [this] {
    const std::uint64_t t = hdr_->tail.load(std::memory_order_acquire);
    if (t < read_pos_ || t - read_pos_ > capacity_ || t % 8 != 0) throw_bad_tail(t);
    tail_cache_ = t;
  };
  for (;;) {
    if (read_pos_ == tail_cache_) {
      refresh_tail();
      if (read_pos_ == tail_cache_) {
        if (hdr_->sender_closed.load(std::memory_order_acquire) == 0) return outcome::would_block;
        refresh_tail();  // the flag is set after the last message: this sees it
        if (read_pos_ == tail_cache_) {
          spsc_check_end();
          return outcome::end_of_stream;
        }
      }
    }
    offset = read_pos_ & mask_;
    const std::uint64_t to_end = capacity_ - offset;
    const std::uint64_t available = tail_cache_ - read_pos_;
    if (record_size_ > to_end || record_size_ > available) throw_bad_record_header(offset, to_end, available);
    record_header rh;
    std::memcpy(&rh, data_ + offset, sizeof rh);
    if (rh.type == record_padding) {
      if (rh.length != to_end - record_size_ || to_end > available)
        throw_bad_record(rh, offset, to_end, available);
      if (checked_) spsc_check_record(offset, rh.length, rh.type, {});
      read_pos_ += to_end;
      continue;
    }
    const std::uint64_t record = align_record(record_size_ + std::uint64_t{rh.length});
    if (rh.type != record_data || rh.length > max_message_ || record > to_end || record > available) {
      throw_bad_record(rh, offset, to_end, available);
    }
    if (read_pos_ + record + receive_prefetch_distance + 64 <= tail_cache_) {
      // Published records further on: start fetching them from the sender's cache now.
      __builtin_prefetch(data_ + ((read_pos_ + receive_prefetch_distance) & mask_));
      __builtin_prefetch(data_ + ((read_pos_ + receive_prefetch_distance + 64) & mask_));
    }
    length = rh.length;
    return outcome::done;
  }
}

}  // namespace ipcoro::detail
