// SPDX-License-Identifier: MIT
// mq_channel: channels over POSIX message queues: the adapters, the mq: scheme and its links.
#include "ipcoro/channel.hpp"
#include "ipcoro/error.hpp"
#include "ipcoro/mqueue.hpp"
#include "ipcoro/transport.hpp"

#include "channel_wire.hpp"
#include "link_claims.hpp"
#include "message_port.hpp"
#include "mq_peers.hpp"
#include "proc_value.hpp"

#include <dirent.h>
#include <fcntl.h>
#include <fmt/core.h>
#include <mqueue.h>
#include <sys/stat.h>

#include <cerrno>
#include <ctime>
#include <optional>
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

bool try_send_end(int mqd, std::uint32_t fingerprint) noexcept {
  const message_head h{static_cast<std::uint32_t>(frame_kind::end), fingerprint};
  const timespec now{0, 0};  // an absolute time in the past: never block
  return ::mq_timedsend(static_cast<mqd_t>(mqd), reinterpret_cast<const char*>(&h), sizeof h, 0, &now) == 0;
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

/// The queue under a message channel's sending end, and its peer record. A wait for room
/// in a full queue is looked at every check interval (mq_watched_wait) and ends with
/// peer_died once every receiver recorded has died, or channel_closed once they have all
/// closed.
struct mq_sending : mq_end {
  task<void> send(std::span<const std::byte> m) { return send_checked(pooled_frame{}, m); }
  std::string size_advice(std::size_t wanted) const { return mq_size_advice(wanted); }
  /// Never waits: the end goes into the peer record, where receivers find it once they
  /// have emptied the queue, and the end marker, when it fits, wakes those waiting now.
  /// (A queue without a record, made outside channels, gets the marker only if it fits.)
  void close(std::uint32_t fingerprint) noexcept {
    if (!queue) return;
    peers.mark_end();
    try_send_end(queue.native_handle(), fingerprint);
    peers.close();
    queue.close();
  }
  void detach() noexcept {
    peers.close();
    queue.close();
  }
  /// The record keeps this process as a sender, so its exit reads as a death (peer_died).
  void abort() noexcept {
    peers.abort();
    queue.close();
  }

 private:
  task<void> send_checked(pooled_frame, std::span<const std::byte> m) {
    peers.ensure_attached();
    for (;;) {
      mq_send_operation op = queue.send(m);
      if (!peers) {
        co_await op;
        co_return;
      }
      {
        const mq_watched_wait watch(peers, op, mq_watched_wait::waits_for::room);
        try {
          co_await op;
          co_return;
        } catch (const operation_cancelled&) {
          if (!watch.fired()) throw;
        }
      }
      const mq_peers::verdict v = peers.peers();
      if (v.state == mq_peers::verdict::dead) {
        throw peer_died(
            v.pid, fmt::format("channel {}: {}, while this send waited for room in the full queue", address,
                               why_dead(v.pid, "receiver", "receiving")));
      }
      if (v.state == mq_peers::verdict::left) {
        throw channel_closed(fmt::format("channel {}: the receiver has closed the channel", address));
      }
    }
  }
};

/// The queue under a message channel's receiving end, and its peer record. A wait on an
/// empty queue is looked at every check interval: it ends the stream once a sender's
/// close is recorded, and throws peer_died once every sender recorded has died without
/// closing.
struct mq_receiving : mq_end {
  task<std::optional<mq_message>> receive(std::span<std::byte> buffer) {
    return receive_checked(pooled_frame{}, buffer);
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
  co_return std::make_unique<mq_receive_port>(a.text,
                                              mq_receiving{{std::move(c.queue), std::move(c.peers), a.text}});
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
  co_return std::make_unique<mq_send_port>(a.text, mq_sending{{std::move(*q), std::move(peers), a.text}});
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
        address_,
        mq_sending{std::move(send_queue_),
                   peers_.share(mq_peers::role::sender, std::move(claims_.receiver_watch)), address_});
    claims_.sender_claim.reset();  // the record holds this process now
    return port;
  }
  std::unique_ptr<receive_port> take_receiver() override {
    auto port = std::make_unique<mq_receive_port>(
        address_,
        mq_receiving{std::move(receive_queue_),
                     peers_.share(mq_peers::role::receiver, std::move(claims_.sender_watch)), address_});
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
