// SPDX-License-Identifier: MIT
// mq_jobs: a dispatcher and several worker processes over POSIX message queues.
//
//   dispatcher --/jobs (priorities)--> worker 1..W --/results (labels)--> dispatcher
//
// The dispatcher creates two queues, forks the workers (each opens the queues by name and
// runs its own io_context) and sends jobs: every tenth is urgent (priority 9) and is taken
// before the normal ones (priority 1) waiting in the queue. A worker computes each job and
// answers on the results queue with labelled messages of three kinds: a `result` per job,
// a `progress` note every 100 jobs, and a `bye` with its count when it stops. In the
// dispatcher an mq_demux hands each kind to its own consumer coroutine. Shutdown: after
// the jobs the dispatcher sends one stop job per worker at priority 0, so stops come out
// only after every job; each worker takes one, says bye and exits. Nobody hangs on a dead
// peer: the dispatcher awaits each worker's pidfd through the ring, so a crashed worker
// fails the run (the others are killed, the queues removed), and each worker races its
// work against the dispatcher's pidfd. The dispatcher checks every result (each job
// answered once, with the right value), that the byes account for every job, that every
// worker exited 0, and that both queue names are gone; it exits 0 only then.
//
// Usage: mq_jobs [--jobs N] [--workers W]
#include <ipcoro/fd_io.hpp>
#include <ipcoro/io_context.hpp>
#include <ipcoro/mqueue.hpp>
#include <ipcoro/process.hpp>
#include <ipcoro/sync_wait.hpp>
#include <ipcoro/task.hpp>
#include <ipcoro/unique_fd.hpp>
#include <ipcoro/when_all.hpp>
#include <ipcoro/when_any.hpp>

#include <fcntl.h>
#include <fmt/core.h>
#include <mqueue.h>
#include <poll.h>
#include <signal.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
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
#include <system_error>
#include <vector>

