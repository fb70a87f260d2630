// SPDX-License-Identifier: MIT
// SPSC and MPMC message rings in shared memory, shm segments and mapped files alike.
#pragma once

#include "ipcoro/detail/op_deadline.hpp"
#include "ipcoro/detail/region.hpp"
#include "ipcoro/export.hpp"
#include "ipcoro/task.hpp"

#include <sys/types.h>

#include <chrono>
#include <coroutine>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <memory>
#include <optional>
#include <span>
#include <stop_token>
#include <string>
#include <system_error>
#include <utility>

// How the rings work, and what they promise
// ----------------------------------------
// A ring lives in a byte region that the caller maps into every process (shm_segment's or
// mapped_file's payload, or anonymous MAP_SHARED memory created before fork()). The region
// starts with the ring's own header: magic, layout version, kind, capacity, a check word
// over them, then each side's position, two futex words, the close flags and a table of
// the attached processes (pid + process start time). Attaching validates all of it and
// copies the geometry into the process, so a peer that rewrites the header later cannot
// move this process's reads and writes outside the region; every position, length and
// index read from the region afterwards is bounds-checked, and a violation throws
// std::system_error(EBADMSG) naming what was wrong.
//
// SPSC (spsc_ring_sender / spsc_ring_receiver): variable-length messages as 8-byte-aligned
// length-prefixed records in a power-of-two byte ring; a record that does not fit before
// the end is preceded by a padding record and written at the start. Positions only grow
// (64-bit), so full and empty need no extra state. A message of up to capacity/2 - 8 bytes
// always fits.
//
// MPMC (mpmc_ring_sender / mpmc_ring_receiver): a power-of-two array of fixed-size slots
// with a per-slot sequence word (Vyukov's bounded queue). A slot is claimed by a
// compare-and-swap that also records the claimer's pid, so a slot left half-written or
// half-read by a process that was killed can be recognised and released by the others.
// Each message is delivered to exactly one receiver; a receiver killed while copying a
// message out takes that message with it.
//
// No syscall and no atomic read-modify-write while data flows: a message costs each side
// its copy, one store of its position and one read of the other side's futex word (the
// other side's position is read only when the copy kept here says the ring is empty or
// full). A side that finds the ring empty (or full) first busy-polls it for a bounded,
// adaptive time (`ring_options::spin`; not when the peer last ran on this CPU), then
// announces that it sleeps: it sets bit 0 of the futex word (unless set), issues a fence
// and membarrier(MEMBARRIER_CMD_GLOBAL_EXPEDITED), looks at the ring once more, and only
// then parks with futex_wait (through the loop, always with a timeout) on the value with
// the bit. The other side publishes its position and reads the futex word: only when the
// bit is set does it clear it (adding 1, a new value) and call futex_wake — one syscall
// per sleep, however many messages follow before the sleeper runs. Why no wake-up is
// lost: membarrier() runs a full fence on every thread of the processes that registered
// for it (each endpoint's process does, when it attaches), wherever that thread is in its
// publication. If the publisher's position store came before that fence, the sleeper's
// second look sees it; if after, the publisher's read of the futex word comes after the
// fence too and sees the bit. (A process that cannot use membarrier — Linux < 4.16, a
// seccomp filter — marks the ring, and then every publisher issues a fence per message
// instead, the classic Dekker pairing. So does a side that sleeps often — eight waits in a
// row, each within 2 ms of the last and fewer than 64 messages after it, as in
// request/response traffic — since there a fence per message is cheaper than a membarrier
// per sleep; the ring then stays in that mode.) A change of the word between the sleeper's
// read and its entry into the kernel makes FUTEX_WAIT return at once.
//
// Every wait can end: by data or space, by the peer closing (end of stream / EPIPE), by
// the operation's own timeout (`with_timeout`, `with_deadline`: ipcoro::timed_out, as for
// every awaitable; a timeout counts from when the operation first has to wait), by
// cancellation through the awaiting task's stop token (ipcoro::operation_cancelled), or by
// the peer's death: a sleeper wakes every `liveness_check_interval`, checks the processes
// recorded for the other side (alive, not a zombie, same start time, so a reused pid is
// not mistaken for them) and throws ipcoro::peer_died once they are all gone.
//
// Durability of a ring in a mapped file: everything written to the mapping — messages
// sent, the acknowledged position — survives the crash of any process, because it lives
// in the kernel's page cache, not in the process. After a machine crash only what was
// flushed with msync (mapped_file::sync()) survives, and since pages are written back in
// no particular order, call sync() at the points you need to survive (e.g. after ack()).
// A receiver restarted after a crash resumes after the last acknowledged message: nothing
// acknowledged comes again; messages received but not acknowledged come again. The ring
// itself never calls msync (it would cost a disk flush per message): between syncs, a
// machine crash may leave a position on disk ahead of the bytes it publishes, which the
// ring then reports as EBADMSG or, if the stale bytes look like records, delivers. So
// sync() after the sends (sender) and the acks (receiver) that must survive one.
//
// Limits: all processes share one pid namespace (pids are compared). An endpoint belongs
// to the thread that uses it (coroutines of that thread may share it). A process killed
// while asleep leaves its sleeper bit behind: the next publication clears it with one
// futex_wake.
//
// Steady state allocates nothing: the fast paths work in the caller's coroutine frame,
// and a sleep runs in a task whose frame comes from the thread's frame pool.

