// SPDX-License-Identifier: MIT
// mq_channel: channels over POSIX message queues: the adapters, the mq: scheme and its links.
#include "ipcoro/channel.hpp"
#include "ipcoro/error.hpp"
#include "ipcoro/fd_io.hpp"
#include "ipcoro/mqueue.hpp"
#include "ipcoro/transport.hpp"

#include "channel_wire.hpp"
#include "link_claims.hpp"
#include "loop.hpp"
#include "message_port.hpp"
#include "mq_peers.hpp"
#include "proc_value.hpp"

#include <dirent.h>
#include <fcntl.h>
#include <fmt/core.h>
#include <mqueue.h>
#include <poll.h>
#include <sys/stat.h>

#include <cerrno>
#include <chrono>
#include <ctime>
#include <exception>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace ipcoro::detail {
namespace {

std::string mq_size_advice(std::size_t wanted) {
  const long limit = read_proc_long("/proc/sys/fs/mqueue/msgsize_max");
  return fmt::format(
      "create the channel with message_size={} or more (this system allows up to {}, "
      "/proc/sys/fs/mqueue/msgsize_max)",
      wanted, limit);
}

/// Posts `m` to `mqd` if the queue has room now: 0 once posted, EAGAIN when full, or the errno.
int post_if_room(int mqd, std::span<const std::byte> m) noexcept {
  const timespec now{0, 0};  // an absolute time in the past: never block
  while (::mq_timedsend(static_cast<mqd_t>(mqd), reinterpret_cast<const char*>(m.data()), m.size(), 0,
                        &now) != 0)
    if (errno != EINTR) return errno == ETIMEDOUT ? EAGAIN : errno;
  return 0;
}

bool try_send_end(int mqd, std::uint32_t fingerprint) noexcept {
  const message_head h{static_cast<std::uint32_t>(frame_kind::end), fingerprint};
  return post_if_room(mqd, std::as_bytes(std::span(&h, 1))) == 0;
}

/// Why a queue's peer counts as dead: `pid` died, or (pid 0) a link's `end` that nobody
/// took and nobody can take any more.
std::string why_dead(pid_t pid, const char* peer, const char* end) {
  if (pid == 0) {
    return fmt::format(
        "the link's {} end was never taken, and no process can take it any more (each one that "
        "held the link exited or dropped it)",
        end);
  }
  return fmt::format("the {} (process {}) died", peer, pid);
}

/// A queue, its peer record, and the address for messages: what both ends hold.
struct mq_end {
  message_queue queue;
  mq_peers peers;
  std::string address;

  std::size_t max_message() const noexcept {
    return static_cast<std::size_t>(queue.attributes().message_size);
  }
};

/// What a wait for room learns from the record: peer_died, or channel_closed (all closed).
void check_receivers(const mq_end& e) {
  const mq_peers::verdict v = e.peers.peers();
  if (v.state == mq_peers::verdict::dead) {
    throw peer_died(v.pid, fmt::format("channel {}: {}, while this send waited for room in the full queue",
                                       e.address, why_dead(v.pid, "receiver", "receiving")));
  }
  if (v.state == mq_peers::verdict::left)
    throw channel_closed(fmt::format("channel {}: the receiver has closed the channel", e.address));
}

/// post_if_room() for an end: true once posted, false when full; throws other errors.
bool post_now(const mq_end& e, std::span<const std::byte> m) {
  const int err = post_if_room(e.queue.native_handle(), m);
  if (err != 0 && err != EAGAIN) throw_errno(err, fmt::format("channel {}: mq_send", e.address));
  return err == 0;
}

/// A queue message of several frames: message_head{batch, 0}, then each as {u32 length, frame}.
constexpr std::uint32_t batch_kind = 3;
constexpr std::size_t batch_entry_head = 4;

/// A sending end's queue and the frames it holds for the turn's end, shared by the port, the
/// end-of-turn hook and a task that waits for room (it outlives the port until they are
/// posted). They go as one queue message while the queue has had one receiver only; with
/// several, each goes alone, so that the receivers share the work message by message.
struct mq_out : turn_end_hook {
  explicit mq_out(mq_end e) noexcept : end(std::move(e)) {}

