// SPDX-License-Identifier: MIT
// The exceptions ipcoro throws, and the helpers that build them.
#pragma once

#include "ipcoro/export.hpp"

#include <string>
#include <system_error>

namespace ipcoro {

/// Thrown by an awaitable whose operation was cancelled through a std::stop_token, or
/// because its io_context is shutting down. Carries std::errc::operation_canceled.
class IPCORO_API operation_cancelled : public std::system_error {
 public:
  operation_cancelled();
};

/// Thrown by an awaitable whose timeout (`with_timeout`, `with_deadline`) expired first.
/// Carries std::errc::timed_out.
class IPCORO_API timed_out : public std::system_error {
 public:
  timed_out();
};

/// Throws std::system_error for `-res` (a negated errno) with `what` in the message.
IPCORO_API [[noreturn]] void throw_errno(int err, const char* what);
IPCORO_API [[noreturn]] void throw_errno(int err, const std::string& what);

}  // namespace ipcoro