namespace ipcoro {

/// Thrown by a wait on a ring whose peer process died without closing: the sender of an
/// SPSC ring, or every sender (receiver) of an MPMC ring. Carries ECONNRESET.
class IPCORO_API peer_died : public std::system_error {
 public:
  peer_died(pid_t pid, const std::string& what);
  /// The pid the dead peer had; 0 when no peer ever attached and none can any more
  /// (ring_options::peer_claim_fd).
  pid_t pid() const noexcept { return pid_; }

 private:
  pid_t pid_;
};

/// Per-endpoint settings (not stored in the region).
struct ring_options {
  /// Busy-poll the ring for at most this long before sleeping, when the peer last ran on
  /// another CPU. The budget adapts: it shrinks (to 1/16) when spinning does not pay off and
  /// grows back when it does. 0: sleep at once. Spinning burns CPU on the loop thread; it
  /// pays when the peer answers within microseconds. The default, a few microseconds, keeps
  /// a streaming receiver from sleeping (and its sender from waking it) between messages.
  std::chrono::nanoseconds spin{std::chrono::microseconds(2)};
  /// How often a sleeping waiter wakes to check that its peer is still alive.
  std::chrono::milliseconds liveness_check_interval{100};
  /// Receivers of an SPSC ring: false (default) frees each message's space as it is
  /// received; true keeps received messages in the ring until ack(), so that a receiver
  /// restarted after a crash gets the unacknowledged ones again. The sender can then
  /// only reuse acknowledged space.
  bool manual_ack = false;
  /// Senders of an SPSC ring: a receiver that died is not an error. A send waiting for
  /// space goes on waiting (never peer_died) until a receiver attaches again and makes
  /// room: for a ring in a file whose consumer is restarted after a crash (manual_ack).
  /// The wait still ends by timeout, cancellation, or a receiver's close() (EPIPE).
  bool wait_for_new_receiver = false;
  /// Lets this side switch the ring to a fence per published message once it sleeps
  /// often (request/response traffic): then a fence per message costs less than the
  /// membarrier() each sleep otherwise needs. The switch holds for the whole ring, for as
  /// long as it exists. false: this side never asks for it (others still may).
  bool adaptive_fences = true;
  /// Who may still attach as the other side, for a ring whose other side can only come
  /// from known processes (a channel_link's): the read end of a pipe whose write ends are
  /// held by exactly those processes. -1 (default): anyone may attach later, so an other
  /// side that has no record yet is waited for. Otherwise, once no process of the other
  /// side is recorded and the pipe reports that every write end is closed (the processes
  /// took their end, let it go or died), the other side will never come: a wait fails
  /// with peer_died (pid 0) at its next peer check. The caller keeps the descriptor open
  /// while the endpoint exists.
  int peer_claim_fd = -1;
};

/// Size of the ring header at the start of a region; the data follows it.
inline constexpr std::size_t ring_header_size = 4096;

/// The largest ring of each kind: data bytes of an SPSC ring, slots and message size of
/// an MPMC ring. Larger requests are clamped by the *_region_size functions below.
inline constexpr std::size_t spsc_ring_max_capacity = std::size_t{1} << 40;
inline constexpr std::size_t mpmc_ring_max_slots = std::size_t{1} << 30;
inline constexpr std::size_t mpmc_ring_max_message = std::size_t{1} << 30;

/// Region size for an SPSC ring with `capacity` data bytes (rounded up to a power of two,
/// at least 4096, at most spsc_ring_max_capacity).
IPCORO_API std::size_t spsc_ring_region_size(std::size_t capacity) noexcept;
/// Region size for an MPMC ring with `slots` slots (rounded up to a power of two) of
/// messages of up to `max_message` bytes.
IPCORO_API std::size_t mpmc_ring_region_size(std::size_t slots, std::size_t max_message) noexcept;

/// Type tags and layout version for a shm_segment or mapped_file that holds a ring.
inline constexpr std::uint32_t spsc_ring_type_tag = 0x43535053;  // "SPSC"
inline constexpr std::uint32_t mpmc_ring_type_tag = 0x434d504d;  // "MPMC"
inline constexpr std::uint32_t ring_layout_version = 1;

/// The region_layout to create (or open) a shm_segment or mapped_file for an SPSC ring of
/// `capacity` data bytes: `shm_segment::create(name, spsc_ring_layout(1 << 20))`.
inline region_layout spsc_ring_layout(std::size_t capacity) noexcept {
  return {spsc_ring_type_tag, ring_layout_version, spsc_ring_region_size(capacity)};
}
/// The region_layout for an MPMC ring (see mpmc_ring_region_size).
inline region_layout mpmc_ring_layout(std::size_t slots, std::size_t max_message) noexcept {
  return {mpmc_ring_type_tag, ring_layout_version, mpmc_ring_region_size(slots, max_message)};
}

/// Whether an SPSC ring's records carry a checksum. xxh3: each record carries an XXH3-64
/// hash over its ring position, length, type and payload, and a close carries one over the
/// final position, so that a receiver reports a damaged record, a moved position or a
/// close flag not set by the sender's close() as EBADMSG instead of delivering it or
/// ending the stream (16 bytes per record instead of 8, and a hash on each side). It
/// detects accidents and naive tampering, not a peer that forges records knowing the
/// scheme. Needs libxxhash at build time.
enum class ring_checksum : unsigned char { none, xxh3 };

/// Writes an empty SPSC ring into `region` (overwriting it): the capacity is the largest
/// power of two that fits after the header. `region` must be 64-byte aligned and hold at
/// least ring_header_size + 4096 bytes; throws std::system_error(EINVAL) otherwise. Do it
/// once, before any process attaches (e.g. before fork(), or right after creating the
/// segment); the magic number is written last.
IPCORO_API void format_spsc_ring(std::span<std::byte> region);
/// format_spsc_ring(), for a ring whose records carry ring_checksum::xxh3 checksums. Such a
/// ring has layout version 3, which ipcoro before it refuses (a ring without checksums keeps
/// version 2). Also throws std::system_error(EINVAL) in a build without libxxhash.
IPCORO_API void format_spsc_ring_with_checksums(std::span<std::byte> region);
/// Writes an empty MPMC ring into `region`: slots for messages of up to `max_message`
/// bytes, as many as fit (a power of two, at least 2). Same requirements as above.
IPCORO_API void format_mpmc_ring(std::span<std::byte> region, std::size_t max_message);

namespace detail {
class ring_endpoint;
struct ring_access;
}  // namespace detail

/// Sends one message: completes once the whole message is in the ring (waiting for space
/// while the ring is full). Throws std::system_error: EMSGSIZE when the message exceeds
/// the ring's max_message_size(), EPIPE once the receiving side closed the ring, EBADMSG
/// when the region is corrupt; ipcoro::peer_died when the receiving side died while this
/// waited for space; timed_out / operation_cancelled. The message is copied; it need only
/// live until the co_await returns. `.with_timeout(d)` / `.with_deadline(t)` bound the
/// wait: timed_out, and nothing is sent then. A timeout counts from when the send first has
/// to wait, so a send that completes at once reads no clock.
class [[nodiscard]] IPCORO_API ring_send_operation : public detail::deadline_methods<ring_send_operation> {
 public:
  ring_send_operation(detail::ring_endpoint* endpoint, std::span<const std::byte> message) noexcept
      : endpoint_(endpoint), message_(message) {}