namespace {

using ipcoro::task;

struct job {
  std::uint32_t id;
  std::uint32_t urgent;  ///< 1 for urgent jobs; a stop job has id == stop_id
  std::uint64_t n;
};
constexpr std::uint32_t stop_id = 0xffffffff;

// The labels on the results queue, each handled by its own consumer.
enum label : std::uint32_t { result_label = 0, progress_label = 1, bye_label = 2, label_count = 3 };

struct result {
  std::uint32_t id;
  std::uint32_t worker;
  std::uint64_t value;
};
struct progress {
  std::uint32_t worker;
  std::uint32_t done;
};
struct bye {
  std::uint32_t worker;
  std::uint32_t jobs_done;
};

constexpr unsigned urgent_priority = 9;
constexpr unsigned normal_priority = 1;
constexpr unsigned stop_priority = 0;

/// The work: the number of Collatz steps from n down to 1.
std::uint64_t collatz_steps(std::uint64_t n) {
  std::uint64_t steps = 0;
  while (n != 1) {
    n = n % 2 == 0 ? n / 2 : 3 * n + 1;
    ++steps;
  }
  return steps;
}
std::uint64_t job_input(std::uint32_t id) { return 1'000'000 + std::uint64_t{id} * 7919; }

template <class T>
std::span<const std::byte> bytes_of(const T& v) {
  return std::as_bytes(std::span(&v, 1));
}
template <class T>
T read_as(std::span<const std::byte> b) {
  T v{};
  std::memcpy(&v, b.data(), std::min(sizeof v, b.size()));
  return v;
}

// ---- the worker ----

task<void> work(std::uint32_t worker, const ipcoro::message_queue& jobs,
                const ipcoro::message_queue& results) {
  std::array<std::byte, sizeof(job)> buf{};
  std::uint32_t done = 0;
  for (;;) {
    const ipcoro::mq_message m = co_await jobs.receive(buf);
    if (m.size != sizeof(job)) throw std::runtime_error("worker: a job message of the wrong size");
    const job j = read_as<job>(buf);
    if (j.id == stop_id) break;
    const result r{j.id, worker, collatz_steps(j.n)};
    co_await results.send_labelled(result_label, bytes_of(r), 1);
    if (++done % 100 == 0)
      co_await results.send_labelled(progress_label, bytes_of(progress{worker, done}), 2);
  }
  co_await results.send_labelled(bye_label, bytes_of(bye{worker, done}), 0);
}

/// Completes when the process behind `pidfd` has exited.
task<void> exited(int pidfd) { (void)co_await ipcoro::poll(pidfd, POLLIN); }

int worker_main(std::uint32_t worker, pid_t dispatcher, const std::string& jobs_name,
                const std::string& results_name) {
  try {
    // Every wait must be able to end: if the dispatcher dies, nobody will send the stop.
    ipcoro::unique_fd dispatcher_fd(static_cast<int>(::syscall(SYS_pidfd_open, dispatcher, 0)));
    if (!dispatcher_fd || ::getppid() != dispatcher) throw std::runtime_error("the dispatcher is gone");
    ipcoro::io_context ctx;
    auto jobs = ipcoro::message_queue::open(jobs_name, {.access = ipcoro::mq_access::read_only});
    auto results = ipcoro::message_queue::open(results_name, {.access = ipcoro::mq_access::write_only});
    const auto outcome =
        ipcoro::sync_wait(ctx, ipcoro::when_any(work(worker, jobs, results), exited(dispatcher_fd.get())));
    if (outcome.index() == 1) {
      // The owner died without cleaning up: the survivors remove its queues (the first
      // one to get here does it; unlink of a name already gone returns false).
      ipcoro::message_queue::unlink(jobs_name);
      ipcoro::message_queue::unlink(results_name);
      throw std::runtime_error("the dispatcher is gone; removed its queues and stopped");
    }
    return 0;
  } catch (const std::exception& e) {
    fmt::print(stderr, "worker {}: {}\n", worker, e.what());
    return 1;
  }
}

// ---- the dispatcher ----

struct tally {
  std::vector<std::uint8_t> answered;  ///< per job: how many results came back
  std::uint32_t wrong = 0;             ///< results with a wrong value or unknown id
  std::uint32_t results = 0;
  std::int64_t urgent_overtaken = 0;  ///< sum of (job id - arrival position), urgent jobs
  std::int64_t normal_overtaken = 0;
  std::uint32_t urgent = 0;
  std::uint32_t progress_notes = 0;
  std::vector<std::uint32_t> jobs_per_worker;
  std::uint32_t byes = 0;
};

bool is_urgent(std::uint32_t id) { return id % 10 == 0; }

task<void> produce(const ipcoro::message_queue& jobs, std::uint32_t count, std::uint32_t workers) {
  for (std::uint32_t id = 0; id < count; ++id) {
    const job j{id, is_urgent(id) ? 1u : 0u, job_input(id)};
    co_await jobs.send(bytes_of(j), is_urgent(id) ? urgent_priority : normal_priority);
  }
  // Priority 0: the stops come out of the queue only after every job.
  for (std::uint32_t w = 0; w < workers; ++w) co_await jobs.send(bytes_of(job{stop_id, 0, 0}), stop_priority);
}

task<void> collect_results(ipcoro::mq_demux& demux, std::uint32_t count, tally& t) {
  std::vector<std::byte> buf(demux.max_payload());
  while (t.results < count) {
    const auto m = co_await demux.receive(result_label, buf);
    if (!m) co_return;
    const result r = read_as<result>(buf);
    const std::uint32_t rank = t.results++;
    if (m->size != sizeof r || r.id >= count || r.value != collatz_steps(job_input(r.id))) {
      ++t.wrong;
      continue;
    }
    ++t.answered[r.id];
    const std::int64_t ahead = std::int64_t{r.id} - rank;
    if (is_urgent(r.id)) {
      t.urgent_overtaken += ahead;
      ++t.urgent;
    } else {
      t.normal_overtaken += ahead;
    }
  }
}

task<void> collect_byes(ipcoro::mq_demux& demux, std::uint32_t workers, tally& t) {
  std::vector<std::byte> buf(demux.max_payload());
  while (t.byes < workers) {
    const auto m = co_await demux.receive(bye_label, buf);
    if (!m) co_return;
    const bye b = read_as<bye>(buf);
    if (b.worker < workers) t.jobs_per_worker[b.worker] += b.jobs_done;
    ++t.byes;
  }
}

task<void> show_progress(ipcoro::mq_demux& demux, tally& t) {
  std::vector<std::byte> buf(demux.max_payload());
  // Ends when the demux is closed: progress notes have no fixed count.
  while (const auto m = co_await demux.receive(progress_label, buf)) {
    const progress p = read_as<progress>(buf);
    ++t.progress_notes;
    if (p.done % 500 == 0) fmt::print("  worker {} has done {} jobs\n", p.worker, p.done);
  }
}

/// Fails the run if a worker exits abnormally; a clean exit (after its bye) is fine.
task<void> watch(ipcoro::process& p, std::uint32_t worker, std::vector<int>& exit_codes) {
  const ipcoro::exit_status status = co_await p.wait();
  exit_codes[worker] = status.exited() ? status.code : 128 + status.signal;
  if (!status.success()) throw std::runtime_error(fmt::format("worker {} {}", worker, p.describe()));
}

bool queue_gone(const std::string& name) {
  const mqd_t q = ::mq_open(name.c_str(), O_RDONLY);
  if (q != static_cast<mqd_t>(-1)) {
    ::mq_close(q);
    return false;
  }
  return errno == ENOENT;
}

int run(std::uint32_t count, std::uint32_t workers) {
  const std::string suffix = std::to_string(::getpid());
  const std::string jobs_name = "/ipcoro-mq-jobs-" + suffix;
  const std::string results_name = "/ipcoro-mq-results-" + suffix;
  tally t;
  t.answered.assign(count, 0);
  t.jobs_per_worker.assign(workers, 0);
  std::vector<int> exit_codes(workers, -1);
  const auto start = std::chrono::steady_clock::now();
  {
    ipcoro::io_context ctx;
    // Owned by the dispatcher: unlinked when these objects go away, even on an error.
    // Ten messages fit in each with the default /proc/sys/fs/mqueue/msg_max.
    auto jobs = ipcoro::message_queue::create(jobs_name, {10, sizeof(job)}, ipcoro::mq_access::write_only);
    auto results = ipcoro::message_queue::create(
        results_name, {10, static_cast<long>(ipcoro::mq_label_header_size + sizeof(result))},
        ipcoro::mq_access::read_only);

    const pid_t dispatcher = ::getpid();
    std::vector<ipcoro::process> procs;
    for (std::uint32_t w = 0; w < workers; ++w) {
      procs.push_back(ipcoro::process::fork(
          [&, w] {
            jobs.release_name();
            results.release_name();
            return worker_main(w, dispatcher, jobs_name, results_name);
          },
          // A worker outlives a dead dispatcher long enough to remove its queues.
          {.name = fmt::format("worker {}", w), .die_with_parent = false}));
    }

    ipcoro::mq_demux demux(results, label_count);
    auto dispatch = [&]() -> task<void> {
      co_await ipcoro::when_all(produce(jobs, count, workers), collect_results(demux, count, t),
                                collect_byes(demux, workers, t));
      demux.close();  // ends show_progress and the pump
    };
    std::vector<task<void>> watchers;
    for (std::uint32_t w = 0; w < workers; ++w) watchers.push_back(watch(procs[w], w, exit_codes));
    try {
      ipcoro::sync_wait(ctx, [&]() -> task<void> {
        co_await ipcoro::when_all(demux.run(), dispatch(), show_progress(demux, t),
                                  ipcoro::when_all(std::move(watchers)));
      }());
    } catch (const std::exception& e) {
      fmt::print(stderr, "mq_jobs: {}\n", e.what());
      procs.clear();  // kills and reaps every worker still running
      return 1;
    }
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();

  std::uint32_t missing = 0, duplicated = 0, by_workers = 0;
  for (std::uint8_t a : t.answered) {
    missing += a == 0;
    duplicated += a > 1;
  }
  for (std::uint32_t w = 0; w < workers; ++w) {
    fmt::print("worker {}: {} jobs, exit status {}\n", w, t.jobs_per_worker[w], exit_codes[w]);
    by_workers += t.jobs_per_worker[w];
  }
  const std::uint32_t normal = count - t.urgent;
  fmt::print("{} jobs by {} workers in {:.2f} s; {} progress notes\n", count, workers, seconds,
             t.progress_notes);
  if (t.urgent != 0 && normal != 0) {
    // Positive: the result came back earlier than the job's place in the submission order.
    fmt::print(
        "urgent jobs came back {:+.1f} places ahead of submission order on average, normal ones {:+.1f}\n",
        static_cast<double>(t.urgent_overtaken) / t.urgent, static_cast<double>(t.normal_overtaken) / normal);
  }
  const bool gone = queue_gone(jobs_name) && queue_gone(results_name);
  bool exits_ok = true;
  for (int c : exit_codes) exits_ok = exits_ok && c == 0;
  const bool ok = missing == 0 && duplicated == 0 && t.wrong == 0 && t.results == count &&
                  by_workers == count && t.byes == workers && exits_ok && gone;
  fmt::print("results: {} missing, {} duplicated, {} wrong; byes account for {} jobs; queues {}\n", missing,
             duplicated, t.wrong, by_workers, gone ? "removed" : "LEFT BEHIND");
  fmt::print("mq_jobs {}\n", ok ? "verified" : "FAILED");
  return ok ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) try {
  std::uint32_t count = 2000;
  std::uint32_t workers = 3;
  for (int i = 1; i < argc; ++i) {
    const std::string_view arg = argv[i];
    if ((arg == "--jobs" || arg == "--workers") && i + 1 < argc) {
      const unsigned long v = std::strtoul(argv[++i], nullptr, 10);
      (arg == "--jobs" ? count : workers) = static_cast<std::uint32_t>(v);
    } else {
      fmt::print(stderr, "usage: mq_jobs [--jobs N] [--workers W]\n");
      return 2;
    }
  }
  if (count == 0 || workers == 0 || workers > 64) {
    fmt::print(stderr, "mq_jobs: --jobs must be at least 1 and --workers between 1 and 64\n");
    return 2;
  }
  try {
    return run(count, workers);
  } catch (const std::exception& e) {
    fmt::print(stderr, "mq_jobs: {}\n", e.what());
    return 1;
  }
} catch (const std::exception& e) {
  // Whatever nothing above caught (no io_uring, say): the message and status 1, not an abort.
  fmt::print(stderr, "{}: {}\n", argv[0], e.what());
  return 1;
}
