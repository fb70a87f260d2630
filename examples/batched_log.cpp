// SPDX-License-Identifier: MIT
// batched_log: a process ships log records to a collector process over a pipe channel.
// Records sent in one loop turn leave in one write (over a message queue: as one queue
// message, after the turn's first; over a shared-memory ring: published together, after
// the turn's first); flush() says when they are all in the kernel (or the ring), so the
// shipper can report "shipped" only for what a crash could no longer lose.
//
//   shipper --pipe: channel--> collector
//
// The shipper sends bursts of records (one burst per loop turn), flushes after each burst,
// and closes; the collector checks every record's sequence number and text and exits 0
// only when it saw all of them in order, then a clean end.
//
// Usage: batched_log [--records N] [--burst N] [--transport pipe|fifo|mq|shm]
#include <ipcoro/ipcoro.hpp>

#include <fmt/core.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <optional>
#include <string>
#include <string_view>
#include <system_error>

namespace {

using ipcoro::task;

struct config {
  std::uint64_t records = 200'000;
  std::uint64_t burst = 256;
  std::string transport = "pipe";
};

std::string text_of(std::uint64_t seq) { return fmt::format("record {} level={}", seq, seq % 5); }

/// The collector: every record in order, then the end.
task<int> collect(ipcoro::channel_receiver<std::string>& rx, std::uint64_t records) {
  std::uint64_t next = 0;
  while (std::optional<std::string> line = co_await rx.receive()) {
    if (*line != text_of(next)) {
      fmt::print(stderr, "collector: record {} is \"{}\"\n", next, *line);
      co_return 1;
    }
    ++next;
  }
  if (next != records) {
    fmt::print(stderr, "collector: {} records of {}\n", next, records);
    co_return 1;
  }
  co_return 0;
}

/// The shipper: bursts of sends (held by the sender until the end of the loop's turn, then
/// written together), and a flush after each burst: once it returns, the burst is in the
/// pipe and survives this process.
task<void> ship(ipcoro::channel_sender<std::string>& tx, const config& cfg, std::uint64_t& shipped) {
  for (std::uint64_t seq = 0; seq < cfg.records;) {
    const std::uint64_t end = std::min(cfg.records, seq + cfg.burst);
    for (; seq < end; ++seq) {
      std::string line = text_of(seq);  // named: a temporary inside co_await trips GCC 12
      co_await tx.send(std::move(line));
    }
    co_await tx.flush();
    shipped = seq;
  }
}

bool parse(int argc, char** argv, config& cfg) {
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string_view flag = argv[i];
    if (flag == "--records") {
      cfg.records = std::strtoull(argv[i + 1], nullptr, 10);
    } else if (flag == "--burst") {
      cfg.burst = std::strtoull(argv[i + 1], nullptr, 10);
    } else if (flag == "--transport") {
      cfg.transport = argv[i + 1];
    } else {
      return false;
    }
  }
  return argc % 2 == 1 && cfg.burst > 0 &&
         (cfg.transport == "pipe" || cfg.transport == "fifo" || cfg.transport == "mq" ||
          cfg.transport == "shm");
}

}  // namespace

int main(int argc, char** argv) try {
  config cfg;
  if (!parse(argc, argv, cfg)) {
    fmt::print(stderr, "usage: {} [--records N] [--burst N (>0)] [--transport pipe|fifo|mq|shm]\n", argv[0]);
    return 2;
  }
  const std::string address = cfg.transport == "pipe"   ? std::string("pipe:")
                              : cfg.transport == "fifo" ? fmt::format("fifo:/tmp/batched-log-{}", ::getpid())
                              : cfg.transport == "shm"  ? fmt::format("shm:/batched-log-{}", ::getpid())
                                                        : fmt::format("mq:/batched-log-{}", ::getpid());
  ipcoro::channel_link link = ipcoro::channel_link::create(address);
  const pid_t collector = ::fork();
  if (collector < 0) throw std::system_error(errno, std::system_category(), "fork");
  if (collector == 0) {
    ipcoro::io_context ctx;
    ipcoro::channel_receiver<std::string> rx = link.receiver<std::string>();
    link.reset();
    ::_exit(ipcoro::sync_wait(ctx, collect(rx, cfg.records)));
  }
  ipcoro::io_context ctx;
  ipcoro::channel_sender<std::string> tx = link.sender<std::string>();
  link.reset();
  std::uint64_t shipped = 0;
  const auto start = std::chrono::steady_clock::now();
  ipcoro::sync_wait(ctx, ship(tx, cfg, shipped));
  tx.close();
  int status = 0;
  ::waitpid(collector, &status, 0);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  const bool ok = WIFEXITED(status) && WEXITSTATUS(status) == 0 && shipped == cfg.records;
  fmt::print("batched_log: {} records over {} in bursts of {}: {:.2f} M records/s, collector {}\n", shipped,
             cfg.transport, cfg.burst, static_cast<double>(shipped) / seconds / 1e6, ok ? "ok" : "FAILED");
  return ok ? 0 : 1;
} catch (const std::exception& e) {
  fmt::print(stderr, "batched_log: {}\n", e.what());
  return 1;
}
