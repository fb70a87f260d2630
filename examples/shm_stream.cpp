// SPDX-License-Identifier: MIT
// shm_stream: a producer process streams bytes (1 GiB by default) to a consumer process
// through an SPSC ring in a named shared-memory segment; both sides checksum the stream and
// the consumer verifies it, then prints the throughput. No syscall is made while data flows:
// a side sleeps (a futex wait through io_uring) only when the ring is empty or full.
//
//   parent: creates /ipcoro-shm-stream-<pid>, formats the ring, forks the two sides,
//           removes the segment at the end
//   producer --[ header | 64 KiB messages ... | trailer with checksum ]--> consumer
//
// Usage: shm_stream [--bytes N] [--message-size BYTES] [--ring-size BYTES] [--spin-us US]
// (sizes accept K, M, G suffixes). Exits 0 only when the consumer verified the checksum.
#include <ipcoro/ipcoro.hpp>

#include <fmt/core.h>
#include <sys/resource.h>
#include <unistd.h>

#include <array>
#include <bit>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace {

using ipcoro::task;

struct config {
  std::uint64_t bytes = std::uint64_t{1} << 30;
  std::size_t message_size = 64 * 1024;
  std::size_t ring_size = 4 * 1024 * 1024;
  unsigned spin_us = 0;
};

// The first message says how much follows; the last carries the producer's checksum.
struct stream_header {
  std::uint64_t bytes;
  std::uint64_t message_size;
};
struct stream_trailer {
  std::uint64_t bytes;
  std::uint64_t checksum;
};

/// A fast order-sensitive checksum over 32-byte blocks (four independent lanes, so it runs
/// near memory speed). Fed with whole messages whose sizes are multiples of 32, plus a tail.
class stream_checksum {
 public:
  void update(std::span<const std::byte> data) noexcept {
    std::size_t i = 0;
    for (; i + 32 <= data.size(); i += 32) {
      for (int lane = 0; lane < 4; ++lane) {
        std::uint64_t w;
        std::memcpy(&w, data.data() + i + 8 * lane, 8);
        h_[lane] = std::rotl((h_[lane] ^ w) * 0x9e3779b97f4a7c15ull, 31);
      }
    }
    for (; i < data.size(); ++i) h_[0] = (h_[0] ^ static_cast<std::uint64_t>(data[i])) * 0x100000001b3ull;
    bytes_ += data.size();
  }
  std::uint64_t value() const noexcept {
    return (h_[0] ^ std::rotl(h_[1], 17) ^ std::rotl(h_[2], 34) ^ std::rotl(h_[3], 51)) + bytes_;
  }

 private:
  std::array<std::uint64_t, 4> h_{0x243f6a8885a308d3ull, 0x13198a2e03707344ull, 0xa4093822299f31d0ull,
                                  0x082efa98ec4e6c89ull};
  std::uint64_t bytes_ = 0;
};

// The producer sends slices of a pseudo-random table at shifting offsets: no per-byte
// generation cost, yet every message differs from its neighbours.
std::vector<std::byte> make_table(std::size_t size) {
  std::vector<std::byte> table(size);
  std::uint64_t x = 0x9e3779b97f4a7c15ull;
  for (std::size_t i = 0; i + 8 <= size; i += 8) {
    x ^= x << 13, x ^= x >> 7, x ^= x << 17;
    std::memcpy(table.data() + i, &x, 8);
  }
  return table;
}

double cpu_seconds() {
  rusage ru{};
  ::getrusage(RUSAGE_SELF, &ru);
  return static_cast<double>(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) +
         static_cast<double>(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
}

task<void> produce(std::span<std::byte> region, config cfg) {
  ipcoro::ring_options opts;
  opts.spin = std::chrono::microseconds(cfg.spin_us);
  ipcoro::spsc_ring_sender tx(region, opts);
  const std::vector<std::byte> table = make_table(std::max<std::size_t>(1 << 20, 2 * cfg.message_size));
  const stream_header header{cfg.bytes, cfg.message_size};
  co_await tx.send(std::as_bytes(std::span(&header, 1)));
  stream_checksum sum;
  std::uint64_t sent = 0;
  for (std::uint64_t n = 0; sent < cfg.bytes; ++n) {
    const std::size_t size =
        static_cast<std::size_t>(std::min<std::uint64_t>(cfg.message_size, cfg.bytes - sent));
    const std::size_t offset = (n * 4104) % (table.size() - size + 1) & ~std::size_t{7};
    const auto message = std::span(table).subspan(offset, size);
    sum.update(message);
    co_await tx.send(message);
    sent += size;
  }
  const stream_trailer trailer{sent, sum.value()};
  co_await tx.send(std::as_bytes(std::span(&trailer, 1)));
  tx.close();
  fmt::print("producer: sent {} bytes, checksum {:016x}, {:.2f} s of CPU\n", sent, trailer.checksum,
             cpu_seconds());
}

task<bool> consume(std::span<std::byte> region, config cfg) {
  ipcoro::ring_options opts;
  opts.spin = std::chrono::microseconds(cfg.spin_us);
  ipcoro::spsc_ring_receiver rx(region, opts);
  std::vector<std::byte> buffer(rx.max_message_size());
  const auto t0 = std::chrono::steady_clock::now();

  auto n = co_await rx.receive(buffer).with_timeout(std::chrono::seconds(30));
  stream_header header{};
  if (!n || *n != sizeof header) {
    fmt::print(stderr, "consumer: the stream does not start with its header\n");
    co_return false;
  }
  std::memcpy(&header, buffer.data(), sizeof header);
  stream_checksum sum;
  std::uint64_t received = 0;
  std::uint64_t messages = 0;
  while (received < header.bytes) {
    n = co_await rx.receive(buffer).with_timeout(std::chrono::seconds(30));
    if (!n) {
      fmt::print(stderr, "consumer: the stream ended after {} of {} bytes\n", received, header.bytes);
      co_return false;
    }
    sum.update(std::span(buffer).first(*n));
    received += *n;
    ++messages;
  }
  n = co_await rx.receive(buffer).with_timeout(std::chrono::seconds(30));
  stream_trailer trailer{};
  if (!n || *n != sizeof trailer) {
    fmt::print(stderr, "consumer: no trailer after {} bytes\n", received);
    co_return false;
  }
  std::memcpy(&trailer, buffer.data(), sizeof trailer);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const bool ok =
      trailer.bytes == received && trailer.checksum == sum.value() && !co_await rx.receive(buffer);
  fmt::print("consumer: received {} bytes in {} messages, checksum {:016x} (producer: {:016x}): {}\n",
             received, messages, sum.value(), trailer.checksum, ok ? "verified" : "MISMATCH");
  fmt::print("consumer: {:.2f} s, {:.2f} GB/s ({:.2f} GiB/s), {:.0f} messages/s, {:.2f} s of CPU\n", seconds,
             static_cast<double>(received) / seconds / 1e9,
             static_cast<double>(received) / seconds / double(1 << 30),
             static_cast<double>(messages) / seconds, cpu_seconds());
  co_return ok;
}

std::uint64_t size_flag(std::string_view flag, const char* text) {
  const std::optional<std::uint64_t> v = ipcoro::parse_size(text);
  if (!v) {
    fmt::print(stderr, "{}: expected a size ({}), got '{}'\n", flag, ipcoro::size_forms, text);
    std::exit(2);
  }
  return *v;
}

}  // namespace

