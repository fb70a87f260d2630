// SPDX-License-Identifier: MIT
// kv_server: an async key-value server that many client processes use at once over typed channels.
//
//   client 0..N-1 --mq:/kv-<pid>-requests (one queue, many senders)--> server (in the parent)
//   server --shm:/kv-<pid>-reply-<i> (one ring per client)--> client i
//
// The parent opens the request channel by name and runs the server; it forks N clients
// (ipcoro::process). Each client opens its own reply channel by name (a shared-memory
// ring), says hello with that address on the request queue, and then pipelines requests
// (get / put / del of its own keys, plus reads of keys the parent seeded for everyone),
// keeping up to `window` requests in flight. The server's dispatcher hands each client's
// requests to one coroutine per client (through an in-process channel, so a slow client
// stalls only itself); that coroutine applies them to the store and answers on a sender
// it opened for the client. Requests travel through a user codec (ipcoro::codec<request>,
// variable-length strings); replies are a trivially copyable struct (the built-in codec).
//
// Checks: each client predicts every reply from its own model of its keys and counts
// mismatches; the parent replays every client's (deterministic) workload and compares the
// final store with it. Shutdown: a client ends with `bye` (its session closes the reply
// channel, which the client sees as the end of the stream) and detaches its sender, since
// close() on a message-queue sender would end the queue for every client. Once every
// client has exited, the parent closes its own sender: that ends the request stream and
// the server. Nothing is left in /dev/mqueue or /dev/shm, even when a client is killed.
// Exits 0 only if every client exited 0, every reply was right and the store matches.
//
// Usage: kv_server [--clients N] [--ops M]
#include <ipcoro/channel.hpp>
#include <ipcoro/io_context.hpp>
#include <ipcoro/process.hpp>
#include <ipcoro/scope.hpp>
#include <ipcoro/shm_segment.hpp>
#include <ipcoro/sync_wait.hpp>
#include <ipcoro/task.hpp>
#include <ipcoro/when_all.hpp>

#include <dirent.h>
#include <fcntl.h>
#include <fmt/core.h>
#include <mqueue.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

namespace kv {

enum class op : std::uint8_t { hello, get, put, del, bye };

/// A request. For `hello`, `key` carries the client's reply address.
struct request {
  op kind = op::get;
  std::uint32_t client = 0;
  std::uint32_t seq = 0;
  std::string key;
  std::string value;
};

constexpr std::size_t max_value = 48;

/// A reply; trivially copyable, so the built-in codec sends it by memcpy.
struct reply {
  std::uint32_t seq = 0;
  std::uint8_t found = 0;  ///< get: the key exists; put: it replaced a value; del: it removed one
  std::uint8_t value_size = 0;
  std::array<char, max_value> value{};

  std::string_view text() const noexcept { return {value.data(), value_size}; }
};

}  // namespace kv

/// The wire form of a request: a fixed head, then the key, then the value.
template <>
struct ipcoro::codec<kv::request> {
  struct head {
    std::uint8_t kind;
    std::uint8_t reserved;
    std::uint16_t key_size;
    std::uint32_t client;
    std::uint32_t seq;
  };
  static std::string type_name() { return "kv::request"; }
  static constexpr std::uint32_t version = 1;
  static std::size_t size(const kv::request& r) noexcept {
    return sizeof(head) + r.key.size() + r.value.size();
  }
  static void encode(const kv::request& r, std::span<std::byte> out) noexcept {
    const head h{static_cast<std::uint8_t>(r.kind), 0, static_cast<std::uint16_t>(r.key.size()), r.client,
                 r.seq};
    std::memcpy(out.data(), &h, sizeof h);
    std::memcpy(out.data() + sizeof h, r.key.data(), r.key.size());
    std::memcpy(out.data() + sizeof h + r.key.size(), r.value.data(), r.value.size());
  }
  static kv::request decode(std::span<const std::byte> in) {
    head h{};
    if (in.size() < sizeof h) throw ipcoro::decode_error("kv::request: shorter than its head");
    std::memcpy(&h, in.data(), sizeof h);
    if (h.kind > static_cast<std::uint8_t>(kv::op::bye))
      throw ipcoro::decode_error("kv::request: unknown op");
    if (h.key_size > in.size() - sizeof h)
      throw ipcoro::decode_error("kv::request: the key runs past the end");
    const char* text = reinterpret_cast<const char*>(in.data() + sizeof h);
    return kv::request{static_cast<kv::op>(h.kind), h.client, h.seq, std::string(text, h.key_size),
                       std::string(text + h.key_size, in.size() - sizeof h - h.key_size)};
  }
};

