// SPDX-License-Identifier: MIT
// Shared parts of the crash and load suites: run-time settings, numbered messages, trials in
// parallel worker processes with results in shared memory, and the machine-readable report.
#pragma once

#include "process.hpp"

#include <poll.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <new>
#include <string>
#include <vector>

namespace ipcoro::test::crash {

/// IPCORO_SOAK: unset or 0 for the CI run; 1 multiplies trials by 10 (and the load by 100),
/// a larger number multiplies trials by that number.
inline int soak_factor() {
  const char* s = std::getenv("IPCORO_SOAK");
  if (s == nullptr || *s == '\0' || std::string(s) == "0") return 1;
  const int n = std::atoi(s);
  return n <= 1 ? 10 : n;
}
inline bool soaking() { return soak_factor() > 1; }

inline int env_int(const char* name, int fallback) {
  const char* s = std::getenv(name);
  return s != nullptr && *s != '\0' ? std::atoi(s) : fallback;
}

/// A message of the matrix: word 0 is its sequence number, every other word a function of
/// it and of its index, so that a receiver notices a gap, a duplicate or a changed byte.
using message = std::vector<std::uint64_t>;

inline std::uint64_t word_of(std::uint64_t seq, std::size_t i) noexcept {
  return (seq * 0x9E3779B97F4A7C15ull) ^ (i * 0xD1B54A32D192ED03ull) ^ 0x5bd1e995ull;
}
inline message make_message(std::uint64_t seq, std::size_t words) {
  message m(std::max<std::size_t>(words, 1));
  m[0] = seq;
  for (std::size_t i = 1; i < m.size(); ++i) m[i] = word_of(seq, i);
  return m;
}

/// What a trial found. `survived` is the only good outcome.
enum class outcome : int { survived, hang, silent_end, lost, duplicate, corrupt, wrong_error, setup_failed };
inline constexpr const char* outcome_names[] = {"survived",  "hang",    "silent_end",  "lost",
                                                "duplicate", "corrupt", "wrong_error", "setup_failed"};
inline constexpr int outcome_count = 8;

/// Checks that messages come in sequence, whole, each once.
struct sequence_check {
  std::uint64_t next = 0;
  outcome bad = outcome::survived;
  std::string note;

  void take(const message& m) {
    if (bad != outcome::survived) return;
    if (m.empty()) {
      fail(outcome::corrupt, "an empty message");
    } else if (m[0] < next) {
      fail(outcome::duplicate,
           "message " + std::to_string(m[0]) + " came again after " + std::to_string(next - 1));
    } else if (m[0] > next) {
      fail(outcome::lost,
           "message " + std::to_string(m[0]) + " came where " + std::to_string(next) + " was due");
    } else {
      for (std::size_t i = 1; i < m.size(); ++i) {
        if (m[i] != word_of(m[0], i)) {
          fail(outcome::corrupt, "message " + std::to_string(m[0]) + " differs at word " + std::to_string(i));
          return;
        }
      }
      ++next;
    }
  }
  void fail(outcome o, std::string why) {
    bad = o;
    note = std::move(why);
  }
};

/// One trial's result, written by the worker process into shared memory.
struct trial_result {
  int done;
  int outcome;
  double detect_ms;        // from the kill to the survivor's error (or end); -1 when none applies
  double longest_wait_ms;  // the longest single wait of the survivor after the kill
  std::uint64_t acknowledged;
  std::uint64_t received;
  int cut_frame;    // the survivor reported a message cut by the kill
  int peer_closed;  // the victim's close() had returned before the kill
  int leftovers;
  char note[400];

  void set_note(const std::string& s) noexcept { std::snprintf(note, sizeof note, "%s", s.c_str()); }
};

/// An array of T in anonymous shared memory, visible to every process forked after it.
template <class T>
class shared_array {
 public:
  explicit shared_array(std::size_t n) : n_(std::max<std::size_t>(n, 1)) {
    void* p = ::mmap(nullptr, bytes(), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) throw std::bad_alloc();
    data_ = static_cast<T*>(p);
    for (std::size_t i = 0; i < n_; ++i) new (&data_[i]) T{};
  }
  ~shared_array() { ::munmap(data_, bytes()); }
  shared_array(const shared_array&) = delete;
  shared_array& operator=(const shared_array&) = delete;
  T& operator[](std::size_t i) noexcept { return data_[i]; }
  std::size_t size() const noexcept { return n_; }

