// SPDX-License-Identifier: MIT
// ring_channel: the ring adapters, the ring's address checks, and ring links.
#include "ring_channel.hpp"

#include "ipcoro/channel.hpp"
#include "ipcoro/error.hpp"
#include "ipcoro/shm_ring.hpp"

#include "channel_wire.hpp"
#include "link_claims.hpp"
#include "loop.hpp"
#include "message_port.hpp"
#include "ring/endpoint.hpp"
#include "ring/protocol.hpp"

#include <fmt/core.h>

#include <coroutine>
#include <optional>
#include <string>
#include <type_traits>

namespace ipcoro::detail {
namespace {

constexpr std::size_t default_ring_capacity = std::size_t{1024} * 1024;
constexpr std::size_t default_mpmc_slots = 256;
constexpr std::size_t default_mpmc_message = 4096;

/// The end-of-turn publication of an SPSC channel sender (see batched_publication). The
/// loop's queue of hooks may hold it past the port, so it is shared, and forgets the ring
/// when the port goes.
struct ring_turn : turn_end_hook {
  spsc_ring_sender* ring = nullptr;  // while the port lives
  std::shared_ptr<ring_turn> keep;   // while queued
};

void publish_at_turn_end(turn_end_hook& hook) noexcept {
  auto& t = static_cast<ring_turn&>(hook);
  const std::shared_ptr<ring_turn> self = std::move(t.keep);
  if (t.ring != nullptr) t.ring->publish();
}

/// An SPSC channel sender publishes a loop turn's first message at once (a round trip is
/// not delayed) and the turn's further messages together: at the turn's end, every 4 KiB,
/// when the ring is full, and before close, detach and abort (spsc_ring_sender::
/// hold_publication). A receiver that polls the ring then takes a batch per transfer of
/// the ring's tail between the CPUs instead of one message. Not for a durable file
/// channel, whose sent messages must be in the file for a restarted sender's successor.
class batched_publication {
 public:
  explicit batched_publication(bool on) : turn_(on ? std::make_shared<ring_turn>() : nullptr) {
    if (turn_) turn_->fn = &publish_at_turn_end;
  }
  batched_publication(batched_publication&&) noexcept = default;
  batched_publication& operator=(batched_publication&&) = delete;
  ~batched_publication() { forget(); }

  /// Before a send or a loan on `ring`: holds its publication unless it is the turn's first.
  void before_send(spsc_ring_sender& ring) noexcept {
    if (!turn_) return;
    if (turn_->queued) {
      if (ring_endpoint* e = ring_access::endpoint(ring)) e->hold_publication();
      return;
    }
    queue_turn(ring);
  }
  /// The rest of before_send, once a turn: out of line, so the sends that only hold
  /// publication save no registers for it.
  [[gnu::noinline]] void queue_turn(spsc_ring_sender& ring) noexcept {
    io_context* ctx = io_context::current_or_null();
    // No turn that will end soon (no loop, or one that nothing turns): published at once.
    if (ctx == nullptr || !loop::driven(*ctx)) return;
    turn_->ring = &ring;
    turn_->keep = turn_;
    loop::at_turn_end(*ctx, *turn_);
  }
  /// The port goes (the ring publishes what it holds as it closes, detaches or aborts).
  void forget() noexcept {
    if (turn_) turn_->ring = nullptr;
  }

 private:
  std::shared_ptr<ring_turn> turn_;
};

template <class Ring>
struct ring_sending {
  static constexpr bool spsc = std::is_same_v<Ring, spsc_ring_sender>;
  std::shared_ptr<void> region;
  unique_fd peer_claim;  // see ring_claims; before the ring, which polls it
  Ring ring;
  batched_publication batching{false};

