// SPDX-License-Identifier: MIT
// fifo_echo_server: a server on a well-known FIFO serving many concurrent clients, each
// with a reply FIFO of its own, one coroutine per client; the companion of fifo_echo_client.
//
//   clients --(requests, one shared FIFO)--> server --(replies, one FIFO per client)--> client
//
// Every message is one write of at most PIPE_BUF bytes (ipcoro::write_message), so the
// requests of many clients share the well-known FIFO without ever interleaving. A message
// is a 16-byte header {magic, type, length, client, seq} and `length` payload bytes:
//   hello    client -> server   payload: the path of the client's reply FIFO
//   welcome  server -> client   the session is open
//   echo     both ways          the server sends the request back as the reply
//   bye      client -> server   the server closes the reply FIFO: the client reads end of stream
//
// One coroutine reads the well-known FIFO and hands each request to its client's session
// coroutine through a small mailbox; the session writes the replies. The server keeps its
// own write end of the well-known FIFO, so it never reads end of stream between clients. A
// client that dies is noticed at once (its reply FIFO reports POLLERR) and its session ends.
// The server creates the well-known FIFO (mode 0600, or --mode) and removes it on exit,
// including after SIGINT/SIGTERM.
//
// Usage: fifo_echo_server FIFO_PATH [--clients N] [--mode OCTAL]
//   --clients N  wait until N clients are connected, serve them all at once, and exit once
//                all N have finished (0 only if every one of them said bye). Used by the
//                smoke test to prove N concurrent sessions. Without it, the server runs until
//                SIGINT or SIGTERM.
// Try it:  ./fifo_echo_server /tmp/echo.fifo &  ./fifo_echo_client /tmp/echo.fifo --requests 100
#include <ipcoro/ipcoro.hpp>

#include "fifo_echo_protocol.hpp"

#include <fmt/core.h>
#include <poll.h>
#include <signal.h>
#include <sys/signalfd.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>