 private:
  std::size_t bytes() const noexcept { return n_ * sizeof(T); }
  std::size_t n_;
  T* data_;
};

/// Runs `jobs` trials, `parallel` at a time, each in a worker process of its own: `run(i,
/// result)` fills result[i]. A new worker starts as soon as any one has finished. A worker
/// that does not finish within `limit` is killed and its trial counted as a hang.
inline void run_trials(std::size_t jobs, int parallel, std::chrono::milliseconds limit,
                       shared_array<trial_result>& results,
                       const std::function<void(std::size_t, trial_result&)>& run) {
  struct running {
    std::size_t index;
    child_process worker;
    int pidfd;
    std::chrono::steady_clock::time_point deadline;
  };
  std::vector<std::unique_ptr<running>> active;  // child_process cannot be assigned
  auto reap = [&](std::size_t at, std::chrono::milliseconds wait_for) {
    running& r = *active[at];
    const int code = r.worker.wait(wait_for);
    trial_result& res = results[r.index];
    if (code == -1) {
      res.outcome = static_cast<int>(outcome::hang);
      res.set_note("the trial's worker did not finish within " + std::to_string(limit.count()) + " ms");
    } else if (res.done == 0) {
      res.outcome = static_cast<int>(outcome::setup_failed);
      res.set_note("the trial's worker ended with status " + std::to_string(code) + " before reporting");
    }
    if (r.pidfd >= 0) ::close(r.pidfd);
    active.erase(active.begin() + static_cast<std::ptrdiff_t>(at));
  };
  // Waits until at least one worker has ended (or is past its time), and reaps it.
  auto reap_one = [&] {
    std::vector<pollfd> fds;
    for (const auto& r : active) fds.push_back({r->pidfd, POLLIN, 0});
    auto soonest = active.front()->deadline;
    for (const auto& r : active) soonest = std::min(soonest, r->deadline);
    const auto left =
        std::chrono::duration_cast<std::chrono::milliseconds>(soonest - std::chrono::steady_clock::now());
    const int ready =
        ::poll(fds.data(), fds.size(), static_cast<int>(std::max<std::int64_t>(left.count(), 0)) + 1);
    for (std::size_t i = fds.size(); i-- > 0;) {
      const bool ended = ready > 0 && (fds[i].revents != 0 || fds[i].fd < 0);
      const bool late = std::chrono::steady_clock::now() >= active[i]->deadline;
      if (ended || late) reap(i, ended ? limit : std::chrono::milliseconds(0));
    }
  };
  for (std::size_t i = 0; i < jobs; ++i) {
    while (active.size() >= static_cast<std::size_t>(std::max(parallel, 1))) reap_one();
    trial_result& res = results[i];
    child_process worker([&run, i, &res]() -> int {
      run(i, res);
      res.done = 1;
      return 0;
    });
    const int pidfd = static_cast<int>(::syscall(SYS_pidfd_open, worker.pid(), 0));
    active.push_back(std::make_unique<running>(
        running{i, std::move(worker), pidfd, std::chrono::steady_clock::now() + limit}));
  }
  while (!active.empty()) reap_one();
}

/// The totals of one cell of the matrix, for the report.
struct cell_report {
  std::string group;      // "channel", "pipeline", "process_mutex"
  std::string transport;  // pipe, fifo, mq, shm, shm-mpmc, file
  std::string mode;       // link, named
  std::string victim;     // sender, receiver, stage name, holder
  std::string point;      // before_end, before_first, mid_stream, mid_frame, during_close, ...
  std::string status;     // pass, fail, n/a
  std::string remark;     // why n/a, or how a cell is approximated
  int trials = 0;
  int counts[outcome_count] = {};
  int leftovers = 0;
  int cut_frames = 0;
  int peer_closed = 0;
  std::vector<double> detect_ms;
  double longest_wait_ms = 0;
  std::vector<std::string> notes;  // the failures' notes (at most a few)
};

/// Collects the cells and, if IPCORO_CRASH_REPORT names a file, writes them there as JSON
/// when the test program ends.
class report {
 public:
  static report& get() {
    static report r;
    return r;
  }
  void add(cell_report c) { cells_.push_back(std::move(c)); }
  void set_meta(const std::string& key, const std::string& value) { meta_[key] = value; }
  ~report() {
    if (::getpid() != owner_) return;  // a forked child leaving through exit()
    const char* path = std::getenv("IPCORO_CRASH_REPORT");
    if (path == nullptr || *path == '\0' || cells_.empty()) return;
    write(path);
  }

