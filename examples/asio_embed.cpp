// SPDX-License-Identifier: MIT
// asio_embed: an Asio program that drives ipcoro from its own loop on one thread (ipcoro/asio.hpp).
//
// A worker process, forked with ipcoro::process, upper-cases the words it receives over a
// shared-memory channel and sends them back over another. The parent is an ordinary Asio
// program: its coroutine is an asio::awaitable, it awaits ipcoro's channel operations and the
// worker's exit through ipcoro::as_asio, and io.run() drives ipcoro's io_context through an
// ipcoro::asio_driver: no second thread. Exits 0 when every answer is right.
//
// Run: ./build/examples/asio_embed
#include <ipcoro/asio.hpp>
#include <ipcoro/ipcoro.hpp>

#include <asio/co_spawn.hpp>
#include <asio/io_context.hpp>

#include <fmt/core.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <exception>
#include <optional>
#include <string>

namespace {

using ipcoro::channel_receiver;
using ipcoro::channel_sender;
using ipcoro::task;

constexpr int word_count = 10'000;

std::string word(int i) { return "word-" + std::to_string(i); }

std::string upper(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(),
                 [](unsigned char c) { return static_cast<char>(std::toupper(c)); });
  return s;
}

// The worker: an ordinary ipcoro program with an io_context of its own.
task<void> serve(channel_receiver<std::string>& requests, channel_sender<std::string>& replies) {
  while (std::optional<std::string> w = co_await requests.receive()) {
    std::string answer = upper(std::move(*w));
    co_await replies.send(std::move(answer));
  }
}

// The Asio side. Each ipcoro task is named before co_await (GCC 12 mishandles temporaries with
// destructors inside a co_await expression).
asio::awaitable<int> ask(ipcoro::asio_driver& driver, channel_sender<std::string>& requests,
                         channel_receiver<std::string>& replies, ipcoro::process& worker) {
  int wrong = 0;
  for (int i = 0; i < word_count; ++i) {
    auto sent = ipcoro::as_asio(driver, requests.send(word(i)));
    co_await std::move(sent);
    auto received = ipcoro::as_asio(driver, replies.receive());
    std::optional<std::string> answer = co_await std::move(received);
    if (answer != upper(word(i))) ++wrong;
  }
  requests.close();  // the worker's receive() ends, and so does the worker
  auto exited = ipcoro::as_asio(driver, worker.wait());
  ipcoro::exit_status status = co_await std::move(exited);
  fmt::print("asio_embed: {} words upper-cased by worker {} ({} wrong), worker {}\n", word_count,
             worker.pid(), wrong, status.describe());
  co_return wrong == 0 && status.success() ? 0 : 1;
}

}  // namespace

int main() try {
  try {
    const std::string suffix = std::to_string(::getpid());
    ipcoro::channel_link to_worker = ipcoro::channel_link::create("shm:/asio-embed-requests-" + suffix);
    ipcoro::channel_link from_worker = ipcoro::channel_link::create("shm:/asio-embed-replies-" + suffix);
    ipcoro::process worker = ipcoro::process::fork([&] {
      channel_receiver<std::string> requests = to_worker.receiver<std::string>();
      channel_sender<std::string> replies = from_worker.sender<std::string>();
      to_worker.reset();
      from_worker.reset();
      ipcoro::io_context ctx;
      ipcoro::sync_wait(ctx, serve(requests, replies));
      return 0;
    });
    channel_sender<std::string> requests = to_worker.sender<std::string>();
    channel_receiver<std::string> replies = from_worker.receiver<std::string>();
    to_worker.reset();
    from_worker.reset();

    // Asio's context and ipcoro's, made to be driven by another loop, on this one thread. Asio's
    // comes first, so that it outlives ipcoro's: a task the latter cancels as it goes away still
    // posts its outcome to a live Asio context.
    asio::io_context io(1);
    ipcoro::io_context::options opts;
    opts.embedded = true;
    ipcoro::io_context ctx(opts);
    ipcoro::asio_driver driver(io, ctx);

    int result = 1;
    std::exception_ptr failure;
    asio::co_spawn(io, ask(driver, requests, replies, worker), [&](std::exception_ptr e, int r) {
      failure = e;
      result = r;
    });
    io.run();  // returns once the coroutine is done and ipcoro's context is idle
    if (failure) std::rethrow_exception(failure);
    return result;
  } catch (const std::exception& e) {
    fmt::print(stderr, "asio_embed: {}\n", e.what());
    return 1;
  }
} catch (const std::exception& e) {
  // Whatever nothing above caught (no io_uring, say): the message and status 1, not an abort.
  fmt::print(stderr, "asio_embed: {}\n", e.what());
  return 1;
}
