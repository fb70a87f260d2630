// SPDX-License-Identifier: MIT
// message_port: a channel's ends over any transport that keeps message boundaries (queue, ring).
#pragma once

#include "ipcoro/channel.hpp"
#include "ipcoro/error.hpp"
#include "ipcoro/shm_ring.hpp"
#include "ipcoro/transport.hpp"

#include "channel_wire.hpp"

#include <fmt/core.h>

#include <concepts>
#include <cstring>
#include <exception>
#include <optional>
#include <vector>

namespace ipcoro::detail {

/// A transport that can also move a message without waiting (a ring): the channel's path
/// for a message that needs no wait uses it.
template <class Transport>
concept trying_sender = requires(Transport& t, std::span<const std::byte> m) {
  { t.try_send(m) } -> std::same_as<bool>;
};
template <class Transport>
concept trying_receiver = requires(Transport& t, std::span<std::byte> b) {
  { t.try_receive(b) } -> std::same_as<ring_try_result>;
};

/// A transport that lends space in itself (an SPSC ring): the channel's zero-copy loans.
template <class Transport>
concept loaning_sender = requires(Transport& t, std::size_t n) {
  { t.try_loan(n) } -> std::same_as<std::optional<ring_loan>>;
  t.loan(n);
};
/// A transport that reserves room in itself for one message and publishes it later (an
/// SPSC ring): the channel encodes a message that fits straight into it. try_reserve is
/// false when there is no room now; drop_reserved gives the room back unpublished.
template <class Transport>
concept reserving_sender = requires(Transport& t, std::size_t n, std::span<std::byte>& space) {
  { t.try_reserve(n, space) } -> std::same_as<bool>;
  t.commit_reserved(n);
  t.drop_reserved();
};
/// A reserving transport that also reserves, writes and commits in one call (try_write).
template <class Transport>
concept writing_sender = reserving_sender<Transport> &&
    requires(Transport& t, std::size_t n, void (*write)(void*, std::span<std::byte>), void* context) {
  { t.try_write(n, write, context) } -> std::same_as<bool>;
};
/// ... and that writes a frame's head and a payload given as bytes in one call.
template <class Transport>
concept headed_writing_sender = writing_sender<Transport> &&
    requires(Transport& t, std::uint64_t head, std::span<const std::byte> payload) {
  { t.try_write_headed(head, payload) } -> std::same_as<bool>;
};
/// A transport that gives messages in place (an SPSC ring): the channel's zero-copy views.
template <class Transport>
concept viewing_receiver = requires(Transport& t) {
  { t.try_receive_view() } -> std::same_as<ring_try_view>;
  t.receive_view();
};

/// A viewing transport that also serves copying receives in place: the channel decodes a
/// message straight from the ring and frees its room once decoded, instead of copying it
/// into the port's buffer first. Not where records carry checksums: a record is checked as
/// it is taken, and a copy checked is what a peer can no longer change under the decoder.
template <class Transport>
concept in_place_receiver = viewing_receiver<Transport> && requires(const Transport& t) {
  { t.reads_in_place() } -> std::same_as<bool>;
};

/// A transport that holds sent messages for a while (a queue that packs a loop turn's
/// messages into one): drain() posts them now, waiting for room (the channel's flush()).
template <class Transport>
concept draining = requires(Transport& t) {
  t.drain();
};

/// What a peek at a transport's next message found.
enum class peek_result : unsigned char { message, empty, end };

/// An in-place receiver whose next message can be looked at without a view object (an SPSC
/// ring): try_peek gives its bytes and the position to release it at, release_peeked frees
/// it (the channel's path for a message that is there).
template <class Transport>
concept peeking_receiver = in_place_receiver<Transport> &&
    requires(Transport& t, std::span<const std::byte>& m, std::uint64_t& end) {
  { t.try_peek(m, end) } -> std::same_as<peek_result>;
  t.release_peeked(end);
};

template <class Transport>
concept acknowledging = requires(Transport& t, std::uint64_t p) {
  { t.position() } -> std::same_as<std::uint64_t>;
  t.ack(p);
};

/// The sending end of a channel over a transport that keeps message boundaries (a queue
/// or a ring): each message is a {kind, short fingerprint} head and the payload.
template <message_sending_transport Transport>
class message_send_port final : public send_port {
 public:
  message_send_port(std::string address, Transport transport)
      : send_port(std::move(address)), transport_(std::move(transport)) {
    buf_.grow(transport_.max_message(), 0);
    sends_bytes = headed_writing_sender<Transport>;
  }

