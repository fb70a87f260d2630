// SPDX-License-Identifier: MIT
// Load: a thousand FIFO clients served by one loop, and many messages through SPSC and MPMC
// rings and a queue with several producer and consumer processes, each delivered exactly
// once (a count and a checksum per producer). IPCORO_SOAK=1 makes it 100 times longer.
#include "ipcoro/channel.hpp"
#include "ipcoro/io_context.hpp"
#include "ipcoro/sync_wait.hpp"
#include "ipcoro/task.hpp"
#include "ipcoro/when_all.hpp"

#include "channel_support.hpp"
#include "crash_support.hpp"
#include "process.hpp"

#include <catch2/catch.hpp>

#include <sys/resource.h>

#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace {

using namespace std::chrono_literals;
using namespace ipcoro::test::crash;
using ipcoro::channel_link;
using ipcoro::channel_receiver;
using ipcoro::channel_sender;
using ipcoro::task;
using ipcoro::test::child_process;
using steady = std::chrono::steady_clock;

const bool named_in_report = (report::get().set_meta("program", "load"), true);

/// CI sizes times 100 when soaking (10^6 → 10^8 ring messages, 10^5 → 10^7 queue messages).
std::uint64_t scaled(std::uint64_t ci) { return soaking() ? ci * 100 : ci; }

/// One message of a producer: who sent it and its number in that producer's sequence.
struct numbered {
  std::uint32_t producer;
  std::uint32_t pad;
  std::uint64_t seq;
};