  std::size_t max_message() const noexcept { return ring.max_message_size(); }
  auto send(std::span<const std::byte> m) noexcept {
    if constexpr (spsc) batching.before_send(ring);
    return ring.send(m);
  }
  bool try_send(std::span<const std::byte> m) {
    if constexpr (spsc) batching.before_send(ring);
    return ring.try_send(m);
  }
  auto loan(std::size_t n) noexcept requires spsc {
    batching.before_send(ring);
    return ring.loan(n);
  }
  std::optional<ring_loan> try_loan(std::size_t n) requires spsc {
    batching.before_send(ring);
    return ring.try_loan(n);
  }
  /// The channel's path for a message that fits now: reserved in the ring, encoded there,
  /// committed (what ring_loan does, without the loan object). False: no room now.
  bool try_reserve(std::size_t n, std::span<std::byte>& space) requires spsc {
    ring_endpoint* e = ring_access::endpoint(ring);
    if (e == nullptr) return false;  // the waiting send reports the empty end
    batching.before_send(ring);
    return e->try_reserve(n, space) == ring_endpoint::outcome::done;
  }
  void commit_reserved(std::size_t n) requires spsc { ring_access::endpoint(ring)->commit_reserved(n); }
  /// try_reserve, `write` and commit_reserved in one call (ring_protocol::try_write).
  bool try_write(std::size_t n, ring_endpoint::write_fn write, void* context) requires spsc {
    ring_endpoint* e = ring_access::endpoint(ring);
    if (e == nullptr) return false;
    batching.before_send(ring);
    return e->try_write(n, write, context) == ring_endpoint::outcome::done;
  }
  /// try_write of a message that is `head` and then `payload` (ring_protocol::try_write_headed).
  bool try_write_headed(std::uint64_t head, std::span<const std::byte> payload) requires spsc {
    ring_endpoint* e = ring_access::endpoint(ring);
    if (e == nullptr) return false;
    batching.before_send(ring);
    return e->try_write_headed(head, payload) == ring_endpoint::outcome::done;
  }
  void drop_reserved() noexcept requires spsc {
    if (ring_endpoint* e = ring_access::endpoint(ring)) e->drop_reserved();
  }
  /// The channel's flush(): what the turn held is published now (never waits).
  std::suspend_never drain() noexcept requires spsc {
    ring.publish();
    return {};
  }
  std::string size_advice(std::size_t) const {
    return std::is_same_v<Ring, spsc_ring_sender> ? "raise the address's capacity="
                                                  : "raise the address's message_size=";
  }
  void close(std::uint32_t) noexcept {
    batching.forget();
    ring.close();
  }
  void detach() noexcept {
    batching.forget();
    ring.detach();
  }
  /// The ring keeps this process as a sender, so its exit reads as a death (peer_died).
  void abort() noexcept {
    batching.forget();
    ring.abort();
  }
};

/// The next message of an SPSC ring in place, for a channel's try_next (see
/// peeking_receiver). An empty ring is looked at again after this thread's loop published
/// what it held for the turn's end (the sender may be on this thread).
peek_result peek_ring(spsc_ring_receiver& ring, std::span<const std::byte>& frame, std::uint64_t& end) {
  ring_endpoint* e = ring_access::endpoint(ring);
  if (e == nullptr) return peek_result::empty;  // the waiting receive reports the empty end
  ring_endpoint::outcome r = e->try_peek(frame);
  if (r == ring_endpoint::outcome::would_block) {
    if (!loop::end_turn_early_here()) return peek_result::empty;
    r = e->try_peek(frame);
    if (r == ring_endpoint::outcome::would_block) return peek_result::empty;
  }
  end = e->read_position();
  return r == ring_endpoint::outcome::end_of_stream ? peek_result::end : peek_result::message;
}
void release_ring_peek(spsc_ring_receiver& ring, std::uint64_t end) noexcept {
  if (ring_endpoint* e = ring_access::endpoint(ring)) e->release_peeked(end);
}
/// Whether a channel decodes straight from the ring: unless its records carry checksums.
bool ring_in_place(const spsc_ring_receiver& ring) noexcept {
  const ring_endpoint* e = ring_access::endpoint(ring);
  return e != nullptr && !e->record_checks();
}

template <class Ring>
struct ring_receiving {
  std::shared_ptr<void> region;
  unique_fd peer_claim;
  Ring ring;

  std::size_t max_message() const noexcept { return ring.max_message_size(); }
  auto receive(std::span<std::byte> buffer) noexcept { return ring.receive(buffer); }
  ring_try_result try_receive(std::span<std::byte> buffer) { return ring.try_receive(buffer); }
  auto receive_view() noexcept requires std::is_same_v<Ring, spsc_ring_receiver> {
    return ring.receive_view();
  }
  ring_try_view try_receive_view() requires std::is_same_v<Ring, spsc_ring_receiver> {
    return ring.try_receive_view();
  }
  /// Decode straight from the ring (see in_place_receiver), unless records carry checksums.
  bool reads_in_place() const noexcept requires std::is_same_v<Ring, spsc_ring_receiver> {
    return ring_in_place(ring);
  }
  peek_result try_peek(std::span<const std::byte>& frame,
                       std::uint64_t& end) requires std::is_same_v<Ring, spsc_ring_receiver> {
    return peek_ring(ring, frame, end);
  }
  void release_peeked(std::uint64_t end) noexcept requires std::is_same_v<Ring, spsc_ring_receiver> {
    release_ring_peek(ring, end);
  }
  static std::optional<std::size_t> size_of(std::optional<std::size_t> size) noexcept { return size; }
  void pass_end_on(std::uint32_t) noexcept {}
  /// One receiver of an MPMC ring leaving does not close the ring for the others; the
  /// last one closes it for the senders.
  void close() noexcept {
    if constexpr (std::is_same_v<Ring, mpmc_ring_receiver>) {
      ring.leave();
    } else {
      ring.close();
    }
  }
};

/// The ring of a durable file channel under its receiving end: messages stay in the file
/// until acknowledged, and leaving detaches instead of closing, so that the next receiver
/// resumes where this one acknowledged last and the sender is not told to stop.
struct durable_ring_receiving {
  std::shared_ptr<void> region;
  spsc_ring_receiver ring;

