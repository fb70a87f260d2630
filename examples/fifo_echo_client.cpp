// SPDX-License-Identifier: MIT
// fifo_echo_client: a client of fifo_echo_server. It creates a reply FIFO of its own, says
// hello through the server's well-known FIFO, sends requests with a window of several in
// flight, and checks that every reply matches its request (client, sequence number, length
// and every payload byte). Exits 0 only if all replies were verified and the server then
// closed the session cleanly.
//
// Each request is one atomic write of at most PIPE_BUF bytes (ipcoro::write_message), so
// it can share the well-known FIFO with other clients' requests. Requests go out from one
// coroutine and replies are checked in another. The reply FIFO's name is removed as soon
// as the server has opened it, so nothing is left in the file system even if this client
// is killed. Every wait has a timeout: a missing or dead server makes the client fail, not hang.
//
// Usage: fifo_echo_client SERVER_FIFO [--requests N] [--window W] [--reply-dir DIR] [--timeout-ms T]
//   The reply FIFO is DIR/echo-reply-<pid> (DIR defaults to the server FIFO's directory).
// Try it:  ./fifo_echo_server /tmp/echo.fifo &  ./fifo_echo_client /tmp/echo.fifo --requests 100
#include <ipcoro/ipcoro.hpp>

#include "fifo_echo_protocol.hpp"

#include <fmt/core.h>
#include <unistd.h>

#include <array>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <filesystem>
#include <span>
#include <string>
#include <string_view>

