// SPDX-License-Identifier: MIT
// pipeline: forking the stages, making the edges, and supervising the processes.
#include "ipcoro/pipeline.hpp"

#include "ipcoro/error.hpp"
#include "ipcoro/when_any.hpp"

#include "liveness.hpp"

#include <fmt/core.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <optional>

namespace ipcoro {
namespace {

std::string edge_address(const pipeline_options& opts, std::size_t run, std::size_t edge) {
  const std::string name = fmt::format("ipcoro-pipeline-{}-{}-{}", ::getpid(), run, edge);
  std::string transport = opts.transport;
  std::string options = opts.edge_options;
  if (!opts.edges.empty()) {
    transport = opts.edges.at(edge);
    options.clear();
    if (const std::size_t q = transport.find('?'); q != std::string::npos) {
      options = transport.substr(q + 1);
      transport.resize(q);
    }
  }
  std::string a;
  if (transport == "pipe") {
    a = "pipe:";
  } else if (transport == "fifo" || transport == "file") {
    a = fmt::format("{}:/tmp/{}", transport, name);
  } else if (transport == "mq" || transport == "shm") {
    a = fmt::format("{}:/{}", transport, name);
  } else {
    throw bad_channel_address(
        fmt::format("pipeline transport \"{}\": expected pipe, fifo, mq, shm or file", transport));
  }
  if (!options.empty()) a += "?" + options;
  return a;
}

/// The stages' report slots, in memory the children share with the parent.
class shared_slots {
 public:
  explicit shared_slots(std::size_t n) : size_(n * sizeof(detail::stage_slot)) {
    void* p = ::mmap(nullptr, size_, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) throw_errno(errno, "pipeline: mmap of the stage reports");
    slots_ = static_cast<detail::stage_slot*>(p);
  }
  shared_slots(const shared_slots&) = delete;
  shared_slots& operator=(const shared_slots&) = delete;
  ~shared_slots() { ::munmap(slots_, size_); }
  detail::stage_slot& operator[](std::size_t i) noexcept { return slots_[i]; }

 private:
  detail::stage_slot* slots_ = nullptr;
  std::size_t size_;
};

void record_error(detail::stage_slot& slot, const char* what) noexcept {
  const std::size_t n = std::min(std::strlen(what), sizeof slot.error - 1);
  std::memcpy(slot.error, what, n);
  slot.error[n] = '\0';
}

/// How likely a failed stage is the cause rather than a neighbour of the cause: killed by
/// a signal first, then a failure of its own, then a complaint about a dead peer.
int blame_rank(const exit_status& st, const detail::stage_slot& slot) {
  if (!st.exited()) return 0;
  const std::string_view error = slot.error;
  if (error.find("died") != std::string_view::npos || error.find("went away") != std::string_view::npos)
    return 2;
  return 1;
}

std::atomic<std::size_t> runs{0};

/// How long a stage that reports a dead neighbour waits for that neighbour's exit.
constexpr std::chrono::seconds neighbour_grace{2};
/// How long the stages before one that finished may take to end on their own.
constexpr std::chrono::seconds finish_grace{2};

std::vector<channel_link> make_links(const pipeline_options& opts, std::size_t run_id, std::size_t edges) {
  std::vector<channel_link> links;
  links.reserve(edges);
  for (std::size_t e = 0; e < edges; ++e)
    links.push_back(channel_link::create(edge_address(opts, run_id, e)));
  return links;
}

/// A stage's child process: runs its body, records how it ended in its slot, and returns
/// the exit code.
int run_stage(const detail::pipeline_stage& stage, channel_link* in, channel_link* out,
              const std::function<void()>& close_links, detail::stage_slot& slot) {
  const auto t0 = std::chrono::steady_clock::now();
  int code = 0;
  try {
    stage.body(in, out, close_links, slot);
  } catch (const channel_closed&) {
    // The consumer stopped reading: this stage is done, as a shell's `yes | head`.
  } catch (const std::exception& e) {
    record_error(slot, e.what());
    code = 70;
  } catch (...) {
    record_error(slot, "an exception that is not a std::exception");
    code = 70;
  }
  slot.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return code;
}

/// The stages' processes of one run, and what is known of how each ended.
struct stage_processes {
  std::vector<process> procs;
  std::vector<pid_t> pids;
  std::vector<std::optional<exit_status>> status;
  std::vector<bool> finished_early;  // still running after a later stage finished: stopped
  std::optional<std::size_t> failed;

