// SPDX-License-Identifier: MIT
// channel_send_operation and channel_receive_operation: what send() and receive() return.
// Included at the end of ipcoro/channel.hpp, whose sender and receiver they work on.
#pragma once

#include "ipcoro/channel.hpp"

#include <exception>
#include <memory>
#include <optional>
#include <type_traits>
#include <utility>

namespace ipcoro {

namespace detail {
/// How a channel operation (Op, a deferred task<R>) is awaited: it first tries the work at
/// once (Op::try_now, told whether a stop was asked), and only when that cannot complete
/// makes its coroutine (Op::make_awaited: one that may leave the last step to resume) and
/// awaits it as a task; Op::resume gives the outcome either way.
template <class Op, class R>
struct channel_op_awaiter {
  Op& op;
  bool await_ready() const noexcept { return false; }
  template <class P>
  [[gnu::always_inline]] bool await_suspend(std::coroutine_handle<P> h) {
    if (op.deferred() && op.try_now(stop_requested_of(h))) return false;
    return wait(h);
  }
  /// The operation's coroutine, made now if it was not: out of line, so that what is
  /// tried at once inlines where the operation is awaited.
  template <class P>
  [[gnu::noinline]] bool wait(std::coroutine_handle<P> h) {
    if (op.deferred()) op.make_awaited();
    return typename task<R>::awaiter{op.handle()}.await_suspend(h);
  }
  [[gnu::always_inline]] R await_resume() { return op.resume(); }
};
}  // namespace detail

/// What channel_sender::send returns: a task<void> that, awaited directly, first tries to
/// send at once (room in an in-process channel; a transport that takes the message without
/// waiting, with the port's lock free) and only otherwise starts the send's coroutine.
/// Either way the outcome is the same: the stop token is checked before the message is
/// committed, and the errors are those of the coroutine.
template <class T>
class [[nodiscard]] channel_send_operation : public task<void> {
 public:
  channel_send_operation(channel_sender<T>& sender,
                         T&& value) noexcept(std::is_nothrow_move_constructible_v<T>)
      : task<void>(&make), sender_(sender), owned_(std::in_place, std::move(value)), value_(&*owned_) {}
  /// Refers to `value` (no copy): what co_await tx.send(v) keeps alive until it is done.
  channel_send_operation(channel_sender<T>& sender,
                         const T& value) noexcept requires std::is_copy_constructible_v<T>
      : task<void>(&make), sender_(sender), value_(&value) {}
  channel_send_operation(const channel_send_operation&) = delete;
  channel_send_operation& operator=(const channel_send_operation&) = delete;
  // Inline where the operation is awaited, as try_now and resume, whatever the size of the
  // caller's unit: the inliner left all three as calls in a large one (ipcoro-bench).
  [[gnu::always_inline]] ~channel_send_operation() = default;

  using awaiter = detail::channel_op_awaiter<channel_send_operation, void>;
  awaiter operator co_await() & noexcept { return awaiter{*this}; }
  awaiter operator co_await() && noexcept { return awaiter{*this}; }

 private:
  friend awaiter;
  void make_awaited() { make_now(); }

  static task<void> make(task<void>& base) {
    auto& op = static_cast<channel_send_operation&>(base);
    if constexpr (encodable<T>) {
      if (op.prepared_) return send_prepared(detail::pooled_frame{}, op.sender_.port_, op.prepared_->size);
    }
    return op.sender_.start_send(op.take_value());
  }

  /// The rest of a send that try_port prepared and the transport could not take at once:
  /// it waits for the transport with the message as prepared, under the lock try_port
  /// took (this operation holds it until resume()), so it is not encoded again.
  static task<void> send_prepared(detail::pooled_frame, std::shared_ptr<detail::send_port> owner,
                                  std::size_t size) {
    detail::send_port& port = *owner;
    co_await port.send_prepared();
    ++port.messages;
    port.bytes += size;
  }

  /// The value to store: moved from an rvalue's, or a copy of the lvalue (a type that
  /// cannot be copied has no lvalue send, see the constructors).
  T take_value() {
    if constexpr (std::is_copy_constructible_v<T>) {
      if (!owned_) return T(*value_);
    }
    return std::move(*owned_);
  }

  /// True when the send is done (or has failed without waiting); false when it must wait.
  [[gnu::always_inline]] bool try_now(bool stop_requested) {
    if (detail::local_channel<T>* s = sender_.local_.get()) return try_local(*s, stop_requested);
    if constexpr (encodable<T>) {
      if (detail::send_port* port = sender_.port_.get()) return try_port(*port, stop_requested);
    }
    return false;
  }