std::uint64_t hash_of(std::uint64_t seq) noexcept {
  std::uint64_t x = seq + 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

/// What one consumer saw from one producer.
struct tally_slot {
  std::uint64_t count;
  std::uint64_t sum;  // of hash_of(seq), wrapping
  std::uint64_t out_of_order;
  std::uint64_t last_plus_one;
};

void add_report(const std::string& transport, const std::string& shape, std::uint64_t messages,
                double seconds, bool ok, const std::string& note) {
  cell_report rep;
  rep.group = "load";
  rep.transport = transport;
  rep.mode = "link";
  rep.victim = "none";
  rep.point = shape;
  rep.trials = 1;
  rep.counts[ok ? 0 : static_cast<int>(outcome::lost)] = 1;
  rep.status = ok ? "pass" : "fail";
  rep.remark = std::to_string(messages) + " messages in " + std::to_string(seconds) + " s (" +
               std::to_string(static_cast<long>(static_cast<double>(messages) / seconds)) + " per second)";
  if (!note.empty()) rep.notes.push_back(note);
  report::get().add(rep);
}

task<void> produce(channel_sender<numbered>& tx, std::uint32_t producer, std::uint64_t count) {
  for (std::uint64_t i = 0; i < count; ++i) {
    numbered m{producer, 0, i};
    co_await tx.send(m);
  }
}

task<void> consume(channel_receiver<numbered>& rx, tally_slot* slots, std::uint32_t producers) {
  while (std::optional<numbered> m = co_await rx.receive().with_timeout(30s)) {
    if (m->producer >= producers) {
      ++slots[0].out_of_order;
      continue;
    }
    tally_slot& s = slots[m->producer];
    ++s.count;
    s.sum += hash_of(m->seq);
    if (m->seq + 1 <= s.last_plus_one) ++s.out_of_order;  // each producer's order holds per consumer
    s.last_plus_one = m->seq + 1;
  }
}

/// `producers` processes each send `per_producer` numbered messages into one channel;
/// `consumers` processes take them. Every message must arrive exactly once.
void exactly_once(const std::string& transport, const std::string& options, std::uint32_t producers,
                  std::uint32_t consumers, std::uint64_t per_producer) {
  const std::string address = ipcoro::test::fresh_address(transport, options);
  CAPTURE(address, producers, consumers, per_producer);
  shared_array<tally_slot> slots(static_cast<std::size_t>(consumers) * producers);
  const auto start = steady::now();
  std::vector<child_process> consumer_procs;
  std::vector<child_process> producer_procs;
  {
    channel_link link = channel_link::create(address);
    for (std::uint32_t c = 0; c < consumers; ++c) {
      consumer_procs.emplace_back([&link, &slots, c, producers]() -> int {
        ipcoro::io_context ctx;
        channel_receiver<numbered> rx = link.receiver<numbered>();
        link.reset();
        ipcoro::sync_wait(ctx, consume(rx, &slots[static_cast<std::size_t>(c) * producers], producers));
        return 0;
      });
    }
    for (std::uint32_t p = 0; p < producers; ++p) {
      producer_procs.emplace_back([&link, p, per_producer, producers]() -> int {
        ipcoro::io_context ctx;
        channel_sender<numbered> tx = link.sender<numbered>();
        link.reset();
        ipcoro::sync_wait(ctx, produce(tx, p, per_producer));
        // One of several senders leaves without ending the stream; with one, it ends it.
        if (producers > 1) {
          tx.detach();
        } else {
          tx.close();
        }
        return 0;
      });
    }
    if (producers > 1) {
      // Every producer has left: end the stream for the consumers.
      ipcoro::io_context ctx;
      channel_sender<numbered> tx = link.sender<numbered>();
      link.reset();
      for (child_process& p : producer_procs) CHECK(p.wait(std::chrono::minutes(30)) == 0);
      tx.close();
    }
  }
  if (producers == 1) CHECK(producer_procs[0].wait(std::chrono::minutes(30)) == 0);
  for (child_process& c : consumer_procs) CHECK(c.wait(std::chrono::minutes(30)) == 0);
  const double seconds = std::chrono::duration<double>(steady::now() - start).count();

  std::uint64_t expected_sum = 0;
  for (std::uint64_t i = 0; i < per_producer; ++i) expected_sum += hash_of(i);
  bool ok = true;
  std::string note;
  for (std::uint32_t p = 0; p < producers; ++p) {
    std::uint64_t count = 0;
    std::uint64_t sum = 0;
    std::uint64_t disorder = 0;
    for (std::uint32_t c = 0; c < consumers; ++c) {
      const tally_slot& s = slots[static_cast<std::size_t>(c) * producers + p];
      count += s.count;
      sum += s.sum;
      disorder += s.out_of_order;
    }
    INFO("producer " << p << ": " << count << " received of " << per_producer);
    CHECK(count == per_producer);
    CHECK(sum == expected_sum);
    CHECK(disorder == 0);
    if (count != per_producer || sum != expected_sum || disorder != 0) {
      ok = false;
      note = "producer " + std::to_string(p) + ": " + std::to_string(count) + " of " +
             std::to_string(per_producer) + (sum != expected_sum ? ", checksum differs" : "") +
             (disorder != 0 ? ", " + std::to_string(disorder) + " out of order" : "");
    }
  }
  CHECK(ipcoro::test::nothing_left_behind());
  add_report(transport,
             std::to_string(producers) + (producers == 1 ? " producer + " : " producers + ") +
                 std::to_string(consumers) + (consumers == 1 ? " consumer" : " consumers"),
             per_producer * producers, seconds, ok, note);
}

// ---- a thousand FIFO clients on one loop ----

task<void> serve_one(channel_receiver<numbered>& rx, std::uint32_t client, std::uint64_t per_client,
                     std::uint64_t& wrong) {
  std::uint64_t next = 0;
  while (std::optional<numbered> m = co_await rx.receive().with_timeout(60s)) {
    if (m->producer != client || m->seq != next) ++wrong;
    ++next;
  }
  if (next != per_client) ++wrong;
}

task<void> serve_all(std::vector<channel_receiver<numbered>>& rxs, std::uint64_t per_client,
                     std::vector<std::uint64_t>& wrong) {
  std::vector<task<void>> all;
  all.reserve(rxs.size());
  for (std::size_t i = 0; i < rxs.size(); ++i)
    all.push_back(serve_one(rxs[i], static_cast<std::uint32_t>(i), per_client, wrong[i]));
  co_await ipcoro::when_all(std::move(all));
}

task<void> client_batch(const std::vector<std::string>& addresses, std::size_t first, std::size_t count,
                        std::uint64_t per_client) {
  std::vector<channel_sender<numbered>> txs;
  txs.reserve(count);
  for (std::size_t i = first; i < first + count; ++i)
    txs.push_back(co_await ipcoro::open_sender<numbered>(addresses[i]));
  std::vector<task<void>> all;
  all.reserve(count);
  for (std::size_t i = 0; i < count; ++i)
    all.push_back(produce(txs[i], static_cast<std::uint32_t>(first + i), per_client));
  co_await ipcoro::when_all(std::move(all));
  for (channel_sender<numbered>& tx : txs) tx.close();
}

}  // namespace

