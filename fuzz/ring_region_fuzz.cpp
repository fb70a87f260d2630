// SPDX-License-Identifier: MIT
// Fuzzes region and ring header validation on open and attach: a file, a shm segment or a
// ring region holding the input (or a valid ring with the input's bytes written over it)
// is opened and attached to; that must succeed or fail with std::system_error, and a ring
// endpoint on it must send and receive or fail the same way, never crash or read outside.
//
// Input: one byte choosing the case, then the bytes. Bits 0-1 of the case: 0 a file opened
// with mapped_file::open, 1 a segment opened with shm_segment::open, 2 a bare ring region
// holding the bytes, 3 a valid ring (three messages sent) whose bytes are then patched,
// the bytes being patches of {16-bit offset, length byte, bytes}. Bit 2: MPMC instead of
// SPSC. Bit 3: attach a sender instead of a receiver.
#include "fuzz_support.hpp"

#include "ipcoro/error.hpp"
#include "ipcoro/mapped_file.hpp"
#include "ipcoro/shm_ring.hpp"
#include "ipcoro/shm_segment.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <span>
#include <string>
#include <system_error>
#include <vector>

namespace {

using namespace std::chrono_literals;

constexpr std::size_t bare_region_size = ipcoro::ring_header_size + 8192;

ipcoro::ring_options quick() {
  ipcoro::ring_options o;
  o.spin = 0ns;
  return o;
}

/// Sends and receives a few messages without waiting; every failure must be a system_error.
template <class Endpoint, bool Sender>
ipcoro::task<void> exercise(Endpoint& end) {
  std::vector<std::byte> buf(std::min<std::size_t>(end.max_message_size(), 1 << 16));
  for (int i = 0; i < 8; ++i) {
    if constexpr (Sender) {
      const std::span<const std::byte> m{buf.data(), std::min<std::size_t>(buf.size(), 5 + i * 300)};
      co_await end.send(m).with_timeout(0ns);
    } else {
      std::optional<std::size_t> n = co_await end.receive(buf).with_timeout(0ns);
      if (!n) break;
      if (*n > buf.size()) std::abort();
    }
  }
}

template <class Endpoint, bool Sender>
ipcoro::task<void> attach_and_exercise(std::span<std::byte> region) {
  Endpoint end(region, quick());
  co_await exercise<Endpoint, Sender>(end);
}

void attach(std::span<std::byte> region, bool mpmc, bool sender) {
  try {
    if (mpmc) {
      if (sender)
        ipcoro::fuzz::run(attach_and_exercise<ipcoro::mpmc_ring_sender, true>(region));
      else
        ipcoro::fuzz::run(attach_and_exercise<ipcoro::mpmc_ring_receiver, false>(region));
    } else {
      if (sender)
        ipcoro::fuzz::run(attach_and_exercise<ipcoro::spsc_ring_sender, true>(region));
      else
        ipcoro::fuzz::run(attach_and_exercise<ipcoro::spsc_ring_receiver, false>(region));
    }
  } catch (const std::system_error&) {
  }
}

void write_file(const std::string& path, std::span<const std::uint8_t> bytes) {
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  if (fd < 0) std::abort();
  for (std::size_t done = 0; done < bytes.size();) {
    const ssize_t n = ::write(fd, bytes.data() + done, bytes.size() - done);
    if (n <= 0) std::abort();
    done += static_cast<std::size_t>(n);
  }
  ::close(fd);
}

struct unlink_at_exit {
  std::string path;
  ~unlink_at_exit() { ::unlink(path.c_str()); }
};

struct aligned_region {
  struct free_it {
    void operator()(std::byte* p) const noexcept { std::free(p); }
  };
  std::unique_ptr<std::byte, free_it> p{static_cast<std::byte*>(std::aligned_alloc(64, bare_region_size))};
  std::span<std::byte> span() { return {p.get(), bare_region_size}; }
};

ipcoro::task<void> send_three(std::span<std::byte> region, bool mpmc) {
  const char text[] = "hello, ring";
  const auto m = std::as_bytes(std::span{text});
  if (mpmc) {
    ipcoro::mpmc_ring_sender tx(region, quick());
    for (int i = 0; i < 3; ++i) co_await tx.send(m);
    tx.detach();
  } else {
    ipcoro::spsc_ring_sender tx(region, quick());
    for (int i = 0; i < 3; ++i) co_await tx.send(m);
    tx.detach();
  }
}

void patch(std::span<std::byte> region, std::span<const std::uint8_t> patches) {
  while (patches.size() >= 3) {
    const std::size_t offset = (patches[0] | std::size_t{patches[1]} << 8) % region.size();
    const std::size_t n = std::min<std::size_t>({patches[2], patches.size() - 3, region.size() - offset});
    std::memcpy(region.data() + offset, patches.data() + 3, n);
    patches = patches.subspan(3 + n);
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size < 1) return -1;
  const unsigned which = data[0];
  const bool mpmc = (which & 4) != 0;
  const bool sender = (which & 8) != 0;
  const std::span<const std::uint8_t> bytes{data + 1, size - 1};
  const ipcoro::region_layout expected{mpmc ? ipcoro::mpmc_ring_type_tag : ipcoro::spsc_ring_type_tag,
                                       ipcoro::ring_layout_version, 0};
  switch (which & 3) {
    case 0: {
      const unlink_at_exit file{"/dev/shm/" + ipcoro::fuzz::unique_name("file")};
      write_file(file.path, bytes);
      try {
        ipcoro::mapped_file f = ipcoro::mapped_file::open(file.path, expected);
        attach(f.payload(), mpmc, sender);
      } catch (const std::system_error&) {
      }
      break;
    }
    case 1: {
      const std::string name = ipcoro::fuzz::unique_name("segment");
      const unlink_at_exit file{"/dev/shm/" + name};
      write_file(file.path, bytes);
      try {
        ipcoro::shm_segment s = ipcoro::shm_segment::open("/" + name, expected);
        attach(s.payload(), mpmc, sender);
      } catch (const std::system_error&) {
      }
      break;
    }
    case 2: {
      aligned_region r;
      std::memset(r.p.get(), 0, bare_region_size);
      std::memcpy(r.p.get(), bytes.data(), std::min(bytes.size(), bare_region_size));
      attach(r.span(), mpmc, sender);
      break;
    }
    case 3: {
      aligned_region r;
      std::memset(r.p.get(), 0, bare_region_size);
      if (mpmc)
        ipcoro::format_mpmc_ring(r.span(), 64);
      else
        ipcoro::format_spsc_ring(r.span());
      ipcoro::fuzz::run(send_three(r.span(), mpmc));
      patch(r.span(), bytes);
      attach(r.span(), mpmc, sender);
      break;
    }
  }
  return 0;
}
