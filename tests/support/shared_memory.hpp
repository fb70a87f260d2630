// SPDX-License-Identifier: MIT
// shared_memory: anonymous MAP_SHARED memory that a test creates before fork() and its children share.
#pragma once

#include <sys/mman.h>

#include <cerrno>
#include <cstddef>
#include <new>
#include <span>
#include <system_error>

namespace ipcoro::test {

/// Anonymous MAP_SHARED memory: created before fork(), shared with every child, gone with them.
class shared_memory {
 public:
  explicit shared_memory(std::size_t size) : size_(size) {
    void* p = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) throw std::system_error(errno, std::system_category(), "mmap");
    data_ = static_cast<std::byte*>(p);
  }
  ~shared_memory() { ::munmap(data_, size_); }
  shared_memory(const shared_memory&) = delete;
  shared_memory& operator=(const shared_memory&) = delete;
  std::span<std::byte> bytes() const noexcept { return {data_, size_}; }
  template <class T>
  T& at(std::size_t offset) const noexcept {
    return *std::launder(reinterpret_cast<T*>(data_ + offset));
  }

 private:
  std::byte* data_;
  std::size_t size_;
};

}  // namespace ipcoro::test
