// SPDX-License-Identifier: MIT
// ignore_sigpipe: a write to a pipe or FIFO without reader fails with EPIPE instead of killing.
#pragma once

#include "ipcoro/export.hpp"

namespace ipcoro {

/// Makes sure a write to a pipe without reader fails with EPIPE instead of killing the
/// process: sets SIGPIPE to SIG_IGN if it still has its default action (a handler the
/// program installed is left alone). Called by io_context and make_pipe; idempotent.
IPCORO_API void ignore_sigpipe() noexcept;

}  // namespace ipcoro