  bool packs() const noexcept { return end.peers && end.peers.receivers_seen() <= 1; }
  /// The held frames as one queue message (a lone frame without the batch head).
  std::span<const std::byte> message() noexcept {
    if (frames == 1) return {held.data() + head_size + batch_entry_head, used - head_size - batch_entry_head};
    return {held.data(), used};
  }
  bool fits(std::size_t frame) const noexcept {
    return (used == 0 ? head_size : used) + batch_entry_head + frame <= end.max_message();
  }
  void hold(std::span<const std::byte> frame) {
    if (used == 0) {
      held.grow(end.max_message(), 0);
      const message_head h{batch_kind, 0};
      std::memcpy(held.data(), &h, sizeof h);
      used = head_size;
    }
    const auto n = static_cast<std::uint32_t>(frame.size());
    std::memcpy(held.data() + used, &n, sizeof n);
    std::memcpy(held.data() + used + batch_entry_head, frame.data(), frame.size());
    used += batch_entry_head + frame.size();
    ++frames;
  }
  /// Whether the queue has a free slot now: a batch is begun only then, so that a sender
  /// alone on the queue always has room for what it holds, and a waiting send holds nothing.
  bool has_room() const {
    struct mq_attr attr {};
    if (::mq_getattr(static_cast<mqd_t>(end.queue.native_handle()), &attr) != 0)
      throw_errno(errno, fmt::format("channel {}: mq_getattr", end.address));
    return attr.mq_curmsgs < attr.mq_maxmsg;
  }
  void posted() noexcept {
    used = 0;
    frames = 0;
  }
  /// Reports what a deferred post found (peer_died, channel_closed, ...), once.
  void check() {
    if (failure) std::rethrow_exception(std::exchange(failure, nullptr));
  }

