// SPDX-License-Identifier: MIT
// channel: typed senders and receivers between coroutines, in one process or across
// processes over any transport.
#pragma once

#include "ipcoro/channel_address.hpp"
#include "ipcoro/channel_error.hpp"
#include "ipcoro/channel_loan.hpp"
#include "ipcoro/codec.hpp"
#include "ipcoro/deadline.hpp"
#include "ipcoro/detail/channel_port.hpp"
#include "ipcoro/detail/frame_pool.hpp"
#include "ipcoro/detail/local_channel.hpp"
#include "ipcoro/detail/wait_list.hpp"
#include "ipcoro/error.hpp"
#include "ipcoro/export.hpp"
#include "ipcoro/task.hpp"
#include "ipcoro/when_any.hpp"

#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <memory>
#include <new>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <system_error>
#include <type_traits>
#include <utility>
#include <vector>

namespace ipcoro {

template <class T>
class channel_sender;
template <class T>
class channel_receiver;
template <class T>
class channel_send_operation;
template <class T>
class channel_loan_operation;
template <class T, class R>
class channel_receive_operation;

namespace detail {

IPCORO_API [[noreturn]] void throw_channel_closed(const char* what);
/// Rethrows an error of opening or creating the transport behind `address` so that it
/// names the address (and which of its options to change), keeping its error code.
/// `throw;` semantics when it already does.
IPCORO_API [[noreturn]] void rethrow_for_address(std::string_view address, const std::system_error& e);
/// channel_error with `errno_value` (an errno).
IPCORO_API [[noreturn]] void throw_channel_error(int errno_value, const char* what);
/// channel_closed for a send that its own sender's close, detach or abort came before
/// (`waited` false) or interrupted.
IPCORO_API [[noreturn]] void throw_sender_left(const port_base& port, bool waited);

IPCORO_API [[nodiscard]] std::unique_ptr<send_port> link_send_port(void* link_state);
IPCORO_API [[nodiscard]] std::unique_ptr<receive_port> link_receive_port(void* link_state);
IPCORO_API [[nodiscard]] task<std::unique_ptr<send_port>> open_send_port(channel_address address);
IPCORO_API [[nodiscard]] task<std::unique_ptr<receive_port>> open_receive_port(channel_address address);

}  // namespace detail

/// The sending half of a channel. Move-only; destroying it closes it.
template <class T>
class channel_sender {
 public:
  channel_sender() noexcept = default;
  channel_sender(channel_sender&&) noexcept = default;
  channel_sender& operator=(channel_sender&& other) noexcept {
    if (this != &other) {
      close();
      local_ = std::move(other.local_);
      port_ = std::move(other.port_);
      sent_ = other.sent_;
      uncaught_ = other.uncaught_;
    }
    return *this;
  }
  /// Closes the channel; but when destroyed by an exception unwinding the stack, aborts it
  /// (see abort()), so receivers never take a failed producer's stream for a whole one.
  ~channel_sender() {
    if (std::uncaught_exceptions() > uncaught_) {
      abort();
    } else {
      close();
    }
  }

  /// Sends one value, waiting while the channel is full (backpressure). Throws
  /// channel_closed when the receiving side has gone, channel_error for a message the
  /// transport cannot carry; cancellable through the caller's stop token. (GCC 12: name
  /// the value, `T v{...}; co_await tx.send(std::move(v));` — a braced temporary inside a
  /// co_await expression is copied bytewise, which breaks members such as std::string.)
  ///
  /// The operation is a task<void> (it can be given to sync_wait, when_any, a
  /// vector<task<void>>...), but awaited directly, a send that can complete at once does so
  /// without a coroutine frame; it refers to this sender, which must outlive the co_await.
  /// An lvalue sent is referred to, not copied: keep it unchanged until the operation is
  /// awaited or made a task (as `co_await tx.send(v)` is at once). An rvalue is moved in.
  // Not inlined: GCC 12 -O2, inlining it into `co_await tx.send(point{i, 2 * i})`, lost
  // stores into the braced temporary. Two overloads, not one by value: T is copied once.
  [[nodiscard, gnu::noinline]] channel_send_operation<T> send(
      const T& value) requires std::is_copy_constructible_v<T> {
    if (!local_ && !has_port()) empty_send();
    return channel_send_operation<T>{*this, value};
  }
  [[nodiscard, gnu::noinline]] channel_send_operation<T> send(T&& value) {
    if (!local_ && !has_port()) empty_send();
    return channel_send_operation<T>{*this, std::move(value)};
  }

