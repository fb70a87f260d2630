// SPDX-License-Identifier: MIT
// mmap_log: a persistent message queue in a file, drained by a consumer across a crash and
// a restart. The queue is an SPSC ring in a memory-mapped file; the consumer acknowledges
// what it has processed, and the acknowledged position lives in the file too.
//
//   producer  --records-->  [ ring in /tmp/ipcoro-mmap-log-<pid>.queue ]  -->  consumer 1 (crashes)
//                                                                         -->  consumer 2 (restarted)
//
// Consumer 1 processes and acknowledges part of the queue, takes a few more records
// without acknowledging them, and dies by SIGKILL. Consumer 2, a new process opening the
// file by path, resumes right after the last acknowledged record: the unacknowledged ones
// come again, nothing acknowledged does. Meanwhile the producer, finding the queue full,
// waits; while no consumer is alive its sends report the dead peer and it retries.
// The parent checks that every record was processed exactly once, then removes the file.
//
// Durability: a process crash loses nothing written to the mapping; a machine crash loses
// what was written after the last sync(), which the consumers call every 1000 records.
//
// Usage: mmap_log [--path FILE] [--records N] [--keep]
#include <ipcoro/ipcoro.hpp>

#include <fmt/core.h>
#include <signal.h>
#include <unistd.h>

#include <charconv>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>
#include <string_view>
#include <vector>

namespace {

using ipcoro::task;
using namespace std::chrono_literals;

constexpr std::size_t queue_capacity = 64 * 1024;

// Record `seq`: "record <seq>:" then a run of letters whose length depends on seq.
std::string record_text(std::uint64_t seq) {
  std::string s = fmt::format("record {}:", seq);
  s.append(16 + (seq * 2654435761u) % 200, static_cast<char>('a' + seq % 26));
  return s;
}

std::span<const std::byte> bytes_of(const std::string& s) {
  return std::as_bytes(std::span(s.data(), s.size()));
}

/// Reports one line to the parent through `fd`.
void report(int fd, const std::string& line) {
  const std::string l = line + "\n";
  [[maybe_unused]] ssize_t n = ::write(fd, l.data(), l.size());
}

task<void> produce(ipcoro::mapped_file& file, std::uint64_t records) {
  ipcoro::ring_options opts;
  opts.liveness_check_interval = 50ms;
  ipcoro::spsc_ring_sender tx(file.payload(), opts);
  std::uint64_t dead_peer_reports = 0;
  for (std::uint64_t seq = 0; seq < records;) {
    try {
      co_await tx.send(bytes_of(record_text(seq))).with_timeout(60s);
      ++seq;
    } catch (const ipcoro::peer_died&) {
      ++dead_peer_reports;  // the consumer died; its successor will attach: send the same record again
    }
  }
  tx.close();
  fmt::print("producer:   {} records appended (the queue was full without a live consumer {} times)\n",
             records, dead_peer_reports);
}

/// Takes records from where the last acknowledged one left off. With `crash_after`, dies
/// after acknowledging that many and receiving 5 more; otherwise drains to the end.
task<bool> consume(ipcoro::mapped_file& file, int report_fd, const char* name, std::uint64_t crash_after) {
  ipcoro::ring_options opts;
  opts.manual_ack = true;
  ipcoro::spsc_ring_receiver rx(file.payload(), opts);
  std::vector<std::byte> buf(rx.max_message_size());
  std::uint64_t first = 0;
  std::uint64_t count = 0;
  std::uint64_t next = 0;
  while (auto n = co_await rx.receive(buf).with_timeout(60s)) {
    const std::string_view text(reinterpret_cast<const char*>(buf.data()), *n);
    std::uint64_t seq = ~std::uint64_t{0};
    if (text.starts_with("record ")) std::from_chars(text.data() + 7, text.data() + text.size(), seq);
    if (text != record_text(seq) || (count != 0 && seq != next)) {
      fmt::print(stderr, "{}: unexpected record '{}' (expected record {})\n", name, text.substr(0, 20), next);
      co_return false;
    }
    if (count == 0) first = seq;
    next = seq + 1;
    ++count;
    if (count <= crash_after) {
      rx.ack();  // processed: never comes again
      if (count % 1000 == 0) file.sync();
      if (count == crash_after) {
        report(report_fd, fmt::format("{} {}", first, count));
        fmt::print("{}: acknowledged records {}..{}; taking 5 more without acknowledging, then crashing\n",
                   name, first, seq);
        std::fflush(stdout);
      }
    } else if (count == crash_after + 5) {
      ::raise(SIGKILL);
    }
  }
  rx.ack();
  file.sync();
  report(report_fd, fmt::format("{} {}", first, count));
  fmt::print("{}: drained records {}..{} ({} records) and reached the end of the queue\n", name, first,
             next - 1, count);
  co_return true;
}

/// Reads "first count" from the report pipe.
bool read_report(std::FILE* in, std::uint64_t& first, std::uint64_t& count) {
  unsigned long long f = 0;
  unsigned long long c = 0;
  if (std::fscanf(in, "%llu %llu", &f, &c) != 2) return false;
  first = f;
  count = c;
  return true;
}

}  // namespace

