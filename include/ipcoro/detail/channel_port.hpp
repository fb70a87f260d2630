// SPDX-License-Identifier: MIT
// channel_port: the untyped, transport-specific ends behind channel_sender / channel_receiver.
#pragma once

#include "ipcoro/codec.hpp"
#include "ipcoro/detail/frame_pool.hpp"
#include "ipcoro/export.hpp"
#include "ipcoro/mutex.hpp"
#include "ipcoro/task.hpp"

#include <coroutine>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <stop_token>
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

/// How an end goes away: close (a clean end of stream), detach (leave, others go on),
/// abort (an end the receivers see as a failure).
enum class port_exit : unsigned char { close, detach, abort };

class port_base;
/// Unpins `port` (port_base::pin); deletes it when it was the last pin of an end whose
/// shared owners are gone.
IPCORO_API void unpin(port_base* port) noexcept;

/// What both ends of a transport keep: the address (for messages), the type identity of
/// the channel, a lock that serialises the coroutines using the end, counters, and what
/// lets leave() from one coroutine interrupt another one waiting in the transport.
///
/// Ends are shared (std::shared_ptr) by the channel half and every operation in flight,
/// so leaving while another coroutine waits never frees what that coroutine uses: the
/// wait is cancelled through the port's stop source, and the transport is finished once
/// the operation has returned.
class IPCORO_API port_base {
 public:
  explicit port_base(std::string address) : address_(std::move(address)) {}
  port_base(const port_base&) = delete;
  port_base& operator=(const port_base&) = delete;
  virtual ~port_base() = default;

  const std::string& address() const noexcept { return address_; }
  void set_identity(type_identity id) { identity_ = std::move(id); }
  const type_identity& identity() const noexcept { return identity_; }

  /// Ends this end: at once when no operation holds `lock`; otherwise the waiting
  /// operation is interrupted and the end is finished when it returns. The first call
  /// decides how; later calls do nothing. Never throws.
  void leave(port_exit how) noexcept;
  bool leaving() const noexcept { return leaving_; }
  /// How this end left (meaningful once leaving()).
  port_exit left_how() const noexcept { return exit_; }

  /// Marks an operation as in flight from right after it took `lock` to its end, so that
  /// a leave() meanwhile finishes the transport only once it is done with it.
  class [[nodiscard]] in_flight {
   public:
    explicit in_flight(port_base& port) noexcept : port_(port) { ++port_.in_flight_; }
    in_flight(const in_flight&) = delete;
    in_flight& operator=(const in_flight&) = delete;
    ~in_flight() {
      if (--port_.in_flight_ == 0 && port_.leaving_) port_.finish_once();
    }

   private:
    port_base& port_;
  };

  mutex lock;
  std::uint64_t messages = 0;
  std::uint64_t bytes = 0;

  /// Loans and views (channel_loan, channel_view) refer to their end by pointer and pin it,
  /// instead of sharing it: a std::shared_ptr copy costs a pair of atomic instructions per
  /// message. The ends' shared owners delete through port_deleter, which leaves an end
  /// still pinned to its last unpin(). Pins are not atomic: a loan or view is used on the
  /// thread of its channel end, as the end itself is.
  void pin() noexcept { ++pins_; }
  friend void unpin(port_base* port) noexcept;
  friend struct port_deleter;

 protected:
  /// Closes, detaches or aborts the transport itself; runs once, with nothing in flight.
  virtual void finish(port_exit how) noexcept = 0;

 private:
  friend class port_wait;
  void finish_once() noexcept;

  std::string address_;
  type_identity identity_;
  // Made once per port; replaced only after a caller's cancellation has used it up.
  std::stop_source stop_;
  int in_flight_ = 0;
  int pins_ = 0;
  bool orphaned_ = false;  // its shared owners are gone; deleted at the last unpin()
  port_exit exit_ = port_exit::close;
  bool leaving_ = false;
  bool finished_ = false;
};

/// The deleter of a channel end's shared owners: an end that a loan or view still pins
/// lives on until that lets it go.
struct IPCORO_API port_deleter {
  void operator()(port_base* port) const noexcept;
};

/// Awaits a transport task of a port (commit, fill) so that leave() can interrupt it. The
/// task runs under the port's stop source; once it has suspended, that source also
/// follows the awaiting coroutine's own stop token, so a caller's cancellation still
/// works. A task that completes without suspending touches no stop machinery beyond the
/// token copy every task makes.
class IPCORO_API port_wait {
 public:
  port_wait(const port_wait&) = delete;
  port_wait& operator=(const port_wait&) = delete;