  /// Completes once every value sent so far has reached the kernel: it is in the pipe, FIFO,
  /// queue or ring, and a process may exit or block without losing it. Streams, queues with
  /// one receiver and SPSC rings hold values sent in a loop turn until it ends (see
  /// docs/channels.md); elsewhere this does nothing. Throws channel_closed when the receiver
  /// has gone (a later write may be what found out), and when this sender is empty.
  [[nodiscard]] task<void> flush() {
    if constexpr (encodable<T>) {
      if (port_) return flush_port(detail::pooled_frame{}, port_);
    }
    return flush_local(detail::pooled_frame{}, local_ != nullptr);
  }

  /// Lends `size` bytes of the transport to write one message's encoding in place (see
  /// channel_loan): waits for room as send() does, and fails as send() does
  /// (channel_closed, peer_died, EMSGSIZE; timed_out / operation_cancelled with nothing
  /// lent or published). SPSC rings (`shm:`, `file:`) only: elsewhere channel_error
  /// (EOPNOTSUPP) naming the address; an in-process channel holds values, not bytes.
  /// Awaited directly, a loan with room takes no coroutine frame (as send()).
  [[nodiscard]] channel_loan_operation<T> loan(std::size_t size) {
    if constexpr (encodable<T>) {
      if (port_) return channel_loan_operation<T>{*this, size};
    }
    if (local_)
      detail::throw_channel_error(EOPNOTSUPP, "channel loan: an in-process channel holds values, not bytes");
    detail::throw_channel_closed("channel loan: this sender is empty (moved from or closed)");
  }
  /// loan(sizeof(T)) with a T value-initialised in place: set its fields, then commit().
  [[nodiscard]] task<object_loan<T>> loan_object() requires std::is_trivially_copyable_v<T> {
    return loan_object_port(detail::pooled_frame{}, loan(sizeof(T)));
  }

  /// Ends the stream: receivers get what was sent, then an empty optional. Waiting
  /// senders and receivers wake up; a send of this sender that is waiting (in another
  /// coroutine) gets channel_closed, and its message is not sent. Never throws; a second
  /// close does nothing. Across processes the transport is closed once that send has
  /// returned; a stream message cut half way by it makes the close an abort, so the
  /// receiver reports the cut instead of a clean end.
  void close() noexcept { leave(detail::port_exit::close); }

  /// Leaves without ending the stream, for one of several senders on a transport that
  /// carries many (message queues, MPMC rings). For a pipe or FIFO this is close(): the
  /// stream ends when every writer has closed. A send of this sender that is waiting gets
  /// channel_closed, as with close().
  void detach() noexcept { leave(detail::port_exit::detach); }

  /// Ends the stream with an error instead of a clean end, for a producer that failed:
  /// an in-process receiver, or one across a pipe or FIFO, gets channel_error; across an
  /// SPSC ring, peer_died once this process has exited; across an MPMC ring or a message
  /// queue, peer_died once every sender, this process among them, has died. A send of
  /// this sender that is waiting gets channel_closed, as with close(). Never throws.
  void abort() noexcept { leave(detail::port_exit::abort); }

  /// Messages sent through this sender (still counted after it is closed).
  std::uint64_t messages_sent() const noexcept {
    if (port_) return port_->messages;
    return local_ ? local_->sent : sent_;
  }
  /// The largest encoded value the transport carries (unlimited in process).
  std::size_t max_message_size() const noexcept { return port_ ? port_->max_payload() : SIZE_MAX; }
  explicit operator bool() const noexcept { return local_ || port_; }

  explicit channel_sender(std::shared_ptr<detail::local_channel<T>> state) noexcept
      : local_(std::move(state)) {}
  explicit channel_sender(std::unique_ptr<detail::send_port> port) noexcept
      : port_(port.release(), detail::port_deleter{}) {}