  [[gnu::noinline]] bool try_local(detail::local_channel<T>& s, bool stop_requested) {
    if (s.receiver_closed || s.sender_closed || s.count == s.slots.size()) return false;
    settle();
    cancelled_ = stop_requested;
    if (!stop_requested) channel_sender<T>::put_local(s, take_value());
    return true;
  }

  [[gnu::always_inline]] bool try_port(detail::send_port& port, bool stop_requested) {
    if constexpr (bytewise_codec<T>) {
      // The bytes are copied with no code of the user's running: no lock is needed, only
      // that no other operation holds it (a send waiting for room goes first).
      if (port.sends_bytes && !stop_requested && !port.lock.locked() && !port.leaving() && !port.loan_open) {
        try {
          if (port.try_send_bytes(std::as_bytes(std::span<const T, 1>(value_, 1)))) {
            settle();
            ++port.messages;
            port.bytes += sizeof(T);
            return true;
          }
        } catch (...) {
          settle();
          failure_ = std::current_exception();
          return true;
        }
      }
    }
    return try_port_locked(port, stop_requested);
  }

  /// try_port under the port's lock: every other send that can go at once. Out of line, so
  /// that the direct path above stays small enough to inline where the send is awaited.
  [[gnu::noinline]] bool try_port_locked(detail::send_port& port, bool stop_requested) {
    if (!port.lock.try_lock()) return false;
    mutex::guard guard{port.lock};
    const detail::port_base::in_flight busy{port};
    if (port.leaving() || port.loan_open) return false;  // the coroutine reports it
    try {
      if (stop_requested) {
        settle();
        cancelled_ = true;
        return true;
      }
      const std::size_t size = codec<T>::size(*value_);
      if (!port.try_send_encoded(size, &encode_erased, value_)) {
        codec<T>::encode(*value_, port.prepare(size));
        if (!port.try_send_prepared()) {
          // Not sent at once: send_prepared() waits for the transport, with the lock and
          // the in-flight mark kept until then, so nothing else is prepared over it.
          prepared_.emplace(std::move(guard), port, size);
          return false;
        }
      }
      settle();
      ++port.messages;
      port.bytes += size;
    } catch (...) {
      settle();
      failure_ = std::current_exception();
    }
    return true;
  }

  static void encode_erased(const void* value, std::span<std::byte> out) {
    codec<T>::encode(*static_cast<const T*>(value), out);
  }

  [[gnu::always_inline]] void resume() {
    if (handle() || cancelled_ || failure_) [[unlikely]]
      resume_slow();
  }
  [[gnu::noinline]] void resume_slow() {
    if (handle()) {
      struct release_at_exit {
        channel_send_operation& op;
        ~release_at_exit() { op.prepared_.reset(); }
      } at_exit{*this};
      return task<void>::awaiter{handle()}.await_resume();
    }
    if (cancelled_) throw operation_cancelled{};
    if (failure_) std::rethrow_exception(failure_);
  }

  channel_sender<T>& sender_;
  std::optional<T> owned_;  // the value sent from an rvalue; an lvalue's is not copied
  const T* value_;          // what is sent: *owned_ or the caller's lvalue
  std::exception_ptr failure_;
  /// A message try_port prepared and the transport did not take at once: the port's lock
  /// and in-flight mark, kept for send_prepared(), and the payload's size.
  struct prepared {
    prepared(mutex::guard&& g, detail::port_base& port, std::size_t n) noexcept
        : guard(std::move(g)), busy(port), size(n) {}
    mutex::guard guard;
    detail::port_base::in_flight busy;
    std::size_t size;
  };
  std::optional<prepared> prepared_;
  bool cancelled_ = false;
};

/// What channel_sender::loan returns: a task<channel_loan> that, awaited directly, lends
/// at once where the transport has room now (the port's lock free) and only otherwise
/// starts the loan's coroutine, which waits for room. Either way the stop token is checked
/// before anything is lent, and the errors are those of the coroutine.
template <class T>
class [[nodiscard]] channel_loan_operation : public task<channel_loan> {
 public:
  channel_loan_operation(channel_sender<T>& sender, std::size_t size) noexcept
      : task<channel_loan>(&make), sender_(sender), size_(size) {}
  channel_loan_operation(const channel_loan_operation&) = delete;
  channel_loan_operation& operator=(const channel_loan_operation&) = delete;
  ~channel_loan_operation() {
    if (lent_ != nullptr) take_lent().drop();  // made and never handed out: given up
  }