  bool await_ready();
  template <class P>
  bool await_suspend(std::coroutine_handle<P> h) {
    return suspend(h, detail::stop_token_of(h));
  }
  void await_resume();

 private:
  friend class detail::ring_endpoint;
  bool suspend(std::coroutine_handle<> h, std::stop_token token);

  detail::ring_endpoint* endpoint_;
  std::span<const std::byte> message_;
  task<> wait_;  // the sleep, once the fast path and the spin found no room
};

/// Receives one message into `buffer`: its size, or an empty optional at end of stream
/// (the sending side closed and every message before the close has been received).
/// Throws std::system_error: EMSGSIZE when the next message is larger than `buffer` (it
/// stays in the ring: receive again with a buffer of max_message_size()), EBADMSG when
/// the region is corrupt; ipcoro::peer_died when the sending side died and the ring is
/// drained; timed_out / operation_cancelled. `.with_timeout(d)` / `.with_deadline(t)`
/// bound the wait: timed_out, and no message is taken then. A timeout counts from when the
/// receive first has to wait, so a receive that completes at once reads no clock.
class [[nodiscard]] IPCORO_API ring_receive_operation
    : public detail::deadline_methods<ring_receive_operation> {
 public:
  ring_receive_operation(detail::ring_endpoint* endpoint, std::span<std::byte> buffer) noexcept
      : endpoint_(endpoint), buffer_(buffer) {}

  bool await_ready();
  template <class P>
  bool await_suspend(std::coroutine_handle<P> h) {
    return suspend(h, detail::stop_token_of(h));
  }
  std::optional<std::size_t> await_resume();

 private:
  friend class detail::ring_endpoint;
  bool suspend(std::coroutine_handle<> h, std::stop_token token);

  detail::ring_endpoint* endpoint_;
  std::span<std::byte> buffer_;
  task<> wait_;  // the sleep, once the fast path and the spin found nothing
  std::size_t size_ = 0;
  bool end_of_stream_ = false;
};

/// What a non-blocking try_receive() found.
struct ring_try_result {
  bool would_block = false;         ///< the ring was empty: nothing taken
  std::optional<std::size_t> size;  ///< else the message's size, or empty at the end of the stream
};

/// Space lent by an SPSC ring's sender (basic_ring_end::loan): exactly the bytes asked
/// for, inside the ring, where the message will be. Write the message there and commit():
/// only then does the receiver see it (the sender's position moves at commit; with
/// ring_checksum::xxh3 the record's check is computed then, over what the loan holds).
/// Destroying or drop()ping it uncommitted publishes nothing. Move-only; while it is open
/// the sender's send, try_send and loan throw EBUSY; close() of the sender drops it. The
/// ring end must outlive it (drop it before abort(), which empties the end).
class IPCORO_API ring_loan {
 public:
  ring_loan() noexcept = default;
  // Inline, as drop() and release() below: a channel moves a loan or view per message.
  ring_loan(ring_loan&& other) noexcept
      : endpoint_(std::exchange(other.endpoint_, nullptr)), space_(other.space_) {}
  ring_loan& operator=(ring_loan&& other) noexcept {
    if (this != &other) {
      drop();
      endpoint_ = std::exchange(other.endpoint_, nullptr);
      space_ = other.space_;
    }
    return *this;
  }
  ~ring_loan() { drop(); }

