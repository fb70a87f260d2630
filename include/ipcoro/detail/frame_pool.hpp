// frame_pool: per-thread recycling of coroutine frames for coroutines that opt in.
#pragma once

#include <cstddef>

namespace ipcoro::detail {

/// Tag type. A task coroutine whose first parameter (after the object, for a member
/// coroutine) is a `pooled_frame` takes its frame from a small per-thread pool instead of
/// the heap, so a channel's send or receive allocates nothing once the pool is warm. The
/// tag selects the promise type through std::coroutine_traits (see task.hpp).
struct pooled_frame {};

/// Every task frame starts with this prefix; it says where the block must go back to.
/// `pooled` frames come from (and return to) the freeing thread's pool.
void* allocate_frame(std::size_t size, bool pooled);
void deallocate_frame(void* frame) noexcept;

/// Blocks the calling thread's pool holds for reuse (for tests).
std::size_t pooled_frames() noexcept;

}  // namespace ipcoro::detail