  using awaiter = detail::channel_op_awaiter<channel_loan_operation, channel_loan>;
  awaiter operator co_await() & noexcept { return awaiter{*this}; }
  awaiter operator co_await() && noexcept { return awaiter{*this}; }

 private:
  friend awaiter;
  void make_awaited() { make_now(); }

  static task<channel_loan> make(task<channel_loan>& base) {
    auto& op = static_cast<channel_loan_operation&>(base);
    if (op.sender_.port_) return lend_port(detail::pooled_frame{}, op.sender_.port_, op.size_);
    return lend_none(detail::pooled_frame{});
  }

  static task<channel_loan> lend_port(detail::pooled_frame, std::shared_ptr<detail::send_port> owner,
                                      std::size_t size) {
    detail::send_port& port = *owner;
    mutex::guard guard = co_await port.lock.lock();
    const detail::port_base::in_flight busy{port};
    if (port.leaving()) detail::throw_sender_left(port, false);
    if (port.loan_open) detail::throw_loan_open(port);
    if (co_await detail::stop_requested()) throw operation_cancelled{};
    std::span<std::byte> space;
    if (!port.try_lend(size, space)) space = co_await port.lend(size);
    port.loan_open = true;
    channel_loan loan{port, space};
    co_return loan;
  }
  /// The sender was closed (or moved from) after loan() and before the co_await.
  static task<channel_loan> lend_none(detail::pooled_frame) {
    detail::throw_channel_closed("channel loan: this sender is empty (moved from or closed)");
    co_return channel_loan{};
  }

  /// True when the loan is made (or has failed without waiting); false when it must wait.
  /// Inline where the loan is awaited, as the send's.
  [[gnu::always_inline]] bool try_now(bool stop_requested) {
    detail::send_port* port = sender_.port_.get();
    // Lending runs no code of the user's, so, as a bytewise send, it needs only the lock to
    // be free (an operation waiting goes first), not to hold it. Leaving or a loan already
    // open: the coroutine reports it.
    if (port == nullptr || port->lock.locked() || port->leaving() || port->loan_open) return false;
    try {
      if (stop_requested) {
        settle();
        cancelled_ = true;
        return true;
      }
      std::span<std::byte> space;
      if (!port->try_lend(size_, space)) return false;  // nothing lent: the coroutine waits for room
      port->loan_open = true;
      lent_ = port;
      lent_bytes_ = space.data();
      lent_size_ = space.size();
      settle();
    } catch (...) {
      settle();
      failure_ = std::current_exception();
    }
    return true;
  }

  [[gnu::always_inline]] channel_loan resume() {
    if (handle() || cancelled_ || failure_) [[unlikely]]
      return resume_slow();
    return take_lent();
  }
  [[gnu::noinline]] channel_loan resume_slow() {
    if (handle()) return task<channel_loan>::awaiter{handle()}.await_resume();
    if (cancelled_) throw operation_cancelled{};
    if (failure_) std::rethrow_exception(failure_);
    return take_lent();
  }

  /// The loan try_now made, as the channel_loan that holds it from now on.
  channel_loan take_lent() noexcept {
    return channel_loan{*std::exchange(lent_, nullptr), std::span<std::byte>{lent_bytes_, lent_size_}};
  }

  channel_sender<T>& sender_;
  std::size_t size_;
  // The loan try_now made, until resume() hands it out. Kept as scalars, not as a
  // channel_loan: read back as one 16-byte span right after being written as two 8-byte
  // words, it cost a store-forwarding stall that waited for the ring's lines (measured:
  // about half of a 64-byte loan producer's samples).
  detail::send_port* lent_ = nullptr;
  std::byte* lent_bytes_ = nullptr;
  std::size_t lent_size_ = 0;
  std::exception_ptr failure_;
  bool cancelled_ = false;
};

/// What channel_receiver::receive (R = std::optional<T>) and receive_into (R = bool)
/// return: a task<R> that, awaited directly, takes a value that is already there (in an
/// in-process channel; from a transport's try_next, with the port's lock free) without a
/// coroutine frame, and only otherwise starts the receive's coroutine. A receive asked to
/// stop leaves the value where it is, either way.
template <class T, class R>
class [[nodiscard]] channel_receive_operation : public task<R> {
  static constexpr bool into_ = std::is_same_v<R, bool>;
  static constexpr bool view_ = std::is_same_v<R, std::optional<channel_view>>;
  /// Whether a message there now is taken in one call (receive_port::try_take): into the
  /// caller's value for receive_into; for receive, into this operation and copied out in
  /// resume(), for a small T whose encoding is its bytes only (it lives in the awaiting
  /// coroutine's frame, and any other T would be moved once more than it is now).
  static constexpr bool takes_ = [] {
    if constexpr (encodable<T> && !view_) {
      return into_ || (bytewise_codec<T> && sizeof(T) <= 256);
    } else {
      return false;
    }
  }();
  struct nothing {};
  using taken_type = std::conditional_t<takes_ && !into_, std::optional<T>, nothing>;