  /// The lent bytes: write the message here (never past them).
  std::span<std::byte> bytes() const noexcept { return space_; }
  /// Publishes the whole loan as one message. Never waits.
  void commit() { commit(space_.size()); }
  /// Publishes the first `size` bytes as one message; std::system_error(EINVAL) naming both
  /// numbers when `size` is more than the loan holds (then the loan stays open).
  void commit(std::size_t size);
  /// Gives the space back unpublished; nothing when committed, dropped or empty.
  void drop() noexcept {
    if (endpoint_ != nullptr) drop_open();
  }
  explicit operator bool() const noexcept { return endpoint_ != nullptr; }

 private:
  friend class ring_loan_operation;
  void drop_open() noexcept;
  ring_loan(detail::ring_endpoint* endpoint, std::span<std::byte> space) noexcept
      : endpoint_(endpoint), space_(space) {}

  detail::ring_endpoint* endpoint_ = nullptr;
  std::span<std::byte> space_;
};

/// The next message of an SPSC ring, in place (basic_ring_end::receive_view): valid until
/// release(), its destruction, or the next receive / receive_view of that end, which
/// release it first. Its space goes back to the sender only then (with
/// ring_options::manual_ack: at ack(), as for a copied message). Move-only; the ring end
/// must outlive it. The bytes are in memory the sender's process shares: a sender that
/// misbehaves can change them while they are read (the checksum, if any, was checked when
/// the view was made).
class IPCORO_API ring_view {
 public:
  ring_view() noexcept = default;
  ring_view(ring_view&& other) noexcept
      : endpoint_(std::exchange(other.endpoint_, nullptr)), bytes_(other.bytes_), end_(other.end_) {}
  ring_view& operator=(ring_view&& other) noexcept {
    if (this != &other) {
      release();
      endpoint_ = std::exchange(other.endpoint_, nullptr);
      bytes_ = other.bytes_;
      end_ = other.end_;
    }
    return *this;
  }
  ~ring_view() { release(); }

