// SPDX-License-Identifier: MIT
// An owned file descriptor that closes itself.
#pragma once

#include "ipcoro/export.hpp"

#include <utility>

namespace ipcoro {

/// Owns one file descriptor and closes it on destruction. Move-only.
class IPCORO_API unique_fd {
 public:
  unique_fd() noexcept = default;
  explicit unique_fd(int fd) noexcept : fd_(fd) {}
  unique_fd(unique_fd&& other) noexcept : fd_(std::exchange(other.fd_, -1)) {}
  unique_fd& operator=(unique_fd&& other) noexcept {
    if (this != &other) reset(std::exchange(other.fd_, -1));
    return *this;
  }
  unique_fd(const unique_fd&) = delete;
  unique_fd& operator=(const unique_fd&) = delete;
  ~unique_fd() { reset(); }

  int get() const noexcept { return fd_; }
  explicit operator bool() const noexcept { return fd_ >= 0; }
  /// Gives up ownership without closing.
  int release() noexcept { return std::exchange(fd_, -1); }
  /// Closes the current descriptor (errors are ignored: the descriptor is gone either way).
  void reset(int fd = -1) noexcept;

 private:
  int fd_ = -1;
};

}  // namespace ipcoro