 public:
  channel_receive_operation(channel_receiver<T>& receiver, T* into) noexcept
      : task<R>(&make), receiver_(receiver), into_ptr_(into) {}
  channel_receive_operation(const channel_receive_operation&) = delete;
  channel_receive_operation& operator=(const channel_receive_operation&) = delete;
  [[gnu::always_inline]] ~channel_receive_operation() = default;  // as the send's

  using awaiter = detail::channel_op_awaiter<channel_receive_operation, R>;
  awaiter operator co_await() & noexcept { return awaiter{*this}; }
  awaiter operator co_await() && noexcept { return awaiter{*this}; }

 private:
  friend awaiter;
  // What try_now found; the value itself is taken in resume(), which runs right after.
  enum class ready : unsigned char { none, local, port, taken, end, cancelled, failed };

  /// The coroutine of a receive awaited directly waits for the message and leaves it
  /// current, under the lock, for resume() to decode where it returns it: a large T is then
  /// not copied out of the coroutine's result.
  void make_awaited() {
    awaited_ = true;
    this->make_now();
  }

  static task<R> make(task<R>& base) {
    auto& op = static_cast<channel_receive_operation&>(base);
    if constexpr (encodable<T>) {
      if (op.awaited_ && op.receiver_.port_) return wait_port(detail::pooled_frame{}, op.receiver_.port_, op);
    }
    if constexpr (into_) {
      return op.receiver_.start_receive_into(*op.into_ptr_);
    } else if constexpr (view_) {
      return op.receiver_.start_receive_view();
    } else {
      return op.receiver_.start_receive();
    }
  }

  /// try_next, or try_next_view for a receive_view().
  static bool try_next(detail::receive_port& port) { return view_ ? port.try_next_view() : port.try_next(); }

  /// take_next without the take: once a message is current, this operation holds the
  /// port's lock and in-flight mark (as try_port does) and resume() takes it.
  static task<R> wait_port(detail::pooled_frame, std::shared_ptr<detail::receive_port> owner,
                           channel_receive_operation& op) {
    detail::receive_port& port = *owner;
    mutex::guard guard = co_await port.lock.lock();
    const detail::port_base::in_flight busy{port};
    port.end_view();
    if (port.leaving()) co_return R{};
    bool got = try_next(port);
    if (!got) {
      if constexpr (view_) {
        got = co_await port.next_view();
      } else {
        got = co_await port.next();
      }
    }
    if (!got) co_return R{};
    if (co_await detail::stop_requested()) throw operation_cancelled{};  // the message stays current
    op.guard_.emplace(std::move(guard));
    op.busy_.emplace(port);
    op.waited_ = std::move(owner);
    co_return R{};
  }

  [[gnu::always_inline]] bool try_now(bool stop_requested) {
    channel_receiver<T>& rx = receiver_;
    if (detail::local_channel<T>* s = rx.local_.get()) {
      if (view_ || s->receiver_closed || s->count == 0) return false;  // views: the coroutine throws
      return found(ready::local, stop_requested);
    }
    if constexpr (encodable<T>) {
      if (detail::receive_port* port = rx.port_.get()) return try_port(*port, stop_requested);
    }
    return found(ready::end, false);  // an empty receiver: the end of the stream
  }

  bool found(ready what, bool stop_requested) noexcept {
    this->settle();
    ready_ = stop_requested ? ready::cancelled : what;
    return true;
  }

  [[gnu::always_inline]] bool try_port(detail::receive_port& port, bool stop_requested) {
    if constexpr (takes_ && bytewise_codec<T>) {
      // The bytes are copied with no code of the user's running: as a bytewise send, no
      // lock is taken, only checked to be free (a receive waiting for a message goes first).
      if (port.takes_now && !stop_requested && !port.lock.locked() && !port.leaving() && !port.viewing) {
        try {
          const auto taken = port.try_take(&take_into, into_ ? static_cast<void*>(into_ptr_) : &taken_);
          if (taken == detail::receive_port::take_outcome::taken) return found(ready::taken, false);
          if (taken == detail::receive_port::take_outcome::empty) return false;
        } catch (...) {
          failure_ = std::current_exception();
          return found(ready::failed, false);
        }
      }
    }
    return try_port_locked(port, stop_requested);
  }