 private:
  friend class channel_send_operation<T>;
  friend class channel_loan_operation<T>;

  bool has_port() const noexcept {
    if constexpr (encodable<T>) {
      return port_ != nullptr;
    } else {
      return false;
    }
  }
  [[noreturn]] static void empty_send() {
    detail::throw_channel_closed("channel send: this sender is empty (moved from or closed)");
  }

  /// The send as a coroutine: for a send that has to wait, or one moved into a task.
  task<void> start_send(T value) {
    if (local_) return send_local(detail::pooled_frame{}, local_, std::move(value));
    if constexpr (encodable<T>) {
      if (port_) return send_port(detail::pooled_frame{}, port_, std::move(value));
    }
    return send_empty(detail::pooled_frame{});
  }
  static task<void> send_empty(detail::pooled_frame) {
    empty_send();
    co_return;
  }

  /// Stores `value` in the in-process channel, which has room.
  static void put_local(detail::local_channel<T>& s, T&& value) {
    std::size_t at = s.head + s.count;
    if (at >= s.slots.size()) at -= s.slots.size();
    s.slots[at].emplace(std::move(value));
    ++s.count;
    ++s.sent;
    if (!s.receivers.empty()) s.receivers.wake_one();
  }
  void leave(detail::port_exit how) noexcept {
    if (local_) {
      sent_ = local_->sent;
      if (how != detail::port_exit::detach) {
        local_->sender_closed = true;
        local_->sender_aborted = how == detail::port_exit::abort;
        local_->receivers.wake_all();
        local_->senders.wake_all();
      }
      local_.reset();
    }
    if (port_) {
      sent_ = port_->messages;
      port_->leave(how);
      port_.reset();
    }
  }

  // The operations own a share of the state or port: the half may be closed or destroyed
  // by another coroutine while they wait.
  static task<void> send_local(detail::pooled_frame, std::shared_ptr<detail::local_channel<T>> state,
                               T value) {
    detail::local_channel<T>& s = *state;
    for (;;) {
      if (s.receiver_closed)
        detail::throw_channel_closed("channel send: the receiver has closed the channel");
      if (s.sender_closed) detail::throw_channel_closed("channel send: the channel was closed");
      if (s.count < s.slots.size()) {
        if (co_await detail::stop_requested()) throw operation_cancelled{};
        put_local(s, std::move(value));
        co_return;
      }
      co_await detail::park_operation{s.senders};
    }
  }

  static task<object_loan<T>> loan_object_port(detail::pooled_frame, task<channel_loan> lend) {
    channel_loan loan = co_await std::move(lend);
    object_loan<T> typed{std::move(loan)};
    co_return typed;
  }

  static task<void> send_port(detail::pooled_frame, std::shared_ptr<detail::send_port> owner, T value) {
    detail::send_port& port = *owner;
    mutex::guard guard = co_await port.lock.lock();
    const detail::port_base::in_flight busy{port};
    if (port.leaving()) detail::throw_sender_left(port, false);
    if (port.loan_open) detail::throw_loan_open(port);
    if (co_await detail::stop_requested()) throw operation_cancelled{};
    const std::size_t size = codec<T>::size(value);
    codec<T>::encode(value, port.prepare(size));
    if (!port.try_send_prepared()) co_await port.send_prepared();
    ++port.messages;
    port.bytes += size;
  }

  static task<void> flush_port(detail::pooled_frame, std::shared_ptr<detail::send_port> owner) {
    detail::send_port& port = *owner;
    mutex::guard guard = co_await port.lock.lock();
    const detail::port_base::in_flight busy{port};
    if (port.leaving()) detail::throw_sender_left(port, false);
    detail::send_port::send_operation flushed = port.flush_sent();
    co_await flushed;
  }
  static task<void> flush_local(detail::pooled_frame, bool open) {
    if (!open) detail::throw_channel_closed("channel flush: this sender is empty (moved from or closed)");
    co_return;
  }