 private:
  report() : owner_(::getpid()), started_(std::chrono::steady_clock::now()) {}

  static std::string quoted(const std::string& s) {
    std::string out = "\"";
    for (const char c : s) {
      if (c == '"' || c == '\\') {
        out += '\\';
        out += c;
      } else if (static_cast<unsigned char>(c) < 0x20) {
        out += ' ';
      } else {
        out += c;
      }
    }
    return out + "\"";
  }
  static double percentile(std::vector<double> v, double p) {
    if (v.empty()) return -1;
    std::sort(v.begin(), v.end());
    return v[static_cast<std::size_t>(p * static_cast<double>(v.size() - 1) + 0.5)];
  }

  void write(const char* path) const {
    // Several suites may share one report file: merge by appending a JSON document per
    // program run, one per line.
    std::ofstream out(path, std::ios::app);
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - started_).count();
    out << "{\"program\":" << quoted(meta_.count("program") ? meta_.at("program") : "crash")
        << ",\"soak\":" << soak_factor() << ",\"seconds\":" << seconds;
    for (const auto& [k, v] : meta_) out << "," << quoted(k) << ":" << quoted(v);
    out << ",\"cells\":[";
    bool first = true;
    for (const cell_report& c : cells_) {
      out << (first ? "" : ",") << "{\"group\":" << quoted(c.group)
          << ",\"transport\":" << quoted(c.transport) << ",\"mode\":" << quoted(c.mode)
          << ",\"victim\":" << quoted(c.victim) << ",\"point\":" << quoted(c.point)
          << ",\"status\":" << quoted(c.status) << ",\"remark\":" << quoted(c.remark)
          << ",\"trials\":" << c.trials;
      for (int i = 0; i < outcome_count; ++i) out << ",\"" << outcome_names[i] << "\":" << c.counts[i];
      out << ",\"leftovers\":" << c.leftovers << ",\"cut_frames\":" << c.cut_frames
          << ",\"peer_closed\":" << c.peer_closed << ",\"detect_ms_median\":" << percentile(c.detect_ms, 0.5)
          << ",\"detect_ms_p95\":" << percentile(c.detect_ms, 0.95)
          << ",\"detect_ms_max\":" << percentile(c.detect_ms, 1.0)
          << ",\"longest_wait_ms\":" << c.longest_wait_ms << ",\"notes\":[";
      for (std::size_t i = 0; i < c.notes.size(); ++i) out << (i ? "," : "") << quoted(c.notes[i]);
      out << "]}";
      first = false;
    }
    out << "]}\n";
  }

  pid_t owner_;
  std::chrono::steady_clock::time_point started_;
  std::vector<cell_report> cells_;
  std::map<std::string, std::string> meta_;
};

/// Folds the trials' results into a cell's totals.
inline void tally(cell_report& c, shared_array<trial_result>& results, std::size_t first, std::size_t count) {
  c.trials += static_cast<int>(count);
  for (std::size_t i = first; i < first + count; ++i) {
    const trial_result& r = results[i];
    const int o =
        r.outcome >= 0 && r.outcome < outcome_count ? r.outcome : static_cast<int>(outcome::setup_failed);
    ++c.counts[o];
    c.leftovers += r.leftovers;
    c.cut_frames += r.cut_frame;
    c.peer_closed += r.peer_closed;
    if (r.detect_ms >= 0) c.detect_ms.push_back(r.detect_ms);
    c.longest_wait_ms = std::max(c.longest_wait_ms, r.longest_wait_ms);
    if ((o != 0 || r.leftovers != 0) && c.notes.size() < 4) c.notes.emplace_back(r.note);
  }
  const bool clean = c.counts[0] == c.trials && c.leftovers == 0;
  if (c.status.empty()) c.status = clean ? "pass" : "fail";
}

inline std::string summary(const cell_report& c) {
  std::string s = c.transport + " " + c.mode + ", " + c.victim + " killed " + c.point + ": " +
                  std::to_string(c.counts[0]) + "/" + std::to_string(c.trials) + " survived";
  for (int i = 1; i < outcome_count; ++i)
    if (c.counts[i] != 0) s += ", " + std::to_string(c.counts[i]) + " " + outcome_names[i];
  if (c.leftovers != 0) s += ", " + std::to_string(c.leftovers) + " names left";
  for (const std::string& n : c.notes) s += "\n  - " + n;
  return s;
}

}  // namespace ipcoro::test::crash
