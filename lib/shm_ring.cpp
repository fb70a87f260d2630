// SPDX-License-Identifier: MIT
// The rings: in-region layout, fast paths, futex sleeps, peer liveness, endpoints.
#include "ipcoro/shm_ring.hpp"

#include "ipcoro/error.hpp"
#include "ipcoro/futex.hpp"
#include "ipcoro/hash.hpp"

#include <fcntl.h>
#include <fmt/core.h>
#include <linux/membarrier.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <bit>
#include <cerrno>
#include <climits>
#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <new>
#include <stdexcept>
#include <utility>

namespace ipcoro {

peer_died::peer_died(pid_t pid, const std::string& what)
    : std::system_error(ECONNRESET, std::system_category(), what), pid_(pid) {}

namespace {

using clock = std::chrono::steady_clock;

constexpr std::uint64_t ring_magic = 0x31474e4952435049ull;  // "IPCRING1" in memory order
// 2: the futex word carries the "a sleeper waits on this value" bit (was: a waiter count).
constexpr std::uint32_t ring_version = 2;
constexpr std::uint32_t kind_spsc = 1;
constexpr std::uint32_t kind_mpmc = 2;
constexpr std::size_t participant_count = 64;
constexpr std::size_t min_spsc_capacity = 4096;
constexpr std::size_t max_spsc_capacity = spsc_ring_max_capacity;
constexpr std::size_t max_mpmc_slots = mpmc_ring_max_slots;
constexpr std::size_t max_mpmc_message = mpmc_ring_max_message;
constexpr std::size_t slot_header_size = 16;
// How far ahead of its position each SPSC side prefetches, in bytes (four cache lines).
constexpr std::uint64_t prefetch_distance = 256;
// The room a spinning SPSC sender waits for once the ring was full (at most a quarter of it).
constexpr std::uint64_t spin_batch_bytes = 32 * 1024;

// ---- the layout in the region ----

// The immutable description of a ring, written by format_*() and copied out on attach.
struct ring_config {
  std::uint64_t magic;
  std::uint32_t version;
  std::uint32_t kind;
  std::uint64_t region_size;
  std::uint64_t capacity;  // SPSC: data bytes; MPMC: slots
  std::uint32_t slot_stride;
  std::uint32_t max_message;
  std::uint32_t header_size;
  std::uint32_t participants;
  std::uint64_t check;  // FNV-1a of the fields above
};

// The futex word of one direction. Bit 0 set: a sleeper announced that it waits on this
// value. A waker that finds the bit clears it by adding 1 (which also changes the value)
// and issues one futex_wake: one syscall per sleep, not per message.
struct event_count {
  std::atomic<std::uint32_t> seq;
  std::uint32_t reserved;
};
constexpr std::uint32_t sleeper_bit = 1;

// ring_header::fence_required. Off: publishers issue no fence; each sleeper orders their
// publications with membarrier(). Requested: every publisher fences its publication from
// now on (set by a process that cannot issue membarrier, or by a side that sleeps so often
// that a syscall per sleep costs more than a fence per message); a publication already
// under way may still be unfenced. In force: requested, and a membarrier() has run since,
// so no unfenced publication is left and sleepers need no barrier of their own. Only ever
// moves up: a ring that once slept often stays in fence mode.
enum fence_mode : std::uint32_t { fence_off = 0, fence_requested = 1, fence_in_force = 2 };

// An attached process, packed into one word so that it is claimed, read and released
// atomically: pid (24 bits; pid_max is at most 2^22), role (2 bits), start time (38 bits of
// clock ticks since boot, 87 years at 100 Hz). 0: free.
using participant_word = std::atomic<std::uint64_t>;
constexpr std::uint32_t role_sender = 1;
constexpr std::uint32_t role_receiver = 2;

struct ring_header {
  ring_config config;
  alignas(64) std::atomic<std::uint32_t> sender_closed;  // SPSC: end of stream; MPMC: ring closed
  std::atomic<std::uint32_t> receiver_closed;            // sends fail with EPIPE (MPMC: no receiver is left)
  std::atomic<std::uint32_t> fence_required;             // sticky fence_mode: publishers fence per message
  alignas(64) std::atomic<std::int32_t> cpu[2];          // CPU a sender [0] / receiver [1] last ran on, + 1
  alignas(64) std::atomic<std::uint64_t> tail;           // SPSC: bytes written; MPMC: next send position
  alignas(64)
      std::atomic<std::uint64_t> head;  // SPSC: bytes released (acknowledged); MPMC: next receive position
  alignas(64) event_count data;         // receivers sleep here
  alignas(64) event_count space;        // senders sleep here
  alignas(64) participant_word participants[participant_count];  // SPSC: [0] sender, [1] receiver
};
static_assert(sizeof(ring_header) <= ring_header_size);
static_assert(offsetof(ring_header, fence_required) == 72,
              "tests/shm_ring_test.cpp reads the fence mode here");
static_assert(std::atomic<std::uint64_t>::is_always_lock_free &&
                  std::atomic<std::uint32_t>::is_always_lock_free,
              "the ring's words must be address-free lock-free atomics to live in shared memory");

// SPSC: every record starts 8-aligned with this header.
struct record_header {
  std::uint32_t length;
  std::uint32_t type;
};
constexpr std::uint32_t record_data = 0x44;
constexpr std::uint32_t record_padding = 0x50;

// MPMC: a slot is this header followed by the payload. The word holds the slot's sequence
// (low 32 bits), the pid of a process that has claimed it (bits 32-62), and a flag marking a
// message abandoned by a sender that died while writing it (bit 63).
struct slot_header {
  std::atomic<std::uint64_t> word;
  std::atomic<std::uint32_t> size;
  std::uint32_t reserved;
};
static_assert(sizeof(slot_header) == slot_header_size);
constexpr std::uint64_t abandoned_bit = std::uint64_t{1} << 63;

constexpr std::uint64_t make_slot_word(std::uint32_t seq, std::uint32_t owner,
                                       bool abandoned = false) noexcept {
  return std::uint64_t{seq} | (std::uint64_t{owner & 0x7fffffffu} << 32) | (abandoned ? abandoned_bit : 0);
}
constexpr std::uint32_t slot_seq(std::uint64_t w) noexcept { return static_cast<std::uint32_t>(w); }
constexpr std::uint32_t slot_owner(std::uint64_t w) noexcept {
  return static_cast<std::uint32_t>(w >> 32) & 0x7fffffffu;
}
constexpr bool slot_abandoned(std::uint64_t w) noexcept { return (w & abandoned_bit) != 0; }

constexpr std::uint64_t align8(std::uint64_t n) noexcept { return (n + 7) & ~std::uint64_t{7}; }
constexpr std::size_t mpmc_stride(std::size_t max_message) noexcept {
  return (slot_header_size + align8(max_message) + 63) & ~std::size_t{63};
}

std::uint64_t config_check(const ring_config& c) noexcept {
  return fnv1a(std::as_bytes(std::span{&c, 1}).first(offsetof(ring_config, check)));
}

[[noreturn]] void throw_corrupt(const std::string& what) {
  throw std::system_error(EBADMSG, std::system_category(), "shm ring is corrupt: " + what);
}

[[noreturn]] void throw_invalid(const std::string& what) {
  throw std::system_error(EINVAL, std::system_category(), what);
}

void check_region(std::span<std::byte> region, std::size_t minimum, const char* what) {
  if (reinterpret_cast<std::uintptr_t>(region.data()) % 64 != 0) {
    throw_invalid(
        fmt::format("{}: the region must be 64-byte aligned (a segment's or mapping's payload is)", what));
  }
  if (region.size() < minimum) {
    throw_invalid(fmt::format("{}: the region has {} bytes; this ring needs at least {}", what, region.size(),
                              minimum));
  }
}

// ---- process identity ----

bool proc_available() noexcept {
  static const bool available = ::access("/proc/self/stat", R_OK) == 0;
  return available;
}

constexpr std::uint64_t start_mask = (std::uint64_t{1} << 38) - 1;

std::uint64_t self_start_time() noexcept {
  static std::atomic<pid_t> cached_pid{0};
  static std::atomic<std::uint64_t> cached_start{0};
  const pid_t me = ::getpid();
  if (cached_pid.load(std::memory_order_acquire) != me) {
    detail::proc_stat_fields st;
    cached_start.store(detail::read_proc_stat(me, st) == 0 ? st.start_time & start_mask : 0,
                       std::memory_order_relaxed);
    cached_pid.store(me, std::memory_order_release);
  }
  return cached_start.load(std::memory_order_relaxed);
}

/// Alive, not a zombie, and (when known) started at `start`: a reused pid is not the same process.
bool pid_alive(pid_t pid, std::uint64_t start) noexcept {
  if (pid <= 0) return false;  // never kill(0) or kill(-1): those are process groups
  if (::kill(pid, 0) != 0 && errno == ESRCH) return false;
  if (!proc_available()) return true;
  detail::proc_stat_fields st;
  if (detail::read_proc_stat(pid, st) != 0) return false;  // it went away between the two looks
  if (st.state == 'Z' || st.state == 'X' || st.state == 'x') return false;
  return start == 0 || (st.start_time & start_mask) == start;
}

constexpr std::uint64_t pack_participant(pid_t pid, std::uint32_t role, std::uint64_t start) noexcept {
  return (static_cast<std::uint64_t>(pid) & 0xffffffu) | (std::uint64_t{role & 3u} << 24) |
         ((start & start_mask) << 26);
}
constexpr pid_t participant_pid(std::uint64_t v) noexcept { return static_cast<pid_t>(v & 0xffffffu); }
constexpr std::uint32_t participant_role(std::uint64_t v) noexcept {
  return static_cast<std::uint32_t>(v >> 24) & 3u;
}
constexpr std::uint64_t participant_start(std::uint64_t v) noexcept { return v >> 26; }

bool participant_alive(std::uint64_t v) noexcept {
  return v != 0 && pid_alive(participant_pid(v), participant_start(v));
}

// ---- sleeping and waking ----

/// A seq_cst fence. On x86-64 a locked no-op RMW on the stack orders exactly like mfence
/// for ordinary memory and costs less (it is Linux's smp_mb() there); it runs once per
/// message on each side.
inline void full_fence() noexcept {
#if defined(__x86_64__) && !defined(__SANITIZE_THREAD__)
  asm volatile("lock orq $0, (%%rsp)" ::: "memory", "cc");
#else
  std::atomic_thread_fence(std::memory_order_seq_cst);
#endif
}

/// The waker's half, after it published its position (and ordered that before this):
/// wakes the sleepers on `ev` if one announced itself since the last wake.
void wake_announced(event_count& ev) noexcept {
  std::uint32_t v = ev.seq.load(std::memory_order_relaxed);
  while ((v & sleeper_bit) != 0) {
    if (ev.seq.compare_exchange_weak(v, v + 1, std::memory_order_release, std::memory_order_relaxed)) {
      futex_wake(ev.seq, INT_MAX);
      return;
    }
  }
}

/// The sleeper's half: sets the bit (unless set) and returns the value to wait on. Must be
/// followed by a full fence (and, for fenceless wakers, the asymmetric barrier) before the
/// sleeper looks at the ring again.
std::uint32_t announce_sleeper(event_count& ev) noexcept {
  std::uint32_t v = ev.seq.load(std::memory_order_relaxed);
  while ((v & sleeper_bit) == 0) {
    if (ev.seq.compare_exchange_weak(v, v | sleeper_bit, std::memory_order_seq_cst,
                                     std::memory_order_relaxed)) {
      return v | sleeper_bit;
    }
  }
  return v;
}

/// Whether this process takes part in the asymmetric barrier: registered for
/// MEMBARRIER_CMD_GLOBAL_EXPEDITED (Linux 4.16), so that a sleeper's membarrier() executes a
/// full fence on this process's threads wherever they run. Asked once per process; the
/// environment variable IPCORO_RING_NO_MEMBARRIER (anything but "" or "0") makes the process
/// behave as if membarrier were missing (its rings then fence on every message).
bool asymmetric_barrier_registered() noexcept {
  static std::atomic<pid_t> cached_pid{0};
  static std::atomic<bool> cached{false};
  const pid_t me = ::getpid();
  if (cached_pid.load(std::memory_order_acquire) != me) {
    const char* off = std::getenv("IPCORO_RING_NO_MEMBARRIER");
    const long supported = off != nullptr && *off != '\0' && std::strcmp(off, "0") != 0
                               ? 0
                               : ::syscall(SYS_membarrier, MEMBARRIER_CMD_QUERY, 0, 0);
    const bool ok = supported > 0 && (supported & MEMBARRIER_CMD_GLOBAL_EXPEDITED) != 0 &&
                    (supported & MEMBARRIER_CMD_REGISTER_GLOBAL_EXPEDITED) != 0 &&
                    ::syscall(SYS_membarrier, MEMBARRIER_CMD_REGISTER_GLOBAL_EXPEDITED, 0, 0) == 0;
    cached.store(ok, std::memory_order_relaxed);
    cached_pid.store(me, std::memory_order_release);
  }
  return cached.load(std::memory_order_relaxed);
}

/// A full fence on every running thread of every registered process (and this one).
bool asymmetric_barrier() noexcept {
  return ::syscall(SYS_membarrier, MEMBARRIER_CMD_GLOBAL_EXPEDITED, 0, 0) == 0;
}

/// The CPU this thread runs on (+1, so that 0 means unknown); through rseq, cheap.
std::int32_t current_cpu_tag() noexcept {
  const int cpu = ::sched_getcpu();
  return cpu < 0 ? 0 : cpu + 1;
}

inline void cpu_relax() noexcept {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield" ::: "memory");
#endif
}

// ---- the coroutine a sleep runs in, with frames recycled per thread ----

/// Keeps a few freed coroutine frames for reuse, so that sleeping allocates nothing once
/// warm. Frames are allocated and freed on the loop's thread.
class frame_pool {
 public:
  frame_pool() = default;
  frame_pool(const frame_pool&) = delete;
  frame_pool& operator=(const frame_pool&) = delete;
  ~frame_pool() {
    for (void* block : free_) ::operator delete(block);
  }