  std::size_t max_message() const noexcept { return ring.max_message_size(); }
  auto receive(std::span<std::byte> buffer) noexcept { return ring.receive(buffer); }
  ring_try_result try_receive(std::span<std::byte> buffer) { return ring.try_receive(buffer); }
  auto receive_view() noexcept { return ring.receive_view(); }
  ring_try_view try_receive_view() { return ring.try_receive_view(); }
  bool reads_in_place() const noexcept { return ring_in_place(ring); }
  peek_result try_peek(std::span<const std::byte>& frame, std::uint64_t& end) {
    return peek_ring(ring, frame, end);
  }
  void release_peeked(std::uint64_t end) noexcept { release_ring_peek(ring, end); }
  static std::optional<std::size_t> size_of(std::optional<std::size_t> size) noexcept { return size; }
  void pass_end_on(std::uint32_t) noexcept {}
  std::uint64_t position() const noexcept { return ring.position(); }
  void ack(std::uint64_t position) noexcept { ring.ack(position); }
  void close() noexcept { ring.detach(); }
};

[[noreturn]] void bad_address(const channel_address& a, const std::string& why) {
  throw bad_channel_address(fmt::format("channel address \"{}\": {}", a.text, why));
}

/// Both ends of a ring link; the claims tell each end when the other can no longer be taken.
class ring_link final : public link_ends {
 public:
  ring_link(const channel_address& a, std::shared_ptr<void> region, std::span<std::byte> payload)
      : address_(a), region_(std::move(region)), payload_(payload), claims_(link_claims::make(a)) {}
  std::unique_ptr<send_port> take_sender() override {
    auto port = make_ring_sender(address_, region_, payload_, std::move(claims_.receiver_watch));
    claims_.sender_claim.reset();  // the ring records this process now
    return port;
  }
  std::unique_ptr<receive_port> take_receiver() override {
    auto port = make_ring_receiver(address_, region_, payload_, std::move(claims_.sender_watch));
    claims_.receiver_claim.reset();  // the ring records this process now
    return port;
  }

