// SPDX-License-Identifier: MIT
// The error io_context throws when io_uring_setup fails: it names the cause and the fix.
#pragma once

namespace ipcoro::detail {

/// Throws std::system_error for `err` (a positive errno from io_uring_setup), saying what to
/// change: the kernel version, kernel.io_uring_disabled (per value), a seccomp policy, or
/// RLIMIT_MEMLOCK.
[[noreturn]] void throw_io_uring_setup_error(int err);

}  // namespace ipcoro::detail
