// SPDX-License-Identifier: MIT
// The peer record of a message-queue channel: naming, creating, opening, attaching and
// reading who is alive, with the process identities of region.hpp.
#include "mq_peers.hpp"

#include "ipcoro/detail/intrusive_queue.hpp"
#include "ipcoro/detail/region.hpp"
#include "ipcoro/error.hpp"
#include "ipcoro/hash.hpp"
#include "ipcoro/io_context.hpp"
#include "ipcoro/shm_ring.hpp"
#include "ipcoro/shm_segment.hpp"
#include "ipcoro/task.hpp"
#include "ipcoro/timer.hpp"
#include "loop.hpp"

#include "liveness.hpp"

#include <fmt/core.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <system_error>
#include <utility>

namespace ipcoro::detail {

namespace {

constexpr std::string_view record_suffix = mq_record_suffix;

region_layout record_layout() noexcept {
  return {mq_peer_type_tag, mq_peer_layout_version, sizeof(mq_peer_record)};
}

constexpr std::uint64_t entry_word(pid_t pid, std::uint64_t role) noexcept {
  return (static_cast<std::uint64_t>(static_cast<std::uint32_t>(pid)) << 8) | role;
}
constexpr pid_t entry_pid(std::uint64_t word) noexcept { return static_cast<pid_t>(word >> 8); }
constexpr std::uint64_t entry_role(std::uint64_t word) noexcept { return word & 0xff; }
std::uint64_t role_bits(mq_peers::role r) noexcept {
  return r == mq_peers::role::sender ? mq_peer_sender : mq_peer_receiver;
}

/// Whether the endpoint in `e`, whose word was read as `word`, certainly died; an entry
/// rewritten meanwhile counts as alive (it is looked at again at the next check).
bool entry_dead(const mq_peer_entry& e, std::uint64_t word) noexcept {
  const process_identity who{entry_pid(word), 0, e.start_time.load(std::memory_order_relaxed),
                             e.boot_id.load(std::memory_order_relaxed)};
  if (e.word.load(std::memory_order_acquire) != word) return false;
  return !process_alive(who);
}

}  // namespace

std::string mq_record_name(std::string_view queue_name) {
  const std::string_view rest = queue_name.substr(queue_name.starts_with('/') ? 1 : 0);
  if (rest.size() + record_suffix.size() <= NAME_MAX) return fmt::format("/{}{}", rest, record_suffix);
  // Keeps a readable prefix (so that names made per test or per user still group together).
  constexpr std::size_t hash_text = 17;  // '-' and 16 hex digits
  return fmt::format("/{}-{:016x}{}", rest.substr(0, NAME_MAX - record_suffix.size() - hash_text),
                     fnv1a(rest), record_suffix);
}

mq_peers::mq_peers() noexcept = default;

mq_peers::mq_peers(mq_peers&& other) noexcept
    : segment_(std::move(other.segment_)),
      record_(std::exchange(other.record_, nullptr)),
      peer_claim_(std::move(other.peer_claim_)),
      index_(std::exchange(other.index_, -1)),
      attached_pid_(std::exchange(other.attached_pid_, 0)),
      role_(other.role_) {}

mq_peers& mq_peers::operator=(mq_peers&& other) noexcept {
  if (this != &other) {
    leave();
    segment_ = std::move(other.segment_);
    record_ = std::exchange(other.record_, nullptr);
    peer_claim_ = std::move(other.peer_claim_);
    index_ = std::exchange(other.index_, -1);
    attached_pid_ = std::exchange(other.attached_pid_, 0);
    role_ = other.role_;
  }
  return *this;
}

mq_peers::~mq_peers() { leave(); }

mq_peers mq_peers::create(std::string_view queue_name, unsigned mode) {
  shm_segment::options opts;
  opts.mode = mode;
  mq_peers p;
  p.segment_ = std::make_shared<shm_segment>(
      shm_segment::create_or_reclaim(mq_record_name(queue_name), record_layout(), opts));
  p.record_ = &checked_object<mq_peer_record>(p.segment_->payload(), 0, "message queue peer record");
  return p;
}

mq_peers mq_peers::open(std::string_view queue_name, int mqd) noexcept {
  mq_peers p;
  struct stat st {};
  if (::fstat(mqd, &st) != 0) return p;
  try {
    auto segment =
        std::make_shared<shm_segment>(shm_segment::open(mq_record_name(queue_name), record_layout()));
    auto& record = checked_object<mq_peer_record>(segment->payload(), 0, "message queue peer record");
    // 0: its receiver is between creating the queue and recording it (or died there).
    const std::uint64_t ino = record.queue_ino.load(std::memory_order_acquire);
    if (ino != 0 && (ino != st.st_ino || record.queue_dev.load(std::memory_order_relaxed) != st.st_dev))
      return p;
    p.segment_ = std::move(segment);
    p.record_ = &record;
  } catch (...) {
    // No record, one left by another queue of this name, or one this user cannot open:
    // the queue works as before, without liveness.
  }
  return p;
}

mq_peers mq_peers::share(role r, unique_fd peer_claim) const {
  mq_peers p;
  p.segment_ = segment_;
  p.record_ = record_;
  p.peer_claim_ = std::move(peer_claim);
  p.attach(r);
  return p;
}

void mq_peers::bind_queue(int mqd) noexcept {
  struct stat st {};
  if (record_ == nullptr || ::fstat(mqd, &st) != 0) return;
  record_->queue_dev.store(st.st_dev, std::memory_order_relaxed);
  record_->queue_ino.store(st.st_ino, std::memory_order_release);
}

void mq_peers::unlink() noexcept {
  if (!segment_) return;
  try {
    segment_->unlink();
  } catch (...) {
    // Removed by someone else already: nothing to do.
  }
}

pid_t mq_peers::current_pid() { return this_process().pid; }

void mq_peers::attach(role r) {
  if (record_ == nullptr) return;
  const process_identity& me = this_process();
  const std::uint64_t mine = role_bits(r);
  const std::uint64_t claiming = entry_word(me.pid, mq_peer_claiming);
  // A free entry first; then one of this side whose process died (a restarted or
  // replaced endpoint), or one whose writer died half way. The other side's dead entries
  // stay: they are how the other side's peers learn of the death.
  for (int pass = 0; pass < 2; ++pass) {
    for (std::size_t i = 0; i < mq_peer_entries; ++i) {
      mq_peer_entry& e = record_->entries[i];
      std::uint64_t v = e.word.load(std::memory_order_acquire);
      if (pass == 0 ? v != 0 : v == 0) continue;
      if (pass == 1) {
        const bool stale_claim = entry_role(v) == mq_peer_claiming && !pid_running(entry_pid(v));
        if (!stale_claim && !(entry_role(v) == mine && entry_dead(e, v))) continue;
      }
      if (!e.word.compare_exchange_strong(v, claiming, std::memory_order_acq_rel)) continue;
      e.start_time.store(me.start_time, std::memory_order_relaxed);
      e.boot_id.store(me.boot_id, std::memory_order_relaxed);
      e.word.store(entry_word(me.pid, mine), std::memory_order_release);
      (r == role::sender ? record_->senders_seen : record_->receivers_seen)
          .fetch_add(1, std::memory_order_release);
      leave();  // a forked child's inherited entry is its parent's: leave() keeps it
      index_ = static_cast<int>(i);
      attached_pid_ = me.pid;
      role_ = r;
      return;
    }
  }
  throw std::system_error(
      EUSERS, std::system_category(),
      fmt::format("message queue peer record {}: all {} entries hold live endpoints; at most "
                  "{} processes can hold the ends of one queue channel",
                  segment_->name(), mq_peer_entries, mq_peer_entries));
}

void mq_peers::leave() noexcept {
  if (index_ < 0 || record_ == nullptr) return;
  if (attached_pid_ == ::getpid()) {
    mq_peer_entry& e = record_->entries[index_];
    std::uint64_t expected = entry_word(attached_pid_, role_bits(role_));
    e.word.compare_exchange_strong(expected, 0, std::memory_order_acq_rel);
  }
  index_ = -1;
}

void mq_peers::close() noexcept {
  leave();
  record_ = nullptr;
  segment_.reset();
  peer_claim_.reset();
}

void mq_peers::abort() noexcept {
  index_ = -1;
  record_ = nullptr;
  segment_.reset();
  peer_claim_.reset();
}

void mq_peers::mark_end() noexcept {
  if (record_ != nullptr) record_->ended.store(1, std::memory_order_release);
}

bool mq_peers::ended() const noexcept {
  return record_ != nullptr && record_->ended.load(std::memory_order_acquire) != 0;
}

mq_peers::verdict mq_peers::peers() const noexcept {
  verdict v;
  if (record_ == nullptr) return v;
  // Looked at before the entries: a taker records itself before it lets its claim go, so
  // once the claims are gone, the scan below sees whoever took the end.
  const bool claims_gone = peer_claim_ && write_ends_closed(peer_claim_.get());
  const std::uint64_t other = role_ == role::sender ? mq_peer_receiver : mq_peer_sender;
  for (const mq_peer_entry& e : record_->entries) {
    const std::uint64_t word = e.word.load(std::memory_order_acquire);
    if (word == 0 || entry_role(word) != other) continue;
    if (!entry_dead(e, word)) return verdict{};
    v.state = verdict::dead;
    v.pid = entry_pid(word);
  }
  if (v.state == verdict::dead) return v;
  const auto& seen = other == mq_peer_receiver ? record_->receivers_seen : record_->senders_seen;
  if (seen.load(std::memory_order_acquire) != 0) {
    v.state = verdict::left;
  } else if (claims_gone) {
    v.state = verdict::dead;  // pid 0: nobody came, and nobody can any more
  }
  return v;
}

// ---- the liveness ticker ----

/// The waits of this thread to look at, and whether a ticker runs for them.
struct mq_ticker {
  intrusive_queue<mq_watched_wait, &mq_watched_wait::next_, &mq_watched_wait::prev_> waits;
  bool running = false;