  std::span<const std::byte> bytes() const noexcept { return bytes_; }
  /// Gives the message's space back to the sender; later calls do nothing.
  void release() noexcept {
    if (endpoint_ != nullptr) release_open();
  }
  explicit operator bool() const noexcept { return endpoint_ != nullptr; }

 private:
  friend class ring_view_operation;
  void release_open() noexcept;
  ring_view(detail::ring_endpoint* endpoint, std::span<const std::byte> bytes, std::uint64_t end) noexcept
      : endpoint_(endpoint), bytes_(bytes), end_(end) {}

  detail::ring_endpoint* endpoint_ = nullptr;
  std::span<const std::byte> bytes_;
  std::uint64_t end_ = 0;  // the ring position right after the message
};

/// Lends `size` bytes of an SPSC ring: waits for room as send() does (spinning, sleeping,
/// the receiver's death: ipcoro::peer_died; timed_out / operation_cancelled, with nothing
/// lent or published), and throws as send() does (EMSGSIZE, EPIPE, EBADMSG; EBUSY while
/// another loan of this end is open).
class [[nodiscard]] IPCORO_API ring_loan_operation : public detail::deadline_methods<ring_loan_operation> {
 public:
  ring_loan_operation(detail::ring_endpoint* endpoint, std::size_t size) noexcept
      : endpoint_(endpoint), size_(size) {}