  std::shared_ptr<detail::local_channel<T>> local_;
  std::shared_ptr<detail::send_port> port_;
  std::uint64_t sent_ = 0;  // the count at close
  int uncaught_ = std::uncaught_exceptions();
};

/// The receiving half of a channel. Move-only; destroying it closes it.
template <class T>
class channel_receiver {
 public:
  channel_receiver() noexcept = default;
  channel_receiver(channel_receiver&&) noexcept = default;
  channel_receiver& operator=(channel_receiver&& other) noexcept {
    if (this != &other) {
      close();
      local_ = std::move(other.local_);
      port_ = std::move(other.port_);
      received_ = other.received_;
    }
    return *this;
  }
  ~channel_receiver() { close(); }

  /// The next value, or an empty optional once the stream has ended (every sender closed,
  /// or this receiver was closed). Throws channel_type_mismatch for a peer of another
  /// type, peer_died when a ring or queue sender died without closing, decode_error for
  /// bytes the codec rejects; cancellable through the caller's stop token. Nothing is
  /// lost: a receive asked to stop before it takes its message (it lost a when_any race,
  /// its deadline passed) throws operation_cancelled or timed_out and leaves the message,
  /// read from the transport or not, for the next receive. `.with_timeout(d)` bounds it.
  ///
  /// The operation is a task<std::optional<T>>, but awaited directly, a receive whose
  /// value is there completes without a coroutine frame; it refers to this receiver,
  /// which must outlive the co_await.
  [[nodiscard]] channel_receive_operation<T, std::optional<T>> receive() {
    return channel_receive_operation<T, std::optional<T>>{*this, nullptr};
  }

  /// Receives the next value into `into`, reusing what it holds: a string's or vector's
  /// capacity (codec<T>::decode_into), so that once `into` is large enough a receive
  /// allocates nothing, and a large value is written once instead of travelling through
  /// an optional. True with a value; false at the end of the stream, with `into`
  /// unchanged. Throws as receive() does (if decoding fails, `into` holds an unspecified
  /// value). `into` must stay alive until the returned task has completed.
  [[nodiscard]] channel_receive_operation<T, bool> receive_into(T& into) {
    return channel_receive_operation<T, bool>{*this, &into};
  }

  /// The next message in place, not copied out (see channel_view): its encoding, or an
  /// empty optional at the end of the stream. Waits and fails as receive() does (nothing
  /// is lost to a cancellation or a timeout). Zero-copy on an SPSC ring (`shm:`, `file:`);
  /// elsewhere the bytes are the receiver's buffer. An in-process channel has none:
  /// channel_error(EOPNOTSUPP).
  [[nodiscard]] channel_receive_operation<T, std::optional<channel_view>> receive_view() {
    if (local_)
      detail::throw_channel_error(EOPNOTSUPP,
                                  "channel receive_view: an in-process channel holds values, not bytes");
    return channel_receive_operation<T, std::optional<channel_view>>{*this, nullptr};
  }
  /// receive_view() of one T: a const T& in place. Throws decode_error when the message
  /// does not hold exactly one T (it is released).
  [[nodiscard]] task<std::optional<object_view<T>>> receive_object_view() requires
      std::is_trivially_copyable_v<T> {
    return object_view_port(detail::pooled_frame{}, receive_view());
  }

  /// Completes once receive() would not wait: a value is ready or the stream has ended.
  /// Consumes nothing. select() is built on it.
  [[nodiscard]] task<void> ready() {
    if (local_) return ready_local(detail::pooled_frame{}, local_);
    if constexpr (encodable<T>) {
      if (port_) return ready_port(detail::pooled_frame{}, port_);
    }
    return nothing_void(detail::pooled_frame{});
  }

  /// Stops receiving: senders of an in-process channel, pipe, FIFO or SPSC ring get
  /// channel_closed; values not yet received are dropped. A receive() or ready() of this
  /// receiver that is waiting (in another coroutine) wakes up and reports the end of the
  /// stream (a receive whose message had already arrived still returns it); across
  /// processes the transport is closed once that operation has returned. Never throws.
  void close() noexcept {
    if (local_) {
      received_ = local_->received;
      local_->receiver_closed = true;
      local_->senders.wake_all();
      local_->receivers.wake_all();
      local_.reset();
    }
    if (port_) {
      received_ = port_->messages;
      port_->leave(detail::port_exit::close);
      port_.reset();
    }
  }

