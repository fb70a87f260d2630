// SPDX-License-Identifier: MIT
// A program that uses ipcoro as any other project would; tests/consumer/run builds it through
// pkg-config, CMake and a Meson subproject, and each build must run and print "ok".
#include <ipcoro/ipcoro.hpp>

#include <array>
#include <cstddef>
#include <cstdio>
#include <cstring>
#include <optional>
#include <span>
#include <string_view>
#include <utility>

namespace {

ipcoro::task<int> produce(ipcoro::channel_sender<int> tx) {
  for (int i = 1; i <= 100; ++i) co_await tx.send(i);
  tx.close();
  co_return 0;
}

ipcoro::task<int> consume(ipcoro::channel_receiver<int> rx) {
  int sum = 0;
  while (std::optional<int> v = co_await rx.receive()) sum += *v;
  co_return sum;
}

// A pipe through the ring, and a channel between two coroutines; returns what it saw.
ipcoro::task<bool> work() {
  ipcoro::pipe_pair pipe = ipcoro::make_pipe();
  constexpr std::string_view message = "hello through the ring";
  co_await pipe.writer.write_all(std::as_bytes(std::span{message}));
  std::array<std::byte, message.size()> got{};
  std::size_t n = co_await pipe.reader.read_exact(got);
  bool pipe_ok = n == message.size() && std::memcmp(got.data(), message.data(), n) == 0;

  ipcoro::channel_pair<int> channel = ipcoro::make_channel<int>(8);
  ipcoro::task<int> producer = produce(std::move(channel.sender));
  ipcoro::task<int> consumer = consume(std::move(channel.receiver));
  auto [sent, sum] = co_await ipcoro::when_all(std::move(producer), std::move(consumer));
  co_return pipe_ok&& sent == 0 && sum == 5050;
}

}  // namespace

int main(int argc, char** argv) {
  // The version the build system reported must be the one of the headers found.
  if (argc > 1 && std::strcmp(argv[1], IPCORO_VERSION_STRING) != 0) {
    std::printf("headers are ipcoro %s, the build system said %s\n", IPCORO_VERSION_STRING, argv[1]);
    return 1;
  }
  ipcoro::io_context ctx;
  bool ok = ipcoro::sync_wait(ctx, work());
  std::printf("%s (ipcoro %s)\n", ok ? "ok" : "FAILED", ipcoro::version_string);
  return ok ? 0 : 1;
}
