// SPDX-License-Identifier: MIT
// lent_pages: staging memory lent to a pipe with vmsplice, reused once the reader has read it.
#include "page_lending.hpp"

#include <fcntl.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>

namespace ipcoro::detail {

namespace {
constexpr std::size_t page = 4096;
}

lent_pages::~lent_pages() {
  // The pipe keeps its own reference to each page still in it: unmapping is safe.
  if (base_ != nullptr) ::munmap(base_, arena_size);
}

bool lent_pages::in_use(std::size_t at, std::size_t n) const noexcept {
  for (std::size_t i = 0; i < count_; ++i) {
    const region& r = regions_[(first_ + i) % regions_.size()];
    if (r.put > read_ && r.begin < at + n && at < r.end) return true;
  }
  return false;
}

std::span<std::byte> lent_pages::claim(int fd, std::size_t n, std::uint64_t put) noexcept {
  if (n < min_frame || n > max_frame || failed_) return {};
  if (base_ == nullptr) {
    void* p = ::mmap(nullptr, arena_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
      failed_ = true;
      return {};
    }
    base_ = static_cast<std::byte*>(p);
  }
  const std::size_t at = next_ + n <= arena_size ? next_ : 0;
  if (in_use(at, n)) {
    int unread = 0;
    if (::ioctl(fd, FIONREAD, &unread) != 0 || unread < 0) return {};
    const auto u = static_cast<std::uint64_t>(unread);
    read_ = std::max(read_, put > u ? put - u : 0);
    if (in_use(at, n)) return {};
  }
  while (count_ > 0 && regions_[first_].put <= read_) {
    first_ = (first_ + 1) % regions_.size();
    --count_;
  }
  if (count_ == regions_.size()) return {};
  at_ = at;
  n_ = n;
  next_ = (at + n + page - 1) / page * page;
  return {base_ + at, n};
}

ssize_t lent_pages::lend(int fd, std::size_t from) noexcept {
  ::iovec iov{base_ + at_ + from, n_ - from};
  for (;;) {
    const ssize_t r = ::vmsplice(fd, &iov, 1, SPLICE_F_NONBLOCK);
    if (r >= 0) return r;
    if (errno == EINTR) continue;
    if (errno == EAGAIN) return 0;
    return -errno;
  }
}

void lent_pages::settle(std::size_t lent, std::uint64_t put) noexcept {
  if (lent == 0) return;
  regions_[(first_ + count_) % regions_.size()] = region{at_, at_ + lent, put};
  ++count_;
}

}  // namespace ipcoro::detail