  /// Acknowledges every value received so far. On a durable file channel (durable=1) a
  /// receiver restarted after a crash resumes after the last acknowledged value: values
  /// received but not acknowledged come again, and their room in the file is not reused
  /// until then, so acknowledge often enough for the sender not to wait. Elsewhere a
  /// value is acknowledged as it is received, and this does nothing. Never throws.
  void ack() noexcept {
    if (port_) port_->acknowledge();
  }

  /// Messages received through this receiver (still counted after it is closed).
  std::uint64_t messages_received() const noexcept {
    if (port_) return port_->messages;
    return local_ ? local_->received : received_;
  }
  explicit operator bool() const noexcept { return local_ || port_; }

  /// For select(): another waiting receiver of the same in-process channel gets the turn
  /// this one was woken for but did not use.
  void pass_on() noexcept {
    if (local_ && local_->count > 0) local_->receivers.wake_one();
  }

  explicit channel_receiver(std::shared_ptr<detail::local_channel<T>> state) noexcept
      : local_(std::move(state)) {}
  explicit channel_receiver(std::unique_ptr<detail::receive_port> port) noexcept
      : port_(port.release(), detail::port_deleter{}) {
    if constexpr (bytewise_codec<T>) port_->direct_size = sizeof(T);
  }

 private:
  friend class channel_receive_operation<T, std::optional<T>>;
  friend class channel_receive_operation<T, bool>;
  friend class channel_receive_operation<T, std::optional<channel_view>>;

  /// The receives as coroutines: for a receive that has to wait, or one moved into a task.
  task<std::optional<T>> start_receive() {
    if (local_) return receive_local(detail::pooled_frame{}, local_);
    if constexpr (encodable<T>) {
      if (port_) return receive_port(detail::pooled_frame{}, port_);
    }
    return nothing(detail::pooled_frame{});
  }
  task<bool> start_receive_into(T& into) {
    if (local_) return receive_local_into(detail::pooled_frame{}, local_, into);
    if constexpr (encodable<T>) {
      if (port_) return receive_port_into(detail::pooled_frame{}, port_, into);
    }
    return nothing_bool(detail::pooled_frame{});
  }

  // As for the sender: the operations own a share of the state or port.
  static task<std::optional<T>> receive_local(detail::pooled_frame,
                                              std::shared_ptr<detail::local_channel<T>> state) {
    detail::local_channel<T>& s = *state;
    if (!co_await next_local(detail::pooled_frame{}, s)) co_return std::nullopt;
    if (co_await detail::stop_requested()) throw operation_cancelled{};
    std::optional<T> value = std::move(s.slots[s.head]);
    pop_local(s);
    co_return value;
  }

  static task<bool> receive_local_into(detail::pooled_frame, std::shared_ptr<detail::local_channel<T>> state,
                                       T& into) {
    detail::local_channel<T>& s = *state;
    if (!co_await next_local(detail::pooled_frame{}, s)) co_return false;
    if (co_await detail::stop_requested()) throw operation_cancelled{};
    into = std::move(*s.slots[s.head]);
    pop_local(s);
    co_return true;
  }

  /// Waits until the in-process channel has a value at its head (true) or has ended.
  static task<bool> next_local(detail::pooled_frame, detail::local_channel<T>& s) {
    for (;;) {
      if (s.receiver_closed) co_return false;
      if (s.count > 0) co_return true;
      if (s.sender_aborted)
        detail::throw_channel_error(ECONNRESET, "channel receive: the sender aborted the stream");
      if (s.sender_closed) co_return false;
      co_await detail::park_operation{s.receivers};
    }
  }

  static void pop_local(detail::local_channel<T>& s) noexcept {
    s.slots[s.head].reset();
    if (++s.head == s.slots.size()) s.head = 0;
    --s.count;
    ++s.received;
    if (!s.senders.empty()) s.senders.wake_one();
  }

  static task<void> ready_local(detail::pooled_frame, std::shared_ptr<detail::local_channel<T>> state) {
    while (!state->readable()) co_await detail::park_operation{state->receivers};
  }