  /// try_port under the port's lock, kept until resume() when a message is current: every
  /// other receive that can complete at once. Out of line, as the send's.
  [[gnu::noinline]] bool try_port_locked(detail::receive_port& port, bool stop_requested) {
    if (!port.lock.try_lock()) return false;
    guard_.emplace(port.lock);
    busy_.emplace(port);
    port.end_view();  // as take_next: the view handed out last is released first
    bool got = false;
    try {
      if constexpr (takes_) {
        // A receive asked to stop leaves the message where it is: try_next's way, below.
        if (port.takes_now && !stop_requested && !port.leaving()) {
          const auto taken = port.try_take(&take_into, into_ ? static_cast<void*>(into_ptr_) : &taken_);
          if (taken != detail::receive_port::take_outcome::other) {
            release();
            return taken == detail::receive_port::take_outcome::taken && found(ready::taken, false);
          }
        }
      }
      got = !port.leaving() && try_next(port);
    } catch (...) {
      release();
      failure_ = std::current_exception();
      return found(ready::failed, false);
    }
    if (got && !stop_requested) return found(ready::port, false);  // keeps the lock until resume()
    release();
    if (!got) return false;
    return found(ready::cancelled, false);  // the message stays current
  }

  /// What try_take calls: decodes into the caller's value or into taken_.
  static void take_into(std::span<const std::byte> payload, void* out) {
    if constexpr (into_) {
      ipcoro::decode_into(payload, *static_cast<T*>(out));
    } else if constexpr (takes_) {
      static_cast<taken_type*>(out)->emplace(detail::decoded_as<T>{payload});
    }
  }

  void release() noexcept {
    busy_.reset();
    guard_.reset();
  }

  [[gnu::always_inline]] R resume() {
    if constexpr (takes_) {
      if (ready_ == ready::taken) {
        if constexpr (into_) {
          return true;
        } else {
          return std::move(taken_);
        }
      }
    }
    return resume_slow();
  }
  [[gnu::noinline]] R resume_slow() {
    switch (ready_) {
      case ready::none:
        if constexpr (encodable<T>) {
          typename task<R>::awaiter waited{this->handle()};
          if (!waited_) return waited.await_resume();
          waited.await_resume();  // empty: the message is current in *waited_
          return take_port(waited_);
        } else {
          return typename task<R>::awaiter{this->handle()}.await_resume();
        }
      case ready::end:
        return R{};
      case ready::cancelled:
        throw operation_cancelled{};
      case ready::failed:
        std::rethrow_exception(failure_);
      case ready::local:
        if constexpr (!view_) return take_local(*receiver_.local_);
        return R{};  // not reached: a view is never taken from an in-process channel
      case ready::taken:
        if constexpr (into_) {
          return true;
        } else if constexpr (takes_) {
          return std::move(taken_);
        } else {
          return R{};  // not reached: only takes_ makes ready::taken
        }
      case ready::port:
        break;
    }
    if constexpr (encodable<T>) {
      return take_port(receiver_.port_);
    } else {
      return R{};  // not reached: only encodable types have ports
    }
  }

  R take_port(const std::shared_ptr<detail::receive_port>& owner) {
    struct release_at_exit {
      channel_receive_operation& op;
      ~release_at_exit() { op.release(); }
    } at_exit{*this};
    detail::receive_port& port = *owner;
    if constexpr (view_) {
      return channel_receiver<T>::take_current_view(owner);
    } else if constexpr (into_) {
      detail::take_current_into(port, *into_ptr_);
      return true;
    } else {
      return detail::take_current_value<T>(port);
    }
  }

  R take_local(detail::local_channel<T>& s) {
    if constexpr (into_) {
      *into_ptr_ = std::move(*s.slots[s.head]);
      channel_receiver<T>::pop_local(s);
      return true;
    } else {
      // In place from T, not from the slot's optional: GCC 12 then sees no "maybe
      // uninitialized" vector in the optional (-Werror).
      R value{std::in_place, std::move(*s.slots[s.head])};
      channel_receiver<T>::pop_local(s);
      return value;
    }
  }

  channel_receiver<T>& receiver_;
  T* into_ptr_;
  std::shared_ptr<detail::receive_port> waited_;  // wait_port left a message current here
  bool awaited_ = false;                          // awaited directly: make() makes wait_port
  std::optional<mutex::guard> guard_;
  std::optional<detail::port_base::in_flight> busy_;
  std::exception_ptr failure_;
  [[no_unique_address]] taken_type taken_;  // what try_take decoded (receive, a small T)
  ready ready_ = ready::none;
};

}  // namespace ipcoro
