// SPDX-License-Identifier: MIT
// frame_pool: the slow paths of the per-thread frame pool (the fast ones are inline).
#include "ipcoro/detail/frame_pool.hpp"

namespace ipcoro::detail::frame_pool {
namespace {

static_assert(class_of(1) == 0 && class_of(64) == 0 && class_of(65) == 1 && class_of(4096) == 63);
static_assert(class_of(4097) == 64 && block_size(64) == 8192 && class_of(65536 + 16) == 68);
static_assert(block_size(classes - 1) == std::size_t{1024} * 1024 &&
              class_of(std::size_t{1024} * 1024 + 1) == classes);
static_assert(sizeof(std::uint32_t) <= prefix && sizeof(free_block) <= prefix);

/// How many spare frames a miss puts on its class's list (within the class's limit).
constexpr std::size_t refill = 3;

std::size_t limit_of(std::size_t size_class) noexcept {
  return size_class < small_classes ? per_small_class : per_large_class;
}

/// Owns the thread's lists; its destructor runs at thread exit and frees what they hold.
struct owner {
  lists l{};
  owner() noexcept { tls.current = &l; }
  ~owner() {
    tls.current = nullptr;
    tls.gone = true;
    for (free_block* b : l.hot) ::operator delete(b);
    for (free_block* head : l.heads) {
      while (free_block* b = head) {
        head = b->next;
        ::operator delete(b);
      }
    }
  }
};

lists* lists_of_thread() noexcept {
  if (tls.current != nullptr || tls.gone) return tls.current;
  static thread_local owner o;  // made on the first pooled allocation of the thread
  return tls.current;
}

void* with_header(void* block, std::uint32_t size_class) noexcept {
  *static_cast<std::uint32_t*>(block) = size_class;
  return static_cast<std::byte*>(block) + prefix;
}

}  // namespace

constinit thread_local slot tls{nullptr, false};

void* allocate_slow(std::size_t size, bool pooled) {
  const std::size_t need = size + prefix;
  const std::size_t size_class = class_of(need);
  lists* l = pooled && size_class < classes ? lists_of_thread() : nullptr;
  if (l == nullptr) return with_header(::operator new(need), not_pooled);
  if (free_block* b = l->heads[size_class]) {  // a large class (small ones are inline)
    l->heads[size_class] = b->next;
    --l->counts[size_class];
    return with_header(b, static_cast<std::uint32_t>(size_class));
  }
  // A miss means more frames of this class are alive at once than ever before on this
  // thread: keep a few more ready, so that a later, rarely reached high (one more frame
  // alive for an instant) finds one instead of allocating in the middle of a steady stream.
  const std::size_t block = block_size(size_class);
  for (std::size_t i = 0; i < refill && l->counts[size_class] < limit_of(size_class); ++i) {
    auto* spare = static_cast<free_block*>(::operator new(block));
    spare->next = l->heads[size_class];
    l->heads[size_class] = spare;
    ++l->counts[size_class];
  }
  return with_header(::operator new(block), static_cast<std::uint32_t>(size_class));
}

void deallocate_slow(void* block, std::uint32_t size_class) noexcept {
  if (size_class != not_pooled) {
    lists* l = lists_of_thread();
    if (l != nullptr && l->counts[size_class] < limit_of(size_class)) {
      auto* b = static_cast<free_block*>(block);
      b->next = l->heads[size_class];
      l->heads[size_class] = b;
      ++l->counts[size_class];
      return;
    }
  }
  ::operator delete(block);
}

}  // namespace ipcoro::detail::frame_pool

namespace ipcoro::detail {
std::size_t pooled_frames() noexcept {
  std::size_t total = 0;
  if (const frame_pool::lists* l = frame_pool::tls.current) {
    for (const std::uint8_t n : l->counts) total += n;
    for (const frame_pool::free_block* b : l->hot) total += b != nullptr ? 1 : 0;
  }
  return total;
}
}  // namespace ipcoro::detail
