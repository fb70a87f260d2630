// SPDX-License-Identifier: MIT
// large_frames: a producer process streams 64 KiB frames, a plain trivially copyable struct,
// to a consumer process over a pipe: or fifo: link, with ordinary send() and receive().
// Nothing here asks for it, but each frame is copied once on each side: the sender lends
// the frame's pages to the pipe (vmsplice) instead of copying them in, and the receiver
// reads the frame from the pipe straight into the value receive() returns. The consumer
// checks every byte of every frame against what the producer made, and prints the rate.
//
// Usage: large_frames [--transport pipe|fifo] [--frames N]. Exits 0 only when every frame
// came, intact and in order.
#include <ipcoro/ipcoro.hpp>

#include <fmt/core.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>

namespace {

/// One frame: a number and its pixels, 64 KiB in all. Trivially copyable, so its
/// encoding on the wire is its bytes.
struct frame {
  std::uint64_t number;
  std::array<std::byte, 65536 - sizeof(std::uint64_t)> pixels;
};

void fill(frame& f, std::uint64_t i) {
  f.number = i;
  std::memset(f.pixels.data(), static_cast<int>(i & 0xff), f.pixels.size());
  f.pixels[i % f.pixels.size()] = std::byte{0x5a};  // one byte that moves from frame to frame
}

ipcoro::task<void> produce(ipcoro::channel_sender<frame>& tx, std::uint64_t frames) {
  frame f{};
  for (std::uint64_t i = 0; i < frames; ++i) {
    fill(f, i);
    co_await tx.send(f);  // an lvalue is referred to until the send completes
  }
}

/// Receives frames until the end; each must be the next one the producer made.
ipcoro::task<std::uint64_t> consume(ipcoro::channel_receiver<frame>& rx) {
  std::uint64_t got = 0;
  frame expected{};
  while (std::optional<frame> f = co_await rx.receive()) {
    fill(expected, got);
    if (std::memcmp(&*f, &expected, sizeof(frame)) != 0)
      throw std::runtime_error(fmt::format("frame {} came changed (its number says {})", got, f->number));
    ++got;
  }
  co_return got;
}

}  // namespace

int main(int argc, char** argv) {
  std::uint64_t frames = 20000;
  std::string transport = "pipe";
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string_view arg = argv[i];
    if (arg == "--frames") frames = std::strtoull(argv[i + 1], nullptr, 10);
    if (arg == "--transport") transport = argv[i + 1];
  }
  if (transport != "pipe" && transport != "fifo") {
    fmt::print(stderr, "large_frames: --transport {}: use pipe or fifo\n", transport);
    return 2;
  }
  try {
    const std::string address =
        transport == "pipe" ? "pipe:" : fmt::format("fifo:/tmp/ipcoro-large-frames-{}", ::getpid());
    ipcoro::channel_link link = ipcoro::channel_link::create(address);
    const pid_t producer = ::fork();
    if (producer == 0) {
      int code = 1;
      try {
        ipcoro::io_context ctx;
        ipcoro::channel_sender<frame> tx = link.sender<frame>();
        link.reset();
        ipcoro::sync_wait(ctx, produce(tx, frames));
        tx.close();
        fmt::print("producer: {} frames of {} bytes\n", frames, sizeof(frame));
        std::fflush(stdout);
        code = 0;
      } catch (const std::exception& e) {
        fmt::print(stderr, "producer: {}\n", e.what());
      }
      std::_Exit(code);
    }
    ipcoro::io_context ctx;
    ipcoro::channel_receiver<frame> rx = link.receiver<frame>();
    link.reset();
    const auto start = std::chrono::steady_clock::now();
    const std::uint64_t got = ipcoro::sync_wait(ctx, consume(rx));
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    int status = 0;
    ::waitpid(producer, &status, 0);
    fmt::print("consumer: {} frames intact; {:.0f} frames/s, {:.2f} GB/s\n", got, got / seconds,
               static_cast<double>(got * sizeof(frame)) / seconds / 1e9);
    const bool ok = got == frames && WIFEXITED(status) && WEXITSTATUS(status) == 0;
    fmt::print("large_frames: {}\n", ok ? "verified" : "MISMATCH");
    return ok ? 0 : 1;
  } catch (const std::exception& e) {
    fmt::print(stderr, "large_frames: {}\n", e.what());
    return 1;
  }
}