namespace kv {

using ipcoro::channel_receiver;
using ipcoro::channel_sender;
using ipcoro::task;

constexpr std::uint32_t shared_keys = 16;
constexpr std::uint32_t keys_per_client = 48;
constexpr std::size_t window = 8;  ///< requests a client keeps in flight

std::string shared_key(std::uint32_t i) { return fmt::format("shared/{}", i); }
std::string shared_value(std::uint32_t i) { return fmt::format("seeded-{}", i * 7919); }

// ---- the workload: deterministic per client, so the parent can replay it ----

class workload {
 public:
  explicit workload(std::uint32_t client) : state_(0xd1b54a32d192ed03ull * (client + 1)), client_(client) {}

  request next(std::uint32_t seq) {
    const std::uint64_t r = random();
    const std::uint32_t pick = static_cast<std::uint32_t>(r % 100);
    const std::uint32_t index = static_cast<std::uint32_t>((r >> 8) % keys_per_client);
    request q{op::get, client_, seq, fmt::format("c{}/k{}", client_, index), {}};
    if (pick < 10) {
      q.key = shared_key(static_cast<std::uint32_t>((r >> 16) % shared_keys));
    } else if (pick >= 50 && pick < 85) {
      q.kind = op::put;
      q.value = fmt::format("c{}-s{}-{:06x}", client_, seq, (r >> 24) & 0xffffff);
    } else if (pick >= 85) {
      q.kind = op::del;
    }
    return q;
  }