namespace {

using namespace std::chrono_literals;
using ipcoro::task;

using namespace fifo_echo;

// ---- the server ----

constexpr std::size_t mailbox_slots = 8;   // at least the clients' window of requests in flight
constexpr auto open_reply_timeout = 10s;   // the client opens its reply FIFO right after hello
constexpr auto reply_write_timeout = 30s;  // a client that stops reading its replies
constexpr auto everyone_timeout = 60s;     // --clients N: all N must connect within this

/// One message, header and payload contiguous, as it goes out again.
struct slot {
  message_header header;
  std::array<std::byte, max_payload> payload;
  std::span<const std::byte> message() const noexcept {
    return std::as_bytes(std::span(this, 1)).first(sizeof header + header.length);
  }
};
static_assert(sizeof(slot) == ipcoro::fifo_message_max);

struct session {
  std::uint32_t client = 0;
  std::string reply_path;
  std::array<slot, mailbox_slots> mailbox;
  std::size_t head = 0;
  std::size_t tail = 0;
  ipcoro::semaphore free_slots{mailbox_slots};
  ipcoro::semaphore full_slots{0};
  bool closed = false;       ///< the session has ended: the dispatcher drops its requests
  bool client_gone = false;  ///< its reply FIFO lost its reader
};

struct server_state {
  std::optional<std::uint32_t> expected_clients;  ///< --clients N
  std::map<std::uint32_t, std::shared_ptr<session>> sessions;
  ipcoro::event everyone_here;
  std::uint32_t connected = 0;
  std::uint32_t live = 0;
  std::uint32_t peak = 0;
  std::uint32_t finished = 0;
  std::uint32_t completed = 0;  ///< sessions that ended with bye
  std::uint64_t replies = 0;
  std::uint64_t dropped = 0;
  bool failed = false;
};

/// Ends when the reply FIFO has no reader left (the client closed it, or died).
task<void> watch_client(session& s, int reply_fd, ipcoro::scope& session_scope) {
  try {
    co_await ipcoro::poll(reply_fd, POLLERR);
  } catch (const ipcoro::operation_cancelled&) {
    co_return;  // the session ended first
  }
  s.client_gone = true;
  session_scope.request_stop();
}

/// Writes the welcome, then a reply for each request, until bye.
task<void> converse(session& s, const ipcoro::pipe_writer& reply, server_state& st) {
  if (st.expected_clients) co_await st.everyone_here.wait();
  const message_header welcome_header{protocol_magic, welcome, 0, s.client, 0};
  co_await ipcoro::write_message(reply, std::as_bytes(std::span(&welcome_header, 1)))
      .with_timeout(reply_write_timeout);
  for (;;) {
    co_await s.full_slots.acquire();
    slot& m = s.mailbox[s.head];
    s.head = (s.head + 1) % mailbox_slots;
    if (m.header.type == bye) co_return;
    // The request goes back as it came: same header (client, seq, length), same payload.
    co_await ipcoro::write_message(reply, m.message()).with_timeout(reply_write_timeout);
    s.free_slots.release();
    ++st.replies;
  }
}

task<void> run_session(std::shared_ptr<session> s, server_state& st, ipcoro::scope& server_scope) {
  ++st.live;
  st.peak = std::max(st.peak, st.live);
  bool said_bye = false;
  try {
    ipcoro::pipe_writer reply =
        co_await ipcoro::open_fifo_writer(s->reply_path).with_timeout(open_reply_timeout);
    co_await ipcoro::with_scope([&](ipcoro::scope& session_scope) -> task<void> {
      session_scope.spawn(watch_client(*s, reply.native_handle(), session_scope));
      co_await converse(*s, reply, st);
      session_scope.request_stop();  // ends the watcher
    });
    said_bye = true;
  } catch (const ipcoro::operation_cancelled&) {
    if (s->client_gone) fmt::print(stderr, "fifo_echo_server: client {} went away without bye\n", s->client);
  } catch (const std::exception& e) {
    fmt::print(stderr, "fifo_echo_server: client {}: {}\n", s->client, e.what());
  }
  // The reply FIFO is closed by now: the client reads end of stream.
  s->closed = true;
  s->free_slots.release(mailbox_slots);  // a dispatcher waiting for room sees `closed`
  if (auto it = st.sessions.find(s->client); it != st.sessions.end() && it->second == s)
    st.sessions.erase(it);
  --st.live;
  ++st.finished;
  if (said_bye) ++st.completed;
  if (st.expected_clients && st.finished == *st.expected_clients) server_scope.request_stop();
}

/// Reads every request from the well-known FIFO and hands it to its client's session.
task<void> dispatch(ipcoro::fifo_server_reader& in, server_state& st, ipcoro::scope& server_scope) {
  try {
    std::array<std::byte, max_payload> payload;
    for (;;) {
      message_header h{};
      // The server holds a write end itself: this read waits for clients, never returns 0.
      co_await in.read_exact(std::as_writable_bytes(std::span(&h, 1)));
      if (h.magic != protocol_magic || h.length > max_payload) {
        // Messages are written whole, so only a foreign writer can cause this; the stream
        // cannot be resynchronised.
        throw std::runtime_error(
            fmt::format("malformed request (magic {:08x}, length {})", h.magic, h.length));
      }
      const auto body = std::span(payload).first(h.length);
      // Skipped when empty: through io_uring, even a read of 0 bytes waits until the FIFO has data.
      if (!body.empty()) co_await in.read_exact(body);

      if (h.type == hello) {
        auto s = std::make_shared<session>();
        s->client = h.client;
        s->reply_path.assign(reinterpret_cast<const char*>(body.data()), body.size());
        st.sessions[h.client] = s;  // a session of an earlier process with this pid ends by itself
        server_scope.spawn(run_session(s, st, server_scope));
        if (st.expected_clients && ++st.connected == *st.expected_clients) st.everyone_here.set();
        continue;
      }
      const auto it = st.sessions.find(h.client);
      if (it == st.sessions.end() || (h.type != echo && h.type != bye)) {
        ++st.dropped;
        continue;
      }
      std::shared_ptr<session> s = it->second;  // kept alive while this waits for room
      co_await s->free_slots.acquire();
      if (s->closed) {
        ++st.dropped;
        continue;
      }
      slot& m = s->mailbox[s->tail];
      s->tail = (s->tail + 1) % mailbox_slots;
      m.header = h;
      std::memcpy(m.payload.data(), body.data(), body.size());
      s->full_slots.release();
    }
  } catch (const ipcoro::operation_cancelled&) {
    // Shutting down.
  }
}

task<void> watch_signals(int signal_fd, ipcoro::scope& server_scope) {
  signalfd_siginfo info{};
  try {
    co_await ipcoro::read_exact(signal_fd, std::as_writable_bytes(std::span(&info, 1)));
  } catch (const ipcoro::operation_cancelled&) {
    co_return;
  }
  fmt::print("fifo_echo_server: {}, shutting down\n", ::strsignal(static_cast<int>(info.ssi_signo)));
  server_scope.request_stop();
}

task<void> watch_arrivals(server_state& st, ipcoro::scope& server_scope) {
  try {
    co_await ipcoro::sleep_for(everyone_timeout);
  } catch (const ipcoro::operation_cancelled&) {
    co_return;
  }
  if (st.everyone_here.is_set()) co_return;
  fmt::print(stderr, "fifo_echo_server: only {} of {} clients connected within {} s\n", st.connected,
             *st.expected_clients, std::chrono::seconds(everyone_timeout).count());
  st.failed = true;
  server_scope.request_stop();
}

task<void> serve(ipcoro::fifo_server_reader& in, int signal_fd, server_state& st) {
  co_await ipcoro::with_scope([&](ipcoro::scope& server_scope) -> task<void> {
    server_scope.spawn(watch_signals(signal_fd, server_scope));
    if (st.expected_clients) server_scope.spawn(watch_arrivals(st, server_scope));
    co_await dispatch(in, st, server_scope);
    server_scope.request_stop();  // the watchers and any session still running
  });
}

[[noreturn]] void usage(const char* argv0) {
  fmt::print(stderr, "usage: {} FIFO_PATH [--clients N] [--mode OCTAL]\n", argv0);
  std::exit(2);
}

}  // namespace

