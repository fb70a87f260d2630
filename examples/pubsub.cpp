// SPDX-License-Identifier: MIT
// pubsub: one publisher, several subscriber processes, each on its own typed channel.
//
//   publisher --pipe: / shm: / mq: / file: / fifo: (one channel_link each)--> subscriber 0..N-1
//   subscribers --mq: control link (subscribe, report; many senders)--> publisher
//
// The parent makes one channel_link per subscriber before forking (with --transport mixed,
// subscriber i gets pipe, shm, mq, file, fifo in rotation), plus a shared control queue.
// After the fork each process takes the end it uses and drops every link, so a pipe's
// reader sees its end only when the publisher closes. Each subscriber announces the topics
// it wants on the control queue; once all have, the publisher sends M messages of six
// topics, each only to the subscribers of its topic, with a sequence number per topic and
// a checksum of its body. The last subscriber is slow (it naps 2 ms every 100 messages) and its
// channel is small: the publisher waits for it (backpressure), and the parent shows how
// long. Subscribers check every message (topic subscribed, sequence in order, checksum,
// body) and the count per topic, report on the control queue (then detach, since closing
// a queue sender would end it for all) and exit 0 only if everything arrived in order.
// A subscriber that dies early fails the run at once instead of leaving the publisher
// waiting on a channel nobody reads. The parent exits 0 only when every subscriber
// verified its stream and exited 0, and nothing is left in /tmp, /dev/shm or /dev/mqueue.
//
// Usage: pubsub [--subscribers N] [--messages M] [--transport pipe|fifo|mq|shm|file|mixed]
#include <ipcoro/channel.hpp>
#include <ipcoro/event.hpp>
#include <ipcoro/hash.hpp>
#include <ipcoro/io_context.hpp>
#include <ipcoro/process.hpp>
#include <ipcoro/sync_wait.hpp>
#include <ipcoro/task.hpp>
#include <ipcoro/timer.hpp>
#include <ipcoro/when_all.hpp>

#include <dirent.h>
#include <fmt/core.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <bit>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace {

using namespace std::chrono_literals;
using ipcoro::channel_link;
using ipcoro::channel_receiver;
using ipcoro::channel_sender;
using ipcoro::task;

constexpr std::array<std::string_view, 6> topic_names{"prices",  "trades", "news",
                                                      "weather", "sports", "alerts"};
constexpr std::uint32_t topic_count = topic_names.size();
constexpr std::uint32_t all_topics = (1u << topic_count) - 1;

/// One published message. Trivially copyable: the channel's built-in codec copies it.
struct news {
  std::uint32_t topic = 0;
  std::uint32_t length = 0;    ///< bytes of `body` in use
  std::uint64_t seq = 0;       ///< per topic, from 0
  std::uint64_t checksum = 0;  ///< FNV-1a of the body in use
  std::array<char, 232> body{};
};

/// What subscribers tell the publisher on the control queue.
struct control {
  enum kind_t : std::uint32_t { subscribe, report } kind = subscribe;
  std::uint32_t subscriber = 0;
  std::uint32_t topics = 0;  ///< subscribe: a bit per topic
  std::uint32_t verified = 0;
  std::uint64_t received = 0;
  double seconds = 0;
};