  std::size_t size() const noexcept { return procs.size(); }
  bool running() const {
    return std::any_of(status.begin(), status.end(), [](const std::optional<exit_status>& s) { return !s; });
  }
};

/// Forks a process per stage, then closes the parent's copies of the links.
stage_processes fork_stages(const std::vector<detail::pipeline_stage>& stages, shared_slots& slots,
                            std::vector<channel_link>& links) {
  const std::size_t n = stages.size();
  const std::function<void()> close_links = [&links] {
    for (channel_link& l : links) l.reset();
  };
  stage_processes sp;
  sp.procs.reserve(n);
  for (std::size_t i = 0; i < n; ++i) {
    sp.procs.push_back(process::fork(
        [&, i]() -> int {
          return run_stage(stages[i], i > 0 ? &links[i - 1] : nullptr, i + 1 < n ? &links[i] : nullptr,
                           close_links, slots[i]);
        },
        process_options{.name = stages[i].name}));
    sp.pids.push_back(sp.procs.back().pid());
  }
  close_links();
  sp.status.resize(n);
  sp.finished_early.assign(n, false);
  return sp;
}

/// Stage `finished` ended well, so whatever an earlier stage still produces has no reader
/// (a queue or MPMC ring cannot tell it so). An earlier stage still running may well be
/// past its last message, doing its final work: it gets a moment to end on its own (and
/// an error it ends with is reported); one still running after that is stopped, which is
/// no failure.
task<void> let_earlier_stages_end(stage_processes& sp, std::size_t finished) {
  const auto deadline = std::chrono::steady_clock::now() + finish_grace;
  for (std::size_t j = 0; j < finished && !sp.failed; ++j) {
    if (sp.status[j] || sp.finished_early[j]) continue;
    try {
      const auto left = std::max<std::chrono::nanoseconds>(deadline - std::chrono::steady_clock::now(),
                                                           std::chrono::nanoseconds{1});
      sp.status[j] = co_await sp.procs[j].wait(left);
      if (!sp.status[j]->success()) sp.failed = j;
    } catch (const timed_out&) {
      sp.finished_early[j] = true;
      sp.procs[j].kill();
    }
  }
}

/// Waits for the stages until every one has ended or one has failed (sp.failed).
task<void> await_stages(stage_processes& sp) {
  while (!sp.failed && sp.running()) {
    std::vector<task<exit_status>> waits;
    std::vector<std::size_t> which;
    for (std::size_t i = 0; i < sp.size(); ++i) {
      if (!sp.status[i]) {
        waits.push_back(sp.procs[i].wait());
        which.push_back(i);
      }
    }
    when_any_result<exit_status> first = co_await when_any(std::move(waits));
    const std::size_t i = which[first.index];
    sp.status[i] = first.value;
    if (sp.finished_early[i]) continue;
    if (!first.value.success()) {
      sp.failed = i;
    } else {
      co_await let_earlier_stages_end(sp, i);
    }
  }
}

/// Stage `f` failed because a neighbour died; that neighbour closed its descriptors on its
/// way out and is about to be reaped. Give it a moment, so the blame lands on it.
task<void> await_dying_neighbour(stage_processes& sp, std::size_t f) {
  std::vector<task<exit_status>> waits;
  std::vector<std::size_t> which;
  for (std::size_t j : {f - 1, f + 1}) {
    if (j < sp.size() && !sp.status[j]) {
      waits.push_back(sp.procs[j].wait(neighbour_grace));
      which.push_back(j);
    }
  }
  if (waits.empty()) co_return;
  try {
    when_any_result<exit_status> first = co_await when_any(std::move(waits));
    sp.status[which[first.index]] = first.value;
  } catch (const timed_out&) {
  }
}

/// After a failure: collects whoever has also ended by now (for reasons of its own), stops
/// and reaps the rest, and returns the stopped ones.
task<std::vector<std::size_t>> stop_the_rest(stage_processes& sp) {
  for (std::size_t i = 0; i < sp.size(); ++i) {
    if (!sp.status[i]) sp.status[i] = sp.procs[i].try_wait();
  }
  // A stage killed from outside closes its descriptors early in its exit, so a neighbour
  // can fail, and be reaped, before the killed one is a zombie. One already exiting ends
  // for its own reason: wait for that, rather than stop it and lose the reason.
  for (std::size_t i = 0; i < sp.size(); ++i) {
    if (sp.status[i] || !detail::pid_exiting(sp.pids[i])) continue;
    try {
      sp.status[i] = co_await sp.procs[i].wait(neighbour_grace);
    } catch (const timed_out&) {
    }
  }
  std::vector<std::size_t> stopped;
  for (std::size_t i = 0; i < sp.size(); ++i) {
    if (!sp.status[i] || sp.finished_early[i]) {
      sp.procs[i].kill();
      stopped.push_back(i);
    }
  }
  for (std::size_t i : stopped) {
    if (!sp.status[i]) sp.status[i] = co_await sp.procs[i].wait();
  }
  co_return stopped;
}

/// Of the stages that failed on their own, the likeliest cause (see blame_rank); the first
/// failure when none is likelier.
std::size_t find_culprit(const stage_processes& sp, shared_slots& slots,
                         const std::vector<std::size_t>& stopped) {
  std::size_t culprit = *sp.failed;
  for (std::size_t i = 0; i < sp.size(); ++i) {
    const bool own = std::find(stopped.begin(), stopped.end(), i) == stopped.end();
    if (own && !sp.status[i]->success() &&
        blame_rank(*sp.status[i], slots[i]) < blame_rank(*sp.status[culprit], slots[culprit])) {
      culprit = i;
    }
  }
  return culprit;
}

pipeline_error failure_error(const std::vector<detail::pipeline_stage>& stages, const stage_processes& sp,
                             shared_slots& slots, std::size_t culprit,
                             const std::vector<std::size_t>& stopped) {
  const exit_status& st = *sp.status[culprit];
  const std::string detail = slots[culprit].error[0] != '\0' ? std::string(": ") + slots[culprit].error : "";
  return pipeline_error(
      stages[culprit].name,
      fmt::format("pipeline stage '{}' (pid {}) {}{}{}", stages[culprit].name, sp.pids[culprit],
                  st.exited() ? fmt::format("failed ({})", st.describe()) : st.describe(), detail,
                  stopped.empty() ? std::string()
                                  : fmt::format("; {} other stage{} stopped", stopped.size(),
                                                stopped.size() == 1 ? " was" : "s were")));
}

std::vector<stage_report> make_reports(const std::vector<detail::pipeline_stage>& stages,
                                       const stage_processes& sp, shared_slots& slots) {
  std::vector<stage_report> reports;
  reports.reserve(sp.size());
  for (std::size_t i = 0; i < sp.size(); ++i) {
    reports.push_back(
        stage_report{stages[i].name, sp.pids[i], slots[i].received, slots[i].sent, slots[i].seconds});
  }
  return reports;
}

}  // namespace

task<std::vector<stage_report>> pipeline::run(const pipeline_options& opts) { return run_with(opts); }

task<std::vector<stage_report>> pipeline::run() { return run_with(pipeline_options{}); }

task<std::vector<stage_report>> pipeline::run_with(pipeline_options opts) {
  const std::size_t n = stages_.size();
  if (n < 2) throw std::invalid_argument("ipcoro::pipeline::run: a pipeline needs a source and a sink");
  const std::size_t run_id = runs.fetch_add(1);
  if (!opts.edges.empty() && opts.edges.size() != n - 1) {
    throw std::invalid_argument(fmt::format("ipcoro::pipeline::run: {} edge transports given for {} edges",
                                            opts.edges.size(), n - 1));
  }

  shared_slots slots(n);
  std::vector<channel_link> links = make_links(opts, run_id, n - 1);
  stage_processes sp = fork_stages(stages_, slots, links);
  co_await await_stages(sp);
  if (sp.failed) {
    if (blame_rank(*sp.status[*sp.failed], slots[*sp.failed]) == 2)
      co_await await_dying_neighbour(sp, *sp.failed);
    const std::vector<std::size_t> stopped = co_await stop_the_rest(sp);
    const std::size_t culprit = find_culprit(sp, slots, stopped);
    throw failure_error(stages_, sp, slots, culprit, stopped);
  }
  co_return make_reports(stages_, sp, slots);
}

}  // namespace ipcoro
