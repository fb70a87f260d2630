// SPDX-License-Identifier: MIT
// Reading one number from a /proc/sys file, for limits named in error messages.
#pragma once

namespace ipcoro::detail {

/// The first number in `path` (a /proc/sys value: they follow the caller's namespaces), or
/// -1 when the file cannot be read or holds no number (an older kernel).
long read_proc_long(const char* path) noexcept;

}  // namespace ipcoro::detail