  /// Where the ring has room now, the message is encoded straight into it (a reservation
  /// that try_send_prepared() commits): one copy fewer than through the port's buffer.
  std::span<std::byte> prepare(std::size_t size) override {
    check_fits(size);
    used_ = head_size + size;
    if constexpr (reserving_sender<Transport>) {
      drop_staged();
      std::span<std::byte> space;
      try {
        staged_ = greeted_ && transport_.try_reserve(used_, space);
      } catch (...) {
        rethrow_send_error();
      }
      if (staged_) {
        put_head(space.data(), frame_kind::data);
        return space.subspan(head_size);
      }
    }
    put_head(buf_.data(), frame_kind::data);
    return {buf_.data() + head_size, size};
  }

  std::size_t max_payload() const noexcept override { return buf_.size() - head_size; }

  bool try_send_prepared() override {
    if (commit_staged()) return true;
    if constexpr (trying_sender<Transport>) {
      if (!greeted_) return false;
      try {
        return transport_.try_send(std::span<const std::byte>{buf_.data(), used_});
      } catch (...) {
        rethrow_send_error();
      }
    }
    return false;
  }

  /// The message is written straight into the ring, head and payload, in one call. What
  /// `encode` throws goes to the caller as it is, not as a transport's error.
  bool try_send_encoded(std::size_t size, encode_fn encode, const void* value) override {
    if constexpr (writing_sender<Transport>) {
      check_fits(size);
      if (!greeted_) return false;
      drop_staged();
      struct encode_threw {};
      struct message {
        const message_send_port& port;
        encode_fn encode;
        const void* value;
        std::exception_ptr failure;
      } m{*this, encode, value, nullptr};
      const auto write = [](void* context, std::span<std::byte> out) {
        auto& msg = *static_cast<message*>(context);
        msg.port.put_head(out.data(), frame_kind::data);
        try {
          msg.encode(msg.value, out.subspan(head_size));
        } catch (...) {
          msg.failure = std::current_exception();
          throw encode_threw{};
        }
      };
      try {
        return transport_.try_write(head_size + size, write, &m);
      } catch (const encode_threw&) {
        std::rethrow_exception(m.failure);
      } catch (...) {
        rethrow_send_error();
      }
    } else {
      return send_port::try_send_encoded(size, encode, value);
    }
  }

  bool try_send_bytes(std::span<const std::byte> payload) override {
    if constexpr (headed_writing_sender<Transport>) {
      check_fits(payload.size());
      // A message another operation prepared is its to send or give up, under the lock.
      if (!greeted_ || staged_) return false;
      std::uint64_t head = 0;
      put_head(reinterpret_cast<std::byte*>(&head), frame_kind::data);
      try {
        return transport_.try_write_headed(head, payload);
      } catch (...) {
        rethrow_send_error();
      }
    } else {
      return send_port::try_send_bytes(payload);
    }
  }

  /// A loan with room now is a reservation in the ring, as a send's prepare() makes (no
  /// ring_loan object); one that waits is a ring_loan (lend_task).
  bool try_lend(std::size_t size, std::span<std::byte>& space) override {
    if constexpr (loaning_sender<Transport> && reserving_sender<Transport>) {
      check_fits(size);
      drop_staged();
      if (!greeted_) return false;
      try {
        if (!transport_.try_reserve(head_size + size, space)) return false;
      } catch (...) {
        rethrow_send_error();
      }
      reserved_loan_ = true;
      put_head(space.data(), frame_kind::data);
      space = space.subspan(head_size);
      return true;
    } else {
      return send_port::try_lend(size, space);
    }
  }
  void commit_loan(std::size_t size) override {
    if constexpr (reserving_sender<Transport>) {
      if (reserved_loan_) {
        reserved_loan_ = false;
        transport_.commit_reserved(head_size + size);
        return;
      }
    }
    if constexpr (loaning_sender<Transport>) {
      loan_.commit(head_size + size);
    } else {
      send_port::commit_loan(size);
    }
  }
  void drop_loan() noexcept override {
    drop_reserved_loan();
    if constexpr (loaning_sender<Transport>) loan_.drop();
  }