  bool await_ready() const noexcept { return false; }
  template <class P>
  bool await_suspend(std::coroutine_handle<P> awaiter) {
    if constexpr (stop_token_carrier<P>) {
      caller_ = &awaiter.promise().stop_token();
    }
    return start(awaiter);
  }

 protected:
  port_wait(port_base& port, task_promise_base& promise, std::coroutine_handle<> task) noexcept
      : port_(port), promise_(promise), task_(task) {}
  ~port_wait() = default;

  /// Call first in await_resume: ends the forwarding of the caller's stop token. Throws
  /// std::bad_alloc only (renewing the stop source after a caller's cancellation).
  void end();
  /// True when leave() interrupted the wait (or came before it started), so that the
  /// task's operation_cancelled, if any, means "this end is gone", not "the caller gave up".
  bool left() const noexcept;
  bool started() const noexcept { return started_; }
  const port_base& port() const noexcept { return port_; }

 private:
  struct forward_stop {
    port_base* port;
    void operator()() const noexcept { port->stop_.request_stop(); }
  };
  bool start(std::coroutine_handle<> awaiter);

  port_base& port_;
  task_promise_base& promise_;
  std::coroutine_handle<> task_;
  const std::stop_token* caller_ = nullptr;
  std::optional<std::stop_callback<forward_stop>> forward_;
  bool started_ = false;
};

/// The sending end of a transport. One message at a time: prepare() hands out space for
/// the payload, send_prepared() sends it. Callers serialise through `lock` and hold an
/// in_flight while they use the end.
class IPCORO_API send_port : public port_base {
 public:
  using port_base::port_base;

  /// Space for a payload of `size` bytes. Throws channel_error when the transport cannot
  /// carry a message that large (the message says which option to raise).
  virtual std::span<std::byte> prepare(std::size_t size) = 0;

  class [[nodiscard]] send_operation : public port_wait {
   public:
    send_operation(send_port& port, task<void> commit) noexcept
        : port_wait(port, commit.handle().promise(), commit.handle()), commit_(std::move(commit)) {}
    /// Throws channel_closed when this end left before or while the send waited.
    void await_resume();

   private:
    task<void> commit_;
  };
  /// Sends the prepared message; throws channel_closed if this end is left (closed,
  /// detached, aborted) before or while it waits, and operation_cancelled when the
  /// caller's stop token is triggered.
  send_operation send_prepared() { return send_operation{*this, commit(pooled_frame{})}; }
  /// Sends the prepared message at once if the transport can take it without waiting (and
  /// has greeted): true when sent; false when send_prepared() must be awaited. Throws what
  /// send_prepared() would. The path of a message that needs no wait: no task, no stop
  /// machinery.
  virtual bool try_send_prepared() { return false; }
  /// Writes a payload of `size` bytes: `encode(value, out)`.
  using encode_fn = void (*)(const void* value, std::span<std::byte> out);
  /// The path of a message the transport takes now, in one call: encodes it straight into
  /// the transport and sends it. False when it did not (no room now, or a transport that
  /// has no such path): nothing was encoded, and prepare() / try_send_prepared() /
  /// send_prepared() follow. Throws what those would, and what `encode` throws.
  virtual bool try_send_encoded(std::size_t size, encode_fn encode, const void* value) {
    (void)size, (void)encode, (void)value;
    return false;
  }
  /// try_send_encoded of a value whose encoding is its bytes (a bytewise codec): no code of
  /// the user's runs in it, so nothing can take the port's lock or leave the end meanwhile,
  /// and the caller needs neither the lock nor an in-flight mark, only that the lock is free.
  virtual bool try_send_bytes(std::span<const std::byte> payload) {
    (void)payload;
    return false;
  }
  /// Whether this end has a try_send_bytes path at all: a transport without one costs a
  /// send no call to find that out.
  bool sends_bytes = false;
  /// Completes once every message sent so far is in the kernel; throws what a send would
  /// (channel_closed once the receiver has gone, also when only a deferred write saw it).
  send_operation flush_sent() { return send_operation{*this, drain(pooled_frame{})}; }
  /// The largest payload a message can carry.
  virtual std::size_t max_payload() const noexcept = 0;

  // Zero-copy loans (channel_sender::loan): space for a payload in the transport itself.
  // One at a time: `loan_open` while the channel's loan object holds it.

