// SPDX-License-Identifier: MIT
// Zero-copy loans on SPSC rings: reserve / commit on the sender, peek / release on the receiver.
#include "ring/protocol.hpp"
#include "ring/spsc_path.hpp"

#include <fmt/core.h>

#include <cerrno>
#include <cstring>
#include <system_error>

namespace ipcoro::detail {

void ring_protocol::throw_loan_open() const {
  throw std::system_error(EBUSY, std::system_category(),
                          "spsc ring send: a loan is open on this sender; commit or drop it first");
}

void ring_protocol::throw_no_loans(const char* what) const {
  throw std::system_error(EOPNOTSUPP, std::system_category(),
                          fmt::format("{}: zero-copy loans and views need an SPSC ring; this one is MPMC "
                                      "(use send / receive, or an SPSC ring)",
                                      what));
}

ring_protocol::outcome ring_protocol::try_reserve(std::size_t size, std::span<std::byte>& space) {
  return attempt([&] {
    if (kind_ != kind_spsc) throw_no_loans("ring loan");
    const outcome r = spsc_reserve(size, loan_);
    if (r != outcome::done) return r;
    loan_open_ = true;
    space = {data_ + loan_.offset + record_size_, size};
    return outcome::done;
  });
}

ring_protocol::outcome ring_protocol::try_write(std::size_t size, write_fn write, void* context) {
  return attempt([&] {
    if (kind_ != kind_spsc) throw_no_loans("ring send in place");
    spsc_slot slot;
    const outcome r = spsc_reserve(size, slot);
    if (r != outcome::done) return r;
    write(context, {data_ + slot.offset + record_size_, size});
    spsc_publish(slot, size);
    return outcome::done;
  });
}

ring_protocol::outcome ring_protocol::try_write_headed(std::uint64_t head,
                                                       std::span<const std::byte> payload) {
  return attempt([&] {
    if (kind_ != kind_spsc) throw_no_loans("ring send in place");
    const std::size_t size = sizeof head + payload.size();
    spsc_slot slot;
    const outcome r = spsc_reserve(size, slot);
    if (r != outcome::done) return r;
    std::byte* at = data_ + slot.offset + record_size_;
    std::memcpy(at, &head, sizeof head);
    std::memcpy(at + sizeof head, payload.data(), payload.size());
    spsc_publish(slot, size);
    return outcome::done;
  });
}

void ring_protocol::commit_reserved(std::size_t length) {
  if (!loan_open_) {
    throw std::system_error(EINVAL, std::system_category(),
                            "spsc ring loan commit: no loan is open (committed, dropped or never made)");
  }
  if (length > loan_.size) {
    throw std::system_error(
        EINVAL, std::system_category(),
        fmt::format("spsc ring loan commit: {} bytes committed, but the loan holds only {}", length,
                    loan_.size));
  }
  loan_open_ = false;
  spsc_publish(loan_, length);
}

ring_protocol::outcome ring_protocol::try_peek(std::span<const std::byte>& view) {
  return attempt([&] {
    if (kind_ != kind_spsc) throw_no_loans("ring receive_view");
    std::uint64_t offset = 0;
    std::uint32_t length = 0;
    const outcome r = spsc_next(offset, length);
    if (r != outcome::done) return r;
    view = {data_ + offset + record_size_, length};
    // Over the bytes in place, which is what the caller reads.
    if (checked_) spsc_check_record(offset, length, record_data, view);
    read_pos_ += align_record(record_size_ + std::uint64_t{length});
    peeked_ = true;
    return outcome::done;
  });
}

}  // namespace ipcoro::detail
