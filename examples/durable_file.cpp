// SPDX-License-Identifier: MIT
// durable_file: a persistent queue in a file (file:/path?durable=1) whose consumer is killed
// with SIGKILL at random moments and restarted, many times, while one producer goes on.
//
// The consumer acknowledges what it has handled (channel_receiver::ack) every few messages.
// A restarted consumer resumes right after the last acknowledged message: what it had
// received but not acknowledged comes again, nothing acknowledged comes again, and nothing
// is lost. The producer never sees the crashes: its sends wait while the file is full and
// no consumer runs, and go on once the next consumer acknowledges.
//
// The supervisor checks that promise. Around each ack() the consumer notes, in memory it
// shares with the supervisor, the value it is about to acknowledge ("pending") and, once
// ack() returned, the value acknowledged ("acked"). A kill can fall between the two, so
// the next consumer must start at acked + 1 (the ack did not happen) or pending + 1 (it
// did): anything else is a lost or repeated message. Within one consumer, every value must
// follow the one before it.
//
//   durable_file [--messages N] [--restarts K] [--max-delay-us D] [--seed S] [--path P]
#include <ipcoro/channel.hpp>
#include <ipcoro/io_context.hpp>
#include <ipcoro/process.hpp>
#include <ipcoro/sync_wait.hpp>
#include <ipcoro/task.hpp>
#include <ipcoro/timer.hpp>

#include <fmt/core.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>
#include <CLI/CLI.hpp>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <exception>
#include <filesystem>
#include <new>
#include <optional>
#include <random>
#include <string>

