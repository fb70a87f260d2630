// SPDX-License-Identifier: MIT
// sync_wait's loop driver: runs the io_context until the task is done, unwinding on failure.
#include "ipcoro/sync_wait.hpp"

#include "loop.hpp"

#include <exception>
#include <stdexcept>
#include <stop_token>

namespace ipcoro {

void detail::drive(io_context& ctx, const bool& done, std::stop_source& source) {
  try {
    detail::loop::run_until(ctx, done);
  } catch (...) {
    std::exception_ptr first = std::current_exception();
    source.request_stop();
    // Destroying the task while the kernel may still write into its buffers would be
    // use-after-free: let it unwind through cancellation first.
    while (!done) {
      try {
        detail::loop::run_until(ctx, done);
      } catch (const std::logic_error&) {
        break;  // nothing in flight: the frames are safe to leave
      } catch (...) {
        // another detached failure: keep the first
      }
    }
    std::rethrow_exception(first);
  }
}

detail::drive_scope::drive_scope(io_context& ctx) noexcept : ctx_(ctx) { loop::count_driver(ctx_, 1); }
detail::drive_scope::~drive_scope() { loop::count_driver(ctx_, -1); }

}  // namespace ipcoro
