// SPDX-License-Identifier: MIT
// Zero-copy loans and views of a channel: space lent in the transport, messages seen in place.
#pragma once

#include "ipcoro/channel_error.hpp"
#include "ipcoro/detail/channel_port.hpp"
#include "ipcoro/export.hpp"

#include <cstddef>
#include <cstdint>
#include <memory>
#include <new>
#include <span>
#include <type_traits>
#include <utility>

namespace ipcoro {

/// Space lent by a channel sender in its transport (channel_sender::loan): exactly the
/// bytes asked for, where the message will travel: on an SPSC ring (`shm:`, `file:`) the
/// ring itself, so the message is written once and never copied. The bytes are the
/// message's encoding (codec<T>): what receive() decodes, or receive_view() shows.
/// commit() publishes it as one message; destroying it (or drop()) uncommitted publishes
/// nothing and frees the sender for its next operation. While a loan is open, the
/// sender's send() and loan() throw channel_error(EBUSY); close(), detach() or abort() of
/// the sender discard it (commit() then throws channel_closed). The loan keeps the
/// sender's end, and the memory it lends, alive when the sender itself goes first. Use it
/// on the thread of its sender. Move-only.
class IPCORO_API channel_loan {
 public:
  channel_loan() noexcept = default;
  channel_loan(channel_loan&& other) noexcept
      : port_(std::exchange(other.port_, nullptr)), space_(other.space_) {}
  /// Drops what this loan holds first.
  channel_loan& operator=(channel_loan&& other) noexcept;
  ~channel_loan() { drop(); }

  /// The lent bytes (none once committed, dropped or moved from).
  std::span<std::byte> bytes() const noexcept { return port_ ? space_ : std::span<std::byte>{}; }
  /// Publishes the whole loan as one message. Never waits (the room was taken by loan()).
  void commit() { commit(space_.size()); }
  /// Publishes the first `size` bytes as one message. Throws std::system_error(EINVAL)
  /// naming both numbers when `size` is more than the loan holds (the loan stays open),
  /// channel_closed when the sender was closed meanwhile (nothing is published).
  void commit(std::size_t size);
  /// Gives the space up unpublished; nothing for a committed, dropped or empty loan.
  void drop() noexcept;
  explicit operator bool() const noexcept { return port_ != nullptr; }

  /// Holds the loan `port` has open (pinning the port: see port_base::pin).
  explicit channel_loan(detail::send_port& port, std::span<std::byte> space) noexcept
      : port_(&port), space_(space) {
    port.pin();
  }

 private:
  detail::send_port* port_ = nullptr;
  std::span<std::byte> space_;
};

/// A loan of one T in place (channel_sender::loan_object): a T value-initialised in the
/// transport's memory, committed as one T. For trivially copyable T of alignment up to 8
/// (a ring's records are 8-aligned).
template <class T>
class object_loan {
  static_assert(std::is_trivially_copyable_v<T>, "object_loan: T must be trivially copyable");
  static_assert(alignof(T) <= 8, "object_loan: a ring's records are 8-aligned; T may not need more");

 public:
  object_loan() noexcept = default;
  explicit object_loan(channel_loan loan) noexcept : loan_(std::move(loan)) {
    ::new (static_cast<void*>(loan_.bytes().data())) T();
  }
  T& value() const noexcept { return *std::launder(reinterpret_cast<T*>(loan_.bytes().data())); }
  T& operator*() const noexcept { return value(); }
  T* operator->() const noexcept { return &value(); }
  /// Publishes the T.
  void commit() { loan_.commit(sizeof(T)); }
  void drop() noexcept { loan_.drop(); }
  explicit operator bool() const noexcept { return static_cast<bool>(loan_); }

 private:
  channel_loan loan_;
};

/// The next message of a channel, not copied out (channel_receiver::receive_view): on an
/// SPSC ring its bytes are in the ring; elsewhere in the receiver's own buffer. Valid until
/// release(), its destruction, or the next receive of that receiver (receive, receive_into,
/// receive_view, ready), which release it first. Until then its room in the ring is not
/// given back to the sender: a sender that fills the ring waits for the release. The view
/// keeps the receiver's end, and the message's memory, alive when the receiver itself goes
/// first. Use it on the thread of its receiver. Move-only.
class IPCORO_API channel_view {
 public:
  channel_view() noexcept = default;
  channel_view(channel_view&& other) noexcept
      : port_(std::exchange(other.port_, nullptr)), bytes_(other.bytes_), serial_(other.serial_) {}
  /// Releases what this view holds first.
  channel_view& operator=(channel_view&& other) noexcept;
  ~channel_view() { release(); }

  /// The message's encoding (what receive() would decode); none once released or moved from.
  std::span<const std::byte> bytes() const noexcept { return port_ ? bytes_ : std::span<const std::byte>{}; }
  /// Gives the message's room back; later calls do nothing.
  void release() noexcept;
  explicit operator bool() const noexcept { return port_ != nullptr; }

  /// The current message of `port` (pinning the port: see port_base::pin).
  channel_view(detail::receive_port& port, std::span<const std::byte> bytes, std::uint64_t serial) noexcept
      : port_(&port), bytes_(bytes), serial_(serial) {
    port.pin();
  }

 private:
  detail::receive_port* port_ = nullptr;
  std::span<const std::byte> bytes_;
  std::uint64_t serial_ = 0;
};

/// A view of one T in place (channel_receiver::receive_object_view).
template <class T>
class object_view {
  static_assert(std::is_trivially_copyable_v<T>, "object_view: T must be trivially copyable");
  static_assert(alignof(T) <= 8, "object_view: a ring's records are 8-aligned; T may not need more");

 public:
  object_view() noexcept = default;
  explicit object_view(channel_view view) noexcept : view_(std::move(view)) {}
  const T& value() const noexcept { return *std::launder(reinterpret_cast<const T*>(view_.bytes().data())); }
  const T& operator*() const noexcept { return value(); }
  const T* operator->() const noexcept { return &value(); }
  void release() noexcept { view_.release(); }
  explicit operator bool() const noexcept { return static_cast<bool>(view_); }

 private:
  channel_view view_;
};

namespace detail {
/// channel_error(EBUSY): `port` has a loan open.
IPCORO_API [[noreturn]] void throw_loan_open(const send_port& port);
/// Checks that a view holds one T where a T may live (decode_error / channel_error otherwise).
IPCORO_API void check_object_view(std::span<const std::byte> bytes, std::size_t size, std::size_t align,
                                  std::string_view type);
}  // namespace detail

}  // namespace ipcoro