namespace {

using ipcoro::task;

/// What the consumers and the supervisor share (an anonymous MAP_SHARED mapping).
struct ledger {
  std::atomic<std::int64_t> pending{-1};  // the value the consumer is about to acknowledge
  std::atomic<std::int64_t> acked{-1};    // the value it acknowledged last
  std::atomic<std::int64_t> first{-1};    // the first value this consumer received
  std::atomic<std::int64_t> last{-1};     // the last value it received
  std::atomic<std::int64_t> out_of_order{0};
  std::atomic<bool> ended{false};  // a consumer saw the end of the stream
};

task<void> produce(std::string address, std::int64_t messages) {
  ipcoro::channel_sender<std::int64_t> tx = co_await ipcoro::open_sender<std::int64_t>(address);
  for (std::int64_t i = 0; i < messages; ++i) co_await tx.send(i);
  tx.close();  // the end of the stream stays in the file for whichever consumer comes
}

task<void> consume(std::string address, ledger& book, std::uint64_t seed) {
  std::mt19937_64 random(seed);
  std::uniform_int_distribution<int> batch(1, 16);
  ipcoro::channel_receiver<std::int64_t> rx = co_await ipcoro::open_receiver<std::int64_t>(address);
  int until_ack = batch(random);
  for (;;) {
    const std::optional<std::int64_t> v = co_await rx.receive();
    if (!v) break;
    if (book.first == -1) {
      // Where the file resumed is what is acknowledged now, whatever the ledger said.
      book.first = *v;
      book.acked = *v - 1;
      book.pending = *v - 1;
    } else if (*v != book.last + 1) {
      ++book.out_of_order;
    }
    book.last = *v;
    if (--until_ack == 0) {
      book.pending = *v;
      rx.ack();
      book.acked = *v;
      until_ack = batch(random);
    }
  }
  book.pending = book.last.load();
  rx.ack();
  book.acked = book.last.load();
  book.ended = true;
}

task<int> supervise(const std::string& address, std::int64_t messages, int restarts, int max_delay_us,
                    std::uint64_t seed, ledger& book) {
  std::mt19937_64 random(seed);
  std::uniform_int_distribution<int> delay_us(0, max_delay_us);
  const auto start_consumer = [&](std::uint64_t consumer_seed) {
    book.first = -1;
    return ipcoro::process::fork(
        [&address, &book, consumer_seed] {
          ipcoro::io_context ctx;
          ipcoro::sync_wait(ctx, consume(address, book, consumer_seed));
          return 0;
        },
        {.name = "consumer"});
  };

  // The first consumer creates the file; the producer opens it.
  { ipcoro::channel_receiver<std::int64_t> creator = co_await ipcoro::open_receiver<std::int64_t>(address); }
  ipcoro::process producer = ipcoro::process::fork(
      [&address, messages] {
        ipcoro::io_context ctx;
        ipcoro::sync_wait(ctx, produce(address, messages));
        return 0;
      },
      {.name = "producer"});

  int kills = 0;
  std::int64_t redelivered = 0;
  std::int64_t violations = 0;
  bool checked_end = false;
  while (!checked_end) {
    const std::int64_t acked = book.acked;
    const std::int64_t pending = book.pending;
    const std::int64_t last = book.last;
    ipcoro::process consumer = start_consumer(random());
    const bool kill = kills < restarts;
    if (kill) {
      co_await ipcoro::sleep_for(std::chrono::microseconds(delay_us(random)));
      consumer.kill();
    }
    const ipcoro::exit_status status = co_await consumer.wait();
    if (kill && status.signal == SIGKILL) ++kills;
    if (!kill && !status.success()) {
      fmt::print(stderr, "durable_file: the last consumer {}\n", status.describe());
      co_return 1;
    }
    if (book.first != -1) {
      // The ack before the kill either happened (pending + 1) or did not (acked + 1).
      if (book.first != acked + 1 && book.first != pending + 1) {
        fmt::print(stderr, "durable_file: a consumer started at {}, expected {} or {}\n", book.first.load(),
                   acked + 1, pending + 1);
        ++violations;
      }
      if (last >= book.first) redelivered += last - book.first + 1;
    }
    checked_end = book.ended;
  }
  const ipcoro::exit_status produced = co_await producer.wait();
  if (!produced.success()) {
    fmt::print(stderr, "durable_file: the producer {}\n", produced.describe());
    co_return 1;
  }
  violations += book.out_of_order;
  if (book.last != messages - 1) {
    fmt::print(stderr, "durable_file: the stream ended at {}, not {}\n", book.last.load(), messages - 1);
    ++violations;
  }
  fmt::print(
      "durable_file: {} messages through {}, consumer killed {} times at random moments; "
      "{} unacknowledged messages came again, {} errors\n",
      messages, address, kills, redelivered, violations);
  co_return violations == 0 ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) try {
  CLI::App app{"A durable file channel whose consumer is killed and restarted at random moments"};
  std::int64_t messages = 1'000'000;
  int restarts = 100;
  int max_delay_us = 3000;
  std::uint64_t seed = std::random_device{}();
  std::string path = fmt::format("/tmp/ipcoro-durable-{}", ::getpid());
  app.add_option("--messages", messages, "messages the producer sends")->check(CLI::Range(1, 100'000'000));
  app.add_option("--restarts", restarts, "how many times the consumer is killed")
      ->check(CLI::Range(0, 10'000));
  app.add_option("--max-delay-us", max_delay_us,
                 "longest a consumer runs before it is killed, in microseconds")
      ->check(CLI::Range(1, 60'000'000));
  app.add_option("--seed", seed, "seed of the random kill moments (printed, to repeat a run)");
  app.add_option("--path", path, "the file of the channel (removed at the end)");
  CLI11_PARSE(app, argc, argv);
  fmt::print("durable_file: seed {}\n", seed);

  const std::string address = fmt::format("file:{}?durable=1&capacity=16k", path);
  void* shared = ::mmap(nullptr, sizeof(ledger), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  if (shared == MAP_FAILED) {
    fmt::print(stderr, "durable_file: mmap failed\n");
    return 1;
  }
  auto* book = new (shared) ledger{};
  int rc = 1;
  try {
    ipcoro::io_context ctx;
    rc = ipcoro::sync_wait(ctx, supervise(address, messages, restarts, max_delay_us, seed, *book));
  } catch (const std::exception& e) {
    fmt::print(stderr, "durable_file: {}\n", e.what());
  }
  std::error_code ec;
  std::filesystem::remove(path, ec);  // durable: nobody else removes it
  ::munmap(shared, sizeof(ledger));
  return rc;
} catch (const std::exception& e) {
  // Whatever nothing above caught (no io_uring, say): the message and status 1, not an abort.
  fmt::print(stderr, "{}: {}\n", argv[0], e.what());
  return 1;
}