  static task<std::optional<object_view<T>>> object_view_port(detail::pooled_frame,
                                                              task<std::optional<channel_view>> next) {
    std::optional<channel_view> view = co_await std::move(next);
    if (!view) co_return std::nullopt;
    detail::check_object_view(view->bytes(), sizeof(T), alignof(T), codec<T>::type_name());
    std::optional<object_view<T>> typed{std::in_place, std::move(*view)};
    co_return typed;
  }

  static task<std::optional<channel_view>> nothing_view(detail::pooled_frame) { co_return std::nullopt; }

  /// The receive operations' one shape: under the port's lock, the view handed out last is
  /// released, the next message is made current (`view`: left in place), the stop token is
  /// checked at the commit point (a receive that lost a race leaves the message current),
  /// and `take(owner)` makes the result; Result{} at the end of the stream.
  template <class Result, class Take>
  static task<Result> take_next(detail::pooled_frame, std::shared_ptr<detail::receive_port> owner, bool view,
                                Take take) {
    detail::receive_port& port = *owner;
    mutex::guard guard = co_await port.lock.lock();
    const detail::port_base::in_flight busy{port};
    port.end_view();
    if (port.leaving()) co_return Result{};
    bool got = view ? port.try_next_view() : port.try_next();
    if (!got) got = view ? co_await port.next_view() : co_await port.next();
    if (!got) co_return Result{};
    if (co_await detail::stop_requested()) throw operation_cancelled{};  // the message stays current
    co_return take(owner);
  }

  static task<std::optional<T>> receive_port(detail::pooled_frame,
                                             std::shared_ptr<detail::receive_port> owner) {
    return take_next<std::optional<T>>(
        detail::pooled_frame{}, std::move(owner), false,
        [](std::shared_ptr<detail::receive_port>& owner) { return detail::take_current_value<T>(*owner); });
  }

  static task<bool> receive_port_into(detail::pooled_frame, std::shared_ptr<detail::receive_port> owner,
                                      T& into) {
    return take_next<bool>(detail::pooled_frame{}, std::move(owner), false,
                           [&into](std::shared_ptr<detail::receive_port>& owner) {
                             detail::take_current_into(*owner, into);
                             return true;
                           });
  }

  task<std::optional<channel_view>> start_receive_view() {
    if constexpr (encodable<T>) {
      if (port_) {
        return take_next<std::optional<channel_view>>(detail::pooled_frame{}, port_, true,
                                                      &take_current_view);
      }
    }
    return nothing_view(detail::pooled_frame{});  // (an in-process channel: receive_view() threw)
  }
  /// The port's current message as a view, which pins the port.
  static std::optional<channel_view> take_current_view(const std::shared_ptr<detail::receive_port>& owner) {
    detail::receive_port& port = *owner;
    const std::span<const std::byte> payload = port.current();
    port.viewing = true;
    ++port.messages;
    port.bytes += payload.size();
    return std::optional<channel_view>{std::in_place, port, payload, ++port.view_serial};
  }

  static task<void> ready_port(detail::pooled_frame, std::shared_ptr<detail::receive_port> owner) {
    detail::receive_port& port = *owner;
    mutex::guard guard = co_await port.lock.lock();
    const detail::port_base::in_flight busy{port};
    port.end_view();
    if (!port.leaving() && !port.try_next()) (void)co_await port.next();
  }

  static task<std::optional<T>> nothing(detail::pooled_frame) { co_return std::nullopt; }
  static task<void> nothing_void(detail::pooled_frame) { co_return; }
  static task<bool> nothing_bool(detail::pooled_frame) { co_return false; }

