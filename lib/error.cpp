// SPDX-License-Identifier: MIT
// ipcoro's exception types and errno helpers.
#include "ipcoro/error.hpp"

#include "ipcoro/unique_fd.hpp"

#include <unistd.h>

namespace ipcoro {

operation_cancelled::operation_cancelled()
    : std::system_error(std::make_error_code(std::errc::operation_canceled), "ipcoro: operation cancelled") {}

timed_out::timed_out()
    : std::system_error(std::make_error_code(std::errc::timed_out), "ipcoro: operation timed out") {}

void throw_errno(int err, const char* what) { throw std::system_error(err, std::system_category(), what); }

void throw_errno(int err, const std::string& what) {
  throw std::system_error(err, std::system_category(), what);
}

void unique_fd::reset(int fd) noexcept {
  if (fd_ >= 0) ::close(fd_);  // even on EINTR the descriptor is gone on Linux
  fd_ = fd;
}

}  // namespace ipcoro
