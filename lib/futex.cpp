// Futex waits through the ring and futex wakes.
#include "ipcoro/futex.hpp"

#include "ipcoro/error.hpp"
#include "ipcoro/io_context.hpp"
#include "uring/prep.hpp"

#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <cstdlib>
#include <cstring>

namespace ipcoro {

namespace {
std::uint32_t futex2_flags(futex_scope scope) noexcept {
  return uring::futex2_size_u32 | (scope == futex_scope::process_private ? uring::futex2_private : 0u);
}
}  // namespace

bool futex_waits_use_ring() noexcept {
  static const bool forced_fallback = [] {
    const char* v = std::getenv("IPCORO_FUTEX_FALLBACK");
    return v != nullptr && std::strcmp(v, "0") != 0 && *v != '\0';
  }();
  if (forced_fallback) return false;
  io_context* ctx = io_context::current_or_null();
  return ctx != nullptr && ctx->features().futex;
}

futex_wait_operation::futex_wait_operation(std::atomic<std::uint32_t>& word, std::uint32_t expected,
                                           futex_scope scope, std::chrono::nanoseconds timeout) noexcept
    : io_operation(&prep), word_(&word), expected_(expected), scope_(scope) {
  timeout_is_result_ = true;
  set_timeout(timeout.count());
}

bool futex_wait_operation::start(std::coroutine_handle<> waiter, const std::stop_token& token) {
  if (futex_waits_use_ring()) return begin(waiter, token);
  throw std::system_error(ENOSYS, std::system_category(),
                          "futex wait: this kernel has no IORING_OP_FUTEX_WAIT (Linux 6.7) and the "
                          "fallback is not built yet");
}

void futex_wait_operation::prep(detail::op_base& op, ::io_uring_sqe* sqe) noexcept {
  auto& self = static_cast<futex_wait_operation&>(op);
  static_assert(sizeof(std::atomic<std::uint32_t>) == sizeof(std::uint32_t));
  uring::prep_futex_wait(sqe, reinterpret_cast<std::uint32_t*>(self.word_), self.expected_,
                         uring::futex_bitset_match_any, futex2_flags(self.scope_));
}

futex_wait_result futex_wait_operation::finish(int res) const {
  if (res >= 0) return futex_wait_result::woken;
  if (res == -EAGAIN) return futex_wait_result::value_changed;
  if (res == -ETIMEDOUT) return futex_wait_result::timed_out;
  throw_errno(-res, "futex wait");
}

int futex_wake(std::atomic<std::uint32_t>& word, int count, futex_scope scope) noexcept {
  const int op = FUTEX_WAKE | (scope == futex_scope::process_private ? FUTEX_PRIVATE_FLAG : 0);
  const long n = ::syscall(SYS_futex, reinterpret_cast<std::uint32_t*>(&word), op, count, nullptr, nullptr, 0);
  return n < 0 ? 0 : static_cast<int>(n);
}

}  // namespace ipcoro