  mq_end end;
  byte_buffer held;
  std::size_t used = 0;          // bytes of `held` in use, its batch head included
  std::size_t frames = 0;        // frames held
  wait_list progress;            // sends and flushes waiting for a post in flight
  std::shared_ptr<mq_out> keep;  // while the hook is queued or a post task runs
  std::exception_ptr failure;    // a deferred post's error, for the next send or flush
  bool posting = false;          // a coroutine waits for room to post `held`
};

/// How long a post that cannot use the loop waits for room before what is held is lost.
constexpr std::chrono::seconds end_patience{30};

/// Posts what is held, waiting here (at most end_patience; throws as check_receivers(), or
/// channel_error(ETIMEDOUT)): with no running loop, and for finish().
void post_patiently(mq_out& o) {
  const auto until = std::chrono::steady_clock::now() + end_patience;
  while (!post_now(o.end, o.message())) {
    // The descriptor does not block: poll for room, the record looked at every 100 ms.
    pollfd pfd{o.end.queue.native_handle(), POLLOUT, 0};
    if (::poll(&pfd, 1, 100) < 0 && errno != EINTR)
      throw_errno(errno, fmt::format("channel {}: poll", o.end.address));
    check_receivers(o.end);
    if (std::chrono::steady_clock::now() >= until) {
      throw channel_error(ETIMEDOUT,
                          fmt::format("channel {}: the queue stayed full for {} s: the messages of the last "
                                      "loop turn, held to go as one, are lost",
                                      o.end.address, end_patience.count()));
    }
  }
  o.posted();
}

/// Ends the sending end: the end goes into the peer record, where receivers find it once
/// they have emptied the queue, and the end marker, when it fits, wakes those waiting now.
/// (A queue without a record, made outside channels, gets the marker only if it fits.)
void end_now(mq_out& o, port_exit how, std::uint32_t fingerprint) noexcept {
  if (!o.end.queue) return;
  switch (how) {
    case port_exit::close:
      o.end.peers.mark_end();
      try_send_end(o.end.queue.native_handle(), fingerprint);
      o.end.peers.close();
      break;
    case port_exit::detach:
      o.end.peers.close();
      break;
    case port_exit::abort:
      o.end.peers.abort();  // the record keeps this process: its exit reads as a death
      break;
  }
  o.end.queue.close();
}

/// Waits through the loop until `e`'s queue has room (a poll, which posts nothing), looked
/// at every check interval (mq_watched_wait); throws as check_receivers().
task<void> room_in(pooled_frame, mq_end& e) {
  poll_operation room{e.queue.native_handle(), POLLOUT};
  if (!e.peers) {
    co_await room;
    co_return;
  }
  {
    const mq_watched_wait watch(e.peers, room, mq_watched_wait::waits_for::room);
    try {
      co_await room;
      co_return;
    } catch (const operation_cancelled&) {
      if (!watch.fired()) throw;
    }
  }
  check_receivers(e);
}

/// Posts what is held, waiting for room through the loop (a post made meanwhile by
/// finish() leaves it nothing to do). Throws as room_in().
task<void> post_held_waiting(pooled_frame, mq_out& o) {
  while (o.used > 0) {
    if (post_now(o.end, o.message())) {
      o.posted();
      break;
    }
    co_await room_in(pooled_frame{}, o.end);
  }
}

/// A task that posts what is held once the queue has room; a failure is kept for the next
/// send or flush. When the loop shuts down meanwhile, it waits here instead (bounded).
task<void> post_held(pooled_frame, std::shared_ptr<mq_out> self) {
  mq_out& o = *self;
  bool cancelled = false;
  try {
    co_await post_held_waiting(pooled_frame{}, o);
  } catch (const operation_cancelled&) {
    cancelled = true;  // the loop is shutting down
  } catch (...) {
    o.failure = std::current_exception();
  }
  if (cancelled && o.used > 0) {
    try {
      post_patiently(o);
    } catch (...) {
      o.failure = std::current_exception();
    }
  }
  o.posted();
  o.posting = false;
  o.progress.wake_all();
}

/// Posts what is held now if the queue has room; else a task waits for room (without a
/// loop, this waits here). A failure is kept for the next send or flush.
void post_or_wait(mq_out& o, const std::shared_ptr<mq_out>& self) noexcept {
  if (o.posting || o.used == 0) return;
  try {
    if (post_now(o.end, o.message())) {
      o.posted();
      return;
    }
    io_context* ctx = io_context::current_or_null();
    if (ctx != nullptr && !ctx->stopping() && loop::driven(*ctx)) {
      o.posting = true;
      ctx->spawn(post_held(pooled_frame{}, self));
      return;
    }
    post_patiently(o);
  } catch (...) {
    o.posting = false;
    o.failure = std::current_exception();
    o.posted();
  }
}

void post_at_turn_end(turn_end_hook& hook) noexcept {
  auto& o = static_cast<mq_out&>(hook);
  const std::shared_ptr<mq_out> self = std::move(o.keep);
  post_or_wait(o, self);
}

/// The queue under a message channel's sending end, and its peer record. While the queue
/// has one receiver, the first message of a loop turn is posted at once, alone (a round
/// trip costs what it did), and the turn's others wait for its end, where they are posted
/// as one queue message (see mq_out).
class mq_sending {
 public:
  explicit mq_sending(mq_end e) : out_(std::make_shared<mq_out>(std::move(e))) {
    out_->fn = &post_at_turn_end;
  }

  std::size_t max_message() const noexcept { return out_->end.max_message(); }
  std::string size_advice(std::size_t wanted) const { return mq_size_advice(wanted); }

  /// Holds `frame` for the end of this turn, where it is posted with the turn's others;
  /// false when it must wait (the held frames are being posted, or it does not fit with
  /// them and the queue is full) or the queue has several receivers.
  bool try_send(std::span<const std::byte> frame) {
    mq_out& o = *out_;
    o.check();
    if (o.posting || !o.packs()) return false;
    if (!o.fits(frame.size())) {
      if (o.used == 0 || !post_now(o.end, o.message())) return false;
      o.posted();
      if (!o.fits(frame.size())) return false;  // too large to share a queue message
    }
    if (o.used == 0 && !o.queued) {  // the turn's first message goes alone, at once
      if (!post_now(o.end, frame)) return false;
      mark_turn();
      return true;
    }
    if (o.used == 0 && !o.has_room()) return false;
    accept(frame);
    return true;
  }

