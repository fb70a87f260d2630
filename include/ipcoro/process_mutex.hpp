// SPDX-License-Identifier: MIT
// An async mutex shared between processes that survives a holder's death, and a typed
// object in a shm segment guarded by one.
//
// The rules, in one place:
//  - The lock lives in shared memory (process_mutex_state, 64 bytes; all zero is a free,
//    consistent lock, so fresh segments and files need no initialisation). A process_mutex
//    is a cheap handle onto it.
//  - Locking: `auto guard = co_await m.lock();`. Uncontended, that is one compare-and-swap
//    and no suspension. Contended, the waiter spins briefly, then parks with a futex wait
//    whose timeout (options::liveness_check_interval) makes it look at the holder now and then.
//    `lock().with_timeout(d)` throws timed_out after `d`; a stop request throws
//    operation_cancelled.
//  - The holder's pid is the lock word itself, and its start time and boot are recorded
//    next to it, so a waiter can tell that the holder died (even if its pid was reused)
//    and take the lock over: `guard.took_over()` is then true, and `guard.inconsistent()`
//    stays true for every later holder until one repairs the data and calls
//    `guard.mark_consistent()`. The death is noticed within one liveness_check_interval.
//  - The lock belongs to a process, not to a coroutine: coroutines of one process take
//    turns like coroutines of different processes, and any of them may unlock a guard.
//    All processes must share one pid namespace.
//  - Not recursive: a coroutine locking a mutex its own process holds waits for it.
#pragma once

#include "ipcoro/codec.hpp"
#include "ipcoro/detail/region.hpp"
#include "ipcoro/export.hpp"
#include "ipcoro/futex.hpp"
#include "ipcoro/shm_segment.hpp"
#include "ipcoro/task.hpp"

#include <sys/types.h>

#include <atomic>
#include <chrono>
#include <coroutine>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <limits>
#include <new>
#include <optional>
#include <span>
#include <string>
#include <type_traits>
#include <utility>

namespace ipcoro {

/// The shared part of a process_mutex: plain data in shared memory. All zero is a free,
/// consistent lock.
struct alignas(64) process_mutex_state {
  std::atomic<std::uint32_t> word;  ///< 0: free; else the holder's pid, | 1 << 31 when someone may wait
  std::atomic<std::uint32_t> inconsistent;  ///< 1 from a takeover until mark_consistent()
  std::atomic<std::uint64_t> holder;        ///< the holder's start time << 22 | its pid
  std::atomic<std::uint64_t> holder_boot;   ///< the holder's boot (see detail::process_identity)
  std::atomic<std::uint64_t> takeovers;     ///< locks taken over from dead holders, ever
  std::byte reserved[32];
};
static_assert(sizeof(process_mutex_state) == 64);

struct process_mutex_options {
  /// How long a waiter sleeps before it checks that the holder still runs: the longest a
  /// dead holder keeps the lock.
  std::chrono::milliseconds liveness_check_interval{50};
  /// Times a contended lock re-reads the word before parking (a holder is often about to
  /// release it, and parking costs a sleep and a wake of tens of microseconds).
  unsigned spin = 100;
};

/// Holds a process_mutex until destroyed or unlock()ed. Move-only.
class [[nodiscard]] IPCORO_API process_mutex_guard {
 public:
  process_mutex_guard() noexcept = default;
  process_mutex_guard(process_mutex_guard&& other) noexcept
      : state_(std::exchange(other.state_, nullptr)),
        inconsistent_(other.inconsistent_),
        took_over_(other.took_over_) {}
  process_mutex_guard& operator=(process_mutex_guard&& other) noexcept {
    if (this != &other) {
      release_quietly();
      state_ = std::exchange(other.state_, nullptr);
      inconsistent_ = other.inconsistent_;
      took_over_ = other.took_over_;
    }
    return *this;
  }
  process_mutex_guard(const process_mutex_guard&) = delete;
  process_mutex_guard& operator=(const process_mutex_guard&) = delete;
  ~process_mutex_guard() { release_quietly(); }

  /// True when a holder died while holding the lock and nobody has marked the data
  /// consistent since: what the mutex protects may be half-updated. Repair it, then call
  /// mark_consistent().
  bool inconsistent() const noexcept { return inconsistent_; }
  /// True when this acquisition took the lock over from a dead holder.
  bool took_over() const noexcept { return took_over_; }
  /// Declares the protected data repaired: later holders see inconsistent() == false.
  void mark_consistent() noexcept;
  /// Releases the lock and wakes one waiter. Throws std::system_error(EPERM) when this
  /// process no longer holds it (another process took it over, believing this one dead).
  void unlock();
  bool owns_lock() const noexcept { return state_ != nullptr; }