  bool await_ready();
  template <class P>
  bool await_suspend(std::coroutine_handle<P> h) {
    return suspend(h, detail::stop_token_of(h));
  }
  // Inline (the outcome of a wait is out of line): a loan is then built in registers,
  // not stored and read back.
  ring_loan await_resume() {
    if (wait_.valid()) finish_wait();
    return ring_loan{endpoint_, space_};
  }

 private:
  friend class detail::ring_endpoint;
  bool suspend(std::coroutine_handle<> h, std::stop_token token);
  void finish_wait();

  detail::ring_endpoint* endpoint_;
  std::size_t size_;
  std::span<std::byte> space_;
  task<> wait_;
};

/// Waits for the next message of an SPSC ring as receive() does, and gives it in place:
/// a ring_view, or an empty optional at the end of the stream. Throws as receive() does.
class [[nodiscard]] IPCORO_API ring_view_operation : public detail::deadline_methods<ring_view_operation> {
 public:
  explicit ring_view_operation(detail::ring_endpoint* endpoint) noexcept : endpoint_(endpoint) {}

  bool await_ready();
  template <class P>
  bool await_suspend(std::coroutine_handle<P> h) {
    return suspend(h, detail::stop_token_of(h));
  }
  std::optional<ring_view> await_resume() {
    if (wait_.valid()) finish_wait();
    if (end_of_stream_) return std::nullopt;
    return ring_view{endpoint_, bytes_, end_};
  }

 private:
  friend class detail::ring_endpoint;
  bool suspend(std::coroutine_handle<> h, std::stop_token token);
  void finish_wait();
  /// One non-blocking look; true when done (a message, or the end).
  bool attempt();

  detail::ring_endpoint* endpoint_;
  std::span<const std::byte> bytes_;
  std::uint64_t end_ = 0;  // the read position after the message found
  task<> wait_;
  bool end_of_stream_ = false;
};

/// What a non-blocking try_receive_view() found.
struct ring_try_view {
  bool would_block = false;       ///< the ring was empty
  std::optional<ring_view> view;  ///< else the message, or empty at the end of the stream
};

/// Which kind of ring an endpoint attaches to: SPSC (one sender, one receiver, messages of
/// any size up to capacity / 2 - 8) or MPMC (any number of each, fixed-size slots).
enum class ring_kind : unsigned char { spsc, mpmc };
/// Which end of the ring an endpoint is.
enum class ring_role : unsigned char { sender, receiver };

/// One end of a ring; use it through the four names below (spsc_ring_sender, ...), which
/// say what each end does when it goes. Move-only; keep the region mapped while it exists,
/// and do not move or destroy it while one of its operations is in flight.
template <ring_kind Kind, ring_role Role>
class IPCORO_API basic_ring_end {
  static constexpr bool spsc = Kind == ring_kind::spsc;
  static constexpr bool sender = Role == ring_role::sender;

 public:
  basic_ring_end() noexcept;
  /// Attaches to the ring formatted in `region` as this end, recording this process.
  /// Throws std::system_error: EINVAL when the region holds no valid ring of this kind
  /// (what mismatched is in the message); SPSC: EBUSY when another live process holds this
  /// end (one that died is replaced: sending resumes after its last complete message,
  /// receiving at the last acknowledged position, so that a previous receiver's
  /// unacknowledged messages come again); MPMC: EUSERS when the ring's table of 64
  /// attached endpoints is full.
  explicit basic_ring_end(std::span<std::byte> region, const ring_options& options = {});
  basic_ring_end(basic_ring_end&&) noexcept;
  /// SPSC: close()s this end first. MPMC: detaches it first.
  basic_ring_end& operator=(basic_ring_end&&) noexcept;
  /// SPSC sender: close(); but when destroyed by an exception unwinding the stack,
  /// abort(), so that a producer that fails never marks a persistent ring as finished.
  /// SPSC receiver: close(). MPMC: detaches (does not close the ring: others may go on).
  ~basic_ring_end();

