// SPDX-License-Identifier: MIT
// mq_peers: one end's view of a message-queue channel's peer record, so that a wait on a
// queue whose peers died or left can end (private to the library).
#pragma once

#include "ipcoro/detail/op_base.hpp"
#include "ipcoro/unique_fd.hpp"
#include "mq_peer_record.hpp"

#include <sys/types.h>

#include <memory>
#include <string>
#include <string_view>

namespace ipcoro {
class shm_segment;
}

namespace ipcoro::detail {

struct mq_ticker;

/// The name of the record beside queue `queue_name`: "/jobs" has "/jobs.ipcoro-mq" (in
/// /dev/shm); a name too long for the suffix keeps a prefix and adds a hash of the whole.
std::string mq_record_name(std::string_view queue_name);
/// What a record's name ends with.
inline constexpr std::string_view mq_record_suffix = ".ipcoro-mq";

/// A handle on a queue's peer record, recording at most one endpoint of this process.
/// Empty (false) when the queue has no record: then nothing is recorded or checked. Moving
/// moves the entry; destroying it leaves (as leave()). Use it from one thread.
class mq_peers {
 public:
  enum class role : unsigned char { sender, receiver };
  /// What the other side's entries say.
  struct verdict {
    enum { waiting, dead, left } state = waiting;  ///< left: every one attached has left cleanly
    pid_t pid = 0;                                 ///< with dead: one of the dead processes
  };

  mq_peers() noexcept;
  mq_peers(mq_peers&& other) noexcept;
  mq_peers& operator=(mq_peers&& other) noexcept;
  ~mq_peers();

  /// Creates the record for a queue that the caller is about to create exclusively under
  /// `queue_name`, replacing one whose creator has died. The record's name is removed
  /// with this handle (in the creating process) unless unlink() came first. Throws
  /// std::system_error: EEXIST when a live process holds a record of that name, and what
  /// shm_segment::create throws.
  [[nodiscard]] static mq_peers create(std::string_view queue_name, unsigned mode);
  /// The record of the queue open as `mqd`; empty when there is none, or it belongs to
  /// another queue of the same name (validated by the queue's inode).
  [[nodiscard]] static mq_peers open(std::string_view queue_name, int mqd) noexcept;
  /// Another handle on the same record that records this process as `r` (for the ends
  /// of a link, taken after fork). `peer_claim`: the read end of the pipe whose write
  /// ends are held by the processes that may still take the other end (see ring_claims in
  /// channel.cpp); once it hangs up with nobody recorded there, nobody ever will be, and
  /// peers() says dead (pid 0). Throws as attach() does.
  [[nodiscard]] mq_peers share(role r, unique_fd peer_claim = {}) const;

  /// Stores the identity of the queue (open as `mqd`) that this record belongs to.
  void bind_queue(int mqd) noexcept;
  /// Removes the record's name now (a link's record); those who have it open keep it.
  void unlink() noexcept;
  /// Records this process as `r`. Throws std::system_error(EUSERS) when the table is full.
  void attach(role r);
  /// In a forked child that inherited this handle, records the child (as the same role).
  void ensure_attached() {
    if (index_ >= 0 && attached_pid_ != current_pid()) attach(role_);
  }
  /// Removes this process's entry. Never throws; does nothing in a process that did not attach.
  void leave() noexcept;
  /// Leaves and lets go of the record (its name goes with the creator's last handle).
  void close() noexcept;
  /// Lets go of the record without removing the entry: the peers see this process as
  /// attached until it exits, then as dead (an aborted sender).
  void abort() noexcept;

  /// Marks the stream ended (a sender's close).
  void mark_end() noexcept;
  bool ended() const noexcept;
  /// The state of the other side: alive (or not yet attached), dead, or left.
  /// Dead with pid 0: nobody attached and nobody can any more (the link's claims are gone).
  verdict peers() const noexcept;
  /// How many receivers ever attached to the record (0 without a record).
  std::uint32_t receivers_seen() const noexcept {
    return record_ != nullptr ? record_->receivers_seen.load(std::memory_order_acquire) : 0;
  }

  explicit operator bool() const noexcept { return record_ != nullptr; }

 private:
  static pid_t current_pid();

  std::shared_ptr<shm_segment> segment_;
  mq_peer_record* record_ = nullptr;
  unique_fd peer_claim_;
  int index_ = -1;
  pid_t attached_pid_ = 0;
  role role_ = role::sender;
};

/// A wait on a queue (the operation `op`, about to be awaited) that the thread's liveness
/// ticker ends by cancelling it once the record says so: a wait for room once the
/// receivers are dead or gone, a wait for data once the end is recorded or the senders are
/// dead. Then `op` throws operation_cancelled and fired() is true: look at the record.
/// The ticker wakes every check interval (ring_options::liveness_check_interval) while some
/// wait of the thread is registered, so that a wait costs no timer of its own. Lives in
/// the waiting coroutine's frame, registered from construction to destruction.
class mq_watched_wait {
 public:
  enum class waits_for : unsigned char { room, data };
  /// Throws std::bad_alloc (starting the ticker) or std::logic_error (no io_context).
  mq_watched_wait(const mq_peers& peers, op_base& op, waits_for what);
  mq_watched_wait(const mq_watched_wait&) = delete;
  mq_watched_wait& operator=(const mq_watched_wait&) = delete;
  ~mq_watched_wait();
  bool fired() const noexcept { return fired_; }

 private:
  friend struct mq_ticker;
  bool due() const noexcept;
  void unlink(mq_ticker& t) noexcept;

  mq_watched_wait* prev_ = nullptr;
  mq_watched_wait* next_ = nullptr;
  const mq_peers& peers_;
  op_base& op_;
  waits_for what_;
  bool fired_ = false;
};

}  // namespace ipcoro::detail