int main(int argc, char** argv) try {
  if (argc < 2 || argv[1][0] == '-') usage(argv[0]);
  const std::string path = argv[1];
  server_state st;
  ipcoro::fifo_options opts{.mode = 0600, .reclaim = true};  // reclaim what a crashed server left
  for (int i = 2; i < argc; ++i) {
    const std::string_view arg = argv[i];
    if (arg == "--clients" && i + 1 < argc) {
      const long n = std::strtol(argv[++i], nullptr, 10);
      if (n <= 0) usage(argv[0]);
      st.expected_clients = static_cast<std::uint32_t>(n);
    } else if (arg == "--mode" && i + 1 < argc) {
      opts.mode = static_cast<unsigned>(std::strtoul(argv[++i], nullptr, 8));
    } else {
      usage(argv[0]);
    }
  }

  try {
    // SIGINT/SIGTERM arrive through a signalfd read in the ring, so the FIFO is removed on the way out.
    sigset_t signals;
    sigemptyset(&signals);
    sigaddset(&signals, SIGINT);
    sigaddset(&signals, SIGTERM);
    if (::sigprocmask(SIG_BLOCK, &signals, nullptr) != 0) throw std::runtime_error("sigprocmask failed");
    ipcoro::unique_fd signal_fd{::signalfd(-1, &signals, SFD_CLOEXEC)};
    if (!signal_fd) throw std::runtime_error("signalfd failed");

    ipcoro::io_context ctx;
    ipcoro::fifo well_known(path, opts);
    ipcoro::fifo_server_reader in = ipcoro::open_fifo_server_reader(well_known.path());
    fmt::print("fifo_echo_server: listening on {}\n", well_known.path());
    std::fflush(stdout);

    const auto t0 = std::chrono::steady_clock::now();
    ipcoro::sync_wait(ctx, serve(in, signal_fd.get(), st));
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    fmt::print(
        "fifo_echo_server: served {} clients ({} said bye), {} requests, at most {} connected at once, "
        "{} dropped, {:.2f} s\n",
        st.finished, st.completed, st.replies, st.peak, st.dropped, seconds);
    if (st.expected_clients) {
      const bool ok = !st.failed && st.completed == *st.expected_clients && st.dropped == 0;
      if (!ok) fmt::print(stderr, "fifo_echo_server: FAILED\n");
      return ok ? 0 : 1;
    }
    return 0;
  } catch (const std::exception& e) {
    fmt::print(stderr, "fifo_echo_server: {}\n", e.what());
    return 1;
  }
} catch (const std::exception& e) {
  // Whatever nothing above caught (no io_uring, say): the message and status 1, not an abort.
  fmt::print(stderr, "{}: {}\n", argv[0], e.what());
  return 1;
}