  task<void> send(std::span<const std::byte> frame) { return send_waiting(pooled_frame{}, frame); }

  /// Posts what is held now, waiting for room (the channel's flush()).
  task<void> drain() { return drain_waiting(pooled_frame{}); }

  void close(std::uint32_t fingerprint) noexcept { finish(port_exit::close, fingerprint); }
  void detach() noexcept { finish(port_exit::detach, 0); }
  void abort() noexcept { finish(port_exit::abort, 0); }

 private:
  void accept(std::span<const std::byte> frame) {
    mq_out& o = *out_;
    out_->end.peers.ensure_attached();
    o.hold(frame);
    if (!mark_turn()) post_or_wait(o, out_);
  }
  /// Queues the end-of-turn hook (the turn's next message is not its first); false: no loop.
  bool mark_turn() noexcept {
    mq_out& o = *out_;
    if (o.queued) return true;
    io_context* ctx = io_context::current_or_null();
    if (ctx == nullptr) return false;
    o.keep = out_;
    loop::at_turn_end(*ctx, o);
    return true;
  }

  /// Waits until no post is in flight, then posts what is held, waiting for room. A wait
  /// cancelled leaves what is held for the next send, flush or the end.
  task<void> post_held_here(pooled_frame) {
    const std::shared_ptr<mq_out> self = out_;
    mq_out& o = *self;
    while (o.posting) co_await park_operation{o.progress};
    o.check();
    if (o.used == 0) co_return;
    o.posting = true;
    try {
      co_await post_held_waiting(pooled_frame{}, o);
    } catch (const operation_cancelled&) {
      o.posting = false;
      o.progress.wake_all();
      throw;
    } catch (...) {
      o.posting = false;
      o.posted();  // the receivers are dead or gone: what is held goes nowhere
      o.progress.wake_all();
      throw;
    }
    o.posting = false;
    o.progress.wake_all();
  }

  task<void> send_waiting(pooled_frame, std::span<const std::byte> frame) {
    mq_out& o = *out_;
    o.end.peers.ensure_attached();
    for (;;) {
      while (o.posting) co_await park_operation{o.progress};
      o.check();
      if (o.packs() && o.fits(frame.size())) {
        if (o.used == 0 && !o.queued) break;  // the turn's first message goes alone
        if (o.used > 0 || o.has_room()) {
          accept(frame);
          co_return;
        }
        co_await room_in(pooled_frame{}, o.end);
        continue;
      }
      if (o.used == 0) break;
      co_await post_held_here(pooled_frame{});  // the held ones go first
    }
    while (!post_now(o.end, frame)) co_await room_in(pooled_frame{}, o.end);
    if (o.packs()) mark_turn();
  }

  task<void> drain_waiting(pooled_frame) {
    co_await post_held_here(pooled_frame{});
    out_->check();
  }

  /// What is held is posted first, waiting here if need be (post_patiently), so that a
  /// close that returned has put every message it accepted in the queue before its end.
  void finish(port_exit how, std::uint32_t fingerprint) noexcept {
    mq_out& o = *out_;
    if (!o.end.queue) return;
    if (o.used > 0) {
      try {
        post_patiently(o);
      } catch (...) {  // lost: the receivers are dead or gone, or it timed out
        o.posted();
      }
    }
    end_now(o, how, fingerprint);
  }

  std::shared_ptr<mq_out> out_;
};

/// The queue under a message channel's receiving end, and its peer record. A wait on an
/// empty queue is looked at every check interval: it ends the stream once a sender's
/// close is recorded, and throws peer_died once every sender recorded has died without
/// closing.
struct mq_receiving : mq_end {
  explicit mq_receiving(mq_end e) noexcept : mq_end(std::move(e)) {}

