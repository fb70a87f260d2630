// SPDX-License-Identifier: MIT
// truncation_guard: the SIGBUS handler, the table of guarded mappings, and the error.
#include "truncation_guard.hpp"

#include <fmt/core.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <mutex>
#include <system_error>

namespace ipcoro::detail {

std::atomic<unsigned> truncation_faults{0};

namespace {

constexpr int guard_slots = 64;

struct guarded_mapping {
  std::atomic<bool> taken{false};
  std::atomic<std::uintptr_t> base{0};  // 0: free; published last, read by the handler
  std::atomic<std::size_t> size{0};
  std::atomic<bool> faulted{false};
  std::string path;  // written before base is published; never read by the handler
};

guarded_mapping table[guard_slots];
struct sigaction previous_action {};
std::uintptr_t page_mask = 0;
std::once_flag installed;

void chain(int sig, siginfo_t* info, void* context) {
  if ((previous_action.sa_flags & SA_SIGINFO) != 0) {
    previous_action.sa_sigaction(sig, info, context);
  } else if (previous_action.sa_handler != SIG_DFL && previous_action.sa_handler != SIG_IGN) {
    previous_action.sa_handler(sig);
  } else {
    // The default action, which a fault cannot ignore: return, fault again, and die of it.
    struct sigaction dfl {};
    dfl.sa_handler = SIG_DFL;
    ::sigemptyset(&dfl.sa_mask);
    ::sigaction(SIGBUS, &dfl, nullptr);
  }
}

void on_sigbus(int sig, siginfo_t* info, void* context) {
  const int saved_errno = errno;
  const auto address = reinterpret_cast<std::uintptr_t>(info->si_addr);
  for (guarded_mapping& g : table) {
    const std::uintptr_t base = g.base.load(std::memory_order_acquire);
    const std::size_t size = g.size.load(std::memory_order_acquire);
    if (base == 0 || address < base || address - base >= size) continue;
    // Pages past the file's end: private zero pages from the faulting page on. The rest of
    // the mapping (still backed, or faulting later) keeps its meaning until then.
    const std::uintptr_t page = address & page_mask;
    void* p = ::mmap(reinterpret_cast<void*>(page), base + size - page, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
    if (p == MAP_FAILED) break;
    g.faulted.store(true, std::memory_order_relaxed);
    truncation_faults.fetch_add(1, std::memory_order_relaxed);
    errno = saved_errno;
    return;
  }
  errno = saved_errno;
  chain(sig, info, context);
}

void install_handler() {
  page_mask = ~(static_cast<std::uintptr_t>(::sysconf(_SC_PAGESIZE)) - 1);
  struct sigaction sa {};
  sa.sa_sigaction = on_sigbus;
  sa.sa_flags = SA_SIGINFO | SA_RESTART;
  ::sigemptyset(&sa.sa_mask);
  ::sigaction(SIGBUS, &sa, &previous_action);
}

}  // namespace

truncation_guard::truncation_guard(std::span<std::byte> mapping, const std::string& path) {
  std::call_once(installed, install_handler);
  for (int i = 0; i < guard_slots; ++i) {
    guarded_mapping& g = table[i];
    bool expected = false;
    if (!g.taken.compare_exchange_strong(expected, true, std::memory_order_acquire)) continue;
    g.path = path;
    g.faulted.store(false, std::memory_order_relaxed);
    g.size.store(mapping.size(), std::memory_order_release);
    g.base.store(reinterpret_cast<std::uintptr_t>(mapping.data()), std::memory_order_release);
    slot_ = i;
    return;
  }
}

truncation_guard::~truncation_guard() {
  if (slot_ < 0) return;
  guarded_mapping& g = table[slot_];
  g.base.store(0, std::memory_order_release);
  g.size.store(0, std::memory_order_release);
  g.taken.store(false, std::memory_order_release);
}

void throw_if_truncated(const void* address) {
  const auto a = reinterpret_cast<std::uintptr_t>(address);
  for (const guarded_mapping& g : table) {
    const std::uintptr_t base = g.base.load(std::memory_order_acquire);
    const std::size_t size = g.size.load(std::memory_order_acquire);
    if (base == 0 || a < base || a - base >= size || !g.faulted.load(std::memory_order_relaxed)) continue;
    struct stat st {};
    const std::string now = ::stat(g.path.c_str(), &st) == 0
                                ? fmt::format("truncated to {} bytes", st.st_size)
                                : std::string("truncated (and its path names it no more)");
    throw std::system_error(
        EBADMSG, std::system_category(),
        fmt::format("the file {} was {} while this process had it mapped ({} bytes): a page past its "
                    "end was touched; the ring in it cannot be used any more (another process truncated "
                    "or replaced the file)",
                    g.path, now, size));
  }
}

}  // namespace ipcoro::detail
