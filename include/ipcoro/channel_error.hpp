// SPDX-License-Identifier: MIT
// The errors a channel reports: channel_error and what derives from it.
#pragma once

#include "ipcoro/export.hpp"

#include <string>
#include <system_error>

namespace ipcoro {

/// Base of the errors a channel reports; the message names the channel's address, and
/// code() keeps the error below it: the errno of the system call that failed, EPIPE for a
/// closed channel, ECONNRESET for a sender that left without closing, EPROTO or EBADMSG
/// for a peer that does not speak the channel protocol, EMSGSIZE for a message too large.
class IPCORO_API channel_error : public std::system_error {
 public:
  channel_error(std::error_code code, const std::string& what) : std::system_error(code, what) {}
  /// `errno_value` in std::system_category().
  channel_error(int errno_value, const std::string& what)
      : std::system_error(errno_value, std::system_category(), what) {}
};

/// A send on a channel whose receiver has gone, or that was closed (EPIPE by default).
class IPCORO_API channel_closed : public channel_error {
 public:
  explicit channel_closed(const std::string& what) : channel_error(EPIPE, what) {}
  using channel_error::channel_error;
};

/// The peer speaks another type (or another codec version) than this end expects (EPROTO).
class IPCORO_API channel_type_mismatch : public channel_error {
 public:
  explicit channel_type_mismatch(const std::string& what) : channel_error(EPROTO, what) {}
};

}  // namespace ipcoro