int main(int argc, char** argv) try {
  std::string path = fmt::format("/tmp/ipcoro-mmap-log-{}.queue", ::getpid());
  std::uint64_t records = 20000;
  bool keep = false;
  for (int i = 1; i < argc; ++i) {
    const std::string_view arg = argv[i];
    if (arg == "--path" && i + 1 < argc)
      path = argv[++i];
    else if (arg == "--records" && i + 1 < argc)
      records = std::strtoull(argv[++i], nullptr, 10);
    else if (arg == "--keep")
      keep = true;
    else {
      fmt::print(stderr, "usage: {} [--path FILE] [--records N] [--keep]\n", argv[0]);
      return 2;
    }
  }
  if (records < 10) {
    fmt::print(stderr, "--records must be at least 10\n");
    return 2;
  }

  bool ok = false;
  try {
    // The ring is formatted before the file gets its name: no process sees it half made.
    const auto layout = ipcoro::spsc_ring_layout(queue_capacity);
    auto file = ipcoro::mapped_file::create(path, layout, 0600, &ipcoro::format_spsc_ring);
    fmt::print("mmap_log: queue {} ({} KiB ring), {} records\n", file.path(), queue_capacity / 1024, records);
    int fds[2];
    if (::pipe(fds) != 0) throw std::system_error(errno, std::system_category(), "pipe");
    std::FILE* reports = ::fdopen(fds[0], "r");

    // Every process opens the file by path, as separate programs would, on a loop of its own.
    ipcoro::process producer = ipcoro::process::fork(
        [&] {
          ipcoro::io_context ctx;
          auto f = ipcoro::mapped_file::open(path, layout);
          ipcoro::sync_wait(ctx, produce(f, records));
          return 0;
        },
        {.name = "producer"});
    const std::uint64_t crash_after = records / 3;
    ipcoro::process first = ipcoro::process::fork(
        [&] {
          ipcoro::io_context ctx;
          auto f = ipcoro::mapped_file::open(path, layout);
          return ipcoro::sync_wait(ctx, consume(f, fds[1], "consumer 1", crash_after)) ? 0 : 1;
        },
        {.name = "consumer 1"});
    ipcoro::io_context ctx;
    const ipcoro::exit_status first_status = ipcoro::sync_wait(ctx, first.wait());
    fmt::print("mmap_log:   consumer 1 ended by {}\n",
               first_status.signal == SIGKILL ? "SIGKILL, as planned" : first_status.describe());
    ipcoro::process second = ipcoro::process::fork(
        [&] {
          ipcoro::io_context ctx;
          auto f = ipcoro::mapped_file::open(path, layout);
          return ipcoro::sync_wait(ctx, consume(f, fds[1], "consumer 2", ~std::uint64_t{0})) ? 0 : 1;
        },
        {.name = "consumer 2"});
    const ipcoro::exit_status second_status = ipcoro::sync_wait(ctx, second.wait());
    const ipcoro::exit_status producer_status = ipcoro::sync_wait(ctx, producer.wait());
    ::close(fds[1]);

    std::uint64_t first_from = 0, first_acked = 0, second_from = 0, second_count = 0;
    const bool reported =
        read_report(reports, first_from, first_acked) && read_report(reports, second_from, second_count);
    std::fclose(reports);
    // Exactly once: consumer 1 acknowledged 0..k-1, consumer 2 processed k..N-1.
    ok = first_status.signal == SIGKILL && second_status.success() && producer_status.success() && reported &&
         first_from == 0 && first_acked == crash_after && second_from == first_acked &&
         first_acked + second_count == records;
    fmt::print("mmap_log: {} records processed exactly once across the crash: {}\n",
               first_acked + second_count, ok ? "verified" : "FAILED");
  } catch (const std::exception& e) {
    fmt::print(stderr, "mmap_log: {}\n", e.what());
  }
  if (!keep) ::unlink(path.c_str());
  return ok ? 0 : 1;
} catch (const std::exception& e) {
  // Whatever nothing above caught (no io_uring, say): the message and status 1, not an abort.
  fmt::print(stderr, "{}: {}\n", argv[0], e.what());
  return 1;
}