  /// The next frame: one a queue message held from before (a sender's batch), else the
  /// next queue message, or the first frame of it when it is a batch.
  task<std::optional<mq_message>> receive(std::span<std::byte> buffer) {
    return receive_unpacked(pooled_frame{}, buffer);
  }
  /// A frame of a batch already taken from the queue, without waiting: would_block when none is.
  ring_try_result try_receive(std::span<std::byte> buffer) {
    if (held_at_ == held_end_) return {true, std::nullopt};
    return {false, take_held(buffer)};
  }
  static std::optional<std::size_t> size_of(const std::optional<mq_message>& m) noexcept {
    return m ? std::optional<std::size_t>(m->size) : std::nullopt;
  }
  /// Puts the end marker back, so that every other receiver of the queue ends too.
  void pass_end_on(std::uint32_t fingerprint) noexcept { try_send_end(queue.native_handle(), fingerprint); }
  /// The queue goes first: a crash in between leaves a record whose dead creator a
  /// restarted receiver can prove, not a queue with no record that it must refuse.
  void close() noexcept {
    queue.close();
    peers.close();
  }

 private:
  /// Copies the next held frame into `buffer`; its size.
  std::size_t take_held(std::span<std::byte> buffer) {
    std::uint32_t n = 0;
    std::memcpy(&n, held_.data() + held_at_, sizeof n);
    const std::size_t at = held_at_ + batch_entry_head;
    if (n > held_end_ - at || n > buffer.size()) {
      held_at_ = held_end_ = 0;
      throw channel_error(EBADMSG, fmt::format("channel {}: a corrupt batch of messages in the queue (a "
                                               "frame of {} bytes past its end)",
                                               address, n));
    }
    std::memcpy(buffer.data(), held_.data() + at, n);
    held_at_ = at + n;
    if (held_end_ - held_at_ < batch_entry_head) held_at_ = held_end_ = 0;
    return n;
  }
  /// A batch received is kept, and its first frame given in its place in `buffer`.
  task<std::optional<mq_message>> receive_unpacked(pooled_frame, std::span<std::byte> buffer) {
    if (held_at_ < held_end_) co_return mq_message{take_held(buffer), 0};
    std::optional<mq_message> m = co_await receive_checked(pooled_frame{}, buffer);
    if (!m || m->size < head_size + batch_entry_head ||
        read_head<message_head>(buffer.data()).kind != batch_kind)
      co_return m;
    held_.grow(buffer.size(), 0);
    std::memcpy(held_.data(), buffer.data(), m->size);
    held_at_ = head_size;
    held_end_ = m->size;
    co_return mq_message{take_held(buffer), m->priority};
  }

  byte_buffer held_;  // a batch taken from the queue, and how far it has been given out
  std::size_t held_at_ = 0;
  std::size_t held_end_ = 0;

  /// A message if the queue holds one; never waits.
  std::optional<mq_message> take_now(std::span<std::byte> buffer) const {
    for (;;) {
      unsigned priority = 0;
      const ssize_t n = ::mq_receive(static_cast<mqd_t>(queue.native_handle()),
                                     reinterpret_cast<char*>(buffer.data()), buffer.size(), &priority);
      if (n >= 0) return mq_message{static_cast<std::size_t>(n), priority};
      if (errno == EAGAIN) return std::nullopt;
      if (errno != EINTR) throw_errno(errno, fmt::format("channel {}: mq_receive", address));
    }
  }