  static mq_ticker& of_thread() noexcept {
    thread_local mq_ticker t;
    return t;
  }

  /// Wakes every check interval while waits are registered, and cancels those that are due.
  static task<void> run(pooled_frame, mq_ticker& t) {
    const std::stop_token stop = co_await get_stop_token();
    while (!t.waits.empty() && !stop.stop_requested()) {
      try {
        co_await sleep_for(ring_options{}.liveness_check_interval);
      } catch (const operation_cancelled&) {
        break;  // the io_context shuts down
      }
      io_context& ctx = io_context::current();
      if (ctx.stopping()) break;
      // cancel_op never resumes a waiter from here: the list stays as it is meanwhile.
      for (mq_watched_wait* w = t.waits.front(); w != nullptr; w = w->next_) {
        if (!w->fired_ && w->due()) {
          w->fired_ = true;
          loop::cancel_op(ctx, w->op_);
        }
      }
    }
    t.running = false;
  }
};

mq_watched_wait::mq_watched_wait(const mq_peers& peers, op_base& op, waits_for what)
    : peers_(peers), op_(op), what_(what) {
  mq_ticker& t = mq_ticker::of_thread();
  t.waits.push_back(*this);
  if (!t.running) {
    t.running = true;  // first: the ticker may run up to its first sleep inside spawn()
    try {
      io_context::current().spawn(mq_ticker::run(pooled_frame{}, t));
    } catch (...) {
      t.running = false;
      unlink(t);
      throw;
    }
  }
}

mq_watched_wait::~mq_watched_wait() { unlink(mq_ticker::of_thread()); }

void mq_watched_wait::unlink(mq_ticker& t) noexcept { t.waits.remove(*this); }

bool mq_watched_wait::due() const noexcept {
  if (what_ == waits_for::data && peers_.ended()) return true;
  const mq_peers::verdict v = peers_.peers();
  return v.state == mq_peers::verdict::dead ||
         (what_ == waits_for::room && v.state == mq_peers::verdict::left);
}

}  // namespace ipcoro::detail
