// SPDX-License-Identifier: MIT
// truncation_guard: a SIGBUS from a truncated file mapping becomes an error of the operation.
#pragma once

#include <atomic>
#include <cstddef>
#include <span>
#include <string>

namespace ipcoro::detail {

/// How many faults in guarded mappings this process has absorbed (almost always 0): the
/// rings read it after each operation, one relaxed load.
extern std::atomic<unsigned> truncation_faults;

/// Guards one MAP_SHARED file mapping against truncation of its file. A process-wide
/// SIGBUS handler (installed with the first guard, chaining to the handler it replaces)
/// looks up the faulting address; inside a guarded mapping it maps private zero pages over
/// the rest of the mapping (mmap MAP_FIXED, one syscall: no lock, no allocation, nothing
/// but async-signal-safe work), marks the mapping, and returns, so the faulting access is
/// retried and reads zeros. The code that touched the page then learns of it through
/// throw_if_truncated(). Faults elsewhere go to the previous handler (by default: the
/// process dies of SIGBUS, as before). At most 64 mappings are guarded at a time; a guard
/// made beyond that guards nothing. Move-only.
class __attribute__((visibility("hidden"))) truncation_guard {
 public:
  truncation_guard() noexcept = default;
  /// Guards `mapping`, the whole mapping of the file at `path` (for the error message).
  truncation_guard(std::span<std::byte> mapping, const std::string& path);
  truncation_guard(truncation_guard&& other) noexcept : slot_(other.slot_) { other.slot_ = -1; }
  truncation_guard& operator=(truncation_guard&&) = delete;
  truncation_guard(const truncation_guard&) = delete;
  ~truncation_guard();

 private:
  int slot_ = -1;
};

/// Throws std::system_error(EBADMSG) saying that the file behind `address` was truncated,
/// to what size, and which mapping size it needed, when `address` lies in a guarded
/// mapping that faulted. Does nothing otherwise.
void throw_if_truncated(const void* address);

}  // namespace ipcoro::detail