  void* allocate(std::size_t n) {
    const std::size_t need = n + prefix;
    for (void*& block : free_) {
      if (block != nullptr && *static_cast<std::size_t*>(block) >= need) {
        return static_cast<std::byte*>(std::exchange(block, nullptr)) + prefix;
      }
    }
    const std::size_t size = std::max<std::size_t>((need + 63) & ~std::size_t{63}, 512);
    void* block = ::operator new(size);
    *static_cast<std::size_t*>(block) = size;
    return static_cast<std::byte*>(block) + prefix;
  }

  void deallocate(void* frame) noexcept {
    void* block = static_cast<std::byte*>(frame) - prefix;
    for (void*& slot : free_) {
      if (slot == nullptr) {
        slot = block;
        return;
      }
    }
    ::operator delete(block);
  }

 private:
  static constexpr std::size_t prefix = alignof(std::max_align_t);
  std::array<void*, 4> free_{};
};

thread_local frame_pool wait_frames;

// Where an operation's wait stands (the operations' state_ member).
constexpr unsigned char wait_idle = 0;
constexpr unsigned char wait_starting = 1;
constexpr unsigned char wait_suspended = 2;
constexpr unsigned char wait_done_inline = 3;

struct wait_promise;

/// A sleep in progress: owns its frame until started, then the frame frees itself at the
/// end and resumes the operation's awaiter (or returns to it, when it finished inline).
class wait_task {
 public:
  using promise_type = wait_promise;
  explicit wait_task(std::coroutine_handle<wait_promise> h) noexcept : h_(h) {}
  wait_task(wait_task&& other) noexcept : h_(std::exchange(other.h_, {})) {}
  wait_task& operator=(wait_task&&) = delete;
  ~wait_task() {
    if (h_) h_.destroy();
  }
  /// Runs the sleep until its first suspension. Returns true when the awaiter must suspend.
  bool start(std::coroutine_handle<> awaiter, std::stop_token token, unsigned char& state,
             std::exception_ptr& error);

 private:
  std::coroutine_handle<wait_promise> h_;
};

struct wait_promise {
  std::stop_token token_;
  std::coroutine_handle<> continuation_;
  unsigned char* state_ = nullptr;
  std::exception_ptr* error_ = nullptr;

  static void* operator new(std::size_t n) { return wait_frames.allocate(n); }
  static void operator delete(void* p) noexcept { wait_frames.deallocate(p); }