 private:
  channel_address address_;
  std::shared_ptr<void> region_;
  std::span<std::byte> payload_;
  link_claims claims_;
};

/// Refuses, before attaching (an SPSC sender's failed attach would close the stream), a
/// ring whose checksum choice is not the address's.
void check_ring_checksum(const channel_address& a, std::span<const std::byte> payload) {
  const bool checked = ring_checksum_of(payload) == ring_checksum::xxh3;
  if (checked == a.checksum) return;
  throw channel_error(EPROTO,
                      fmt::format("channel {}: the ring's records carry checksum={}, but this address "
                                  "says checksum={}; write the same checksum= on both ends",
                                  a.text, checked ? "xxh3" : "none", a.checksum ? "xxh3" : "none"));
}

ring_options claim_options(const unique_fd& peer_claim) {
  ring_options o;
  o.peer_claim_fd = peer_claim ? peer_claim.get() : -1;
  return o;
}

}  // namespace

region_layout ring_layout(const channel_address& a) {
  if (a.mpmc) {
    return mpmc_ring_layout(a.capacity.value_or(default_mpmc_slots),
                            a.message_size.value_or(default_mpmc_message));
  }
  region_layout l = spsc_ring_layout(a.capacity.value_or(default_ring_capacity));
  if (a.durable) l.type_tag = durable_ring_type_tag;
  return l;
}

std::function<void(std::span<std::byte>)> ring_formatter(const channel_address& a) {
  if (a.mpmc) {
    const std::size_t message = a.message_size.value_or(default_mpmc_message);
    return [message](std::span<std::byte> r) { format_mpmc_ring(r, message); };
  }
  if (a.checksum) return format_spsc_ring_with_checksums;
  return [](std::span<std::byte> r) { format_spsc_ring(r); };
}

region_layout expected_ring_layout(const channel_address& a) {
  region_layout l = ring_layout(a);
  l.payload_size = 0;  // the creator chose the size
  return l;
}

/// Refuses a ring size above what a ring can hold, naming both figures: the ring would
/// otherwise be clamped silently to a size the user never wrote.
void check_ring_address(const channel_address& a) {
  const std::size_t max_capacity = a.mpmc ? mpmc_ring_max_slots : spsc_ring_max_capacity;
  if (a.capacity && *a.capacity > max_capacity) {
    bad_address(
        a, fmt::format("capacity={} is more than the largest {} allows, {} {}", *a.capacity,
                       a.mpmc ? "MPMC ring" : "SPSC ring", max_capacity, a.mpmc ? "slots" : "bytes (1 TiB)"));
  }
  if (a.message_size && *a.message_size > mpmc_ring_max_message) {
    bad_address(a, fmt::format("message_size={} is more than the largest MPMC ring message, {} bytes (1 GiB)",
                               *a.message_size, mpmc_ring_max_message));
  }
  if (a.checksum && a.mpmc) {
    bad_address(a,
                "checksum=xxh3 applies to an SPSC ring (records of an MPMC ring's slots carry none); drop "
                "ring=mpmc or the checksum");
  }
  if (a.message_size && !a.mpmc) {
    bad_address(a,
                "message_size applies to an MPMC ring (ring=mpmc); an SPSC ring's largest message "
                "follows from its capacity");
  }
}

namespace {
template <class Ring>
std::unique_ptr<send_port> ring_sender_port(const channel_address& a, std::shared_ptr<void> region,
                                            unique_fd peer_claim, Ring ring) {
  const bool batched = std::is_same_v<Ring, spsc_ring_sender> && !a.durable;
  return std::make_unique<message_send_port<ring_sending<Ring>>>(
      a.text, ring_sending<Ring>{std::move(region), std::move(peer_claim), std::move(ring),
                                 batched_publication{batched}});
}
template <class Ring>
std::unique_ptr<receive_port> ring_receiver_port(const channel_address& a, std::shared_ptr<void> region,
                                                 unique_fd peer_claim, Ring ring) {
  return std::make_unique<message_receive_port<ring_receiving<Ring>>>(
      a.text, ring_receiving<Ring>{std::move(region), std::move(peer_claim), std::move(ring)});
}
}  // namespace

/// `peer_claim`: for a link's end, the read end of the other end's claim pipe (link_claims).
std::unique_ptr<send_port> make_ring_sender(const channel_address& a, std::shared_ptr<void> region,
                                            std::span<std::byte> payload, unique_fd peer_claim) {
  check_ring_checksum(a, payload);
  ring_options o = claim_options(peer_claim);
  o.wait_for_new_receiver = a.durable;  // a durable channel's receiver comes back
  if (a.mpmc)
    return ring_sender_port(a, std::move(region), std::move(peer_claim), mpmc_ring_sender(payload, o));
  return ring_sender_port(a, std::move(region), std::move(peer_claim), spsc_ring_sender(payload, o));
}

std::unique_ptr<receive_port> make_ring_receiver(const channel_address& a, std::shared_ptr<void> region,
                                                 std::span<std::byte> payload, unique_fd peer_claim) {
  check_ring_checksum(a, payload);
  ring_options o = claim_options(peer_claim);
  if (a.durable) {
    o.manual_ack = true;
    std::optional<spsc_ring_receiver> ring;
    try {
      ring.emplace(payload, o);
    } catch (const std::system_error& e) {
      rethrow_for(a, e);  // EBUSY: a receiver that runs has it
    }
    return std::make_unique<message_receive_port<durable_ring_receiving>>(
        a.text, durable_ring_receiving{std::move(region), std::move(*ring)});
  }
  if (a.mpmc)
    return ring_receiver_port(a, std::move(region), std::move(peer_claim), mpmc_ring_receiver(payload, o));
  return ring_receiver_port(a, std::move(region), std::move(peer_claim), spsc_ring_receiver(payload, o));
}

std::unique_ptr<link_ends> make_ring_link(const channel_address& a, std::shared_ptr<void> region,
                                          std::span<std::byte> payload) {
  return std::make_unique<ring_link>(a, std::move(region), payload);
}

}  // namespace ipcoro::detail
