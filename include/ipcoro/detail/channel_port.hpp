// channel_port: the untyped, transport-specific ends behind channel_sender / channel_receiver.
#pragma once

#include "ipcoro/codec.hpp"
#include "ipcoro/detail/frame_pool.hpp"
#include "ipcoro/mutex.hpp"
#include "ipcoro/task.hpp"

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>

namespace ipcoro::detail {

/// Every message on the wire is a frame of one of these kinds. A sender greets with its
/// type identity before its first message; `end` is the explicit end of stream used by
/// transports that have none of their own (message queues).
enum class frame_kind : std::uint32_t { data = 0, hello = 1, end = 2 };

struct frame_view {
  frame_kind kind = frame_kind::data;
  std::span<const std::byte> payload;
};

/// What both ends of a transport keep: the address (for messages), the type identity
/// of the channel, a lock that serialises the coroutines using the end, and counters.
class port_base {
 public:
  explicit port_base(std::string address) : address_(std::move(address)) {}
  port_base(const port_base&) = delete;
  port_base& operator=(const port_base&) = delete;
  virtual ~port_base() = default;

  const std::string& address() const noexcept { return address_; }
  void set_identity(type_identity id) { identity_ = std::move(id); }
  const type_identity& identity() const noexcept { return identity_; }

  mutex lock;
  std::uint64_t messages = 0;
  std::uint64_t bytes = 0;

 private:
  std::string address_;
  type_identity identity_;
};

/// The sending end of a transport. One message at a time: prepare() hands out space for
/// the payload, commit() sends it. Callers serialise through `lock`.
class send_port : public port_base {
 public:
  using port_base::port_base;

  /// Space for a payload of `size` bytes. Throws channel_error when the transport cannot
  /// carry a message that large (the message says which option to raise).
  virtual std::span<std::byte> prepare(std::size_t size) = 0;
  /// Sends the prepared message (after the greeting, the first time).
  [[nodiscard]] virtual task<void> commit(pooled_frame) = 0;
  /// Ends the stream for the receivers. Never throws.
  virtual void close() noexcept = 0;
  /// Leaves without ending the stream (another sender goes on).
  virtual void detach() noexcept { close(); }
  /// Goes away without ending the stream cleanly, so receivers learn that the sender
  /// failed (an error on a stream, peer_died on an SPSC ring) instead of a clean end.
  virtual void abort() noexcept { detach(); }
  /// The largest payload a message can carry.
  virtual std::size_t max_payload() const noexcept = 0;

 protected:
  /// The greeting's payload, built once.
  std::span<const std::byte> greeting();

 private:
  std::string greeting_;
};

/// The receiving end of a transport. fill() makes the next data message current (checking
/// greetings on the way) or reports the end of the stream; consume() moves past it.
class receive_port : public port_base {
 public:
  using port_base::port_base;

  /// True when a data message is current, false at the end of the stream. Cancelling it
  /// loses nothing: whatever was read stays buffered in the port.
  [[nodiscard]] virtual task<bool> fill(pooled_frame) = 0;
  virtual std::span<const std::byte> current() const noexcept = 0;
  virtual void consume() noexcept = 0;
  virtual void close() noexcept = 0;

 protected:
  /// Checks a greeting against the expected identity; throws channel_type_mismatch or
  /// channel_error (not a greeting at all).
  void check_greeting(std::span<const std::byte> payload) const;
};

}  // namespace ipcoro::detail