namespace {

using ipcoro::task;

using namespace fifo_echo;

// ---- the client ----

struct config {
  std::string server_path;
  std::string reply_dir;
  std::uint32_t requests = 200;
  std::uint32_t window = 4;  // at most the server's mailbox (8)
  std::chrono::milliseconds timeout{30'000};
};

std::uint64_t mix(std::uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

/// The request for `seq`: its length and bytes follow from (pid, seq), so the reply can
/// be checked without keeping the request.
std::uint16_t request_length(std::uint32_t pid, std::uint32_t seq) {
  return static_cast<std::uint16_t>(1 + mix((std::uint64_t{pid} << 32) | seq) % max_payload);
}
void fill_request(std::uint32_t pid, std::uint32_t seq, std::span<std::byte> out) {
  std::uint64_t state = mix((std::uint64_t{seq} << 32) | pid);
  for (std::size_t i = 0; i < out.size(); ++i) {
    if (i % 8 == 0) state = mix(state);
    out[i] = static_cast<std::byte>(state >> ((i % 8) * 8));
  }
}

task<void> send_requests(const ipcoro::pipe_writer& out, std::uint32_t pid, const config& cfg,
                         ipcoro::semaphore& window) {
  message m{};
  for (std::uint32_t seq = 0; seq < cfg.requests; ++seq) {
    co_await window.acquire();
    m.header = {protocol_magic, echo, request_length(pid, seq), pid, seq};
    fill_request(pid, seq, std::span(m.payload).first(m.header.length));
    co_await ipcoro::write_message(out, m.bytes()).with_timeout(cfg.timeout);
  }
  m.header = {protocol_magic, bye, 0, pid, cfg.requests};
  co_await ipcoro::write_message(out, m.bytes()).with_timeout(cfg.timeout);
}

/// Checks every reply; returns a description of the first mismatch, or "" when all matched.
task<std::string> find_mismatch(const ipcoro::pipe_reader& in, std::uint32_t pid, const config& cfg,
                                ipcoro::semaphore& window) {
  message reply{};
  std::array<std::byte, max_payload> expected;
  std::uint32_t seq = 0;
  try {
    for (; seq < cfg.requests; ++seq) {
      const std::size_t got = co_await in.read_exact(std::as_writable_bytes(std::span(&reply.header, 1)))
                                  .with_timeout(cfg.timeout);
      if (got != sizeof reply.header) {
        co_return fmt::format("the server closed the session after {} of {} replies", seq, cfg.requests);
      }
      const message_header& h = reply.header;
      const std::uint16_t length = request_length(pid, seq);
      if (h.magic != protocol_magic || h.type != echo || h.client != pid || h.seq != seq ||
          h.length != length) {
        co_return fmt::format(
            "reply {}: expected {{client {}, seq {}, length {}}}, got {{magic {:08x}, type {}, "
            "client {}, seq {}, length {}}}",
            seq, pid, seq, length, h.magic, h.type, h.client, h.seq, h.length);
      }
      const auto body = std::span(reply.payload).first(length);
      if (co_await in.read_exact(body).with_timeout(cfg.timeout) != body.size()) {
        co_return fmt::format("reply {} was cut short", seq);
      }
      fill_request(pid, seq, std::span(expected).first(length));
      if (std::memcmp(body.data(), expected.data(), length) != 0)
        co_return fmt::format("reply {}: payload differs", seq);
      window.release();
    }
    // After bye the server closes our reply FIFO: end of stream, and nothing after the last reply.
    std::array<std::byte, 1> extra{};
    if (co_await in.read(extra).with_timeout(cfg.timeout) != 0) co_return "data after the last reply";
  } catch (const ipcoro::timed_out&) {
    if (seq < cfg.requests) co_return fmt::format("no reply {} within {} ms", seq, cfg.timeout.count());
    co_return fmt::format("the server did not end the session within {} ms of the last reply",
                          cfg.timeout.count());
  }
  co_return "";
}

/// Throws at the first mismatch, which makes when_all stop the sender too (it may be
/// waiting for room in the window that only replies would make).
task<void> check_replies(const ipcoro::pipe_reader& in, std::uint32_t pid, const config& cfg,
                         ipcoro::semaphore& window) {
  std::string problem = co_await find_mismatch(in, pid, cfg, window);
  if (!problem.empty()) throw std::runtime_error(problem);
}

task<void> run_client(const config& cfg) {
  const auto pid = static_cast<std::uint32_t>(::getpid());
  // reclaim: a client that died with this pid long ago may have left its FIFO.
  ipcoro::fifo reply_fifo(fmt::format("{}/echo-reply-{}", cfg.reply_dir, pid), {.reclaim = true});

  ipcoro::pipe_writer to_server;
  try {
    to_server = co_await ipcoro::open_fifo_writer(cfg.server_path).with_timeout(cfg.timeout);
  } catch (const ipcoro::timed_out&) {
    throw std::runtime_error(fmt::format("no server opened {} within {} ms: is fifo_echo_server running?",
                                         cfg.server_path, cfg.timeout.count()));
  }
  message hello_message{};
  const std::string& reply_path = reply_fifo.path();
  if (reply_path.size() > max_payload)
    throw std::runtime_error("the reply FIFO's path is too long for one message");
  hello_message.header = {protocol_magic, hello, static_cast<std::uint16_t>(reply_path.size()), pid, 0};
  std::memcpy(hello_message.payload.data(), reply_path.data(), reply_path.size());
  co_await ipcoro::write_message(to_server, hello_message.bytes()).with_timeout(cfg.timeout);

  // Completes once the server's session has opened the other end.
  ipcoro::pipe_reader from_server = co_await ipcoro::open_fifo_reader(reply_path).with_timeout(cfg.timeout);
  reply_fifo.unlink();  // both ends are open: the name is no longer needed

  message_header welcome_header{};
  if (co_await from_server.read_exact(std::as_writable_bytes(std::span(&welcome_header, 1)))
              .with_timeout(cfg.timeout) != sizeof welcome_header ||
      welcome_header.magic != protocol_magic || welcome_header.type != welcome ||
      welcome_header.client != pid) {
    throw std::runtime_error("the server did not welcome this client");
  }

  const auto t0 = std::chrono::steady_clock::now();
  ipcoro::semaphore window{cfg.window};
  co_await ipcoro::when_all(send_requests(to_server, pid, cfg, window),
                            check_replies(from_server, pid, cfg, window));
  const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  fmt::print("fifo_echo_client {}: {} replies verified ({:.1f} ms)\n", pid, cfg.requests, ms);
}

[[noreturn]] void usage(const char* argv0) {
  fmt::print(stderr, "usage: {} SERVER_FIFO [--requests N] [--window W] [--reply-dir DIR] [--timeout-ms T]\n",
             argv0);
  std::exit(2);
}

std::uint32_t positive(const char* text, const char* argv0) {
  char* end = nullptr;
  const unsigned long v = std::strtoul(text, &end, 10);
  if (end == text || *end != '\0' || v == 0 || v > 1'000'000'000ul) usage(argv0);
  return static_cast<std::uint32_t>(v);
}

}  // namespace

int main(int argc, char** argv) try {
  if (argc < 2 || argv[1][0] == '-') usage(argv[0]);
  config cfg;
  cfg.server_path = argv[1];
  cfg.reply_dir = std::filesystem::path(cfg.server_path).parent_path().string();
  if (cfg.reply_dir.empty()) cfg.reply_dir = ".";
  for (int i = 2; i < argc; ++i) {
    const std::string_view arg = argv[i];
    if (i + 1 >= argc) usage(argv[0]);
    if (arg == "--requests") {
      cfg.requests = positive(argv[++i], argv[0]);
    } else if (arg == "--window") {
      cfg.window = positive(argv[++i], argv[0]);
    } else if (arg == "--reply-dir") {
      cfg.reply_dir = argv[++i];
    } else if (arg == "--timeout-ms") {
      cfg.timeout = std::chrono::milliseconds(positive(argv[++i], argv[0]));
    } else {
      usage(argv[0]);
    }
  }
  try {
    ipcoro::io_context ctx;
    ipcoro::sync_wait(ctx, run_client(cfg));
    return 0;
  } catch (const std::exception& e) {
    fmt::print(stderr, "fifo_echo_client {}: {}\n", ::getpid(), e.what());
    return 1;
  }
} catch (const std::exception& e) {
  // Whatever nothing above caught (no io_uring, say): the message and status 1, not an abort.
  fmt::print(stderr, "{}: {}\n", argv[0], e.what());
  return 1;
}