 protected:
  task<void> commit(pooled_frame) override {
    if (commit_staged()) co_return;
    try {
      if (!greeted_) co_await greet(pooled_frame{});
      co_await transport_.send(std::span<const std::byte>{buf_.data(), used_});
    } catch (...) {
      rethrow_send_error();
    }
  }

  task<void> drain(pooled_frame) override {
    if constexpr (draining<Transport>) {
      try {
        co_await transport_.drain();
      } catch (...) {
        rethrow_send_error();
      }
    }
  }

  task<std::span<std::byte>> lend_task(pooled_frame, std::size_t size) override {
    if constexpr (!loaning_sender<Transport>) throw_cannot_lend();
    check_fits(size);
    drop_staged();
    try {
      if (!greeted_) co_await greet(pooled_frame{});
      if constexpr (loaning_sender<Transport>) {
        ring_loan l = co_await transport_.loan(head_size + size);
        loan_ = std::move(l);
      }
    } catch (...) {
      rethrow_send_error();
    }
    co_return open_loan();
  }

  void finish(port_exit how) noexcept override {
    // An open loan is never published after this, and must not outlive an aborted end.
    drop_staged();
    drop_loan();
    switch (how) {
      case port_exit::close:
        transport_.close(short_fingerprint(identity().fingerprint));
        break;
      case port_exit::detach:
        transport_.detach();
        break;
      case port_exit::abort:
        transport_.abort();
        break;
    }
  }

 private:
  /// In a handler: rethrows the transport's error in the channel's terms.
  [[noreturn]] void rethrow_send_error() const {
    try {
      throw;
    } catch (const peer_died& e) {
      throw_peer_died(address(), e);
    } catch (const std::system_error& e) {
      if (e.code() == std::errc::broken_pipe) {
        throw channel_closed(e.code(),
                             fmt::format("channel {}: the receiver has closed the channel", address()));
      }
      throw;
    }
  }
  void check_fits(std::size_t size) const {
    if (head_size + size > buf_.size()) throw_too_large(size);
  }
  /// Out of line and cold: the message's formatting costs the sends that fit nothing.
  [[noreturn, gnu::cold, gnu::noinline]] void throw_too_large(std::size_t size) const {
    throw channel_error(
        EMSGSIZE,
        fmt::format("channel {}: a message of {} bytes does not fit: the largest the transport "
                    "carries is {} bytes ({} of them frame it); {}",
                    address(), size, buf_.size(), head_size, transport_.size_advice(size + head_size)));
  }
  /// Sends the greeting, which shares the size limit; a long type name is cut (the
  /// fingerprint is what is compared).
  task<void> greet(pooled_frame) {
    std::span<const std::byte> g = greeting();
    g = g.first(std::min(g.size(), buf_.size() - head_size));
    std::vector<std::byte> frame(head_size + g.size());
    put_head(frame.data(), frame_kind::hello);
    std::memcpy(frame.data() + head_size, g.data(), g.size());
    co_await transport_.send(frame);
    greeted_ = true;
  }
  /// A message prepared in the ring and then not sent (its encoding threw) is given up.
  void drop_staged() noexcept {
    if constexpr (reserving_sender<Transport>) {
      if (staged_) transport_.drop_reserved();
      staged_ = false;
    }
  }
  /// A loan made by try_lend, given up.
  void drop_reserved_loan() noexcept {
    if constexpr (reserving_sender<Transport>) {
      if (reserved_loan_) transport_.drop_reserved();
      reserved_loan_ = false;
    }
  }
  /// Publishes a message prepared in the ring; false when it was prepared in buf_.
  bool commit_staged() {
    if constexpr (reserving_sender<Transport>) {
      if (staged_) {
        staged_ = false;
        transport_.commit_reserved(used_);
        return true;
      }
    }
    return false;
  }
  /// The payload space of the loan just taken, its head written.
  std::span<std::byte> open_loan() noexcept {
    const std::span<std::byte> all = loan_.bytes();
    put_head(all.data(), frame_kind::data);
    return all.subspan(head_size);
  }
  void put_head(std::byte* at, frame_kind kind) const noexcept {
    const message_head h{static_cast<std::uint32_t>(kind), short_fingerprint(identity().fingerprint)};
    std::memcpy(at, &h, sizeof h);
  }

