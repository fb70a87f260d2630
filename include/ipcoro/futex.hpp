// Futex waits through the ring (IORING_OP_FUTEX_WAIT) and wakes, on 32-bit words in memory
// shared between processes or private to one.
#pragma once

#include "ipcoro/io_operation.hpp"

#include <atomic>
#include <chrono>
#include <cstdint>

namespace ipcoro {

/// Whether other processes may wait on or wake the word. `shared` is right for words in
/// MAP_SHARED memory (shm segments, mapped files); `process_private` is cheaper for
/// words only this process uses.
enum class futex_scope : unsigned char { shared, process_private };

/// How a futex wait ended. None of them proves the awaited condition: re-read the word.
enum class futex_wait_result : unsigned char {
  woken,          ///< a futex_wake reached this waiter
  value_changed,  ///< the word no longer held `expected` when the wait began
  timed_out,      ///< the timeout expired first
};

/// Sleeps while `word` holds `expected`, until a futex_wake on the same word, or the
/// timeout. Parks through IORING_OP_FUTEX_WAIT (Linux 6.7); on older kernels, or when the
/// environment sets IPCORO_FUTEX_FALLBACK=1, through a fallback with the same behaviour.
/// A timeout is mandatory: a waiter must never depend on a peer that may have died.
/// Throws operation_cancelled when the awaiting task is stopped. `word` must stay mapped
/// until the wait completes.
class [[nodiscard]] futex_wait_operation : public io_operation<futex_wait_operation> {
public:
  futex_wait_operation(std::atomic<std::uint32_t>& word, std::uint32_t expected, futex_scope scope,
                       std::chrono::nanoseconds timeout) noexcept;
  futex_wait_result finish(int res) const;

  template <class P>
  bool await_suspend(std::coroutine_handle<P> h) {
    return start(h, detail::stop_token_of(h));
  }

private:
  /// Through the ring when the kernel has futex ops, otherwise through the fallback.
  bool start(std::coroutine_handle<> waiter, const std::stop_token& token);
  static void prep(detail::op_base& op, ::io_uring_sqe* sqe) noexcept;
  std::atomic<std::uint32_t>* word_;
  std::uint32_t expected_;
  futex_scope scope_;
};

template <class Rep, class Period>
[[nodiscard]] futex_wait_operation futex_wait(std::atomic<std::uint32_t>& word, std::uint32_t expected,
                                              std::chrono::duration<Rep, Period> timeout,
                                              futex_scope scope = futex_scope::shared) noexcept {
  return {word, expected, scope, std::chrono::duration_cast<std::chrono::nanoseconds>(timeout)};
}

/// Wakes up to `count` waiters on `word` (FUTEX_WAKE, a syscall that never blocks) in any
/// process, whether they wait through the ring or through the fallback. Returns the number
/// woken.
int futex_wake(std::atomic<std::uint32_t>& word, int count, futex_scope scope = futex_scope::shared) noexcept;

/// True when futex waits go through the ring; false when the fallback is in use.
bool futex_waits_use_ring() noexcept;

}  // namespace ipcoro