  /// Copies `message` into the ring, waiting for space while it is full.
  ring_send_operation send(std::span<const std::byte> message) noexcept requires sender {
    return {endpoint_.get(), message};
  }
  /// Copies the next message into `buffer`; see ring_receive_operation. Each message of an
  /// MPMC ring goes to exactly one receiver.
  ring_receive_operation receive(std::span<std::byte> buffer) noexcept requires(!sender) {
    return {endpoint_.get(), buffer};
  }

  /// Sends `message` if the ring has room for it now, without waiting or spinning: true
  /// once it is in the ring, false when the ring is full. Throws as send() does.
  bool try_send(std::span<const std::byte> message) requires sender {
    return ring_send_operation{endpoint_.get(), message}.await_ready();
  }
  /// Takes the next message into `buffer` if one is there now, without waiting or
  /// spinning: `would_block` when the ring is empty; else what receive() would have given
  /// (its size, or an empty optional at the end of the stream). Throws as receive() does.
  ring_try_result try_receive(std::span<std::byte> buffer) requires(!sender) {
    ring_receive_operation op{endpoint_.get(), buffer};
    if (!op.await_ready()) return {true, std::nullopt};
    return {false, op.await_resume()};
  }

  /// SPSC sender: lends `size` bytes of the ring to write a message in place (zero-copy);
  /// see ring_loan and ring_loan_operation. An MPMC ring has no loans.
  ring_loan_operation loan(std::size_t size) noexcept requires(spsc&& sender) {
    return {endpoint_.get(), size};
  }
  /// SPSC sender: loan() if the ring has room now, without waiting; empty when it is full.
  std::optional<ring_loan> try_loan(std::size_t size) requires(spsc&& sender) {
    ring_loan_operation op{endpoint_.get(), size};
    if (!op.await_ready()) return std::nullopt;
    return op.await_resume();
  }
  /// SPSC sender: batches publication. The next sends and loan commits are written into
  /// the ring but the receiver sees them only at publish(), or once they hold 4 KiB, or
  /// when a send finds the ring full (only the receiver can free room), or at close(),
  /// detach() or abort(). One store of the shared position per batch instead of per
  /// message: a receiver polling the ring then takes many messages per cache transfer.
  void hold_publication() noexcept requires(spsc&& sender) { hold_end(); }
  /// SPSC sender: publishes what hold_publication() held, and ends holding.
  void publish() noexcept requires(spsc&& sender) { publish_end(); }
  /// SPSC receiver: the next message in place (zero-copy); see ring_view.
  ring_view_operation receive_view() noexcept requires(spsc && !sender) {
    return ring_view_operation{endpoint_.get()};
  }
  /// SPSC receiver: receive_view() if a message (or the end) is there now, without waiting.
  ring_try_view try_receive_view() requires(spsc && !sender) {
    ring_view_operation op{endpoint_.get()};
    if (!op.await_ready()) return {true, std::nullopt};
    return {false, op.await_resume()};
  }

  /// SPSC receiver: acknowledges every message received so far (with
  /// ring_options::manual_ack): they will not come again, and the sender may reuse their
  /// space. A store and at most one futex wake; no wait.
  void ack() noexcept requires(spsc && !sender) { ack_all(); }
  /// SPSC receiver: the ring position right after the last message received: acknowledge
  /// up to it later with ack(position), e.g. once that message has been handed on by a
  /// caller that reads ahead. Before the first receive: the position acknowledged last.
  std::uint64_t position() const noexcept requires(spsc && !sender) { return read_position(); }
  /// SPSC receiver: acknowledges the messages received before `position` (a value
  /// position() returned); an older or unknown position does nothing.
  void ack(std::uint64_t position) noexcept requires(spsc && !sender) { ack_through(position); }