  Transport transport_;
  byte_buffer buf_;
  ring_loan loan_;              // the open loan of the user's (loaning transports)
  bool staged_ = false;         // the transport holds the prepared message, reserved (reserving transports)
  bool reserved_loan_ = false;  // the user's open loan is such a reservation (try_lend)
  std::size_t used_ = 0;
  bool greeted_ = false;
};

/// The receiving end of a channel over a queue or a ring.
template <message_receiving_transport Transport>
class message_receive_port final : public receive_port {
 public:
  message_receive_port(std::string address, Transport transport)
      : receive_port(std::move(address)), transport_(std::move(transport)) {
    buf_.grow(transport_.max_message(), 0);
    takes_now = peeking_receiver<Transport>;
  }

  std::span<const std::byte> current() noexcept override { return {frame_ + head_size, length_}; }
  void consume() noexcept override {
    current_ = false;
    release_peeked();
    if constexpr (viewing_receiver<Transport>) view_.release();
    if constexpr (acknowledging<Transport>) consumed_position_ = current_position_;
  }
  /// Up to the message consumed last, not the one next() may have read ahead (select).
  void acknowledge() noexcept override {
    if constexpr (acknowledging<Transport>) transport_.ack(consumed_position_);
  }

 protected:
  task<bool> fill(pooled_frame) override {
    if constexpr (in_place_receiver<Transport>) {
      if (transport_.reads_in_place()) co_return co_await fill_view(pooled_frame{});
    }
    if (current_) co_return true;
    if (ended_) co_return false;
    for (;;) {
      std::optional<std::size_t> size;
      try {
        size =
            Transport::size_of(co_await transport_.receive(std::span<std::byte>{buf_.data(), buf_.size()}));
      } catch (const peer_died& e) {
        throw_peer_died(address(), e);
      }
      if (const std::optional<bool> data = take(size)) co_return *data;
    }
  }

 public:
  bool try_next() override {
    if constexpr (in_place_receiver<Transport>) {
      if (transport_.reads_in_place()) return try_next_view();
    }
    if (current_) return true;
    if constexpr (trying_receiver<Transport>) {
      while (!ended_) {
        ring_try_result r;
        try {
          r = transport_.try_receive(std::span<std::byte>{buf_.data(), buf_.size()});
        } catch (const peer_died& e) {
          throw_peer_died(address(), e);
        }
        if (r.would_block) return false;
        if (const std::optional<bool> data = take(r.size)) return *data;
      }
    }
    return false;
  }

  take_outcome try_take(decode_fn decode, void* out) override {
    if constexpr (peeking_receiver<Transport>) {
      if (current_ || ended_ || !transport_.reads_in_place()) return take_outcome::other;
      std::span<const std::byte> frame;
      const peek_result r = peek(frame);
      if (r == peek_result::empty) return take_outcome::empty;
      // Anything but a data message of this channel's type goes the way try_next takes it:
      // it is still there to be peeked again.
      if (r != peek_result::message || frame.size() < head_size) return take_outcome::other;
      const auto h = read_head<message_head>(frame.data());
      if (h.kind != static_cast<std::uint32_t>(frame_kind::data) ||
          h.fingerprint != short_fingerprint(identity().fingerprint))
        return take_outcome::other;
      peeked_ = true;
      if constexpr (acknowledging<Transport>) current_position_ = transport_.position();
      struct consume_at_exit {
        message_receive_port& port;
        ~consume_at_exit() { port.consume(); }
      } at_exit{*this};
      const std::span<const std::byte> payload = frame.subspan(head_size);
      decode(payload, out);
      ++messages;
      bytes += payload.size();
      return take_outcome::taken;
    } else {
      (void)decode, (void)out;
      return take_outcome::other;
    }
  }

  bool try_next_view() override {
    if constexpr (peeking_receiver<Transport>) {
      if (current_) return true;
      while (!ended_) {
        std::span<const std::byte> frame;
        const peek_result r = peek(frame);
        if (r == peek_result::empty) return false;
        if (r == peek_result::end) return take_frame(std::nullopt).value_or(false);
        peeked_ = true;
        const std::optional<bool> data = take_frame(frame);
        if (data && *data) return true;  // current until consume() releases it
        release_peeked();                // a greeting, or the end frame
        if (data) return *data;
      }
      return false;
    } else if constexpr (viewing_receiver<Transport>) {
      if (current_) return true;
      while (!ended_) {
        ring_try_view r;
        try {
          r = transport_.try_receive_view();
        } catch (const peer_died& e) {
          throw_peer_died(address(), e);
        }
        if (r.would_block) return false;
        if (const std::optional<bool> data = take_view(std::move(r.view))) return *data;
      }
      return false;
    } else {
      return try_next();
    }
  }

