// SPDX-License-Identifier: MIT
// pipeline: stages in separate processes joined by typed channels, supervised as one job.
#pragma once

#include "ipcoro/channel.hpp"
#include "ipcoro/codec.hpp"
#include "ipcoro/export.hpp"
#include "ipcoro/io_context.hpp"
#include "ipcoro/process.hpp"
#include "ipcoro/sync_wait.hpp"
#include "ipcoro/task.hpp"

#include <sys/types.h>

#include <cstdint>
#include <functional>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace ipcoro {

/// A pipeline stopped because a stage failed or died. what() names the stage, its pid and
/// what happened (its exception's message, or the signal that killed it).
class IPCORO_API pipeline_error : public std::runtime_error {
 public:
  pipeline_error(std::string stage, const std::string& what)
      : std::runtime_error(what), stage_(std::move(stage)) {}
  const std::string& stage() const noexcept { return stage_; }

 private:
  std::string stage_;
};

/// How the stages are joined.
struct pipeline_options {
  std::string transport = "pipe";  ///< pipe, fifo, mq, shm or file: the transport of every edge
  std::string edge_options{};      ///< appended to every edge's address, e.g. "capacity=1m"
  /// Per edge, in order (source's output first): a transport, optionally with its own
  /// options ("shm?capacity=4m"), overriding `transport` and `edge_options` for that edge.
  /// Empty: every edge uses `transport`. Otherwise one entry per edge.
  std::vector<std::string> edges{};
};

/// What one stage did, for a report once the pipeline has finished.
struct stage_report {
  std::string name;
  pid_t pid = 0;
  std::uint64_t received = 0;  ///< messages taken from its input
  std::uint64_t sent = 0;      ///< messages put on its output
  double seconds = 0;          ///< from the stage's start to its end
};

namespace detail {

/// What a stage writes back to the parent through shared memory.
struct stage_slot {
  std::uint64_t received;
  std::uint64_t sent;
  double seconds;
  char error[480];
};

/// A stage as the runtime sees it: code run in the child with the links of its input and
/// output edges (null at the ends) and a call that closes every other link's descriptors.
struct pipeline_stage {
  std::string name;
  std::function<void(channel_link* in, channel_link* out, const std::function<void()>& close_others,
                     stage_slot& slot)>
      body;
};

template <class T>
void count_input(stage_slot& slot, const channel_receiver<T>& in) noexcept {
  slot.received = in.messages_received();
}
template <class T>
void count_output(stage_slot& slot, const channel_sender<T>& out) noexcept {
  slot.sent = out.messages_sent();
}

}  // namespace detail

class pipeline;

/// A pipeline under construction whose last stage produces values of T.
template <class T>
class pipeline_builder {
 public:
  /// Adds a stage that reads T and writes U: `body(channel_receiver<T>&, channel_sender<U>&)`
  /// returning task<void>. It runs in its own process, on its own io_context.
  template <encodable U, class F>
  [[nodiscard]] pipeline_builder<U> then(std::string name, F body) && {
    static_assert(std::is_invocable_r_v<task<void>, F&, channel_receiver<T>&, channel_sender<U>&>,
                  "pipeline stage: the body must be callable as task<void>(channel_receiver<In>&, "
                  "channel_sender<Out>&)");
    stages_.push_back({std::move(name), [body = std::move(body)](channel_link* in, channel_link* out,
                                                                 const std::function<void()>& close_others,
                                                                 detail::stage_slot& slot) mutable {
                         io_context ctx;
                         channel_receiver<T> rx = in->receiver<T>();
                         channel_sender<U> tx = out->sender<U>();
                         close_others();
                         try {
                           sync_wait(ctx, std::invoke(body, rx, tx));
                         } catch (...) {
                           detail::count_input(slot, rx);
                           detail::count_output(slot, tx);
                           tx.abort();  // downstream must not take a failure for a clean end
                           throw;
                         }
                         detail::count_input(slot, rx);
                         detail::count_output(slot, tx);
                       }});
    return pipeline_builder<U>{std::move(stages_)};
  }