TEST_CASE("load: 1,000 concurrent FIFO clients served by one loop, every message once and in order",
          "[load][fifo]") {
  constexpr std::size_t clients = 1000;
  constexpr std::size_t client_processes = 4;
  const std::uint64_t per_client = scaled(50);
  rlimit files{};
  ::getrlimit(RLIMIT_NOFILE, &files);
  if (files.rlim_cur < 4 * clients && files.rlim_max >= 4 * clients) {
    files.rlim_cur = 4 * clients;
    ::setrlimit(RLIMIT_NOFILE, &files);
  }
  std::vector<std::string> addresses;
  for (std::size_t i = 0; i < clients; ++i) addresses.push_back(ipcoro::test::fresh_address("fifo"));
  const auto start = steady::now();
  std::vector<std::uint64_t> wrong(clients, 0);
  {
    std::vector<ipcoro::test::handshake> ready(client_processes);
    std::vector<child_process> procs;
    for (std::size_t p = 0; p < client_processes; ++p) {
      procs.emplace_back([&, p]() -> int {
        if (!ready[p].wait()) return 2;
        ipcoro::io_context ctx;
        const std::size_t per_process = clients / client_processes;
        ipcoro::sync_wait(ctx, client_batch(addresses, p * per_process, per_process, per_client));
        return 0;
      });
    }
    ipcoro::io_context ctx;
    std::vector<channel_receiver<numbered>> rxs;
    rxs.reserve(clients);
    for (const std::string& a : addresses)
      rxs.push_back(ipcoro::sync_wait(ctx, ipcoro::open_receiver<numbered>(a)));
    for (ipcoro::test::handshake& h : ready) h.signal();
    ipcoro::sync_wait(ctx, serve_all(rxs, per_client, wrong));
    for (child_process& p : procs) CHECK(p.wait(std::chrono::minutes(10)) == 0);
  }
  const double seconds = std::chrono::duration<double>(steady::now() - start).count();
  std::uint64_t bad = 0;
  for (const std::uint64_t w : wrong) bad += w;
  CHECK(bad == 0);
  CHECK(ipcoro::test::nothing_left_behind());
  add_report("fifo", "1000 clients (4 processes) on one server loop", clients * per_client, seconds, bad == 0,
             bad == 0 ? "" : std::to_string(bad) + " clients with a missing, repeated or misplaced message");
}

TEST_CASE("load: an SPSC ring carries every message exactly once", "[load][shm]") {
  exactly_once("shm", "capacity=1m", 1, 1, scaled(1'000'000));
}

TEST_CASE("load: an MPMC ring with several producers and consumers carries every message exactly once",
          "[load][shm-mpmc]") {
  exactly_once("shm-mpmc", "capacity=1024&message_size=64", 3, 3, scaled(1'000'000) / 3);
}

TEST_CASE("load: a message queue with 4 producer and 4 consumer processes carries every message exactly once",
          "[load][mq]") {
  exactly_once("mq", "capacity=10&message_size=64", 4, 4, scaled(100'000) / 4);
}

TEST_CASE("load: a file ring carries every message exactly once", "[load][file]") {
  exactly_once("file", "capacity=1m", 1, 1, scaled(1'000'000));
}