  task<std::optional<mq_message>> receive_checked(pooled_frame, std::span<std::byte> buffer) {
    peers.ensure_attached();
    for (;;) {
      // The end was recorded after the closing sender's last message went in.
      if (peers.ended()) co_return take_now(buffer);
      mq_receive_operation op = queue.receive(buffer);
      if (!peers) co_return co_await op;
      {
        const mq_watched_wait watch(peers, op, mq_watched_wait::waits_for::data);
        try {
          co_return co_await op;
        } catch (const operation_cancelled&) {
          if (!watch.fired()) throw;
        }
      }
      const mq_peers::verdict v = peers.peers();
      if (v.state == mq_peers::verdict::dead) {
        // Whatever the dead sent before it died is in the queue by now.
        if (std::optional<mq_message> m = take_now(buffer)) co_return m;
        if (peers.ended()) co_return std::nullopt;
        throw peer_died(v.pid, fmt::format("channel {}: {}{}", address, why_dead(v.pid, "sender", "sending"),
                                           v.pid != 0 ? " without closing the channel" : ""));
      }
    }
  }
};

/// A shared-memory or file ring under a message channel's sending end. The region is

constexpr long default_mq_messages = 10;
constexpr long default_mq_message_size = 8192;

mq_attributes queue_attributes(const channel_address& a) {
  mq_attributes attrs;
  attrs.max_messages = a.capacity ? static_cast<long>(*a.capacity) : default_mq_messages;
  attrs.message_size = a.message_size ? static_cast<long>(*a.message_size) : default_mq_message_size;
  return attrs;
}

struct mq_created {
  message_queue queue;
  mq_peers peers;
};

/// Creates the queue of `a` and its peer record, the record first: a sender that finds
/// the queue then finds its record too. The record names the receiver that created it,
/// so it is also what proves a queue left under the name to be a dead receiver's: the
/// record is taken over only from a dead creator (mq_peers::create), and only a queue
/// whose record was so taken over is removed and created anew. A queue with no record
/// was not made by a channel receiver and is left alone. Throws std::system_error(EEXIST)
/// naming the address for a live owner or a queue without a record, and what
/// message_queue::create throws.
mq_created create_queue(const channel_address& a) {
  struct stat st {};
  const bool had_record = ::stat(("/dev/shm" + mq_record_name(a.name)).c_str(), &st) == 0;
  mq_peers peers;
  try {
    peers = mq_peers::create(a.name, a.mode);
  } catch (const std::system_error& e) {
    if (e.code() != std::errc::file_exists) throw;
    throw std::system_error(e.code(), fmt::format("channel {}: another receiver owns the queue ({})", a.text,
                                                  std::string_view(e.what())));
  }
  for (int round = 0; round < 2; ++round) {
    try {
      message_queue q = message_queue::create(a.name, queue_attributes(a), mq_access::read_write, a.mode);
      peers.bind_queue(q.native_handle());
      return {std::move(q), std::move(peers)};
    } catch (const std::system_error& e) {
      if (e.code() != std::errc::file_exists) throw;
      if (!had_record) {
        throw std::system_error(
            e.code(), fmt::format("channel {}: the queue {} exists but no channel receiver owns it (it "
                                  "has no record {}): it was made otherwise, and is left alone; remove "
                                  "it (message_queue::unlink) if nothing uses it",
                                  a.text, a.name, mq_record_name(a.name)));
      }
      message_queue::unlink(a.name);  // the dead receiver's
    }
  }
  throw std::system_error(
      EEXIST, std::system_category(),
      fmt::format("channel {}: the queue keeps reappearing after its dead receiver's was removed", a.text));
}

using mq_send_port = message_send_port<mq_sending>;
using mq_receive_port = message_receive_port<mq_receiving>;

task<std::unique_ptr<receive_port>> open_mq_receiver(channel_address a) {
  mq_created c = create_queue(a);
  c.peers.attach(mq_peers::role::receiver);
  co_return std::make_unique<mq_receive_port>(
      a.text, mq_receiving{mq_end{std::move(c.queue), std::move(c.peers), a.text}});
}

task<std::unique_ptr<send_port>> open_mq_sender(channel_address a) {
  std::optional<message_queue> q;
  try {
    q.emplace(message_queue::open(a.name, mq_open_options{mq_access::write_only}));
  } catch (const std::system_error& e) {
    if (e.code() == std::errc::no_such_file_or_directory) no_channel(a, e);
    throw;
  }
  mq_peers peers = mq_peers::open(a.name, q->native_handle());
  peers.attach(mq_peers::role::sender);
  co_return std::make_unique<mq_send_port>(a.text,
                                           mq_sending{mq_end{std::move(*q), std::move(peers), a.text}});
}

/// A queue link: the queue is opened for both ends and its name removed at once; the
/// record stays unnamed too, shared by the ends, and the claims tell each end when the
/// other can no longer be taken.
class mq_link final : public link_ends {
 public:
  explicit mq_link(const channel_address& a) : address_(a.text) {
    mq_created c = create_queue(a);
    receive_queue_ = std::move(c.queue);
    send_queue_ = message_queue::open(a.name, mq_open_options{mq_access::write_only});
    receive_queue_.release_name();
    message_queue::unlink(a.name);
    c.peers.unlink();
    peers_ = std::move(c.peers);
    claims_ = link_claims::make(a);
  }
  std::unique_ptr<send_port> take_sender() override {
    auto port = std::make_unique<mq_send_port>(
        address_, mq_sending{mq_end{std::move(send_queue_),
                                    peers_.share(mq_peers::role::sender, std::move(claims_.receiver_watch)),
                                    address_}});
    claims_.sender_claim.reset();  // the record holds this process now
    return port;
  }
  std::unique_ptr<receive_port> take_receiver() override {
    auto port = std::make_unique<mq_receive_port>(
        address_, mq_receiving{mq_end{std::move(receive_queue_),
                                      peers_.share(mq_peers::role::receiver, std::move(claims_.sender_watch)),
                                      address_}});
    claims_.receiver_claim.reset();  // the record holds this process now
    return port;
  }

