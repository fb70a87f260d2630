// SPDX-License-Identifier: MIT
// waitid_operation: IORING_OP_WAITID on a pidfd, for process waits (the operations layer's own).
#pragma once

#include "ipcoro/io_operation.hpp"

#include <signal.h>

namespace ipcoro::detail {

/// IORING_OP_WAITID (Linux 6.7) with WNOWAIT: completes when the child behind `pidfd` has
/// exited, but leaves the reaping to the caller. So a cancellation that races with the
/// exit can never swallow a status, and several waits on one child all see it. Completes
/// with the CQE's result (0, or -errno).
class [[nodiscard]] waitid_operation : public io_operation<waitid_operation> {
 public:
  explicit waitid_operation(int pidfd) noexcept : io_operation(&prep), pidfd_(pidfd) {}
  int finish(int res) const noexcept { return res; }

 private:
  static void prep(op_base& op, ::io_uring_sqe* sqe) noexcept;
  siginfo_t info_{};
  int pidfd_;
};

}  // namespace ipcoro::detail
