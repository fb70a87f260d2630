// frame_pool: size-classed free lists of coroutine frames, one set per thread.
#include "ipcoro/detail/frame_pool.hpp"

#include <array>
#include <cstdint>
#include <new>

namespace ipcoro::detail {
namespace {

constexpr std::size_t prefix = alignof(std::max_align_t);
constexpr std::size_t granule = 64;
constexpr std::size_t classes = 64;  // frames up to 4 KiB are pooled
constexpr std::size_t per_class = 16;
constexpr std::uint32_t not_pooled = 0xffffffff;

struct block_header {
  std::uint32_t size_class;
};
static_assert(sizeof(block_header) <= prefix);

struct free_block {
  free_block* next;
};

class pool {
 public:
  pool() noexcept { alive = true; }
  pool(const pool&) = delete;
  pool& operator=(const pool&) = delete;
  ~pool() {
    alive = false;
    for (std::size_t c = 0; c < classes; ++c) {
      while (free_block* b = heads_[c]) {
        heads_[c] = b->next;
        ::operator delete(b);
      }
    }
  }

  void* take(std::size_t size_class) noexcept {
    free_block* b = heads_[size_class];
    if (b == nullptr) return nullptr;
    heads_[size_class] = b->next;
    --counts_[size_class];
    --total_;
    return b;
  }

  bool give(std::size_t size_class, void* block) noexcept {
    if (counts_[size_class] == per_class) return false;
    auto* b = static_cast<free_block*>(block);
    b->next = heads_[size_class];
    heads_[size_class] = b;
    ++counts_[size_class];
    ++total_;
    return true;
  }

  std::size_t total() const noexcept { return total_; }

  // Trivially destructible, so it can still be read while thread-local destructors run.
  static thread_local bool alive;

 private:
  std::array<free_block*, classes> heads_{};
  std::array<std::uint8_t, classes> counts_{};
  std::size_t total_ = 0;
};

thread_local bool pool::alive = false;
thread_local pool frames;

void* with_header(void* block, std::uint32_t size_class) noexcept {
  static_cast<block_header*>(block)->size_class = size_class;
  return static_cast<std::byte*>(block) + prefix;
}

}  // namespace

void* allocate_frame(std::size_t size, bool pooled) {
  const std::size_t need = size + prefix;
  const std::size_t size_class = (need + granule - 1) / granule - 1;
  if (!pooled || size_class >= classes) return with_header(::operator new(need), not_pooled);
  pool& p = frames;  // constructs the pool on first use in this thread
  if (void* block = p.take(size_class)) return with_header(block, static_cast<std::uint32_t>(size_class));
  return with_header(::operator new((size_class + 1) * granule), static_cast<std::uint32_t>(size_class));
}

void deallocate_frame(void* frame) noexcept {
  void* block = static_cast<std::byte*>(frame) - prefix;
  const std::uint32_t size_class = static_cast<block_header*>(block)->size_class;
  if (size_class != not_pooled && pool::alive && frames.give(size_class, block)) return;
  ::operator delete(block);
}

std::size_t pooled_frames() noexcept { return pool::alive ? frames.total() : 0; }

}  // namespace ipcoro::detail
