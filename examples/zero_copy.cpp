// SPDX-License-Identifier: MIT
// zero_copy: a producer process writes frames straight into a shared-memory ring channel
// (loans) and a consumer process reads them where they lie (views); no frame is copied on
// its way. Both checksum what passes; the consumer verifies the sum, then prints it.
//
// Usage: zero_copy [--frames N] [--frame-size BYTES]. Exits 0 only when the sums agree.
#include <ipcoro/ipcoro.hpp>

#include <fmt/core.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace {

using frame_bytes = std::vector<std::byte>;

/// The header a producer writes in place before each frame's pixels.
struct frame_header {
  std::uint64_t number;
  std::uint64_t pixels;
};

ipcoro::task<std::uint64_t> produce(ipcoro::channel_sender<frame_bytes>& tx, std::uint64_t frames,
                                    std::size_t size) {
  std::uint64_t sum = ipcoro::fnv1a_basis;
  for (std::uint64_t i = 0; i < frames; ++i) {
    // Space in the ring itself: write the frame there, then publish it.
    ipcoro::channel_loan loan = co_await tx.loan(sizeof(frame_header) + size);
    std::span<std::byte> out = loan.bytes();
    const frame_header h{i, size};
    std::memcpy(out.data(), &h, sizeof h);
    for (std::size_t p = 0; p < size; ++p) out[sizeof h + p] = static_cast<std::byte>((i + p) & 0xff);
    sum = ipcoro::fnv1a(out, sum);
    loan.commit();
  }
  co_return sum;
}

ipcoro::task<std::uint64_t> consume(ipcoro::channel_receiver<frame_bytes>& rx, std::uint64_t& frames) {
  std::uint64_t sum = ipcoro::fnv1a_basis;
  // Each view is the frame where the producer wrote it; its room goes back to the
  // producer when the view is released (here: by the next receive_view).
  while (std::optional<ipcoro::channel_view> v = co_await rx.receive_view()) {
    sum = ipcoro::fnv1a(v->bytes(), sum);
    ++frames;
  }
  co_return sum;
}

}  // namespace

int main(int argc, char** argv) {
  std::uint64_t frames = 20000;
  std::size_t size = 60000;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string_view arg = argv[i];
    if (arg == "--frames") frames = std::strtoull(argv[i + 1], nullptr, 10);
    if (arg == "--frame-size") size = ipcoro::parse_size(argv[i + 1]).value_or(size);
  }
  try {
    const std::string address =
        fmt::format("shm:/ipcoro-zero-copy-{}?capacity={}", ::getpid(), 4 * (size + 64) + (1 << 16));
    ipcoro::channel_link link = ipcoro::channel_link::create(address);
    const pid_t producer = ::fork();
    if (producer == 0) {
      int code = 1;
      try {
        ipcoro::io_context ctx;
        ipcoro::channel_sender<frame_bytes> tx = link.sender<frame_bytes>();
        link.reset();
        const std::uint64_t sum = ipcoro::sync_wait(ctx, produce(tx, frames, size));
        tx.close();
        fmt::print("producer: {} frames of {} bytes, sum {:016x}\n", frames, size, sum);
        std::fflush(stdout);
        code = 0;
      } catch (const std::exception& e) {
        fmt::print(stderr, "producer: {}\n", e.what());
      }
      std::_Exit(code);
    }
    ipcoro::io_context ctx;
    ipcoro::channel_receiver<frame_bytes> rx = link.receiver<frame_bytes>();
    link.reset();
    std::uint64_t got = 0;
    const std::uint64_t sum = ipcoro::sync_wait(ctx, consume(rx, got));
    int status = 0;
    ::waitpid(producer, &status, 0);
    fmt::print("consumer: {} frames, sum {:016x}\n", got, sum);
    // The same sum on both sides, computed the same way over the same frames.
    std::uint64_t expected = ipcoro::fnv1a_basis;
    frame_bytes frame(sizeof(frame_header) + size);
    for (std::uint64_t i = 0; i < frames; ++i) {
      const frame_header h{i, size};
      std::memcpy(frame.data(), &h, sizeof h);
      for (std::size_t p = 0; p < size; ++p) frame[sizeof h + p] = static_cast<std::byte>((i + p) & 0xff);
      expected = ipcoro::fnv1a(frame, expected);
    }
    const bool ok = got == frames && sum == expected && WIFEXITED(status) && WEXITSTATUS(status) == 0;
    fmt::print("zero_copy: {}\n", ok ? "verified" : "MISMATCH");
    return ok ? 0 : 1;
  } catch (const std::exception& e) {
    fmt::print(stderr, "zero_copy: {}\n", e.what());
    return 1;
  }
}