  wait_task get_return_object() noexcept {
    return wait_task{std::coroutine_handle<wait_promise>::from_promise(*this)};
  }
  std::suspend_always initial_suspend() const noexcept { return {}; }
  struct final_awaiter {
    bool await_ready() const noexcept { return false; }
    std::coroutine_handle<> await_suspend(std::coroutine_handle<wait_promise> h) const noexcept {
      unsigned char* state = h.promise().state_;
      const std::coroutine_handle<> continuation = h.promise().continuation_;
      h.destroy();
      if (*state == wait_suspended) return continuation;
      *state = wait_done_inline;  // finished inside start(): the awaiter does not suspend
      return std::noop_coroutine();
    }
    void await_resume() const noexcept {}
  };
  final_awaiter final_suspend() const noexcept { return {}; }
  void return_void() const noexcept {}
  void unhandled_exception() noexcept { *error_ = std::current_exception(); }
  const std::stop_token& stop_token() const noexcept { return token_; }
};

bool wait_task::start(std::coroutine_handle<> awaiter, std::stop_token token, unsigned char& state,
                      std::exception_ptr& error) {
  wait_promise& p = h_.promise();
  p.token_ = std::move(token);
  p.continuation_ = awaiter;
  p.state_ = &state;
  p.error_ = &error;
  state = wait_starting;
  std::exchange(h_, {}).resume();
  if (state == wait_done_inline) return false;
  state = wait_suspended;
  return true;
}

}  // namespace

// ---- formatting ----

std::size_t spsc_ring_region_size(std::size_t capacity) noexcept {
  return ring_header_size + std::bit_ceil(std::clamp(capacity, min_spsc_capacity, max_spsc_capacity));
}

std::size_t mpmc_ring_region_size(std::size_t slots, std::size_t max_message) noexcept {
  return ring_header_size + std::bit_ceil(std::clamp<std::size_t>(slots, 2, max_mpmc_slots)) *
                                mpmc_stride(std::clamp<std::size_t>(max_message, 1, max_mpmc_message));
}

namespace {
ring_header& write_header(std::span<std::byte> region, const ring_config& geometry) {
  std::memset(region.data(), 0, ring_header_size);
  auto* h = new (region.data()) ring_header{};
  h->config = geometry;
  h->config.magic = 0;
  h->config.check = config_check(geometry);  // computed over the final magic
  return *h;
}

void publish_header(ring_header& h) noexcept {
  // Last, so that a process attaching early finds no magic rather than half a header.
  std::atomic_ref<std::uint64_t>(h.config.magic).store(ring_magic, std::memory_order_release);
}
}  // namespace

void format_spsc_ring(std::span<std::byte> region) {
  check_region(region, ring_header_size + min_spsc_capacity, "format_spsc_ring");
  const std::size_t capacity = std::min(std::bit_floor(region.size() - ring_header_size), max_spsc_capacity);
  ring_config c{};
  c.magic = ring_magic;
  c.version = ring_version;
  c.kind = kind_spsc;
  c.region_size = ring_header_size + capacity;
  c.capacity = capacity;
  c.slot_stride = 0;
  c.max_message =
      static_cast<std::uint32_t>(std::min<std::uint64_t>(capacity / 2 - sizeof(record_header), UINT32_MAX));
  c.header_size = ring_header_size;
  c.participants = participant_count;
  publish_header(write_header(region, c));
}

void format_mpmc_ring(std::span<std::byte> region, std::size_t max_message) {
  if (max_message == 0 || max_message > max_mpmc_message) {
    throw_invalid(fmt::format("format_mpmc_ring: max_message {} must be between 1 and {}", max_message,
                              max_mpmc_message));
  }
  const std::size_t stride = mpmc_stride(max_message);
  check_region(region, ring_header_size + 2 * stride, "format_mpmc_ring");
  const std::size_t slots =
      std::min(std::bit_floor((region.size() - ring_header_size) / stride), max_mpmc_slots);
  ring_config c{};
  c.magic = ring_magic;
  c.version = ring_version;
  c.kind = kind_mpmc;
  c.region_size = ring_header_size + slots * stride;
  c.capacity = slots;
  c.slot_stride = static_cast<std::uint32_t>(stride);
  c.max_message = static_cast<std::uint32_t>(max_message);
  c.header_size = ring_header_size;
  c.participants = participant_count;
  ring_header& h = write_header(region, c);
  std::byte* data = region.data() + ring_header_size;
  for (std::size_t i = 0; i < slots; ++i) {
    auto* s = new (data + i * stride) slot_header{};
    s->word.store(make_slot_word(static_cast<std::uint32_t>(i), 0), std::memory_order_relaxed);
  }
  publish_header(h);
}

// ---- the endpoint ----

namespace detail {

class __attribute__((visibility("hidden"))) ring_endpoint {
 public:
  enum class outcome : unsigned char { done, would_block, end_of_stream };

  ring_endpoint(std::span<std::byte> region, std::uint32_t kind, std::uint32_t role,
                const ring_options& options);
  ~ring_endpoint() { detach(); }
  ring_endpoint(const ring_endpoint&) = delete;
  ring_endpoint& operator=(const ring_endpoint&) = delete;

  outcome try_send(std::span<const std::byte> message) {
    const outcome r = kind_ == kind_spsc ? spsc_try_send(message) : mpmc_try_send(message);
    moved_ += r == outcome::done;
    return r;
  }
  outcome try_receive(std::span<std::byte> buffer, std::size_t& size) {
    const outcome r = kind_ == kind_spsc ? spsc_try_receive(buffer, size) : mpmc_try_receive(buffer, size);
    moved_ += r == outcome::done;
    return r;
  }

  /// Polls `attempt` for at most the spin budget: the number of polls it took, 0 if it
  /// did not succeed (or spinning cannot pay).
  template <class Attempt>
  unsigned spin(Attempt attempt);

  bool start_send_wait(ring_send_operation& op, std::coroutine_handle<> h, std::stop_token token);
  bool start_receive_wait(ring_receive_operation& op, std::coroutine_handle<> h, std::stop_token token);

  void close() noexcept;
  void detach() noexcept;
  /// MPMC receivers: detaches, and closes the receiving side when no receiver is left.
  void leave_receiving() noexcept;
  /// Goes without removing this process's record, so that the other side takes the
  /// process's exit for the death of a peer.
  void abandon() noexcept { participant_index_ = -1; }
  void ack() noexcept;
  void ack_through(std::uint64_t position) noexcept;
  std::uint64_t read_position() const noexcept { return read_pos_; }
  std::size_t max_message() const noexcept { return max_message_; }
  std::size_t capacity() const noexcept { return capacity_; }

 private:
  wait_task send_wait(ring_send_operation& op);
  wait_task receive_wait(ring_receive_operation& op);

  outcome spsc_try_send(std::span<const std::byte> message);
  outcome spsc_try_receive(std::span<std::byte> buffer, std::size_t& size);
  outcome mpmc_try_send(std::span<const std::byte> message);
  outcome mpmc_try_receive(std::span<std::byte> buffer, std::size_t& size);

  void attach();
  void release_read_position() noexcept;
  /// Wakes the sleepers on `ev`, after this side published a position. Without a fence
  /// when this process takes part in the asymmetric barrier: the sleeper's membarrier()
  /// orders the publication for it.
  void notify(event_count& ev) noexcept {
    if (fenceless_ && hdr_->fence_required.load(std::memory_order_relaxed) == 0) {
      std::atomic_signal_fence(std::memory_order_seq_cst);
    } else {
      full_fence();
    }
    wake_announced(ev);
  }
  /// The sleeper's half: announce on `ev`, then make every waker's earlier publication
  /// visible here. Returns the value to wait on.
  std::uint32_t prepare_sleep(event_count& ev) noexcept;
  /// Moves ring_header::fence_required up to `to` (never down).
  void raise_fence_mode(std::uint32_t to) noexcept;
  /// Counts a wait starting `now`; asks for fence mode when this side sleeps often.
  void note_wait(clock::time_point now) noexcept;
  /// When a wait that starts `now` must end: the earlier of the operation's deadline and
  /// its timeout counted from now.
  template <class Operation>
  static clock::time_point deadline_of(const Operation& op, clock::time_point now) noexcept {
    if (op.timeout_ == std::chrono::nanoseconds::max() || op.deadline_ <= now) return op.deadline_;
    return op.timeout_ < op.deadline_ - now ? now + op.timeout_ : op.deadline_;
  }
  /// Takes back the announcement of a sleep that turned out not to be needed.
  void withdraw_sleep(event_count& ev, std::uint32_t key) noexcept;
  /// While an SPSC receiver polls an empty ring: pulls in the lines the next record will
  /// occupy together with the tail, so that both arrive in one cache-miss time.
  void prefetch_next_record() const noexcept {
    if (kind_ != kind_spsc) return;
    __builtin_prefetch(data_ + (read_pos_ & mask_));
    __builtin_prefetch(data_ + ((read_pos_ + 64) & mask_));
  }
  /// Whether spinning can pay: a budget is left and the other side last ran on another CPU.
  bool worth_spinning() noexcept;
  /// After a sleep timed out: the pid of a dead peer when the other side is gone (every
  /// process recorded for it died without closing), else 0. For MPMC it first releases a
  /// slot that blocks this side and is held by a dead process.
  pid_t dead_peer();
  /// dead_peer(): the other side has no record, and no process can attach as it any more.
  static constexpr pid_t peer_never_came = -1;
  /// Whether every process that could still attach as the other side is gone
  /// (ring_options::peer_claim_fd hung up); false without a claim descriptor.
  bool peer_claims_gone() const noexcept;
  /// The peer_died for a wait that dead_peer() answered with `dead`.
  [[noreturn]] void throw_peer_died(pid_t dead, const char* waiting) const;
  bool slot_owner_alive(std::uint32_t pid) const noexcept;
  /// Whether the table records a receiver, alive or not.
  bool receiver_recorded() const noexcept;
  slot_header& slot_at(std::uint64_t pos) const noexcept {
    return *reinterpret_cast<slot_header*>(data_ + (pos & mask_) * stride_);
  }
  std::byte* slot_payload(slot_header& s) const noexcept {
    return reinterpret_cast<std::byte*>(&s) + slot_header_size;
  }
  const char* role_name() const noexcept { return role_ == role_sender ? "sender" : "receiver"; }
  const char* kind_name() const noexcept { return kind_ == kind_spsc ? "SPSC" : "MPMC"; }