 private:
  friend class process_mutex;
  friend class process_mutex_lock_operation;
  process_mutex_guard(process_mutex_state* state, bool inconsistent, bool took_over) noexcept
      : state_(state), inconsistent_(inconsistent), took_over_(took_over) {}
  /// Just acquired `state`: records this process as the holder and returns the guard.
  static process_mutex_guard record_holder(process_mutex_state& state, bool took_over);
  void release_quietly() noexcept;

  process_mutex_state* state_ = nullptr;
  bool inconsistent_ = false;
  bool took_over_ = false;
};

/// Acquires a process_mutex: `co_await m.lock()` gives a process_mutex_guard. The
/// uncontended path neither suspends, nor allocates, nor reads the clock; a contended lock
/// runs on a pooled frame and parks with futex waits. `.with_timeout(d)` /
/// `.with_deadline(t)` bound the wait (timed_out, without the lock); a stop request of the
/// awaiting task gives operation_cancelled.
class [[nodiscard]] IPCORO_API process_mutex_lock_operation
    : public detail::deadline_methods<process_mutex_lock_operation> {
 public:
  process_mutex_lock_operation(process_mutex_state& state, const process_mutex_options& opts) noexcept
      : state_(&state), options_(opts) {}

  bool await_ready();
  template <class P>
  bool await_suspend(std::coroutine_handle<P> h) {
    const std::int64_t deadline_ns =
        limit_.bounded() ? limit_.resolve_ns() : std::numeric_limits<std::int64_t>::max();
    contended_.emplace(lock_contended(detail::pooled_frame{}, *state_, options_, deadline_ns));
    inner_.emplace(std::move(*contended_).operator co_await());
    return inner_->await_suspend(h);
  }
  process_mutex_guard await_resume();

 private:
  static task<process_mutex_guard> lock_contended(detail::pooled_frame, process_mutex_state& state,
                                                  process_mutex_options opts, std::int64_t deadline_ns);

  process_mutex_state* state_;
  process_mutex_options options_;
  process_mutex_guard fast_;
  std::optional<task<process_mutex_guard>> contended_;
  std::optional<task<process_mutex_guard>::awaiter> inner_;
};

/// A handle onto a process_mutex_state in shared memory. Cheap to copy; the memory must
/// stay mapped while the handle, its guards and its lock operations are in use.
class IPCORO_API process_mutex {
 public:
  using options = process_mutex_options;

  explicit process_mutex(process_mutex_state& state, const options& opts = {}) noexcept
      : state_(&state), options_(opts) {}
  /// The state at `offset` in `region` (e.g. a segment's payload); throws
  /// std::system_error(EBADMSG) when it does not fit there or is not 64-byte aligned.
  process_mutex(std::span<std::byte> region, std::uint64_t offset, const options& opts = {})
      : state_(&detail::checked_object<process_mutex_state>(region, offset, "process_mutex state")),
        options_(opts) {}

  /// Waits for the lock as long as it takes (a dead holder's lock is taken over);
  /// `co_await m.lock().with_timeout(50ms)` gives up with timed_out.
  process_mutex_lock_operation lock() const noexcept { return {*state_, options_}; }
  /// Takes the lock if it is free now (never takes it over from a dead holder).
  std::optional<process_mutex_guard> try_lock() const;

  /// The pid in the lock word: the holder, 0 when free.
  pid_t holder_pid() const noexcept;
  /// Whether the lock is held by a process that still runs.
  bool holder_alive() const noexcept;
  std::uint64_t takeovers() const noexcept { return state_->takeovers.load(std::memory_order_relaxed); }
  process_mutex_state& state() const noexcept { return *state_; }

 private:
  process_mutex_state* state_;
  options options_;
};

/// How a shared_object names its type in the segment header.
struct shared_object_options {
  /// Names the type in the segment header. 0 (the default) derives it from T's spelled
  /// name and size, so that a process built with another T of the same size is refused.
  std::uint32_t type_tag = 0;
  std::uint32_t version = 1;  ///< bump when T's layout changes
  unsigned mode = 0600;
  process_mutex_options mutex{};
};

/// A locked shared_object: the guard and access to the value. Move-only.
template <class T>
class [[nodiscard]] locked_object {
 public:
  locked_object(process_mutex_guard guard, T* value) noexcept : guard_(std::move(guard)), value_(value) {}
  T& operator*() const noexcept { return *value_; }
  T* operator->() const noexcept { return value_; }
  /// See process_mutex_guard.
  bool inconsistent() const noexcept { return guard_.inconsistent(); }
  bool took_over() const noexcept { return guard_.took_over(); }
  void mark_consistent() noexcept { guard_.mark_consistent(); }
  void unlock() { guard_.unlock(); }
  process_mutex_guard& guard() noexcept { return guard_; }