  class [[nodiscard]] lend_operation : public port_wait {
   public:
    lend_operation(send_port& port, task<std::span<std::byte>> lend) noexcept
        : port_wait(port, lend.handle().promise(), lend.handle()), lend_(std::move(lend)) {}
    /// The lent payload space. Throws channel_closed when this end left before or while
    /// the loan waited.
    std::span<std::byte> await_resume();

   private:
    task<std::span<std::byte>> lend_;
  };
  /// Lends space for a payload of `size` bytes, waiting for room (after the greeting, the
  /// first time), interruptible by leave() as send_prepared() is.
  lend_operation lend(std::size_t size) { return lend_operation{*this, lend_task(pooled_frame{}, size)}; }
  /// lend() when it need not wait: true with `space`; false when lend() must be awaited.
  /// Throws channel_error(EOPNOTSUPP) naming the address on a transport that cannot lend.
  virtual bool try_lend(std::size_t size, std::span<std::byte>& space);
  /// Publishes the first `size` bytes of the open loan as one message. Never waits.
  virtual void commit_loan(std::size_t size);
  /// Gives the open loan up unpublished.
  virtual void drop_loan() noexcept {}
  bool loan_open = false;
  /// Called once the end has its identity, before any send: a transport that greets
  /// eagerly does it here. Never throws; what it cannot do now goes with the first send.
  virtual void opened() noexcept {}

 protected:
  /// Sends the prepared message (after the greeting, the first time).
  [[nodiscard]] virtual task<void> commit(pooled_frame) = 0;
  /// flush_sent()'s part in the transport: nothing where every send reaches the kernel
  /// before it completes.
  [[nodiscard]] virtual task<void> drain(pooled_frame);
  /// The transport's part of lend(); by default refuses (EOPNOTSUPP, see try_lend).
  [[nodiscard]] virtual task<std::span<std::byte>> lend_task(pooled_frame, std::size_t size);
  /// channel_error(EOPNOTSUPP) naming the address: this transport lends no space.
  [[noreturn]] void throw_cannot_lend() const;
  /// The greeting's payload, built once.
  std::span<const std::byte> greeting();

 private:
  std::string greeting_;
};

/// What the stream ends of this process have done, for tests: write system calls made
/// (those of the io_uring included), the most bytes one sender held unwritten, the frames
/// lent to a pipe whole (vmsplice) instead of copied, and the payloads receivers read
/// straight into values (read_pending).
struct stream_stats {
  std::uint64_t writes = 0;
  std::uint64_t peak_buffered = 0;
  std::uint64_t lent_frames = 0;
  std::uint64_t direct_payloads = 0;
};
IPCORO_API stream_stats stream_counts() noexcept;

/// The receiving end of a transport. next() makes the next data message current (checking
/// greetings on the way) or reports the end of the stream; consume() moves past it.
class IPCORO_API receive_port : public port_base {
 public:
  using port_base::port_base;

  class [[nodiscard]] next_operation : public port_wait {
   public:
    next_operation(receive_port& port, task<bool> fill) noexcept
        : port_wait(port, fill.handle().promise(), fill.handle()), fill_(std::move(fill)) {}
    /// False at the end of the stream, or when this end left before or while it waited.
    bool await_resume();

   private:
    task<bool> fill_;
  };
  /// True when a data message is current, false at the end of the stream or once this
  /// end is left. Cancelling it through the caller's stop token loses nothing: whatever
  /// was read stays buffered in the port.
  next_operation next() { return next_operation{*this, fill(pooled_frame{})}; }
  /// next() when it need not wait: true with a data message current; false when next()
  /// must be awaited (nothing has arrived, the stream ended, or the transport has no such
  /// path). Throws what next() would.
  virtual bool try_next() { return false; }
  /// Puts a message's payload where its value goes: `decode(payload, out)`.
  using decode_fn = void (*)(std::span<const std::byte> payload, void* out);
  enum class take_outcome : unsigned char { taken, empty, other };
  /// The path of a data message that is there now, in one call: `decode` it and move past
  /// it, also when `decode` throws (a bad message is not offered again; the exception goes
  /// on). `empty`: nothing has arrived, next() must be awaited. `other`: try_next() must
  /// take it (a greeting, the end, a message already current, a transport without this
  /// path), and nothing was decoded. Throws what try_next() would.
  virtual take_outcome try_take(decode_fn decode, void* out) {
    (void)decode, (void)out;
    return take_outcome::other;
  }
  /// Whether this end has a try_take path at all (see sends_bytes).
  bool takes_now = false;
  /// The current message's payload. One still in the kernel (pending_payload) is read in
  /// first, which throws channel_error if the stream fails.
  virtual std::span<const std::byte> current() = 0;
  virtual void consume() noexcept = 0;