  ring_header* hdr_;
  std::byte* data_;
  std::uint32_t kind_;
  std::uint32_t role_;
  std::uint64_t capacity_;  // SPSC: bytes; MPMC: slots
  std::uint64_t mask_;
  std::size_t stride_ = 0;
  std::size_t max_message_;
  ring_options options_;
  pid_t self_pid_;
  std::uint64_t identity_ = 0;  // our participant word
  int participant_index_ = -1;  // -1: detached
  // SPSC positions kept privately: only this side moves them.
  std::uint64_t tail_ = 0;        // sender: bytes written
  std::uint64_t head_cache_ = 0;  // sender: last seen release position of the receiver
  std::uint64_t read_pos_ = 0;    // receiver: next record
  std::uint64_t tail_cache_ = 0;  // receiver: last seen tail
  std::chrono::nanoseconds spin_budget_;
  // How often this side sleeps: messages it moved, and the last wait's start.
  std::uint64_t moved_ = 0;
  std::uint64_t moved_at_last_wait_ = 0;
  clock::time_point last_wait_{};
  unsigned short_waits_ = 0;  // consecutive waits soon after the previous one
  bool fenceless_ = false;    // this process is registered for the asymmetric barrier
  std::int32_t cpu_tag_ = 0;  // what this side last wrote into hdr_->cpu
};

ring_endpoint::ring_endpoint(std::span<std::byte> region, std::uint32_t kind, std::uint32_t role,
                             const ring_options& options)
    : kind_(kind), role_(role), options_(options), self_pid_(::getpid()), spin_budget_(options.spin) {
  const char* what = kind == kind_spsc ? (role == role_sender ? "spsc_ring_sender" : "spsc_ring_receiver")
                                       : (role == role_sender ? "mpmc_ring_sender" : "mpmc_ring_receiver");
  check_region(region, ring_header_size, what);
  hdr_ = std::launder(reinterpret_cast<ring_header*>(region.data()));
  // Copy the description out once; from here on only the copy is used, so a peer that
  // rewrites the header cannot steer this process outside the region.
  ring_config c{};
  c.magic = std::atomic_ref<std::uint64_t>(hdr_->config.magic).load(std::memory_order_acquire);
  if (c.magic != ring_magic) {
    throw_invalid(
        fmt::format("{}: no ring in this region (magic {:#018x}, expected {:#018x}): not formatted yet, "
                    "or not a ring",
                    what, c.magic, ring_magic));
  }
  std::memcpy(reinterpret_cast<std::byte*>(&c) + sizeof c.magic,
              reinterpret_cast<const std::byte*>(&hdr_->config) + sizeof c.magic, sizeof c - sizeof c.magic);
  if (c.version != ring_version) {
    throw_invalid(fmt::format("{}: the ring has layout version {}; this ipcoro reads version {}", what,
                              c.version, ring_version));
  }
  if (c.check != config_check(c)) {
    throw_invalid(
        fmt::format("{}: the ring header is corrupt: its check word does not match its fields", what));
  }
  if (c.kind != kind) {
    throw_invalid(fmt::format("{}: the region holds an {} ring, not an {} ring", what,
                              c.kind == kind_spsc ? "SPSC" : (c.kind == kind_mpmc ? "MPMC" : "unknown"),
                              kind == kind_spsc ? "SPSC" : "MPMC"));
  }
  if (c.header_size != ring_header_size || c.participants != participant_count) {
    throw_invalid(
        fmt::format("{}: the ring header has size {} and {} participant entries; expected {} and {}", what,
                    c.header_size, c.participants, ring_header_size, participant_count));
  }
  if (c.region_size > region.size() || c.region_size < ring_header_size) {
    throw_invalid(fmt::format("{}: the ring was formatted for a region of {} bytes, but this region has {}",
                              what, c.region_size, region.size()));
  }
  const std::uint64_t data_bytes = c.region_size - ring_header_size;
  if (kind == kind_spsc) {
    if (!std::has_single_bit(c.capacity) || c.capacity < min_spsc_capacity || c.capacity > data_bytes ||
        c.max_message != std::min<std::uint64_t>(c.capacity / 2 - sizeof(record_header), UINT32_MAX)) {
      throw_invalid(
          fmt::format("{}: the ring's geometry is inconsistent (capacity {}, max message {}, {} data bytes)",
                      what, c.capacity, c.max_message, data_bytes));
    }
  } else {
    if (!std::has_single_bit(c.capacity) || c.capacity < 2 || c.capacity > max_mpmc_slots ||
        c.max_message == 0 || c.max_message > max_mpmc_message ||
        c.slot_stride != mpmc_stride(c.max_message) || c.capacity > data_bytes / c.slot_stride) {
      throw_invalid(
          fmt::format("{}: the ring's geometry is inconsistent ({} slots of {} bytes for messages of {}, "
                      "{} data bytes)",
                      what, c.capacity, c.slot_stride, c.max_message, data_bytes));
    }
    stride_ = c.slot_stride;
  }
  data_ = region.data() + ring_header_size;
  capacity_ = c.capacity;
  mask_ = c.capacity - 1;
  max_message_ = c.max_message;
  if (options_.peer_check_interval <= std::chrono::milliseconds::zero()) {
    options_.peer_check_interval = std::chrono::milliseconds(1);
  }
  attach();
}

void ring_endpoint::attach() {
  identity_ = pack_participant(self_pid_, role_, self_start_time());
  fenceless_ = asymmetric_barrier_registered();
  // A process that cannot issue membarrier() makes every waker fence. (A waker that
  // published without a fence just before seeing this delays that one wake-up by at most
  // a peer check interval.)
  if (!fenceless_) raise_fence_mode(fence_requested);
  cpu_tag_ = current_cpu_tag();
  hdr_->cpu[role_ == role_sender ? 0 : 1].store(cpu_tag_, std::memory_order_relaxed);
  if (kind_ == kind_spsc) {
    const int index = role_ == role_sender ? 0 : 1;
    participant_word& entry = hdr_->participants[index];
    std::uint64_t current = entry.load(std::memory_order_acquire);
    for (;;) {
      if (current != 0 && participant_alive(current)) {
        throw std::system_error(EBUSY, std::system_category(),
                                fmt::format("spsc_ring_{}: the ring already has a {}: process {} is alive",
                                            role_name(), role_name(), participant_pid(current)));
      }
      if (entry.compare_exchange_weak(current, identity_, std::memory_order_acq_rel)) break;
    }
    participant_index_ = index;
    const std::uint64_t head = hdr_->head.load(std::memory_order_acquire);
    const std::uint64_t tail = hdr_->tail.load(std::memory_order_acquire);
    if (head > tail || tail - head > capacity_ || head % 8 != 0 || tail % 8 != 0) {
      detach();
      throw_corrupt(fmt::format("positions {} (receiver) and {} (sender) do not fit a ring of {} bytes", head,
                                tail, capacity_));
    }
    if (role_ == role_sender) {
      hdr_->sender_closed.store(0, std::memory_order_release);
      tail_ = tail;
      head_cache_ = head;
    } else {
      hdr_->receiver_closed.store(0, std::memory_order_release);
      read_pos_ = head;  // resume after the last acknowledged message
      tail_cache_ = head;
    }
    return;
  }
  // A dead process's entry is the only evidence that it was attached: a receiver that took
  // over the entry of the ring's last (killed) sender would find no sender recorded, take
  // that for "no sender attached yet" (dead_peer) and sleep until its own timeout instead of
  // throwing peer_died. So take a free entry first, then one left by a dead process of this
  // side, and one of the other side only when the table holds no other choice and that side
  // keeps another entry.
  const auto role_recorded_elsewhere = [this](int except, std::uint32_t role) {
    for (int j = 0; j < static_cast<int>(participant_count); ++j) {
      const std::uint64_t v = hdr_->participants[j].load(std::memory_order_acquire);
      if (j != except && v != 0 && participant_role(v) == role) return true;
    }
    return false;
  };
  for (int pass = 0; pass < 3; ++pass) {
    for (int i = 0; i < static_cast<int>(participant_count); ++i) {
      participant_word& entry = hdr_->participants[i];
      std::uint64_t current = entry.load(std::memory_order_acquire);
      for (;;) {
        if (current != 0) {
          if (pass == 0) break;
          const bool own_side = participant_role(current) == role_;
          if (pass == 1 && !own_side) break;
          if (!own_side && !role_recorded_elsewhere(i, participant_role(current))) break;
          if (participant_alive(current)) break;
        }
        if (entry.compare_exchange_weak(current, identity_, std::memory_order_seq_cst)) {
          participant_index_ = i;
          // After the entry (see leave_receiving): the receiving side is open again.
          if (role_ == role_receiver) hdr_->receiver_closed.store(0, std::memory_order_seq_cst);
          return;
        }
      }
    }
  }
  throw std::system_error(
      EUSERS, std::system_category(),
      fmt::format("mpmc_ring_{}: the ring's table of {} attached endpoints is full (all alive, or "
                  "the last record of a dead other side); "
                  "detach some first",
                  role_name(), participant_count));
}

void ring_endpoint::detach() noexcept {
  if (participant_index_ < 0) return;
  std::uint64_t expected = identity_;
  hdr_->participants[participant_index_].compare_exchange_strong(expected, 0, std::memory_order_acq_rel);
  participant_index_ = -1;
}

bool ring_endpoint::receiver_recorded() const noexcept {
  for (const participant_word& entry : hdr_->participants) {
    const std::uint64_t v = entry.load(std::memory_order_seq_cst);
    if (v != 0 && participant_role(v) == role_receiver) return true;
  }
  return false;
}

void ring_endpoint::leave_receiving() noexcept {
  if (participant_index_ < 0) return;
  std::uint64_t expected = identity_;
  hdr_->participants[participant_index_].compare_exchange_strong(expected, 0, std::memory_order_seq_cst);
  participant_index_ = -1;
  // Dekker with attach(), which records its entry and then clears the flag: if the second
  // look misses a receiver attaching now, that receiver's clear comes after our store. Of
  // two receivers leaving at once, at least one sees the other gone. A receiver recorded
  // but dead keeps the flag down: its senders learn of the death (peer_died) instead.
  if (receiver_recorded()) return;
  hdr_->receiver_closed.store(1, std::memory_order_seq_cst);
  if (receiver_recorded()) {
    hdr_->receiver_closed.store(0, std::memory_order_seq_cst);
    return;
  }
  notify(hdr_->space);
}

void ring_endpoint::close() noexcept {
  if (kind_ == kind_mpmc) {
    hdr_->sender_closed.store(1, std::memory_order_release);
    notify(hdr_->data);
    notify(hdr_->space);
    return;
  }
  if (participant_index_ < 0) return;
  if (role_ == role_sender) {
    // After the last tail store: a receiver that sees the flag sees every message.
    hdr_->sender_closed.store(1, std::memory_order_release);
    notify(hdr_->data);
  } else {
    hdr_->receiver_closed.store(1, std::memory_order_release);
    notify(hdr_->space);
  }
  detach();
}

void ring_endpoint::ack() noexcept {
  if (kind_ == kind_spsc && role_ == role_receiver) release_read_position();
}

void ring_endpoint::ack_through(std::uint64_t position) noexcept {
  if (kind_ != kind_spsc || role_ != role_receiver || position > read_pos_) return;
  if (position <= hdr_->head.load(std::memory_order_relaxed)) return;  // only the receiver moves it
  hdr_->head.store(position, std::memory_order_release);
  notify(hdr_->space);
}

void ring_endpoint::release_read_position() noexcept {
  hdr_->head.store(read_pos_, std::memory_order_release);
  notify(hdr_->space);
}

// ---- SPSC ----

ring_endpoint::outcome ring_endpoint::spsc_try_send(std::span<const std::byte> message) {
  if (message.size() > max_message_) {
    throw std::system_error(
        EMSGSIZE, std::system_category(),
        fmt::format("spsc ring send: a message of {} bytes exceeds this ring's limit of {} "
                    "(capacity / 2 - 8); format a larger region",
                    message.size(), max_message_));
  }
  if (hdr_->receiver_closed.load(std::memory_order_acquire) != 0) {
    throw std::system_error(EPIPE, std::system_category(), "spsc ring send: the receiver closed the ring");
  }
  const std::uint64_t record = align8(sizeof(record_header) + message.size());
  std::uint64_t offset = tail_ & mask_;
  const std::uint64_t to_end = capacity_ - offset;
  const std::uint64_t needed = record <= to_end ? record : to_end + record;
  if (tail_ - head_cache_ + needed > capacity_) {
    const std::uint64_t head = hdr_->head.load(std::memory_order_acquire);
    if (head > tail_ || tail_ - head > capacity_) {
      throw_corrupt(
          fmt::format("the receiver's position {} is outside [{}, {}]", head, tail_ - capacity_, tail_));
    }
    head_cache_ = head;
    if (tail_ - head_cache_ + needed > capacity_) return outcome::would_block;
  }
  std::uint64_t tail = tail_;
  if (record > to_end) {
    // Does not fit before the end: pad to the end, start over at offset 0.
    const record_header pad{static_cast<std::uint32_t>(to_end - sizeof(record_header)), record_padding};
    std::memcpy(data_ + offset, &pad, sizeof pad);
    tail += to_end;
    offset = 0;
  }
  if (tail + record + prefetch_distance + 64 <= head_cache_ + capacity_) {
    // Free room further on: take ownership of its lines now, so that later records are
    // not written into lines the receiver still holds.
    __builtin_prefetch(data_ + ((tail + prefetch_distance) & mask_), 1);
    __builtin_prefetch(data_ + ((tail + prefetch_distance + 64) & mask_), 1);
  }
  const record_header rh{static_cast<std::uint32_t>(message.size()), record_data};
  std::memcpy(data_ + offset, &rh, sizeof rh);
  if (!message.empty()) std::memcpy(data_ + offset + sizeof rh, message.data(), message.size());
  tail_ = tail + record;
  hdr_->tail.store(tail_, std::memory_order_release);
  notify(hdr_->data);
  return outcome::done;
}

ring_endpoint::outcome ring_endpoint::spsc_try_receive(std::span<std::byte> buffer, std::size_t& size) {
  const auto refresh_tail = [this] {
    const std::uint64_t t = hdr_->tail.load(std::memory_order_acquire);
    if (t < read_pos_ || t - read_pos_ > capacity_ || t % 8 != 0) {
      throw_corrupt(
          fmt::format("the sender's position {} is outside [{}, {}]", t, read_pos_, read_pos_ + capacity_));
    }
    tail_cache_ = t;
  };
  for (;;) {
    if (read_pos_ == tail_cache_) {
      refresh_tail();
      if (read_pos_ == tail_cache_) {
        if (hdr_->sender_closed.load(std::memory_order_acquire) == 0) return outcome::would_block;
        refresh_tail();  // the flag is set after the last message: this sees it
        if (read_pos_ == tail_cache_) return outcome::end_of_stream;
      }
    }
    const std::uint64_t offset = read_pos_ & mask_;
    const std::uint64_t to_end = capacity_ - offset;
    const std::uint64_t available = tail_cache_ - read_pos_;
    record_header rh;
    std::memcpy(&rh, data_ + offset, sizeof rh);
    if (rh.type == record_padding) {
      if (rh.length != to_end - sizeof rh || to_end > available) {
        throw_corrupt(
            fmt::format("a padding record of {} bytes at offset {} does not reach the end of the ring",
                        rh.length, offset));
      }
      read_pos_ += to_end;
      continue;
    }
    if (rh.type != record_data) {
      throw_corrupt(fmt::format("unknown record type {:#x} at offset {}", rh.type, offset));
    }
    const std::uint64_t record = align8(sizeof rh + std::uint64_t{rh.length});
    if (rh.length > max_message_ || record > to_end || record > available) {
      throw_corrupt(
          fmt::format("a record of {} bytes at offset {} overruns the ring ({} bytes to its end, {} "
                      "published)",
                      rh.length, offset, to_end, available));
    }
    if (rh.length > buffer.size()) {
      throw std::system_error(
          EMSGSIZE, std::system_category(),
          fmt::format("spsc ring receive: the next message has {} bytes but the buffer only {}; "
                      "it stays in the ring (max_message_size() is {})",
                      rh.length, buffer.size(), max_message_));
    }
    if (read_pos_ + record + prefetch_distance + 64 <= tail_cache_) {
      // Published records further on: start fetching them from the sender's cache now.
      __builtin_prefetch(data_ + ((read_pos_ + prefetch_distance) & mask_));
      __builtin_prefetch(data_ + ((read_pos_ + prefetch_distance + 64) & mask_));
    }
    if (rh.length != 0) std::memcpy(buffer.data(), data_ + offset + sizeof rh, rh.length);
    read_pos_ += record;
    size = rh.length;
    if (!options_.manual_ack) release_read_position();
    return outcome::done;
  }
}

// ---- MPMC ----

ring_endpoint::outcome ring_endpoint::mpmc_try_send(std::span<const std::byte> message) {
  if (message.size() > max_message_) {
    throw std::system_error(
        EMSGSIZE, std::system_category(),
        fmt::format("mpmc ring send: a message of {} bytes exceeds this ring's slot size of {}",
                    message.size(), max_message_));
  }
  if (hdr_->sender_closed.load(std::memory_order_acquire) != 0) {
    throw std::system_error(EPIPE, std::system_category(), "mpmc ring send: the ring was closed");
  }
  if (hdr_->receiver_closed.load(std::memory_order_acquire) != 0) {
    throw std::system_error(EPIPE, std::system_category(),
                            "mpmc ring send: every receiver has closed the ring (none is attached)");
  }
  std::atomic<std::uint64_t>& next = hdr_->tail;
  std::uint64_t pos = next.load(std::memory_order_relaxed);
  // Bounded, so that a peer scribbling on the positions cannot keep this loop turning.
  for (std::uint64_t round = 0; round < 4 * capacity_ + 64; ++round) {
    slot_header& s = slot_at(pos);
    std::uint64_t w = s.word.load(std::memory_order_acquire);
    const auto d = static_cast<std::int32_t>(slot_seq(w) - static_cast<std::uint32_t>(pos));
    if (d == 0 && slot_owner(w) == 0 && !slot_abandoned(w)) {
      // Claim the slot, recording who holds it, then move the shared position on
      // (someone else may already have, seeing the claim).
      if (s.word.compare_exchange_strong(
              w, make_slot_word(static_cast<std::uint32_t>(pos), static_cast<std::uint32_t>(self_pid_)),
              std::memory_order_acquire)) {
        std::uint64_t expected = pos;
        next.compare_exchange_strong(expected, pos + 1, std::memory_order_relaxed);
        s.size.store(static_cast<std::uint32_t>(message.size()), std::memory_order_relaxed);
        if (!message.empty()) std::memcpy(slot_payload(s), message.data(), message.size());
        s.word.store(make_slot_word(static_cast<std::uint32_t>(pos + 1), 0), std::memory_order_release);
        notify(hdr_->data);
        return outcome::done;
      }
      continue;
    }
    if (d < 0) {
      // The slot still holds the message of the previous lap: full, unless others moved on.
      const std::uint64_t now = next.load(std::memory_order_relaxed);
      if (now == pos) return outcome::would_block;
      pos = now;
      continue;
    }
    // Claimed for this position by another sender, or already past it: help move on.
    std::uint64_t expected = pos;
    next.compare_exchange_strong(expected, pos + 1, std::memory_order_relaxed);
    pos = next.load(std::memory_order_relaxed);
  }
  return outcome::would_block;
}

ring_endpoint::outcome ring_endpoint::mpmc_try_receive(std::span<std::byte> buffer, std::size_t& size) {
  std::atomic<std::uint64_t>& next = hdr_->head;
  std::uint64_t pos = next.load(std::memory_order_relaxed);
  for (std::uint64_t round = 0; round < 4 * capacity_ + 64; ++round) {
    slot_header& s = slot_at(pos);
    std::uint64_t w = s.word.load(std::memory_order_acquire);
    const auto d = static_cast<std::int32_t>(slot_seq(w) - static_cast<std::uint32_t>(pos + 1));
    if (d == 0 && slot_owner(w) == 0) {
      const bool skip = slot_abandoned(w);
      const std::uint32_t length = s.size.load(std::memory_order_relaxed);
      if (!skip && (length > max_message_ || length > buffer.size())) {
        // Only meaningful if the slot still holds the message the length was read from.
        if (s.word.load(std::memory_order_acquire) != w) continue;
        if (length > max_message_) {
          throw_corrupt(fmt::format("slot {} holds a message of {} bytes, above the slot size {}",
                                    pos & mask_, length, max_message_));
        }
        throw std::system_error(
            EMSGSIZE, std::system_category(),
            fmt::format("mpmc ring receive: the next message has {} bytes but the buffer only {}; "
                        "it stays in the ring (max_message_size() is {})",
                        length, buffer.size(), max_message_));
      }
      if (s.word.compare_exchange_strong(
              w, make_slot_word(static_cast<std::uint32_t>(pos + 1), static_cast<std::uint32_t>(self_pid_)),
              std::memory_order_acquire)) {
        std::uint64_t expected = pos;
        next.compare_exchange_strong(expected, pos + 1, std::memory_order_relaxed);
        if (!skip && length != 0) std::memcpy(buffer.data(), slot_payload(s), length);
        s.word.store(make_slot_word(static_cast<std::uint32_t>(pos + capacity_), 0),
                     std::memory_order_release);
        notify(hdr_->space);
        if (skip) {
          pos = next.load(std::memory_order_relaxed);
          continue;
        }
        size = length;
        return outcome::done;
      }
      continue;
    }
    if (d < 0) {
      // Nothing published at this position yet: empty, unless others moved on.
      const std::uint64_t now = next.load(std::memory_order_relaxed);
      if (now != pos) {
        pos = now;
        continue;
      }
      if (hdr_->sender_closed.load(std::memory_order_acquire) == 0) return outcome::would_block;
      const std::uint64_t again = s.word.load(std::memory_order_acquire);
      if (static_cast<std::int32_t>(slot_seq(again) - static_cast<std::uint32_t>(pos + 1)) >= 0) continue;
      // Closed and drained, unless a sender is still writing this slot.
      return slot_owner(again) == 0 ? outcome::end_of_stream : outcome::would_block;
    }
    std::uint64_t expected = pos;
    next.compare_exchange_strong(expected, pos + 1, std::memory_order_relaxed);
    pos = next.load(std::memory_order_relaxed);
  }
  return outcome::would_block;
}

bool ring_endpoint::slot_owner_alive(std::uint32_t pid) const noexcept {
  for (const participant_word& entry : hdr_->participants) {
    const std::uint64_t v = entry.load(std::memory_order_acquire);
    if (v != 0 && static_cast<std::uint32_t>(participant_pid(v)) == pid) {
      return pid_alive(static_cast<pid_t>(pid), participant_start(v));
    }
  }
  return pid_alive(static_cast<pid_t>(pid), 0);
}

pid_t ring_endpoint::dead_peer() {
  const std::uint32_t peer_role = role_ == role_sender ? role_receiver : role_sender;
  if (kind_ == kind_spsc) {
    participant_word& entry = hdr_->participants[role_ == role_sender ? 1 : 0];
    std::uint64_t v = entry.load(std::memory_order_acquire);
    if (v == 0) {
      // No peer attached: not yet, or never.
      if (!peer_claims_gone()) return 0;
      // A process that attached, and then let its claim go, did so in that order: seen now.
      v = entry.load(std::memory_order_seq_cst);
      if (v == 0) return peer_never_came;
    }
    if (participant_alive(v)) return 0;
    return participant_pid(v);
  }
  if (role_ == role_receiver) {
    // A sender killed between claiming a slot and publishing it blocks every receiver at
    // that position: mark its message abandoned so that receivers skip it.
    const std::uint64_t pos = hdr_->head.load(std::memory_order_relaxed);
    slot_header& s = slot_at(pos);
    std::uint64_t w = s.word.load(std::memory_order_acquire);
    if (slot_seq(w) == static_cast<std::uint32_t>(pos) && slot_owner(w) != 0 &&
        !slot_owner_alive(slot_owner(w))) {
      if (s.word.compare_exchange_strong(w, make_slot_word(static_cast<std::uint32_t>(pos + 1), 0, true),
                                         std::memory_order_acq_rel)) {
        notify(hdr_->data);
      }
    }
  } else {
    // A receiver killed while copying a message out holds its slot: free it (the message
    // went with the receiver).
    const std::uint64_t pos = hdr_->tail.load(std::memory_order_relaxed);
    slot_header& s = slot_at(pos);
    std::uint64_t w = s.word.load(std::memory_order_acquire);
    if (slot_seq(w) == static_cast<std::uint32_t>(pos - capacity_ + 1) && slot_owner(w) != 0 &&
        !slot_owner_alive(slot_owner(w))) {
      if (s.word.compare_exchange_strong(w, make_slot_word(static_cast<std::uint32_t>(pos), 0),
                                         std::memory_order_acq_rel)) {
        notify(hdr_->space);
      }
    }
  }
  const auto scan = [this, peer_role](bool& recorded) -> pid_t {
    pid_t dead = 0;
    recorded = false;
    for (const participant_word& entry : hdr_->participants) {
      const std::uint64_t v = entry.load(std::memory_order_seq_cst);
      if (v == 0 || participant_role(v) != peer_role) continue;
      recorded = true;
      if (participant_alive(v)) return 0;
      dead = participant_pid(v);
    }
    return dead;
  };
  bool recorded = false;
  const pid_t dead = scan(recorded);
  if (recorded || !peer_claims_gone()) return dead;
  // As for SPSC: a process that attached before letting its claim go is seen now.
  const pid_t again = scan(recorded);
  return recorded ? again : peer_never_came;
}

bool ring_endpoint::peer_claims_gone() const noexcept {
  if (options_.peer_claim_fd < 0) return false;
  // Never blocks: a timeout of 0. POLLHUP on a pipe's read end: no write end is open.
  ::pollfd p{options_.peer_claim_fd, 0, 0};
  int rc;
  do {
    rc = ::poll(&p, 1, 0);
  } while (rc < 0 && errno == EINTR);
  return rc > 0 && (p.revents & POLLHUP) != 0;
}

// ---- waiting ----

std::uint32_t ring_endpoint::prepare_sleep(event_count& ev) noexcept {
  const std::uint32_t key = announce_sleeper(ev);
  full_fence();
  // A waker that publishes without a fence may still hold its position in its store
  // buffer, and may have read the futex word before the bit was set: membarrier() runs a
  // fence on it, so that after it the waker either sees the bit or its position is visible.
  // Once fences are in force, every waker fences: the classic pairing with ours above.
  const std::uint32_t mode = hdr_->fence_required.load(std::memory_order_acquire);
  if (mode == fence_in_force || !fenceless_) return key;
  if (asymmetric_barrier()) {
    if (mode == fence_requested) raise_fence_mode(fence_in_force);
  } else {
    // membarrier() failed (a seccomp filter, say): fence like a process without it.
    fenceless_ = false;
    raise_fence_mode(fence_requested);
  }
  return key;
}

void ring_endpoint::raise_fence_mode(std::uint32_t to) noexcept {
  std::uint32_t mode = hdr_->fence_required.load(std::memory_order_relaxed);
  while (mode < to && !hdr_->fence_required.compare_exchange_weak(mode, to, std::memory_order_seq_cst)) {
  }
}

void ring_endpoint::note_wait(clock::time_point now) noexcept {
  // Request/response traffic sleeps after every message or two; streaming sleeps rarely.
  // After `sleepy_waits` waits in a row that each came soon after the last, fences per
  // message are cheaper than a membarrier() per sleep (about 1 us here, and an
  // interruption of every CPU running a registered process).
  constexpr unsigned sleepy_waits = 8;
  constexpr std::uint64_t few_messages = 64;
  constexpr auto soon = std::chrono::milliseconds(2);
  const bool short_wait = moved_ - moved_at_last_wait_ < few_messages && now - last_wait_ < soon;
  short_waits_ = short_wait ? short_waits_ + 1 : 0;
  moved_at_last_wait_ = moved_;
  last_wait_ = now;
  if (short_waits_ >= sleepy_waits && fenceless_ && options_.adaptive_fences &&
      hdr_->fence_required.load(std::memory_order_relaxed) == fence_off) {
    raise_fence_mode(fence_requested);  // the next prepare_sleep puts it in force
  }
}

bool ring_endpoint::worth_spinning() noexcept {
  if (spin_budget_ <= std::chrono::nanoseconds::zero()) return false;
  const int mine = role_ == role_sender ? 0 : 1;
  const std::int32_t cpu = current_cpu_tag();
  if (cpu != cpu_tag_) {
    cpu_tag_ = cpu;
    hdr_->cpu[mine].store(cpu, std::memory_order_relaxed);
  }
  // On the same CPU the peer cannot run while this spins.
  const std::int32_t peer = hdr_->cpu[1 - mine].load(std::memory_order_relaxed);
  return peer == 0 || peer != cpu;
}

template <class Attempt>
unsigned ring_endpoint::spin(Attempt attempt) {
  if (!worth_spinning()) return 0;
  // The clock is read only once the answer did not come within the first few polls.
  clock::time_point start{};
  for (unsigned i = 1;; ++i) {
    cpu_relax();
    if (attempt()) {
      spin_budget_ = std::min(options_.spin, spin_budget_ * 2);
      return i;
    }
    if (i % 16 == 0) {
      const auto now = clock::now();
      if (i == 16) {
        start = now;
      } else if (now - start >= spin_budget_) {
        // Did not pay off: spin less next time, but keep a floor so that it can recover.
        spin_budget_ = std::max(options_.spin / 16, spin_budget_ / 2);
        return 0;
      }
    }
  }
}

void ring_endpoint::throw_peer_died(pid_t dead, const char* waiting) const {
  const char* peer = role_ == role_sender ? "receiver" : "sender";
  if (dead == peer_never_came) {
    throw peer_died(0,
                    fmt::format("{} ring {}: no {} is attached and none can attach any more: every process "
                                "that could take that end (of a channel_link) has exited or let it go",
                                kind_name(), waiting, peer));
  }
  if (role_ == role_sender) {
    throw peer_died(dead,
                    fmt::format("{} ring send: peer process {} died (it was the ring's {}receiver) while "
                                "this waited for space",
                                kind_name(), dead, kind_ == kind_mpmc ? "last " : ""));
  }
  throw peer_died(dead,
                  fmt::format("{} ring receive: peer process {} died (it was the ring's {}sender) without "
                              "closing the ring",
                              kind_name(), dead, kind_ == kind_mpmc ? "last " : ""));
}

wait_task ring_endpoint::send_wait(ring_send_operation& op) {
  event_count& ev = hdr_->space;
  const clock::time_point start = clock::now();
  const clock::time_point deadline = deadline_of(op, start);
  note_wait(start);
  pid_t dead = 0;
  for (;;) {
    const std::uint32_t key = prepare_sleep(ev);
    if (try_send(op.message_) == outcome::done) {
      withdraw_sleep(ev, key);
      co_return;
    }
    if (dead != 0) throw_peer_died(dead, "send");
    const auto now = clock::now();
    if (now >= deadline) throw timed_out{};
    const auto wait = std::min<std::chrono::nanoseconds>(options_.peer_check_interval, deadline - now);
    if (co_await futex_wait(ev.seq, key, wait) == futex_wait_result::timed_out &&
        !(kind_ == kind_spsc && options_.wait_for_new_receiver)) {
      dead = dead_peer();
    }
  }
}

wait_task ring_endpoint::receive_wait(ring_receive_operation& op) {
  event_count& ev = hdr_->data;
  const clock::time_point start = clock::now();
  const clock::time_point deadline = deadline_of(op, start);
  note_wait(start);
  pid_t dead = 0;
  for (;;) {
    const std::uint32_t key = prepare_sleep(ev);
    const outcome r = try_receive(op.buffer_, op.size_);
    if (r != outcome::would_block) {
      withdraw_sleep(ev, key);
      op.end_of_stream_ = r == outcome::end_of_stream;
      co_return;
    }
    // It can send no more, and everything it sent has been received.
    if (dead != 0) throw_peer_died(dead, "receive");
    const auto now = clock::now();
    if (now >= deadline) throw timed_out{};
    const auto wait = std::min<std::chrono::nanoseconds>(options_.peer_check_interval, deadline - now);
    if (co_await futex_wait(ev.seq, key, wait) == futex_wait_result::timed_out) dead = dead_peer();
  }
}

void ring_endpoint::withdraw_sleep(event_count& ev, std::uint32_t key) noexcept {
  // SPSC only: the bit is this side's alone, so taking it back spares the other side one
  // futex_wake. On MPMC another sleeper may wait on the same value: leave it to the waker.
  if (kind_ != kind_spsc) return;
  std::uint32_t expected = key;
  ev.seq.compare_exchange_strong(expected, key & ~sleeper_bit, std::memory_order_relaxed);
}

bool ring_endpoint::start_send_wait(ring_send_operation& op, std::coroutine_handle<> h,
                                    std::stop_token token) {
  // A sender that went on as soon as one record's room was free would write into the lines
  // the receiver is reading at that moment, and both would stall on every line: while
  // spinning, wait until a batch's room is free (the sleeping path takes any room).
  const std::uint64_t batch =
      kind_ == kind_spsc ? std::min<std::uint64_t>(capacity_ / 4, spin_batch_bytes) : 0;
  if (spin([&] {
        if (batch != 0 && tail_ - hdr_->head.load(std::memory_order_relaxed) > capacity_ - batch)
          return false;
        return try_send(op.message_) == outcome::done;
      }) != 0) {
    return false;
  }
  return send_wait(op).start(h, std::move(token), op.state_, op.error_);
}

bool ring_endpoint::start_receive_wait(ring_receive_operation& op, std::coroutine_handle<> h,
                                       std::stop_token token) {
  if (spin([&] {
        prefetch_next_record();
        const outcome r = try_receive(op.buffer_, op.size_);
        op.end_of_stream_ = r == outcome::end_of_stream;
        return r != outcome::would_block;
      }) != 0) {
    return false;
  }
  return receive_wait(op).start(h, std::move(token), op.state_, op.error_);
}

}  // namespace detail

// ---- operations ----

namespace {
[[noreturn]] void throw_no_endpoint(const char* what) {
  throw std::system_error(
      EBADF, std::system_category(),
      fmt::format("{} on an empty ring endpoint (default-constructed or moved from)", what));
}
}  // namespace

bool ring_send_operation::await_ready() {
  if (endpoint_ == nullptr) throw_no_endpoint("ring send");
  return endpoint_->try_send(message_) == detail::ring_endpoint::outcome::done;
}

bool ring_send_operation::suspend(std::coroutine_handle<> h, std::stop_token token) {
  return endpoint_->start_send_wait(*this, h, std::move(token));
}

void ring_send_operation::await_resume() {
  state_ = wait_idle;
  if (error_) std::rethrow_exception(std::exchange(error_, nullptr));
}

bool ring_receive_operation::await_ready() {
  if (endpoint_ == nullptr) throw_no_endpoint("ring receive");
  const auto r = endpoint_->try_receive(buffer_, size_);
  end_of_stream_ = r == detail::ring_endpoint::outcome::end_of_stream;
  return r != detail::ring_endpoint::outcome::would_block;
}

bool ring_receive_operation::suspend(std::coroutine_handle<> h, std::stop_token token) {
  return endpoint_->start_receive_wait(*this, h, std::move(token));
}

std::optional<std::size_t> ring_receive_operation::await_resume() {
  state_ = wait_idle;
  if (error_) std::rethrow_exception(std::exchange(error_, nullptr));
  if (end_of_stream_) return std::nullopt;
  return size_;
}

// ---- endpoints ----

spsc_ring_sender::spsc_ring_sender() noexcept = default;
spsc_ring_sender::spsc_ring_sender(std::span<std::byte> region, const ring_options& options)
    : endpoint_(std::make_unique<detail::ring_endpoint>(region, kind_spsc, role_sender, options)) {}
spsc_ring_sender::spsc_ring_sender(spsc_ring_sender&&) noexcept = default;
spsc_ring_sender& spsc_ring_sender::operator=(spsc_ring_sender&& other) noexcept {
  if (this != &other) {
    close();
    endpoint_ = std::move(other.endpoint_);
    uncaught_ = other.uncaught_;
  }
  return *this;
}
spsc_ring_sender::~spsc_ring_sender() {
  if (std::uncaught_exceptions() > uncaught_) {
    abandon();
  } else {
    close();
  }
}
void spsc_ring_sender::close() noexcept {
  if (endpoint_) endpoint_->close();
}
void spsc_ring_sender::detach() noexcept {
  if (endpoint_) endpoint_->detach();
}
void spsc_ring_sender::abandon() noexcept {
  if (!endpoint_) return;
  endpoint_->abandon();
  endpoint_.reset();
}
std::size_t spsc_ring_sender::max_message_size() const noexcept {
  return endpoint_ ? endpoint_->max_message() : 0;
}
std::size_t spsc_ring_sender::capacity() const noexcept { return endpoint_ ? endpoint_->capacity() : 0; }

spsc_ring_receiver::spsc_ring_receiver() noexcept = default;
spsc_ring_receiver::spsc_ring_receiver(std::span<std::byte> region, const ring_options& options)
    : endpoint_(std::make_unique<detail::ring_endpoint>(region, kind_spsc, role_receiver, options)) {}
spsc_ring_receiver::spsc_ring_receiver(spsc_ring_receiver&&) noexcept = default;
spsc_ring_receiver& spsc_ring_receiver::operator=(spsc_ring_receiver&& other) noexcept {
  if (this != &other) {
    close();
    endpoint_ = std::move(other.endpoint_);
  }
  return *this;
}
spsc_ring_receiver::~spsc_ring_receiver() { close(); }
void spsc_ring_receiver::ack() noexcept {
  if (endpoint_) endpoint_->ack();
}
std::uint64_t spsc_ring_receiver::position() const noexcept {
  return endpoint_ ? endpoint_->read_position() : 0;
}
void spsc_ring_receiver::ack(std::uint64_t position) noexcept {
  if (endpoint_) endpoint_->ack_through(position);
}
void spsc_ring_receiver::close() noexcept {
  if (endpoint_) endpoint_->close();
}
void spsc_ring_receiver::detach() noexcept {
  if (endpoint_) endpoint_->detach();
}
std::size_t spsc_ring_receiver::max_message_size() const noexcept {
  return endpoint_ ? endpoint_->max_message() : 0;
}
std::size_t spsc_ring_receiver::capacity() const noexcept { return endpoint_ ? endpoint_->capacity() : 0; }

mpmc_ring_sender::mpmc_ring_sender() noexcept = default;
mpmc_ring_sender::mpmc_ring_sender(std::span<std::byte> region, const ring_options& options)
    : endpoint_(std::make_unique<detail::ring_endpoint>(region, kind_mpmc, role_sender, options)) {}
mpmc_ring_sender::mpmc_ring_sender(mpmc_ring_sender&&) noexcept = default;
mpmc_ring_sender& mpmc_ring_sender::operator=(mpmc_ring_sender&&) noexcept = default;
mpmc_ring_sender::~mpmc_ring_sender() = default;
void mpmc_ring_sender::detach() noexcept { endpoint_.reset(); }
void mpmc_ring_sender::abandon() noexcept {
  if (!endpoint_) return;
  endpoint_->abandon();
  endpoint_.reset();
}
void mpmc_ring_sender::close() noexcept {
  if (endpoint_) endpoint_->close();
}
std::size_t mpmc_ring_sender::max_message_size() const noexcept {
  return endpoint_ ? endpoint_->max_message() : 0;
}
std::size_t mpmc_ring_sender::capacity() const noexcept { return endpoint_ ? endpoint_->capacity() : 0; }

mpmc_ring_receiver::mpmc_ring_receiver() noexcept = default;
mpmc_ring_receiver::mpmc_ring_receiver(std::span<std::byte> region, const ring_options& options)
    : endpoint_(std::make_unique<detail::ring_endpoint>(region, kind_mpmc, role_receiver, options)) {}
mpmc_ring_receiver::mpmc_ring_receiver(mpmc_ring_receiver&&) noexcept = default;
mpmc_ring_receiver& mpmc_ring_receiver::operator=(mpmc_ring_receiver&&) noexcept = default;
mpmc_ring_receiver::~mpmc_ring_receiver() = default;
void mpmc_ring_receiver::detach() noexcept { endpoint_.reset(); }
void mpmc_ring_receiver::leave() noexcept {
  if (!endpoint_) return;
  endpoint_->leave_receiving();
  endpoint_.reset();
}
void mpmc_ring_receiver::close() noexcept {
  if (endpoint_) endpoint_->close();
}
std::size_t mpmc_ring_receiver::max_message_size() const noexcept {
  return endpoint_ ? endpoint_->max_message() : 0;
}
std::size_t mpmc_ring_receiver::capacity() const noexcept { return endpoint_ ? endpoint_->capacity() : 0; }

}  // namespace ipcoro