 private:
  process_mutex_guard guard_;
  T* value_;
};

template <class T>
class [[nodiscard]] shared_object_lock_operation
    : public detail::deadline_methods<shared_object_lock_operation<T>> {
 public:
  shared_object_lock_operation(process_mutex_lock_operation op, T* value) noexcept
      : op_(std::move(op)), value_(value) {}
  bool await_ready() { return op_.await_ready(); }
  template <class P>
  bool await_suspend(std::coroutine_handle<P> h) {
    if (this->limit_.bounded()) (void)op_.with_deadline(this->limit_.resolve());  // now is the start
    return op_.await_suspend(h);
  }
  locked_object<T> await_resume() { return {op_.await_resume(), value_}; }

 private:
  process_mutex_lock_operation op_;
  T* value_;
};

/// A T in a shm segment, behind a process_mutex: `auto v = co_await obj.lock(); ++v->count;`.
/// T must be plain data meant for shared memory (standard layout, trivially destructible,
/// no pointers: other processes map it elsewhere; atomics are fine), aligned to at most 64.
/// The segment holds the mutex state, then T; its header records the type tag (by default
/// derived from T's name and size), version and size, so a process built with another T,
/// even one of the same size, is refused on open (EPROTO). Move-only.
template <class T>
class shared_object {
  static_assert(std::is_standard_layout_v<T> && std::is_trivially_destructible_v<T>,
                "shared_object<T>: T must be plain data (standard layout, trivially destructible)");
  static_assert(alignof(T) <= 64, "shared_object<T>: T may be aligned to at most 64 bytes");

 public:
  static constexpr std::uint64_t value_offset = sizeof(process_mutex_state);

  /// Creates the segment `name` with a value-initialised T, then runs `init` on it, both
  /// before any other process can open it. Throws what shm_segment::create throws.
  [[nodiscard]] static shared_object create(const std::string& name, const shared_object_options& opts = {},
                                            const std::function<void(T&)>& init = {}) {
    return shared_object(shm_segment::create(name, layout(opts), segment_options(opts, init)), opts);
  }
  /// create(), or replace the segment of a dead creator (see shm_segment::create_or_reclaim).
  [[nodiscard]] static shared_object create_or_reclaim(const std::string& name,
                                                       const shared_object_options& opts = {},
                                                       const std::function<void(T&)>& init = {}) {
    return shared_object(shm_segment::create_or_reclaim(name, layout(opts), segment_options(opts, init)),
                         opts);
  }
  /// Opens an existing one; throws what shm_segment::open throws (EPROTO for another T).
  [[nodiscard]] static shared_object open(const std::string& name, const shared_object_options& opts = {}) {
    return shared_object(shm_segment::open(name, layout(opts)), opts);
  }

  /// `co_await obj.lock()`, or `obj.lock().with_timeout(d)` to give up with timed_out.
  [[nodiscard]] shared_object_lock_operation<T> lock() const noexcept { return {mutex_.lock(), value_}; }
  /// The value without the lock: for atomics, or for reading after every writer is done.
  T& unsafe_value() const noexcept { return *value_; }
  const process_mutex& mutex() const noexcept { return mutex_; }
  shm_segment& segment() noexcept { return segment_; }

 private:
  shared_object(shm_segment segment, const shared_object_options& opts)
      : segment_(std::move(segment)),
        mutex_(segment_.payload(), 0, opts.mutex),
        value_(&detail::checked_object<T>(segment_.payload(), value_offset, "shared_object value")) {}

  static region_layout layout(const shared_object_options& opts) noexcept {
    return {opts.type_tag != 0 ? opts.type_tag : type_tag_of(), opts.version, value_offset + sizeof(T)};
  }
  /// T's identity folded to 32 bits: its name as the compiler spells it, and its size.
  static constexpr std::uint32_t type_tag_of() noexcept {
    const std::uint64_t h = fnv1a(detail::spelled_type_name<T>(), fnv1a("shared_object")) ^
                            (std::uint64_t{sizeof(T)} * 0x9e3779b97f4a7c15ull);
    return static_cast<std::uint32_t>(h ^ (h >> 32));
  }
  static shm_segment::options segment_options(const shared_object_options& opts,
                                              const std::function<void(T&)>& init) {
    shm_segment::options o;
    o.mode = opts.mode;
    o.initialize = [init](std::span<std::byte> payload) {
      T* value = ::new (payload.data() + value_offset) T{};
      if (init) init(*value);
    };
    return o;
  }

  shm_segment segment_;
  process_mutex mutex_;
  T* value_;
};

}  // namespace ipcoro