  /// SPSC sender: ends the stream: the receiver gets the messages already sent, then an
  /// empty optional. Detaches. Idempotent; the destructor calls it.
  /// SPSC receiver: messages received but not yet acknowledged are given back
  /// (manual_ack), then the ring is closed for the sender (its sends fail with EPIPE) and
  /// this end detaches. The destructor calls it.
  /// MPMC: closes the whole ring: sends fail with EPIPE from now on, receivers get an empty
  /// optional once it is drained. Call it once every sender has finished.
  void close() noexcept;
  /// Detaches without ending the stream. SPSC: a later end of this side (another process,
  /// or after a restart) continues it; unacknowledged messages go to the next receiver.
  /// MPMC: leaves the ring (others go on) and the endpoint becomes empty; the destructor
  /// does the same.
  void detach() noexcept;
  /// Lets go of the ring as a failed producer. SPSC: neither closes nor detaches, so the
  /// ring keeps this process as its sender, and the receiver gets peer_died once this
  /// process has exited (no other sender can attach until then). MPMC: like detach(), but
  /// the ring keeps this process's record, so receivers get peer_died once every sender,
  /// this process among them, has died. The endpoint becomes empty.
  void abort() noexcept requires sender { abort_end(); }
  /// MPMC receiver: leaves the ring as a receiver that is done: detaches, and when no
  /// other receiver is recorded (alive or dead), closes the receiving side, as an SPSC
  /// receiver's close() does: sends fail with EPIPE, and senders waiting for room wake with
  /// it, until a receiver attaches again. Other receivers, and the messages left for them,
  /// stay.
  void leave() noexcept requires(!spsc && !sender) { leave_end(); }

  /// The largest message this ring carries (SPSC: capacity / 2 - 8); 0 for an empty endpoint.
  std::size_t max_message_size() const noexcept;
  /// SPSC: data bytes in the ring; MPMC: number of slots. 0 for an empty endpoint.
  std::size_t capacity() const noexcept;
  /// Whether the ring's records carry checksums (chosen when it was formatted).
  ring_checksum checksum() const noexcept;
  explicit operator bool() const noexcept { return static_cast<bool>(endpoint_); }

 private:
  // The constrained members above are defined inline (clang 14 rejects out-of-line
  // definitions of constrained members of a class template) and call these.
  void ack_all() noexcept;
  std::uint64_t read_position() const noexcept;
  void ack_through(std::uint64_t position) noexcept;
  void abort_end() noexcept;
  void leave_end() noexcept;
  void hold_end() noexcept;
  void publish_end() noexcept;

  friend struct detail::ring_access;  // the library's channels reach the endpoint directly
  std::unique_ptr<detail::ring_endpoint> endpoint_;
  int uncaught_ = std::uncaught_exceptions();  // SPSC sender: unwinding in the destructor is more than this
};

/// The one sending end of an SPSC ring.
using spsc_ring_sender = basic_ring_end<ring_kind::spsc, ring_role::sender>;
/// The one receiving end of an SPSC ring.
using spsc_ring_receiver = basic_ring_end<ring_kind::spsc, ring_role::receiver>;
/// One of the sending ends of an MPMC ring (any number of processes, and several endpoints
/// per process).
using mpmc_ring_sender = basic_ring_end<ring_kind::mpmc, ring_role::sender>;
/// One of the receiving ends of an MPMC ring.
using mpmc_ring_receiver = basic_ring_end<ring_kind::mpmc, ring_role::receiver>;

extern template class basic_ring_end<ring_kind::spsc, ring_role::sender>;
extern template class basic_ring_end<ring_kind::spsc, ring_role::receiver>;
extern template class basic_ring_end<ring_kind::mpmc, ring_role::sender>;
extern template class basic_ring_end<ring_kind::mpmc, ring_role::receiver>;

}  // namespace ipcoro
