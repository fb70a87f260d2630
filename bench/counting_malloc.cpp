// SPDX-License-Identifier: MIT
// Counts every malloc-family allocation of the process, so that allocations per message
// include what C code (libzmq's message bodies) takes with malloc, not only operator new.
#include <atomic>
#include <cerrno>
#include <cstddef>
#include <cstdint>

// glibc's own allocator, which these definitions forward to. They replace malloc, calloc,
// realloc, aligned_alloc, memalign and posix_memalign for the program and every library it
// loads (the executable comes first in symbol lookup); operator new (tests/support's
// counting one) calls malloc, so each allocation is counted once. Never built with a
// sanitizer, whose runtime owns malloc.
extern "C" {
void* __libc_malloc(std::size_t size) noexcept;
void* __libc_calloc(std::size_t count, std::size_t size) noexcept;
void* __libc_realloc(void* p, std::size_t size) noexcept;
void* __libc_memalign(std::size_t alignment, std::size_t size) noexcept;
void __libc_free(void* p) noexcept;
}

namespace {
std::atomic<std::uint64_t> count{0};
void note() noexcept { count.fetch_add(1, std::memory_order_relaxed); }
}  // namespace

namespace ipcoro::bench {
/// malloc-family allocations so far in this process (operator new included).
std::uint64_t malloc_count() noexcept { return count.load(std::memory_order_relaxed); }
}  // namespace ipcoro::bench

extern "C" {
void* malloc(std::size_t size) noexcept {
  note();
  return __libc_malloc(size);
}
void* calloc(std::size_t n, std::size_t size) noexcept {
  note();
  return __libc_calloc(n, size);
}
// A realloc that keeps its block allocates nothing; one that moves it (or starts from
// null) does.
void* realloc(void* p, std::size_t size) noexcept {
  void* q = __libc_realloc(p, size);
  if (q != nullptr && q != p) note();
  return q;
}
void free(void* p) noexcept { __libc_free(p); }
void* aligned_alloc(std::size_t alignment, std::size_t size) noexcept {
  note();
  return __libc_memalign(alignment, size);
}
void* memalign(std::size_t alignment, std::size_t size) noexcept {
  note();
  return __libc_memalign(alignment, size);
}
int posix_memalign(void** out, std::size_t alignment, std::size_t size) noexcept {
  if (alignment % sizeof(void*) != 0 || (alignment & (alignment - 1)) != 0) return EINVAL;
  void* p = __libc_memalign(alignment, size);
  if (p == nullptr) return ENOMEM;
  note();
  *out = p;
  return 0;
}
}