  std::shared_ptr<detail::local_channel<T>> local_;
  std::shared_ptr<detail::receive_port> port_;
  std::uint64_t received_ = 0;  // the count at close
};

template <class T>
struct channel_pair {
  channel_sender<T> sender;
  channel_receiver<T> receiver;
};

/// An in-process channel holding up to `capacity` values: no syscalls, no encoding, and no
/// allocation per message once warm. Both halves must be used on one loop's thread.
/// Throws std::invalid_argument for a capacity of 0.
template <class T>
[[nodiscard]] channel_pair<T> make_channel(std::size_t capacity) {
  if (capacity == 0) throw std::invalid_argument("ipcoro::make_channel: capacity must be at least 1");
  auto state = std::make_shared<detail::local_channel<T>>(capacity);
  return {channel_sender<T>{state}, channel_receiver<T>{state}};
}

/// Both ends of a cross-process channel, made before fork: each process then takes the
/// end it uses and destroys the link, which closes the end it did not take. Names
/// (FIFO path, queue, segment, file) are removed as soon as both ends are open, so
/// nothing is left behind even if every process crashes. `fd:` addresses are not links.
class IPCORO_API channel_link {
 public:
  channel_link() noexcept;
  channel_link(channel_link&&) noexcept;
  channel_link& operator=(channel_link&&) noexcept;
  ~channel_link();

  /// Creates the transport named by `address` (see channel_address). Throws
  /// bad_channel_address, or std::system_error naming the object and the limit to raise.
  [[nodiscard]] static channel_link create(std::string_view address);

  /// Takes the sending end. Throws std::logic_error if it was taken already.
  template <encodable T>
  [[nodiscard]] channel_sender<T> sender() {
    std::unique_ptr<detail::send_port> port = detail::link_send_port(state_.get());
    port->set_identity(identity_of<T>());
    port->opened();
    return channel_sender<T>{std::move(port)};
  }
  /// Takes the receiving end. Throws std::logic_error if it was taken already.
  template <encodable T>
  [[nodiscard]] channel_receiver<T> receiver() {
    std::unique_ptr<detail::receive_port> port = detail::link_receive_port(state_.get());
    port->set_identity(identity_of<T>());
    return channel_receiver<T>{std::move(port)};
  }

  /// Closes whatever end has not been taken.
  void reset() noexcept;
  const channel_address& address() const;

  struct state;

 private:
  static void create_transport(state& s);

  std::unique_ptr<state> state_;
};

/// Opens the receiving end of a named channel, creating the FIFO, queue, segment or file
/// (removed again when the receiver is destroyed). For a FIFO this waits for the first
/// sender. `fd:N` takes over descriptor N as a byte stream.
template <encodable T>
[[nodiscard]] task<channel_receiver<T>> open_receiver(std::string address) {
  std::unique_ptr<detail::receive_port> port;
  try {
    port = co_await detail::open_receive_port(channel_address::parse(address));
  } catch (const std::system_error& e) {
    detail::rethrow_for_address(address, e);
  }
  port->set_identity(identity_of<T>());
  co_return channel_receiver<T>{std::move(port)};
}

/// Opens the sending end of a named channel whose receiver exists (for a FIFO, waits for
/// the receiver to open it). Throws channel_error when there is no such channel.
template <encodable T>
[[nodiscard]] task<channel_sender<T>> open_sender(std::string address) {
  std::unique_ptr<detail::send_port> port;
  try {
    port = co_await detail::open_send_port(channel_address::parse(address));
  } catch (const std::system_error& e) {
    detail::rethrow_for_address(address, e);
  }
  port->set_identity(identity_of<T>());
  port->opened();
  co_return channel_sender<T>{std::move(port)};
}

/// Waits until one of `receivers` has a value ready (or has ended) and returns its index;
/// a receive() on that receiver then completes without waiting. The other waits are
/// cancelled, and nothing is consumed from them.
template <class... R>
[[nodiscard]] task<std::size_t> select(R&... receivers) {
  static_assert(sizeof...(R) > 0, "ipcoro::select: give at least one receiver");
  std::vector<task<void>> waits;
  waits.reserve(sizeof...(R));
  (waits.push_back(receivers.ready()), ...);
  when_any_result<void> result = co_await when_any(std::move(waits));
  std::size_t i = 0;
  ((i++ != result.index ? receivers.pass_on() : void()), ...);
  co_return result.index;
}

}  // namespace ipcoro

// The operations send() and receive() return; templates on the complete sender and receiver.
#include "ipcoro/detail/channel_operations.hpp"  // IWYU pragma: export