std::uint64_t mix(std::uint64_t z) noexcept {  // splitmix64's finaliser
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

/// The schedule both sides know: the topic of the k-th message.
std::uint32_t topic_of(std::uint64_t k) noexcept {
  return static_cast<std::uint32_t>(mix(k + 1) % topic_count);
}

/// The message with sequence number `seq` of `topic`; its body varies in length and content.
news make_news(std::uint32_t topic, std::uint64_t seq) {
  news n;
  n.topic = topic;
  n.seq = seq;
  const std::uint64_t r = mix((std::uint64_t{topic} << 40) ^ seq);
  n.length = static_cast<std::uint32_t>(24 + r % (n.body.size() - 24));
  const std::string line = fmt::format("{} #{} {:016x} ", topic_names[topic], seq, r);
  for (std::uint32_t i = 0; i < n.length; ++i) n.body[i] = line[i % line.size()];
  n.checksum = ipcoro::fnv1a(std::string_view{n.body.data(), n.length});
  return n;
}

/// Subscriber 0 takes everything; the others leave out every third topic, each a different one.
std::uint32_t topics_of(std::uint32_t subscriber) noexcept {
  if (subscriber == 0) return all_topics;
  std::uint32_t mask = 0;
  for (std::uint32_t t = 0; t < topic_count; ++t) {
    if ((t + subscriber) % 3 != 0) mask |= 1u << t;
  }
  return mask;
}

constexpr std::array<std::string_view, 5> rotation{"pipe", "shm", "mq", "file", "fifo"};

std::string address_for(std::string_view transport, const std::string& name) {
  // Small buffers, so that a slow subscriber makes the publisher wait.
  if (transport == "pipe") return "pipe:?capacity=16k";
  if (transport == "fifo") return fmt::format("fifo:/tmp/{}?capacity=16k", name);
  if (transport == "mq") return fmt::format("mq:/{}?capacity=10&message_size=512", name);
  if (transport == "shm") return fmt::format("shm:/{}?capacity=16k", name);
  return fmt::format("file:/tmp/{}?capacity=16k", name);
}

// ---- the subscriber ----

/// The control queue has many senders: leaving must not end it for the others.
struct detach_on_exit {
  channel_sender<control>& sender;
  ~detach_on_exit() { sender.detach(); }
};

task<control> subscribe(channel_receiver<news>& feed, channel_sender<control>& ctl, std::uint32_t id,
                        std::uint64_t messages, bool slow) {
  const std::uint32_t mask = topics_of(id);
  control hello{control::subscribe, id, mask, 0, 0, 0};
  co_await ctl.send(hello);

  std::array<std::uint64_t, topic_count> expected{};  // messages per topic in the schedule
  for (std::uint64_t k = 0; k < messages; ++k) ++expected[topic_of(k)];
  std::array<std::uint64_t, topic_count> next{};
  std::uint64_t received = 0, errors = 0;
  std::chrono::steady_clock::time_point first{};
  const auto complain = [&](const std::string& what) {
    if (++errors <= 5) fmt::print(stderr, "subscriber {}: message {}: {}\n", id, received, what);
  };
  while (std::optional<news> n = co_await feed.receive()) {
    if (received++ == 0) first = std::chrono::steady_clock::now();
    if (n->topic >= topic_count || (mask & (1u << n->topic)) == 0) {
      complain(fmt::format("topic {} was not subscribed", n->topic));
      continue;
    }
    if (n->seq != next[n->topic])
      complain(fmt::format("{} #{} where #{} was due", topic_names[n->topic], n->seq, next[n->topic]));
    next[n->topic] = n->seq + 1;
    if (n->length > n->body.size() ||
        ipcoro::fnv1a(std::string_view{n->body.data(), n->length}) != n->checksum) {
      complain("bad checksum");
    } else {
      const news want = make_news(n->topic, n->seq);
      if (n->length != want.length || std::memcmp(n->body.data(), want.body.data(), want.length) != 0) {
        complain("wrong body");
      }
    }
    if (slow && received % 100 == 0) co_await ipcoro::sleep_for(2ms);
  }
  for (std::uint32_t t = 0; t < topic_count; ++t) {
    const std::uint64_t want = (mask & (1u << t)) != 0 ? expected[t] : 0;
    if (next[t] != want)
      complain(fmt::format("{}: {} messages arrived of {}", topic_names[t], next[t], want));
  }
  const double seconds =
      received == 0 ? 0 : std::chrono::duration<double>(std::chrono::steady_clock::now() - first).count();
  control report{control::report, id, mask, errors == 0 ? 1u : 0u, received, seconds};
  co_await ctl.send(report);
  co_return report;
}

int subscriber_main(std::vector<channel_link>& links, channel_link& control_link, std::uint32_t id,
                    std::uint64_t messages, bool slow) {
  ipcoro::io_context ctx;
  channel_receiver<news> feed = links[id].receiver<news>();
  channel_sender<control> ctl = control_link.sender<control>();
  // Drop every end this process does not use, or other subscribers' pipes never end.
  for (channel_link& l : links) l.reset();
  control_link.reset();
  detach_on_exit leave{ctl};
  const control r = ipcoro::sync_wait(ctx, subscribe(feed, ctl, id, messages, slow));
  return r.verified != 0 ? 0 : 1;
}

// ---- the publisher ----

struct subscriber_state {
  std::string transport;
  std::string address;
  channel_sender<news> feed;
  std::uint32_t topics = 0;
  bool subscribed = false;
  std::uint64_t sent = 0;
  std::chrono::steady_clock::duration waited{};  ///< time the publisher spent in send()
  std::optional<control> report;
  ipcoro::exit_status status;
};

/// Every control message: subscriptions (the publisher starts once all are in), then reports.
task<void> handle_control(channel_receiver<control>& ctl, std::vector<subscriber_state>& subs,
                          ipcoro::event& all_subscribed) {
  std::size_t subscribed = 0;
  while (std::optional<control> c = co_await ctl.receive()) {
    if (c->subscriber >= subs.size())
      throw std::runtime_error("a control message from an unknown subscriber");
    subscriber_state& s = subs[c->subscriber];
    if (c->kind == control::subscribe && !s.subscribed) {
      s.subscribed = true;
      s.topics = c->topics;
      if (++subscribed == subs.size()) all_subscribed.set();
    } else if (c->kind == control::report) {
      s.report = *c;
    }
  }
}

task<void> publish(std::vector<subscriber_state>& subs, std::uint64_t messages, ipcoro::event& all_subscribed,
                   bool& published) {
  co_await all_subscribed.wait();
  std::array<std::uint64_t, topic_count> seq{};
  for (std::uint64_t k = 0; k < messages; ++k) {
    const std::uint32_t topic = topic_of(k);
    const news n = make_news(topic, seq[topic]++);
    for (subscriber_state& s : subs) {
      if ((s.topics & (1u << topic)) == 0) continue;
      const auto before = std::chrono::steady_clock::now();
      co_await s.feed.send(n);  // waits while this subscriber's channel is full
      s.waited += std::chrono::steady_clock::now() - before;
      ++s.sent;
    }
  }
  published = true;
  for (subscriber_state& s : subs) s.feed.close();  // each subscriber sees the end of its stream
}

/// Fails the run as soon as a subscriber exits before its stream has ended, or exits
/// with an error: the publisher might otherwise wait forever on its full channel.
task<void> watch(ipcoro::process& p, subscriber_state& s, const bool& published) {
  s.status = co_await p.wait();
  if (!published || !s.status.success()) {
    throw std::runtime_error(
        fmt::format("{} {}", p.describe(), published ? "" : "before the end of its stream"));
  }
}

task<void> supervise(std::vector<ipcoro::process>& procs, std::vector<subscriber_state>& subs,
                     const bool& published, channel_sender<control>& control_end) {
  std::vector<task<void>> watches;
  for (std::size_t i = 0; i < procs.size(); ++i) watches.push_back(watch(procs[i], subs[i], published));
  co_await ipcoro::when_all(std::move(watches));
  control_end.close();  // every subscriber has reported and gone: end the control stream
}

bool nothing_left_behind(const std::string& prefix) {
  bool clean = true;
  for (const char* dir : {"/tmp", "/dev/shm", "/dev/mqueue"}) {
    DIR* d = ::opendir(dir);
    if (d == nullptr) continue;
    while (dirent* e = ::readdir(d)) {
      if (std::string_view(e->d_name).starts_with(prefix)) {
        fmt::print(stderr, "pubsub: left behind: {}/{}\n", dir, e->d_name);
        clean = false;
      }
    }
    ::closedir(d);
  }
  return clean;
}

int run(std::uint32_t count, std::uint64_t messages, std::string_view transport) {
  const std::string prefix = fmt::format("pubsub-{}-", ::getpid());
  std::vector<subscriber_state> subs(count);
  std::vector<channel_link> links;
  for (std::uint32_t i = 0; i < count; ++i) {
    subs[i].transport = std::string(transport == "mixed" ? rotation[i % rotation.size()] : transport);
    subs[i].address = address_for(subs[i].transport, prefix + std::to_string(i));
    links.push_back(channel_link::create(subs[i].address));
  }
  channel_link control_link =
      channel_link::create(fmt::format("mq:/{}control?capacity=10&message_size=64", prefix));

  std::vector<ipcoro::process> procs;
  for (std::uint32_t i = 0; i < count; ++i) {
    const bool slow = count > 1 && i == count - 1;
    procs.push_back(
        ipcoro::process::fork([&links, &control_link, i, messages,
                               slow] { return subscriber_main(links, control_link, i, messages, slow); },
                              {.name = fmt::format("subscriber {}", i)}));
  }
  for (std::uint32_t i = 0; i < count; ++i) subs[i].feed = links[i].sender<news>();
  channel_receiver<control> ctl = control_link.receiver<control>();
  // The publisher holds one more control sender, used only to end the control stream.
  channel_sender<control> control_end = control_link.sender<control>();
  links.clear();
  control_link.reset();

  ipcoro::io_context ctx;
  ipcoro::event all_subscribed;
  bool published = false;
  const auto start = std::chrono::steady_clock::now();
  try {
    ipcoro::sync_wait(ctx, ipcoro::when_all(handle_control(ctl, subs, all_subscribed),
                                            publish(subs, messages, all_subscribed, published),
                                            supervise(procs, subs, published, control_end)));
  } catch (const std::exception& e) {
    fmt::print(stderr, "pubsub: {}\n", e.what());
    // Leave without end markers: closing a message-queue sender waits for room in the
    // queue, and a dead subscriber will never make any.
    for (subscriber_state& s : subs) s.feed.detach();
    control_end.detach();
    return 1;  // the process objects kill and reap whoever is left
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();

  bool ok = true;
  std::uint64_t delivered = 0;
  for (std::uint32_t i = 0; i < count; ++i) {
    const subscriber_state& s = subs[i];
    const bool verified =
        s.report && s.report->verified != 0 && s.report->received == s.sent && s.status.success();
    ok = ok && verified;
    delivered += s.sent;
    const double rate =
        s.report && s.report->seconds > 0 ? static_cast<double>(s.report->received) / s.report->seconds : 0;
    fmt::print(
        "subscriber {} ({}{}, {} topics): {} sent, {} received, {:.0f} msg/s; publisher waited {:.3f} s; "
        "{}\n",
        i, s.transport, count > 1 && i == count - 1 ? ", slow" : "", std::popcount(s.topics), s.sent,
        s.report ? s.report->received : 0, rate, std::chrono::duration<double>(s.waited).count(),
        verified ? "verified" : fmt::format("FAILED ({})", s.status.describe()));
  }
  fmt::print("{} messages published, {} deliveries to {} subscribers in {:.2f} s ({:.0f} deliveries/s)\n",
             messages, delivered, count, seconds, static_cast<double>(delivered) / seconds);
  return ok ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) try {
  std::uint32_t subscribers = 4;
  std::uint64_t messages = 100000;
  std::string transport = "mixed";
  for (int i = 1; i < argc; ++i) {
    const std::string_view arg = argv[i];
    if (arg == "--subscribers" && i + 1 < argc) {
      subscribers = static_cast<std::uint32_t>(std::strtoul(argv[++i], nullptr, 10));
    } else if (arg == "--messages" && i + 1 < argc) {
      messages = std::strtoull(argv[++i], nullptr, 10);
    } else if (arg == "--transport" && i + 1 < argc) {
      transport = argv[++i];
    } else {
      fmt::print(
          stderr,
          "usage: pubsub [--subscribers N] [--messages M] [--transport pipe|fifo|mq|shm|file|mixed]\n");
      return 2;
    }
  }
  const bool known =
      transport == "mixed" || std::find(rotation.begin(), rotation.end(), transport) != rotation.end();
  if (subscribers == 0 || subscribers > 64 || messages == 0 || !known) {
    fmt::print(stderr,
               "pubsub: --subscribers must be 1..64, --messages at least 1, --transport one of "
               "pipe, fifo, mq, shm, file, mixed\n");
    return 2;
  }
  int rc = 1;
  try {
    rc = run(subscribers, messages, transport);
  } catch (const std::exception& e) {
    fmt::print(stderr, "pubsub: {}\n", e.what());
  }
  if (!nothing_left_behind(fmt::format("pubsub-{}-", ::getpid()))) rc = 1;
  fmt::print("pubsub {}\n", rc == 0 ? "verified" : "FAILED");
  return rc;
} catch (const std::exception& e) {
  // Whatever nothing above caught (no io_uring, say): the message and status 1, not an abort.
  fmt::print(stderr, "{}: {}\n", argv[0], e.what());
  return 1;
}
