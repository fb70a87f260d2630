// SPDX-License-Identifier: MIT
// channel_peer: a separate program that speaks channels over inherited descriptors, for
// the tests of process::exec with channels wired in.
//
//   channel_peer send FD COUNT     sends the numbers 0 .. COUNT-1 as std::uint64_t on fd:FD
//   channel_peer double IN OUT     receives std::uint64_t on fd:IN, sends twice each on fd:OUT
#include <ipcoro/channel.hpp>
#include <ipcoro/io_context.hpp>
#include <ipcoro/sync_wait.hpp>
#include <ipcoro/task.hpp>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <optional>
#include <string>
#include <string_view>

namespace {

ipcoro::task<void> send_numbers(std::string out, std::uint64_t count) {
  ipcoro::channel_sender<std::uint64_t> tx = co_await ipcoro::open_sender<std::uint64_t>(out);
  for (std::uint64_t i = 0; i < count; ++i) co_await tx.send(i);
}

ipcoro::task<void> double_numbers(std::string in, std::string out) {
  ipcoro::channel_receiver<std::uint64_t> rx = co_await ipcoro::open_receiver<std::uint64_t>(in);
  ipcoro::channel_sender<std::uint64_t> tx = co_await ipcoro::open_sender<std::uint64_t>(out);
  while (std::optional<std::uint64_t> v = co_await rx.receive()) co_await tx.send(2 * *v);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: channel_peer send FD COUNT | channel_peer double IN OUT\n");
    return 2;
  }
  const std::string_view mode = argv[1];
  try {
    ipcoro::io_context ctx;
    if (mode == "send") {
      ipcoro::sync_wait(ctx, send_numbers(std::string("fd:") + argv[2], std::strtoull(argv[3], nullptr, 10)));
    } else if (mode == "double") {
      ipcoro::sync_wait(ctx, double_numbers(std::string("fd:") + argv[2], std::string("fd:") + argv[3]));
    } else {
      return 2;
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "channel_peer: %s\n", e.what());
    return 1;
  }
  return 0;
}