  /// Ends the pipeline with a stage that reads T: `body(channel_receiver<T>&)` returning
  /// task<void>.
  template <class F>
  [[nodiscard]] pipeline sink(std::string name, F body) &&;

  explicit pipeline_builder(std::vector<detail::pipeline_stage> stages) : stages_(std::move(stages)) {}

 private:
  std::vector<detail::pipeline_stage> stages_;
};

/// Stages in separate processes, source → transforms … → sink, each edge a channel over
/// the chosen transport, bounded (backpressure runs end to end). run() forks every stage,
/// removes every IPC name as soon as the edges exist, and supervises: when a stage throws,
/// exits with an error or is killed, the others are killed and run() throws
/// pipeline_error naming it. A stage that ends because its consumer stopped reading
/// (channel_closed) counts as finished, as `yes | head` does in a shell; once a stage has
/// finished, the stages before it get 2 seconds to end on their own before they are
/// stopped (a producer busy with something else cannot learn that nobody reads).
class IPCORO_API pipeline {
 public:
  /// Starts a pipeline with a stage that writes T: `body(channel_sender<T>&)` returning
  /// task<void>.
  template <encodable T, class F>
  [[nodiscard]] static pipeline_builder<T> source(std::string name, F body) {
    static_assert(std::is_invocable_r_v<task<void>, F&, channel_sender<T>&>,
                  "pipeline source: the body must be callable as task<void>(channel_sender<Out>&)");
    std::vector<detail::pipeline_stage> stages;
    stages.push_back({std::move(name), [body = std::move(body)](channel_link*, channel_link* out,
                                                                const std::function<void()>& close_others,
                                                                detail::stage_slot& slot) mutable {
                        io_context ctx;
                        channel_sender<T> tx = out->sender<T>();
                        close_others();
                        try {
                          sync_wait(ctx, std::invoke(body, tx));
                        } catch (...) {
                          detail::count_output(slot, tx);
                          tx.abort();
                          throw;
                        }
                        detail::count_output(slot, tx);
                      }});
    return pipeline_builder<T>{std::move(stages)};
  }

  /// Runs the stages to the end. Returns a report per stage; throws pipeline_error when a
  /// stage failed (no stage is left running), bad_channel_address or std::system_error
  /// when the edges cannot be made.
  [[nodiscard]] task<std::vector<stage_report>> run(const pipeline_options& opts);
  /// run() with the default options.
  [[nodiscard]] task<std::vector<stage_report>> run();
  /// Refused on purpose: name the options (`pipeline_options opts{...}; co_await
  /// job.run(opts);`). GCC 12 copies a temporary written inside a co_await expression,
  /// such as `co_await job.run({.transport = "shm"})`, into the coroutine frame bytewise,
  /// and its strings are then freed from the wrong address (a crash).
  task<std::vector<stage_report>> run(pipeline_options&& opts) = delete;

  std::size_t size() const noexcept { return stages_.size(); }
  explicit pipeline(std::vector<detail::pipeline_stage> stages) : stages_(std::move(stages)) {}

 private:
  task<std::vector<stage_report>> run_with(pipeline_options opts);

  std::vector<detail::pipeline_stage> stages_;
};

template <class T>
template <class F>
pipeline pipeline_builder<T>::sink(std::string name, F body) && {
  static_assert(std::is_invocable_r_v<task<void>, F&, channel_receiver<T>&>,
                "pipeline sink: the body must be callable as task<void>(channel_receiver<In>&)");
  stages_.push_back({std::move(name), [body = std::move(body)](channel_link* in, channel_link*,
                                                               const std::function<void()>& close_others,
                                                               detail::stage_slot& slot) mutable {
                       io_context ctx;
                       channel_receiver<T> rx = in->receiver<T>();
                       close_others();
                       try {
                         sync_wait(ctx, std::invoke(body, rx));
                       } catch (...) {
                         detail::count_input(slot, rx);
                         throw;
                       }
                       detail::count_input(slot, rx);
                     }});
  return pipeline{std::move(stages_)};
}

}  // namespace ipcoro