 protected:
  task<bool> fill_view(pooled_frame) override {
    if constexpr (!viewing_receiver<Transport>) co_return co_await fill(pooled_frame{});
    if (current_) co_return true;
    if (ended_) co_return false;
    for (;;) {
      std::optional<ring_view> view;
      try {
        if constexpr (viewing_receiver<Transport>) view = co_await transport_.receive_view();
      } catch (const peer_died& e) {
        throw_peer_died(address(), e);
      }
      if (const std::optional<bool> data = take_view(std::move(view))) co_return *data;
    }
  }

  void finish(port_exit) noexcept override {
    release_peeked();
    if constexpr (viewing_receiver<Transport>) view_.release();
    transport_.close();
    ended_ = true;
    current_ = false;
  }

 private:
  /// The transport's try_peek, its peer's death told as this channel's.
  peek_result peek(std::span<const std::byte>& frame) {
    if constexpr (peeking_receiver<Transport>) {
      try {
        return transport_.try_peek(frame, peeked_end_);
      } catch (const peer_died& e) {
        throw_peer_died(address(), e);
      }
    } else {
      (void)frame;
      return peek_result::empty;
    }
  }
  /// Frees the message try_peek gave, if one is open.
  void release_peeked() noexcept {
    if constexpr (peeking_receiver<Transport>) {
      if (peeked_) transport_.release_peeked(peeked_end_);
      peeked_ = false;
    }
  }
  /// Takes the message of `size` bytes in the buffer (none: the end of the stream): true
  /// when it is a data message, now current; false at the end; empty for a greeting (go
  /// on to the next message).
  std::optional<bool> take(std::optional<std::size_t> size) {
    if (!size) return take_frame(std::nullopt);
    return take_frame(std::span<const std::byte>{buf_.data(), *size});
  }
  /// take() for a message in place: a data message's view stays open (current) until consume().
  std::optional<bool> take_view(std::optional<ring_view> view) {
    if (!view) return take_frame(std::nullopt);
    const std::optional<bool> data = take_frame(view->bytes());
    if (data && *data) {
      if constexpr (viewing_receiver<Transport>) view_ = std::move(*view);
    }
    return data;  // a greeting's view is released here
  }
  std::optional<bool> take_frame(std::optional<std::span<const std::byte>> frame) {
    if (!frame) {
      ended_ = true;
      return false;
    }
    if (frame->size() < head_size) {
      throw channel_error(
          EBADMSG, fmt::format("channel {}: a message of {} bytes is not an ipcoro channel frame", address(),
                               frame->size()));
    }
    const auto h = read_head<message_head>(frame->data());
    const std::span<const std::byte> payload = frame->subspan(head_size);
    if (h.kind == static_cast<std::uint32_t>(frame_kind::hello)) {
      check_greeting(payload);
      return std::nullopt;
    }
    if (h.kind == static_cast<std::uint32_t>(frame_kind::end)) {
      transport_.pass_end_on(h.fingerprint);
      ended_ = true;
      return false;
    }
    if (h.kind != static_cast<std::uint32_t>(frame_kind::data)) {
      throw channel_error(EBADMSG,
                          fmt::format("channel {}: a message of unknown kind {}", address(), h.kind));
    }
    if (h.fingerprint != short_fingerprint(identity().fingerprint)) {
      throw channel_type_mismatch(
          fmt::format("channel {}: a message of another type (fingerprint {:08x}) arrived; "
                      "this receiver expects '{}'",
                      address(), h.fingerprint, identity().name));
    }
    frame_ = frame->data();
    length_ = payload.size();
    current_ = true;
    if constexpr (acknowledging<Transport>) current_position_ = transport_.position();
    return true;
  }

  Transport transport_;
  byte_buffer buf_;
  ring_view view_;                    // the current message in place (viewing transports)
  std::uint64_t peeked_end_ = 0;      // where the message try_peek gave ends (peeking transports)
  bool peeked_ = false;               // ... and it is open (current, or being taken)
  const std::byte* frame_ = nullptr;  // the current message's frame: in buf_ or in view_
  std::size_t length_ = 0;
  std::uint64_t current_position_ = 0;   // the transport's position after the current message
  std::uint64_t consumed_position_ = 0;  // ... after the message consumed last
  bool current_ = false;
  bool ended_ = false;
};

}  // namespace ipcoro::detail