  /// The payload size that the typed receiver takes straight into its value: its T's size
  /// when codec<T> is bytewise, else 0. A stream then leaves a large message's payload in
  /// the kernel once all of it has arrived (pending_payload), for read_pending to put it
  /// where the value lives: one copy instead of a read and a decode.
  std::size_t direct_size = 0;
  /// Nonzero while the current message's payload, this many bytes, is still in the kernel.
  std::size_t pending_payload = 0;
  /// Copies the pending payload into `into` (pending_payload bytes); then consume() as for
  /// any message. Throws channel_error if the stream fails.
  virtual void read_pending(std::span<std::byte> into) { (void)into; }

  /// next() for a view (channel_receiver::receive_view): on a transport that can, the
  /// message stays where it arrived (an SPSC ring) until consume(); elsewhere next().
  next_operation next_view() { return next_operation{*this, fill_view(pooled_frame{})}; }
  /// try_next() for a view, likewise.
  virtual bool try_next_view() { return try_next(); }
  /// Ends the view handed out of the current message, if any: consumes it.
  void end_view() noexcept {
    if (!viewing) return;
    viewing = false;
    consume();
  }
  /// A view of the current message is out (channel_view), numbered `view_serial`.
  bool viewing = false;
  std::uint64_t view_serial = 0;
  /// Acknowledges every message consumed so far, on a transport that keeps messages until
  /// then (a durable file ring); elsewhere a message is acknowledged as it is received.
  virtual void acknowledge() noexcept {}

 protected:
  /// The transport's part of next(): true with a current message, false at the end.
  [[nodiscard]] virtual task<bool> fill(pooled_frame) = 0;
  /// The transport's part of next_view(); fill() unless the transport keeps views in place.
  [[nodiscard]] virtual task<bool> fill_view(pooled_frame) { return fill(pooled_frame{}); }
  /// Checks a greeting against the expected identity; throws channel_type_mismatch or
  /// channel_error (not a greeting at all).
  void check_greeting(std::span<const std::byte> payload) const;
};

/// Reads a pending payload (receive_port::read_pending) when converted to T, so that
/// `std::optional<T>{std::in_place, read_pending_as<T>{port}}` reads it where the value lives.
template <class T>
struct read_pending_as {
  receive_port& port;
  operator T() const {
    T value;
    port.read_pending(std::as_writable_bytes(std::span<T, 1>(&value, 1)));
    return value;
  }
};

/// take_current of a message of `size` bytes that `take` puts where it goes, and moves
/// past it, also when that throws (a bad message is not offered again).
template <class Take>
decltype(auto) take_current_sized(receive_port& port, std::size_t size, Take&& take) {
  struct consume_at_exit {
    receive_port& port;
    ~consume_at_exit() { port.consume(); }
  } consume{port};
  ++port.messages;  // counted first, so that the value can be returned as it is decoded
  port.bytes += size;
  try {
    return take();
  } catch (...) {
    --port.messages;
    port.bytes -= size;
    throw;
  }
}

/// Decodes the port's current message with `decode` and moves past it; returns what
/// `decode` does, built in place (a large T is not copied on its way out).
template <class Decode>
decltype(auto) take_current(receive_port& port, Decode&& decode) {
  const std::span<const std::byte> payload = port.current();
  return take_current_sized(port, payload.size(), [&]() -> decltype(auto) { return decode(payload); });
}

/// take_current for a receive: the optional<T> is decoded into where it is returned; a
/// payload still in the kernel is read there directly.
template <encodable T>
std::optional<T> take_current_value(receive_port& port) {
  if constexpr (bytewise_codec<T>) {
    if (port.pending_payload == sizeof(T)) {
      return take_current_sized(port, sizeof(T), [&] {
        return std::optional<T>{std::in_place, read_pending_as<T>{port}};
      });
    }
  }
  return take_current(port, [](std::span<const std::byte> payload) {
    return std::optional<T>{std::in_place, decoded_as<T>{payload}};
  });
}

/// take_current for receive_into.
template <encodable T>
void take_current_into(receive_port& port, T& into) {
  if constexpr (bytewise_codec<T>) {
    if (port.pending_payload == sizeof(T)) {
      take_current_sized(port, sizeof(T),
                         [&] { port.read_pending(std::as_writable_bytes(std::span<T, 1>(&into, 1))); });
      return;
    }
  }
  take_current(port, [&](std::span<const std::byte> payload) { ipcoro::decode_into(payload, into); });
}

}  // namespace ipcoro::detail
