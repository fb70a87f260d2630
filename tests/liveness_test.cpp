// SPDX-License-Identifier: MIT
// The one liveness rule: a process is taken for dead only when that is certain.
#include "ipcoro/shm_ring.hpp"
#include "process.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <unistd.h>
#include <catch2/catch.hpp>

#include <cerrno>
#include <cstddef>
#include <cstdio>
#include <span>
#include <system_error>

namespace {

using ipcoro::test::child_process;

/// Uses up every descriptor this process may still open (after lowering its limit), so
/// that reading /proc fails with EMFILE.
void exhaust_descriptors() {
  ::rlimit limit{};
  ::getrlimit(RLIMIT_NOFILE, &limit);
  limit.rlim_cur = 64;
  if (::setrlimit(RLIMIT_NOFILE, &limit) != 0)
    throw std::system_error(errno, std::system_category(), "setrlimit");
  while (::open("/dev/null", O_RDONLY | O_CLOEXEC) >= 0) {
  }
  if (errno != EMFILE) throw std::system_error(errno, std::system_category(), "open /dev/null");
}

}  // namespace

TEST_CASE("a ring end held by a live process stays its own when /proc cannot be read", "[liveness]") {
  // The attaching process cannot read /proc/<pid>/stat (EMFILE): that tells nothing about
  // the holder, which is alive, so the attach must fail with EBUSY instead of taking over.
  child_process child([] {
    const std::size_t size = ipcoro::spsc_ring_region_size(4096);
    void* p = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return 2;
    const std::span<std::byte> region{static_cast<std::byte*>(p), size};
    ipcoro::format_spsc_ring(region);
    ipcoro::spsc_ring_sender holder(region);
    exhaust_descriptors();
    const ipcoro::test::failure f =
        ipcoro::test::failure_of([&] { ipcoro::spsc_ring_sender second(region); });
    if (f.code != EBUSY) {
      std::fprintf(stderr, "second sender: error %d (%s), expected EBUSY\n", f.code, f.what.c_str());
      return 1;
    }
    return 0;
  });
  CHECK(child.wait() == 0);
}
