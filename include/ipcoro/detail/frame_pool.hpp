// SPDX-License-Identifier: MIT
// frame_pool: per-thread recycling of coroutine frames for coroutines that opt in.
#pragma once

#include "ipcoro/export.hpp"

#include <cstddef>
#include <cstdint>
#include <new>

namespace ipcoro::detail {

/// Tag type. A task coroutine whose first parameter (after the object, for a member
/// coroutine) is a `pooled_frame` takes its frame from a small per-thread pool instead of
/// the heap, so a channel's send or receive allocates nothing once the pool is warm. The
/// tag selects the promise type through std::coroutine_traits (see task.hpp).
struct pooled_frame {};

namespace frame_pool {

// Every frame starts with a prefix naming its size class. Small frames (every
// operation's, most channel sends and receives) come in 64-byte steps up to 4 KiB; larger
// ones (a channel of big values keeps the value in its frame) in powers of two up to
// 1 MiB, fewer of each kept, so an idle thread holds little memory.
inline constexpr std::size_t prefix = alignof(std::max_align_t);
inline constexpr std::size_t granule = 64;
inline constexpr std::size_t small_classes = 64;
inline constexpr std::size_t large_classes = 8;  // 8 KiB, 16 KiB ... 1 MiB
inline constexpr std::size_t classes = small_classes + large_classes;
inline constexpr std::size_t small_limit = small_classes * granule;
inline constexpr std::uint32_t not_pooled = 0xffffffff;
inline constexpr std::size_t per_small_class = 16;  // blocks kept per class
inline constexpr std::size_t per_large_class = 4;

constexpr std::size_t block_size(std::size_t size_class) noexcept {
  return size_class < small_classes ? (size_class + 1) * granule
                                    : small_limit << (size_class - small_classes + 1);
}

/// The class of a block of at least `need` bytes, or `classes` when it is too large.
constexpr std::size_t class_of(std::size_t need) noexcept {
  if (need <= small_limit) return need == 0 ? 0 : (need - 1) / granule;
  std::size_t c = small_classes;
  while (c < classes && block_size(c) < need) ++c;
  return c;
}

struct free_block {
  free_block* next;
};

/// A thread's free blocks. Each class has one block in `hot`, in front of its list: the
/// common case, one frame made and freed again and again (a task awaited in a loop, a
/// channel operation per message), then touches one pointer, with no list link and no
/// count to read and write back. A class holds at most its list's limit plus that one.
/// `hot` is last, so that code built against the layout without it still finds the lists.
struct lists {
  free_block* heads[classes];
  std::uint8_t counts[classes];
  free_block* hot[classes];
};

/// The thread's lists (null before first use, and again once the thread is exiting),
/// read by one %fs-relative load: initial-exec TLS, and constinit so no wrapper call is
/// needed (the default model for a shared library calls __tls_get_addr, measured as a
/// fifth of an await's instructions).
struct slot {
  lists* current;
  bool gone;
};
[[gnu::tls_model("initial-exec")]] IPCORO_API extern constinit thread_local slot tls;

/// The slow paths: the first use in a thread, an empty list, a full list, unpooled sizes.
IPCORO_API void* allocate_slow(std::size_t size, bool pooled);
IPCORO_API void deallocate_slow(void* block, std::uint32_t size_class) noexcept;

}  // namespace frame_pool

/// A frame of `size` bytes; from the thread's pool when `pooled`. Both inline: the size is
/// a constant where a coroutine's operator new is called, so the class is folded away.
inline void* allocate_frame(std::size_t size, bool pooled) {
  namespace fp = frame_pool;
  const std::size_t size_class = fp::class_of(size + fp::prefix);
  if (pooled && size_class < fp::classes) {
    if (fp::lists* l = fp::tls.current) {
      if (fp::free_block* b = l->hot[size_class]) {
        l->hot[size_class] = nullptr;
        *reinterpret_cast<std::uint32_t*>(b) = static_cast<std::uint32_t>(size_class);
        return reinterpret_cast<std::byte*>(b) + fp::prefix;
      }
      if (fp::free_block* b = l->heads[size_class]) {
        l->heads[size_class] = b->next;
        --l->counts[size_class];
        *reinterpret_cast<std::uint32_t*>(b) = static_cast<std::uint32_t>(size_class);
        return reinterpret_cast<std::byte*>(b) + fp::prefix;
      }
    }
  }
  return fp::allocate_slow(size, pooled);
}

/// Gives a frame back: a pooled block to the freeing thread's pool (a frame may end on
/// another thread than the one that made it), anything else to the heap.
inline void deallocate_frame(void* frame) noexcept {
  namespace fp = frame_pool;
  std::byte* block = static_cast<std::byte*>(frame) - fp::prefix;
  const std::uint32_t size_class = *reinterpret_cast<const std::uint32_t*>(block);
  if (size_class < fp::small_classes) {
    fp::lists* l = fp::tls.current;
    if (l != nullptr && l->hot[size_class] == nullptr) {
      l->hot[size_class] = reinterpret_cast<fp::free_block*>(block);
      return;
    }
    if (l != nullptr && l->counts[size_class] < fp::per_small_class) {
      auto* b = reinterpret_cast<fp::free_block*>(block);
      b->next = l->heads[size_class];
      l->heads[size_class] = b;
      ++l->counts[size_class];
      return;
    }
  }
  fp::deallocate_slow(block, size_class);
}

/// Blocks the calling thread's pool holds for reuse (for tests).
IPCORO_API std::size_t pooled_frames() noexcept;

}  // namespace ipcoro::detail