int main(int argc, char** argv) try {
  config cfg;
  for (int i = 1; i < argc; ++i) {
    const std::string_view arg = argv[i];
    if (i + 1 < argc && arg == "--bytes")
      cfg.bytes = size_flag(arg, argv[++i]);
    else if (i + 1 < argc && arg == "--message-size")
      cfg.message_size = size_flag(arg, argv[++i]);
    else if (i + 1 < argc && arg == "--ring-size")
      cfg.ring_size = size_flag(arg, argv[++i]);
    else if (i + 1 < argc && arg == "--spin-us")
      cfg.spin_us = static_cast<unsigned>(size_flag(arg, argv[++i]));
    else {
      fmt::print(stderr, "usage: {} [--bytes N] [--message-size BYTES] [--ring-size BYTES] [--spin-us US]\n",
                 argv[0]);
      return 2;
    }
  }
  const std::size_t capacity = std::bit_ceil(std::max<std::size_t>(cfg.ring_size, 4096));
  if (cfg.message_size == 0 || cfg.message_size > capacity / 2 - 8) {
    fmt::print(stderr, "--message-size must be between 1 and {} (half the ring, less 8)\n", capacity / 2 - 8);
    return 2;
  }

  try {
    // The parent owns the name: the segment is removed when it returns, whatever happened.
    const std::string name = fmt::format("/ipcoro-shm-stream-{}", ::getpid());
    const auto layout = ipcoro::spsc_ring_layout(capacity);
    // The ring is formatted before the name appears: no process sees it half made.
    auto segment =
        ipcoro::shm_segment::create(name, layout, {.mode = 0600, .initialize = &ipcoro::format_spsc_ring});
    fmt::print("shm_stream: {} bytes through {} ({} KiB ring, {} KiB messages{})\n", cfg.bytes, name,
               capacity / 1024, cfg.message_size / 1024,
               cfg.spin_us ? fmt::format(", spin {} us", cfg.spin_us) : "");

    // Each side opens the segment by name, as an unrelated program would, on a loop of its own.
    std::array<ipcoro::process, 2> sides;
    sides[0] = ipcoro::process::fork(
        [&] {
          ipcoro::io_context ctx;
          auto s = ipcoro::shm_segment::open(name, layout);
          ipcoro::sync_wait(ctx, produce(s.payload(), cfg));
          return 0;
        },
        {.name = "producer"});
    sides[1] = ipcoro::process::fork(
        [&] {
          ipcoro::io_context ctx;
          auto s = ipcoro::shm_segment::open(name, layout);
          return ipcoro::sync_wait(ctx, consume(s.payload(), cfg)) ? 0 : 1;
        },
        {.name = "consumer"});
    ipcoro::io_context ctx;
    bool ok = true;
    for (ipcoro::process& side : sides) {
      if (!ipcoro::sync_wait(ctx, side.wait()).success()) {
        ok = false;
        fmt::print(stderr, "{}\n", side.describe());
      }
    }
    fmt::print("shm_stream: {}\n", ok ? "verified" : "FAILED");
    return ok ? 0 : 1;
  } catch (const std::exception& e) {
    fmt::print(stderr, "shm_stream: {}\n", e.what());
    return 1;
  }
} catch (const std::exception& e) {
  // Whatever nothing above caught (no io_uring, say): the message and status 1, not an abort.
  fmt::print(stderr, "{}: {}\n", argv[0], e.what());
  return 1;
}