 private:
  std::string address_;
  message_queue send_queue_;
  message_queue receive_queue_;
  mq_peers peers_;  ///< each end records itself when it is taken
  link_claims claims_;
};

std::unique_ptr<link_ends> make_mq_link(const channel_address& a) { return std::make_unique<mq_link>(a); }

/// Queues a channel receiver made: each has its record in /dev/shm (names too long for a
/// record are hashed there, and are not listed). Read from the records, since /dev/mqueue
/// need not be mounted.
std::vector<std::string> list_mq() {
  std::vector<std::string> out;
  DIR* d = ::opendir("/dev/shm");
  if (d == nullptr) return out;
  constexpr std::string_view suffix = mq_record_suffix;
  while (const dirent* e = ::readdir(d)) {
    const std::string_view entry = e->d_name;
    if (!entry.ends_with(suffix)) continue;
    // Built by append: GCC 12 at -O3 warns (-Wrestrict, a false positive) on "/" + string.
    const std::string name = std::string("/").append(entry.substr(0, entry.size() - suffix.size()));
    if (mq_record_name(name) != std::string("/").append(entry)) continue;
    const mqd_t q = ::mq_open(name.c_str(), O_RDONLY | O_CLOEXEC);
    if (q == static_cast<mqd_t>(-1)) continue;
    ::mq_close(q);
    out.push_back("mq:" + name);
  }
  ::closedir(d);
  return out;
}

std::string inspect_mq(const channel_address& a) {
  const message_queue q = message_queue::open(a.name, mq_open_options{mq_access::read_only});
  struct mq_attr attr {};
  if (::mq_getattr(static_cast<mqd_t>(q.native_handle()), &attr) != 0)
    throw_errno(errno, fmt::format("channel {}: mq_getattr", a.text));
  struct stat st {};
  const bool recorded = ::stat(("/dev/shm" + mq_record_name(a.name)).c_str(), &st) == 0;
  return fmt::format("{}: message queue, {} of {} messages queued, messages up to {} bytes{}", a.text,
                     attr.mq_curmsgs, attr.mq_maxmsg, attr.mq_msgsize,
                     recorded ? "" : "; not a channel's (no record beside it)");
}

}  // namespace

extern const channel_scheme mq_scheme{
    .name = "mq",
    .example = "mq:/jobs",
    .about = "a POSIX message queue",
    .name_form = address_name::ipc_name,
    .options = address_option::capacity | address_option::message_size | address_option::mode,
    .option_notes = "capacity= is the queue's max_messages and message_size= its message size",
    .check = nullptr,
    .open_sender = open_mq_sender,
    .open_receiver = open_mq_receiver,
    .make_link = make_mq_link,
    .list = list_mq,
    .inspect = inspect_mq,
};

}  // namespace ipcoro::detail