 private:
  std::uint64_t random() noexcept {  // splitmix64
    std::uint64_t z = (state_ += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  std::uint64_t state_;
  std::uint32_t client_;
};

/// What a client expects back for one request.
struct expected {
  std::uint32_t seq = 0;
  bool found = false;
  std::string value;
};

/// A client's view of its own keys; applying a request says what the server must answer.
struct model {
  std::map<std::string, std::string> keys;

  expected apply(const request& q) {
    expected e{q.seq, false, {}};
    if (q.key.rfind("shared/", 0) == 0) {
      e.found = true;
      e.value = shared_value(static_cast<std::uint32_t>(std::stoul(q.key.substr(7))));
    } else if (q.kind == op::get) {
      auto it = keys.find(q.key);
      e.found = it != keys.end();
      if (e.found) e.value = it->second;
    } else if (q.kind == op::put) {
      e.found = !keys.insert_or_assign(q.key, q.value).second;
    } else if (q.kind == op::del) {
      e.found = keys.erase(q.key) > 0;
    }
    return e;
  }
};

// ---- the client ----

struct client_counts {
  std::uint32_t gets = 0, shared_gets = 0, puts = 0, dels = 0, found = 0, mismatches = 0;
};

/// Many clients share the request queue: leaving must not end it for the others, so the
/// sender detaches instead of closing, on the error path too.
struct detach_on_exit {
  channel_sender<request>& sender;
  ~detach_on_exit() { sender.detach(); }
};

task<void> issue(channel_sender<request>& requests, channel_sender<expected>& in_flight, std::uint32_t id,
                 std::uint32_t ops, client_counts& c) {
  workload w(id);
  model m;
  for (std::uint32_t seq = 1; seq <= ops; ++seq) {
    request q = w.next(seq);
    const bool shared = q.key.rfind("shared/", 0) == 0;
    c.shared_gets += shared;
    c.gets += q.kind == op::get && !shared;
    c.puts += q.kind == op::put;
    c.dels += q.kind == op::del;
    // The expectation goes first: the checker must hold it before the reply can arrive.
    // The in-flight channel's capacity is the window: this waits while it is full.
    co_await in_flight.send(m.apply(q));
    co_await requests.send(std::move(q));
  }
  // Named, not a braced temporary in the co_await: GCC 12 copies such temporaries bitwise.
  request bye{op::bye, id, ops + 1, {}, {}};
  co_await requests.send(std::move(bye));
  in_flight.close();
}

task<void> check(channel_receiver<reply>& replies, channel_receiver<expected>& in_flight, std::uint32_t id,
                 client_counts& c) {
  while (std::optional<expected> e = co_await in_flight.receive()) {
    std::optional<reply> r = co_await replies.receive();
    if (!r) throw std::runtime_error(fmt::format("the server ended the replies before request {}", e->seq));
    c.found += r->found;
    if (r->seq != e->seq || (r->found != 0) != e->found || r->text() != e->value) {
      if (++c.mismatches <= 5) {
        fmt::print(stderr, "client {}: request {}: got seq {} found {} \"{}\", expected found {} \"{}\"\n",
                   id, e->seq, r->seq, r->found, r->text(), e->found, e->value);
      }
    }
  }
  // After `bye` the server closes this client's reply channel.
  std::optional<reply> extra = co_await replies.receive();
  if (extra) throw std::runtime_error("a reply arrived after bye");
}

task<client_counts> run_client(std::string request_address, std::string reply_address, std::uint32_t id,
                               std::uint32_t ops) {
  // The reply channel exists before the server hears of it; destroying the receiver
  // removes the segment.
  channel_receiver<reply> replies = co_await ipcoro::open_receiver<reply>(reply_address);
  channel_sender<request> requests = co_await ipcoro::open_sender<request>(request_address);
  detach_on_exit leave{requests};
  request hello{op::hello, id, 0, reply_address, {}};
  co_await requests.send(std::move(hello));
  auto [in_flight_tx, in_flight_rx] = ipcoro::make_channel<expected>(window);
  client_counts c;
  co_await ipcoro::when_all(issue(requests, in_flight_tx, id, ops, c), check(replies, in_flight_rx, id, c));
  co_return c;
}

int client_main(const std::string& request_address, const std::string& reply_address, std::uint32_t id,
                std::uint32_t ops) {
  ipcoro::io_context ctx;  // a forked child makes its own loop
  const client_counts c = ipcoro::sync_wait(ctx, run_client(request_address, reply_address, id, ops));
  fmt::print("client {:2}: {} ops: {} get, {} shared get, {} put, {} del; {} found; {}\n", id, ops, c.gets,
             c.shared_gets, c.puts, c.dels, c.found,
             c.mismatches == 0 ? "every reply as expected" : fmt::format("{} WRONG replies", c.mismatches));
  return c.mismatches == 0 ? 0 : 1;
}

// ---- the server ----

struct store {
  std::unordered_map<std::string, std::string> data;
  std::uint64_t ops = 0;
  std::uint64_t dropped = 0;  ///< requests of clients without a session, or undecodable

  reply apply(const request& q) {
    ++ops;
    reply r;
    r.seq = q.seq;
    if (q.kind == op::get) {
      auto it = data.find(q.key);
      if (it != data.end()) {
        r.found = 1;
        r.value_size = static_cast<std::uint8_t>(std::min(it->second.size(), max_value));
        std::memcpy(r.value.data(), it->second.data(), r.value_size);
      }
    } else if (q.kind == op::put) {
      std::string value = q.value.substr(0, max_value);
      r.found = !data.insert_or_assign(q.key, std::move(value)).second;
    } else if (q.kind == op::del) {
      r.found = data.erase(q.key) > 0;
    }
    return r;
  }
};

/// One client's session: applies its requests in order and answers on its reply channel.
task<void> serve_client(std::string reply_address, channel_receiver<request> inbox, store& s) {
  try {
    channel_sender<reply> out = co_await ipcoro::open_sender<reply>(reply_address);
    while (std::optional<request> q = co_await inbox.receive()) {
      if (q->kind == op::bye) break;
      co_await out.send(s.apply(*q));
    }
    // `out` closes here: the client's receive ends after the last reply.
  } catch (const std::exception& e) {
    // A client that died or misbehaved costs only its own session.
    fmt::print(stderr, "kv_server: session for {} ends: {}\n", reply_address, e.what());
  }
}

/// The dispatcher: reads the shared request queue until it ends, starting a session per
/// hello and routing every other request to its client's session.
task<void> serve(channel_receiver<request>& requests, store& s) {
  co_await ipcoro::with_scope([&](ipcoro::scope& sessions) -> task<void> {
    std::unordered_map<std::uint32_t, channel_sender<request>> inboxes;
    for (;;) {
      std::optional<request> q;
      try {
        q = co_await requests.receive();
      } catch (const ipcoro::decode_error& e) {
        ++s.dropped;  // one bad message does not stop the server
        fmt::print(stderr, "kv_server: dropped a request: {}\n", e.what());
        continue;
      }
      if (!q) break;
      if (q->kind == op::hello) {
        // The session's inbox holds a full window and the bye: a well-behaved client never
        // makes the dispatcher wait.
        auto [inbox_tx, inbox_rx] = ipcoro::make_channel<request>(window + 2);
        sessions.spawn(serve_client(std::move(q->key), std::move(inbox_rx), s));
        inboxes.insert_or_assign(q->client, std::move(inbox_tx));
        continue;
      }
      auto it = inboxes.find(q->client);
      if (it == inboxes.end()) {
        ++s.dropped;
        continue;
      }
      try {
        co_await it->second.send(std::move(*q));
      } catch (const ipcoro::channel_closed&) {
        ++s.dropped;  // that session has ended
      }
    }
    for (auto& entry : inboxes) entry.second.close();  // the sessions finish their queues and end
  });
}

// ---- the parent ----

/// A client killed before its receiver's destructor ran leaves its segment behind; the
/// parent, which outlives every client, removes the names once they have all gone.
struct remove_reply_segments {
  std::vector<std::string> names;
  ~remove_reply_segments() {
    for (const std::string& n : names) {
      try {
        ipcoro::shm_segment::unlink(n);
      } catch (const std::exception&) {
      }
    }
  }
};

task<void> await_clients(std::vector<ipcoro::process>& clients, std::vector<ipcoro::exit_status>& statuses,
                         channel_sender<request>& shutdown) {
  for (std::size_t i = 0; i < clients.size(); ++i) statuses[i] = co_await clients[i].wait();
  // Every client has gone: this close() is the one that ends the request stream.
  shutdown.close();
}

struct outcome {
  bool ok = false;
  std::uint64_t ops = 0;
  double seconds = 0;
};

task<outcome> run(std::uint32_t client_count, std::uint32_t ops) {
  const std::string base = fmt::format("/kv-{}-", ::getpid());
  // Ten messages is the default /proc/sys/fs/mqueue/msg_max for unprivileged users.
  const std::string request_address = fmt::format("mq:{}requests?capacity=10&message_size=256", base);
  remove_reply_segments leftovers;
  channel_receiver<request> requests = co_await ipcoro::open_receiver<request>(request_address);
  // The parent is one more sender on the queue, used only to end it.
  channel_sender<request> shutdown = co_await ipcoro::open_sender<request>(request_address);

  store s;
  for (std::uint32_t i = 0; i < shared_keys; ++i) s.data.emplace(shared_key(i), shared_value(i));

  const auto start = std::chrono::steady_clock::now();
  std::vector<ipcoro::process> clients;
  for (std::uint32_t id = 0; id < client_count; ++id) {
    const std::string reply_name = fmt::format("{}reply-{}", base, id);
    leftovers.names.push_back(reply_name);
    const std::string reply_address = fmt::format("shm:{}?capacity=64k", reply_name);
    clients.push_back(
        ipcoro::process::fork([=] { return client_main(request_address, reply_address, id, ops); },
                              {.name = fmt::format("client {}", id)}));
  }
  std::vector<ipcoro::exit_status> statuses(client_count);
  co_await ipcoro::when_all(serve(requests, s), await_clients(clients, statuses, shutdown));
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();

  bool clients_ok = true;
  for (std::uint32_t id = 0; id < client_count; ++id) {
    if (!statuses[id].success()) {
      clients_ok = false;
      fmt::print(stderr, "kv_server: {}\n", clients[id].describe());
    }
  }
  // The store must hold exactly the seeded keys plus what each client's model holds.
  std::unordered_map<std::string, std::string> want;
  for (std::uint32_t i = 0; i < shared_keys; ++i) want.emplace(shared_key(i), shared_value(i));
  for (std::uint32_t id = 0; id < client_count; ++id) {
    workload w(id);
    model m;
    for (std::uint32_t seq = 1; seq <= ops; ++seq) (void)m.apply(w.next(seq));
    want.insert(m.keys.begin(), m.keys.end());
  }
  const bool store_ok = want == s.data;
  const std::uint64_t expected_ops = std::uint64_t{client_count} * ops;
  fmt::print("{} clients x {} ops = {} ops served in {:.2f} s: {:.0f} ops/s\n", client_count, ops, s.ops,
             seconds, static_cast<double>(s.ops) / seconds);
  fmt::print("store: {} keys, {} the clients' writes; {} requests dropped\n", s.data.size(),
             store_ok ? "matches" : "DOES NOT MATCH", s.dropped);
  co_return outcome{clients_ok && store_ok && s.ops == expected_ops && s.dropped == 0, s.ops, seconds};
}

/// True when nothing named /kv-<pid>-... is left in /dev/mqueue or /dev/shm.
bool nothing_left_behind() {
  const std::string prefix = fmt::format("kv-{}-", ::getpid());
  bool clean = true;
  // /dev/mqueue is not mounted everywhere: ask for the request queue by name too.
  const std::string queue = fmt::format("/{}requests", prefix);
  const mqd_t q = ::mq_open(queue.c_str(), O_RDONLY);
  if (q != static_cast<mqd_t>(-1) || errno != ENOENT) {
    if (q != static_cast<mqd_t>(-1)) ::mq_close(q);
    fmt::print(stderr, "kv_server: left behind: message queue {}\n", queue);
    clean = false;
  }
  for (const char* dir : {"/dev/mqueue", "/dev/shm"}) {
    DIR* d = ::opendir(dir);
    if (d == nullptr) continue;
    while (dirent* e = ::readdir(d)) {
      if (std::string_view(e->d_name).starts_with(prefix)) {
        fmt::print(stderr, "kv_server: left behind: {}/{}\n", dir, e->d_name);
        clean = false;
      }
    }
    ::closedir(d);
  }
  return clean;
}

}  // namespace kv

int main(int argc, char** argv) try {
  std::uint32_t clients = 16;
  std::uint32_t ops = 2000;
  for (int i = 1; i < argc; ++i) {
    const std::string_view arg = argv[i];
    if ((arg == "--clients" || arg == "--ops") && i + 1 < argc) {
      const unsigned long v = std::strtoul(argv[++i], nullptr, 10);
      (arg == "--clients" ? clients : ops) = static_cast<std::uint32_t>(v);
    } else {
      fmt::print(stderr, "usage: kv_server [--clients N] [--ops M]\n");
      return 2;
    }
  }
  if (clients == 0 || clients > 200 || ops == 0 || ops > 10'000'000) {
    fmt::print(stderr, "kv_server: --clients must be 1..200 and --ops 1..10000000\n");
    return 2;
  }
  kv::outcome result;
  try {
    ipcoro::io_context ctx;
    result = ipcoro::sync_wait(ctx, kv::run(clients, ops));
  } catch (const std::exception& e) {
    fmt::print(stderr, "kv_server: {}\n", e.what());
  }
  const bool clean = kv::nothing_left_behind();
  const bool ok = result.ok && clean;
  fmt::print("kv_server {}\n", ok ? "verified" : "FAILED");
  return ok ? 0 : 1;
} catch (const std::exception& e) {
  // Whatever nothing above caught (no io_uring, say): the message and status 1, not an abort.
  fmt::print(stderr, "{}: {}\n", argv[0], e.what());
  return 1;
}
