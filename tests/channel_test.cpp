// SPDX-License-Identifier: MIT
// Typed channels: in process and across real processes over every transport, codecs, close
// semantics, backpressure, select, mismatched peers, bad addresses, and zero allocations.
#include "ipcoro/channel.hpp"
#include "ipcoro/error.hpp"
#include "ipcoro/event.hpp"
#include "ipcoro/io_context.hpp"
#include "ipcoro/pipe.hpp"
#include "ipcoro/process.hpp"
#include "ipcoro/shm_ring.hpp"
#include "ipcoro/sync_wait.hpp"
#include "ipcoro/task.hpp"
#include "ipcoro/timer.hpp"
#include "ipcoro/when_all.hpp"

#include "channel_support.hpp"
#include "counting_new.hpp"
#include "process.hpp"

#include <catch2/catch.hpp>

#include <dirent.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

namespace {

using namespace std::chrono_literals;
using ipcoro::channel_link;
using ipcoro::channel_receiver;
using ipcoro::channel_sender;
using ipcoro::task;
using ipcoro::test::child_process;
using ipcoro::test::contains;
using ipcoro::test::fresh_address;
using ipcoro::test::nothing_left_behind;
using ipcoro::test::unique_name;

struct point {
  std::int32_t x;
  std::int32_t y;
  std::uint64_t seq;
};

/// A user type with its own codec: a name and a list of scores, encoded by hand.
struct player {
  std::string name;
  std::vector<std::uint16_t> scores;
};

}  // namespace

template <>
struct ipcoro::codec<player> {
  static std::string type_name() { return "test::player"; }
  static constexpr std::uint32_t version = 2;
  static std::size_t size(const player& p) { return 4 + p.name.size() + 2 * p.scores.size(); }
  static void encode(const player& p, std::span<std::byte> out) {
    const auto n = static_cast<std::uint32_t>(p.name.size());
    std::memcpy(out.data(), &n, 4);
    std::memcpy(out.data() + 4, p.name.data(), n);
    if (!p.scores.empty()) std::memcpy(out.data() + 4 + n, p.scores.data(), 2 * p.scores.size());
  }
  static player decode(std::span<const std::byte> in) {
    std::uint32_t n = 0;
    if (in.size() < 4) throw ipcoro::decode_error("player: too short");
    std::memcpy(&n, in.data(), 4);
    if (in.size() < 4 + n || (in.size() - 4 - n) % 2 != 0) throw ipcoro::decode_error("player: bad size");
    player p;
    p.name.assign(reinterpret_cast<const char*>(in.data() + 4), n);
    p.scores.resize((in.size() - 4 - n) / 2);
    if (!p.scores.empty()) std::memcpy(p.scores.data(), in.data() + 4 + n, 2 * p.scores.size());
    return p;
  }
};

namespace {

template <class T>
task<std::vector<T>> drain(channel_receiver<T>& rx) {
  std::vector<T> out;
  for (;;) {
    std::optional<T> v = co_await rx.receive();
    if (!v) break;
    out.push_back(std::move(*v));
  }
  co_return out;
}

}  // namespace

// ---- in process ----

TEST_CASE("an in-process channel delivers values in order and ends when the sender closes", "[channel]") {
  ipcoro::io_context ctx;
  auto [tx, rx] = ipcoro::make_channel<std::string>(4);
  std::vector<std::string> got;
  ipcoro::sync_wait(ctx,
                    ipcoro::when_all(
                        [](channel_sender<std::string> tx) -> task<void> {
                          for (int i = 0; i < 100; ++i) co_await tx.send("value " + std::to_string(i));
                          tx.close();
                        }(std::move(tx)),
                        [](channel_receiver<std::string>& rx, std::vector<std::string>& got) -> task<void> {
                          got = co_await drain(rx);
                        }(rx, got)));
  REQUIRE(got.size() == 100);
  CHECK(got.front() == "value 0");
  CHECK(got.back() == "value 99");
  std::optional<std::string> after = ipcoro::sync_wait(ctx, rx.receive());
  CHECK_FALSE(after);
}

TEST_CASE("an in-process channel makes senders wait when full (backpressure)", "[channel]") {
  ipcoro::io_context ctx;
  auto [tx, rx] = ipcoro::make_channel<int>(2);
  int sent = 0;
  int seen_when_blocked = -1;
  ipcoro::sync_wait(ctx, ipcoro::when_all(
                             [](channel_sender<int>& tx, int& sent) -> task<void> {
                               for (int i = 0; i < 3; ++i) {
                                 co_await tx.send(i);
                                 ++sent;
                               }
                             }(tx, sent),
                             [](channel_receiver<int>& rx, int& sent, int& seen) -> task<void> {
                               // The sender ran until it blocked on the third value.
                               seen = sent;
                               for (int i = 0; i < 3; ++i) {
                                 std::optional<int> v = co_await rx.receive();
                                 if (!v || *v != i) throw std::runtime_error("wrong value");
                               }
                             }(rx, sent, seen_when_blocked)));
  CHECK(seen_when_blocked == 2);
  CHECK(sent == 3);
}

TEST_CASE("closing an in-process channel wakes waiting senders and receivers", "[channel]") {
  ipcoro::io_context ctx;
  SECTION("a waiting receiver gets the end of the stream") {
    auto [tx, rx] = ipcoro::make_channel<int>(1);
    bool ended = false;
    ipcoro::sync_wait(ctx, ipcoro::when_all(
                               [](channel_receiver<int>& rx, bool& ended) -> task<void> {
                                 std::optional<int> v = co_await rx.receive();
                                 ended = !v;
                               }(rx, ended),
                               [](channel_sender<int>& tx) -> task<void> {
                                 tx.close();
                                 co_return;
                               }(tx)));
    CHECK(ended);
  }
  SECTION("a sender waiting for room gets channel_closed when the receiver closes") {
    auto [tx, rx] = ipcoro::make_channel<int>(1);
    std::string error;
    ipcoro::sync_wait(ctx, ipcoro::when_all(
                               [](channel_sender<int>& tx, std::string& error) -> task<void> {
                                 co_await tx.send(1);
                                 try {
                                   co_await tx.send(2);  // full: waits
                                 } catch (const ipcoro::channel_closed& e) {
                                   error = e.what();
                                 }
                               }(tx, error),
                               [](channel_receiver<int>& rx) -> task<void> {
                                 rx.close();
                                 co_return;
                               }(rx)));
    CHECK(contains(error, "receiver has closed"));
  }
  SECTION("values sent before close are still received") {
    auto [tx, rx] = ipcoro::make_channel<int>(8);
    ipcoro::sync_wait(ctx, [](channel_sender<int>& tx) -> task<void> {
      co_await tx.send(7);
      co_await tx.send(8);
      tx.close();
    }(tx));
    std::vector<int> got = ipcoro::sync_wait(ctx, drain(rx));
    CHECK(got == std::vector<int>{7, 8});
  }
}

TEST_CASE("make_channel refuses a capacity of zero", "[channel]") {
  CHECK_THROWS_AS(ipcoro::make_channel<int>(0), std::invalid_argument);
}

namespace {
/// Sends `point`s through `tx` and receives each from `rx` in runs of round trips; returns
/// what a run of `long_run` allocates beyond a run of 100 (0 when nothing is allocated per
/// message: a run costs its driving coroutine's frame either way).
std::int64_t allocations_per_long_run(ipcoro::io_context& ctx, channel_sender<point>& tx,
                                      channel_receiver<point>& rx, int long_run) {
  auto run = [&](int n) {
    ipcoro::sync_wait(ctx, [](channel_sender<point>& tx, channel_receiver<point>& rx, int n) -> task<void> {
      for (int i = 0; i < n; ++i) {
        co_await tx.send(point{i, -i, static_cast<std::uint64_t>(i)});
        std::optional<point> p = co_await rx.receive();
        if (!p || p->seq != static_cast<std::uint64_t>(i)) throw std::runtime_error("lost a value");
      }
    }(tx, rx, n));
  };
  run(100);
  const std::uint64_t before_short = ipcoro::test::allocations();
  run(100);
  const std::uint64_t before_long = ipcoro::test::allocations();
  run(long_run);
  const std::uint64_t after = ipcoro::test::allocations();
  return static_cast<std::int64_t>(after - before_long) -
         static_cast<std::int64_t>(before_long - before_short);
}
}  // namespace

TEST_CASE("in-process channel round trips allocate nothing once warm", "[channel][alloc]") {
  ipcoro::io_context ctx;
  auto [tx, rx] = ipcoro::make_channel<point>(4);
  CHECK(allocations_per_long_run(ctx, tx, rx, 10000) == 0);
}

TEST_CASE("select returns a ready receiver and loses nothing from the others", "[channel]") {
  ipcoro::io_context ctx;
  auto a = ipcoro::make_channel<int>(4);
  auto b = ipcoro::make_channel<std::string>(4);
  std::vector<std::size_t> order;
  int ints = 0;
  std::size_t strings = 0;
  ipcoro::sync_wait(
      ctx,
      [](auto& a, auto& b, std::vector<std::size_t>& order, int& ints, std::size_t& strings) -> task<void> {
        co_await b.sender.send("hello");
        co_await a.sender.send(1);
        co_await a.sender.send(2);
        a.sender.close();
        b.sender.close();
        bool a_open = true, b_open = true;
        while (a_open || b_open) {
          std::size_t i = 0;
          if (a_open && b_open) {
            i = co_await ipcoro::select(a.receiver, b.receiver);
          } else {
            i = a_open ? 0 : 1;
          }
          order.push_back(i);
          if (i == 0) {
            std::optional<int> v = co_await a.receiver.receive();
            if (v)
              ints += *v;
            else
              a_open = false;
          } else {
            std::optional<std::string> v = co_await b.receiver.receive();
            if (v)
              strings += v->size();
            else
              b_open = false;
          }
        }
      }(a, b, order, ints, strings));
  CHECK(ints == 3);
  CHECK(strings == 5);
  CHECK(order.size() == 5);  // three ints + end, one string + end
}

TEST_CASE("select waits until some receiver has a value", "[channel]") {
  ipcoro::io_context ctx;
  auto a = ipcoro::make_channel<int>(1);
  auto b = ipcoro::make_channel<int>(1);
  std::size_t chosen = 99;
  int value = 0;
  ipcoro::sync_wait(ctx, ipcoro::when_all(
                             [](auto& a, auto& b, std::size_t& chosen, int& value) -> task<void> {
                               chosen = co_await ipcoro::select(a.receiver, b.receiver);
                               std::optional<int> v = co_await b.receiver.receive();
                               value = v.value_or(-1);
                             }(a, b, chosen, value),
                             [](auto& b) -> task<void> {
                               co_await ipcoro::sleep_for(5ms);
                               co_await b.sender.send(42);
                             }(b)));
  CHECK(chosen == 1);
  CHECK(value == 42);
}

// ---- codecs ----

TEST_CASE("codecs round-trip trivially copyable types, strings, vectors and user types", "[channel][codec]") {
  const point p{1, -2, 3};
  std::array<std::byte, sizeof(point)> buf{};
  ipcoro::codec<point>::encode(p, buf);
  const point q = ipcoro::codec<point>::decode(buf);
  CHECK((q.x == 1 && q.y == -2 && q.seq == 3));
  CHECK_THROWS_AS(ipcoro::codec<point>::decode(std::span<const std::byte>(buf).first(3)),
                  ipcoro::decode_error);

  const std::vector<std::uint32_t> v{1, 2, 3};
  std::vector<std::byte> vb(ipcoro::codec<std::vector<std::uint32_t>>::size(v));
  ipcoro::codec<std::vector<std::uint32_t>>::encode(v, vb);
  CHECK(ipcoro::codec<std::vector<std::uint32_t>>::decode(vb) == v);
  CHECK_THROWS_AS(ipcoro::codec<std::vector<std::uint32_t>>::decode(std::span<const std::byte>(vb).first(5)),
                  ipcoro::decode_error);

  CHECK(ipcoro::identity_of<point>().fingerprint != ipcoro::identity_of<std::string>().fingerprint);
  CHECK(ipcoro::identity_of<std::int32_t>().fingerprint != ipcoro::identity_of<std::uint32_t>().fingerprint);
  CHECK(ipcoro::identity_of<player>().name == "test::player");
  CHECK(contains(ipcoro::identity_of<point>().name, "point"));
}

// ---- across processes, every transport ----

TEST_CASE("a channel carries values between processes over every transport", "[channel][ipc]") {
  const std::string transport = GENERATE("pipe", "fifo", "mq", "shm", "shm-mpmc", "file");
  const std::string address = fresh_address(transport);
  CAPTURE(address);
  constexpr int count = 5000;
  {
    channel_link points = channel_link::create(address);
    channel_link players = channel_link::create(fresh_address(transport));
    child_process child([&]() -> int {
      ipcoro::io_context ctx;
      channel_sender<point> tx = points.sender<point>();
      channel_sender<player> ptx = players.sender<player>();
      points.reset();
      players.reset();
      ipcoro::sync_wait(ctx, [](channel_sender<point>& tx, channel_sender<player>& ptx) -> task<void> {
        for (int i = 0; i < count; ++i) co_await tx.send(point{i, 2 * i, static_cast<std::uint64_t>(i)});
        player ada;
        ada.name = "ada";
        ada.scores.assign(3, 10);
        ada.scores[1] = 20;
        ada.scores[2] = 30;
        co_await ptx.send(std::move(ada));
        player long_name;
        long_name.name.assign(300, 'b');
        co_await ptx.send(std::move(long_name));
      }(tx, ptx));
      return 0;
    });
    channel_receiver<point> rx = points.receiver<point>();
    channel_receiver<player> prx = players.receiver<player>();
    points.reset();
    players.reset();
    ipcoro::io_context ctx;
    std::vector<point> got = ipcoro::sync_wait(ctx, drain(rx));
    std::vector<player> people = ipcoro::sync_wait(ctx, drain(prx));
    REQUIRE(got.size() == count);
    bool in_order = true;
    for (int i = 0; i < count; ++i) {
      in_order = in_order && got[i].seq == static_cast<std::uint64_t>(i) && got[i].y == 2 * i;
    }
    CHECK(in_order);
    REQUIRE(people.size() == 2);
    CHECK(people[0].name == "ada");
    CHECK(people[0].scores == std::vector<std::uint16_t>{10, 20, 30});
    CHECK(people[1].name.size() == 300);
    CHECK(child.wait() == 0);
    CHECK(rx.messages_received() == count);
  }
  CHECK(nothing_left_behind());
}

TEST_CASE("named channels: a receiver creates the name and a sender in another process opens it",
          "[channel][ipc]") {
  const std::string transport = GENERATE("fifo", "mq", "shm", "file");
  const std::string address =
      fresh_address(transport, transport == "mq" ? "capacity=4&message_size=256" : "");
  CAPTURE(address);
  {
    ipcoro::test::handshake created;
    child_process child([&]() -> int {
      if (!created.wait()) return 3;
      ipcoro::io_context ctx;
      ipcoro::sync_wait(ctx, [](std::string address) -> task<void> {
        channel_sender<std::string> tx = co_await ipcoro::open_sender<std::string>(address);
        for (int i = 0; i < 200; ++i) co_await tx.send(std::string(static_cast<std::size_t>(i), 'x'));
      }(address));
      return 0;
    });
    ipcoro::io_context ctx;
    std::vector<std::string> got = ipcoro::sync_wait(
        ctx,
        [](std::string address, const ipcoro::test::handshake& created) -> task<std::vector<std::string>> {
          channel_receiver<std::string> rx = co_await ipcoro::open_receiver<std::string>(address);
          created.signal();
          co_return co_await drain(rx);
        }(address, created));
    REQUIRE(got.size() == 200);
    CHECK(got[199].size() == 199);
    CHECK(child.wait() == 0);
  }
  CHECK(nothing_left_behind());
}

TEST_CASE("a receiver of another type refuses the peer with an error naming both types", "[channel][ipc]") {
  const std::string transport = GENERATE("pipe", "fifo", "mq", "shm", "file");
  const std::string address = fresh_address(transport);
  CAPTURE(address);
  {
    channel_link link = channel_link::create(address);
    child_process child([&]() -> int {
      ipcoro::io_context ctx;
      channel_sender<std::string> tx = link.sender<std::string>();
      link.reset();
      try {
        ipcoro::sync_wait(ctx, tx.send("this is not a point"));
      } catch (const ipcoro::channel_closed&) {
      }
      return 0;
    });
    channel_receiver<point> rx = link.receiver<point>();
    link.reset();
    ipcoro::io_context ctx;
    const std::string error = ipcoro::test::what_of<ipcoro::channel_type_mismatch>(
        [&] { (void)ipcoro::sync_wait(ctx, rx.receive()); });
    CHECK(contains(error, "std::string"));
    CHECK(contains(error, "point"));
    CHECK(contains(error, address));
    rx.close();
    CHECK(child.wait() == 0);
  }
  CHECK(nothing_left_behind());
}

TEST_CASE("a sender gets channel_closed once the receiver has closed", "[channel][ipc]") {
  const std::string transport = GENERATE("pipe", "fifo", "shm", "file");
  const std::string address = fresh_address(transport);
  CAPTURE(address);
  channel_link link = channel_link::create(address);
  ipcoro::test::handshake closed;
  child_process child([&]() -> int {
    channel_receiver<int> rx = link.receiver<int>();
    link.reset();
    rx.close();
    closed.signal();
    return 0;
  });
  channel_sender<int> tx = link.sender<int>();
  link.reset();
  REQUIRE(closed.wait());
  REQUIRE(child.wait() == 0);
  ipcoro::io_context ctx;
  bool got_closed = false;
  try {
    ipcoro::sync_wait(ctx, [](channel_sender<int>& tx) -> task<void> {
      // A stream may take a few messages into the pipe buffer before noticing.
      for (int i = 0; i < 100000; ++i) co_await tx.send(i);
    }(tx));
  } catch (const ipcoro::channel_closed& e) {
    got_closed = contains(e.what(), "closed");
  }
  CHECK(got_closed);
}

TEST_CASE("every receiver of a message queue channel sees the end of the stream", "[channel][ipc]") {
  const std::string address = fresh_address("mq");
  channel_link link = channel_link::create(address);
  auto consumer = [&]() -> int {
    ipcoro::io_context ctx;
    channel_receiver<int> rx = link.receiver<int>();
    link.reset();
    std::vector<int> got = ipcoro::sync_wait(ctx, drain(rx));
    return static_cast<int>(got.size());
  };
  child_process first(consumer);
  child_process second(consumer);
  {
    channel_sender<int> tx = link.sender<int>();
    link.reset();
    ipcoro::io_context ctx;
    ipcoro::sync_wait(ctx, [](channel_sender<int>& tx) -> task<void> {
      for (int i = 0; i < 100; ++i) co_await tx.send(i);
      tx.close();
    }(tx));
  }
  const int a = first.wait();
  const int b = second.wait();
  CHECK(a + b == 100);
  CHECK(nothing_left_behind());
}

TEST_CASE("a message larger than the transport carries is refused with the option to raise",
          "[channel][ipc]") {
  const std::string address = fresh_address("mq", "message_size=128");
  channel_link link = channel_link::create(address);
  channel_sender<std::string> tx = link.sender<std::string>();
  ipcoro::io_context ctx;
  const std::string error = ipcoro::test::what_of<ipcoro::channel_error>(
      [&] { ipcoro::sync_wait(ctx, tx.send(std::string(500, 'x'))); });
  CHECK(contains(error, "500 bytes"));
  CHECK(contains(error, "message_size="));
}

TEST_CASE("a sender killed mid-stream ends the receive with an error saying so, after whole messages only",
          "[channel][ipc]") {
  const std::string transport = GENERATE("pipe", "fifo", "shm", "file");
  const std::string address = fresh_address(transport);
  CAPTURE(address);
  channel_link link = channel_link::create(address);
  ipcoro::test::handshake started;
  child_process child([&]() -> int {
    ipcoro::io_context ctx;
    channel_sender<std::vector<std::uint64_t>> tx = link.sender<std::vector<std::uint64_t>>();
    link.reset();
    ipcoro::sync_wait(ctx,
                      [](channel_sender<std::vector<std::uint64_t>>& tx,
                         const ipcoro::test::handshake& started) -> task<void> {
                        std::vector<std::uint64_t> v(1000);
                        for (std::uint64_t i = 0;; ++i) {
                          for (auto& x : v) x = i;
                          co_await tx.send(v);
                          if (i == 3) {
                            co_await tx.flush();  // a stream holds sent messages until the turn ends
                            started.signal();
                          }
                        }
                      }(tx, started));
    return 0;
  });
  channel_receiver<std::vector<std::uint64_t>> rx = link.receiver<std::vector<std::uint64_t>>();
  link.reset();
  REQUIRE(started.wait());
  child.kill(SIGKILL);
  REQUIRE(child.wait() == 128 + SIGKILL);
  ipcoro::io_context ctx;
  std::uint64_t expected = 0;
  bool consistent = true;
  std::string error;
  try {
    for (;;) {
      std::optional<std::vector<std::uint64_t>> v = ipcoro::sync_wait(ctx, rx.receive());
      if (!v) break;
      consistent = consistent && v->size() == 1000 && v->front() == expected && v->back() == expected;
      ++expected;
    }
  } catch (const std::exception& e) {
    error = e.what();
  }
  CHECK(consistent);
  CHECK(expected >= 3);
  CHECK(contains(error, "died"));
}

TEST_CASE("an aborted ring sender reads as a dead peer once its process has exited", "[channel][ipc]") {
  const std::string transport = GENERATE("shm", "shm-mpmc", "file");
  const std::string address = fresh_address(transport);
  CAPTURE(address);
  {
    channel_link link = channel_link::create(address);
    child_process child([&]() -> int {
      ipcoro::io_context ctx;
      channel_sender<int> tx = link.sender<int>();
      link.reset();
      ipcoro::sync_wait(ctx, tx.send(7));
      tx.abort();
      return 0;
    });
    channel_receiver<int> rx = link.receiver<int>();
    link.reset();
    REQUIRE(child.wait() == 0);
    ipcoro::io_context ctx;
    CHECK(ipcoro::sync_wait(ctx, rx.receive()) == 7);
    const std::string error =
        ipcoro::test::what_of<ipcoro::peer_died>([&] { (void)ipcoro::sync_wait(ctx, rx.receive()); });
    CHECK(contains(error, "died"));
  }
  CHECK(nothing_left_behind());
}

// ---- addresses ----

TEST_CASE("limits a channel's transport cannot have are refused naming the address, the option and the errno",
          "[channel][errors]") {
  struct too_big {
    std::string address;
    std::string option;
  };
  const too_big cases[] = {
      {fresh_address("mq", "capacity=100000"), "capacity="},
      {fresh_address("mq", "message_size=100000000"), "message_size"},
      {fresh_address("fifo", "capacity=100000000"), "capacity="},
      {fresh_address("pipe", "capacity=100000000"), "capacity="},
  };
  ipcoro::io_context ctx;
  for (const too_big& c : cases) {
    CAPTURE(c.address);
    const ipcoro::test::failure link =
        ipcoro::test::failure_of([&] { (void)channel_link::create(c.address); });
    CHECK(link.code == EINVAL);
    CHECK(contains(link.what, "channel " + c.address));
    CHECK(contains(link.what, c.option));
    if (c.address.starts_with("pipe:")) continue;  // a pipe has no name to open
    const ipcoro::test::failure named = ipcoro::test::failure_of(
        [&] { (void)ipcoro::sync_wait(ctx, ipcoro::open_receiver<int>(c.address)); });
    CHECK(named.code == EINVAL);
    CHECK(contains(named.what, "channel " + c.address));
  }
  CHECK(nothing_left_behind());
}

TEST_CASE("bad channel addresses are refused with a message saying what is expected", "[channel]") {
  struct bad {
    const char* address;
    const char* says;
  };
  const bad cases[] = {
      {"nothing", "no transport"},
      {"tcp://host", "unknown transport \"tcp\""},
      {"pipe:/x", "a pipe has no name"},
      {"fifo:relative", "absolute path"},
      {"file:", "absolute path"},
      {"mq:jobs", "one '/'"},
      {"mq:/a/b", "one '/'"},
      {"shm:/", "one '/'"},
      {"fd:x", "descriptor number"},
      {"mq:/q?capacity=0", "not a positive size"},
      {"mq:/q?capacity=ten", "not a positive size"},
      {"mq:/q?colour=red", "does not apply"},
      {"pipe:?mode=0600", "does not apply"},
      {"shm:/s?mode=999", "octal"},
      {"shm:/s?ring=ring", "spsc or mpmc"},
      {"shm:/s?capacity=1k&capacity=2k", "twice"},
      {"mq:/q?capacity", "key=value"},
      {"shm:/s?message_size=64", "ring=mpmc"},
      {"mq:/q?message_size=16", "at least 32"},
      {"shm:/s?ring=mpmc&message_size=9", "at least 32"},
      {"file:/tmp/f?ring=mpmc&message_size=4", "message_size=32 or more"},
  };
  for (const bad& b : cases) {
    CAPTURE(b.address);
    const std::string error = ipcoro::test::what_of<ipcoro::bad_channel_address>(
        [&] { (void)ipcoro::channel_address::parse(b.address); });
    CHECK(contains(error, b.says));
    CHECK(contains(error, b.address));
  }
  const ipcoro::channel_address a =
      ipcoro::channel_address::parse("shm:/frames?capacity=4m&ring=mpmc&mode=0640&message_size=2k");
  CHECK(a.scheme == "shm");
  CHECK(a.name == "/frames");
  CHECK(a.capacity == std::size_t{4} << 20);
  CHECK(a.message_size == 2048);
  CHECK(a.mode == 0640);
  CHECK(a.mpmc);
}

TEST_CASE("opening a sender where nobody listens says so", "[channel][ipc]") {
  const std::string transport = GENERATE("mq", "shm", "file");
  const std::string address = fresh_address(transport);
  ipcoro::io_context ctx;
  const std::string error = ipcoro::test::what_of<ipcoro::channel_error>(
      [&] { (void)ipcoro::sync_wait(ctx, ipcoro::open_sender<int>(address)); });
  CHECK(contains(error, "nobody has opened its receiver"));
  CHECK(nothing_left_behind());
}

TEST_CASE("a pipe address cannot be opened by name", "[channel]") {
  ipcoro::io_context ctx;
  CHECK_THROWS_AS(ipcoro::sync_wait(ctx, ipcoro::open_sender<int>("pipe:")), ipcoro::bad_channel_address);
}

TEST_CASE("an aborted sender ends the stream with an error, not a clean end", "[channel]") {
  ipcoro::io_context ctx;
  SECTION("in process") {
    auto [tx, rx] = ipcoro::make_channel<int>(4);
    ipcoro::sync_wait(ctx, tx.send(1));
    tx.abort();
    std::optional<int> first = ipcoro::sync_wait(ctx, rx.receive());
    CHECK(first == 1);
    CHECK_THROWS_AS(ipcoro::sync_wait(ctx, rx.receive()), ipcoro::channel_error);
  }
  SECTION("over a pipe") {
    channel_link link = channel_link::create("pipe:");
    channel_sender<int> tx = link.sender<int>();
    channel_receiver<int> rx = link.receiver<int>();
    ipcoro::sync_wait(ctx, tx.send(1));
    tx.abort();
    std::optional<int> first = ipcoro::sync_wait(ctx, rx.receive());
    CHECK(first == 1);
    const std::string error =
        ipcoro::test::what_of<ipcoro::channel_error>([&] { (void)ipcoro::sync_wait(ctx, rx.receive()); });
    CHECK(contains(error, "without closing"));
  }
}

TEST_CASE("an fd: address runs a channel over an inherited descriptor", "[channel][ipc]") {
  ipcoro::pipe_pair p = ipcoro::make_pipe();
  const std::string write_end = "fd:" + std::to_string(p.writer.release_fd().release());
  const std::string read_end = "fd:" + std::to_string(p.reader.release_fd().release());
  child_process child([&]() -> int {
    ::close(std::stoi(read_end.substr(3)));
    ipcoro::io_context ctx;
    ipcoro::sync_wait(ctx, [](std::string address) -> task<void> {
      channel_sender<std::string> tx = co_await ipcoro::open_sender<std::string>(address);
      co_await tx.send("over an inherited descriptor");
    }(write_end));
    return 0;
  });
  ::close(std::stoi(write_end.substr(3)));
  ipcoro::io_context ctx;
  std::vector<std::string> got =
      ipcoro::sync_wait(ctx, [](std::string address) -> task<std::vector<std::string>> {
        channel_receiver<std::string> rx = co_await ipcoro::open_receiver<std::string>(address);
        co_return co_await drain(rx);
      }(read_end));
  CHECK(got == std::vector<std::string>{"over an inherited descriptor"});
  CHECK(child.wait() == 0);
}

TEST_CASE("several processes send into one FIFO channel and the stream ends after the last",
          "[channel][ipc]") {
  const std::string address = fresh_address("fifo");
  constexpr int senders = 4;
  constexpr int each = 500;
  std::vector<child_process> children;
  ipcoro::test::handshake created;
  ipcoro::test::handshake connected;
  ipcoro::test::handshake go;
  for (int s = 0; s < senders; ++s) {
    children.emplace_back([&, s]() -> int {
      if (!created.wait()) return 3;
      ipcoro::io_context ctx;
      ipcoro::sync_wait(ctx,
                        [](std::string address, int s, const ipcoro::test::handshake& connected,
                           const ipcoro::test::handshake& go) -> task<void> {
                          channel_sender<point> tx = co_await ipcoro::open_sender<point>(address);
                          // All senders connect before any sends: the stream ends once every sender that has
                          // connected has closed.
                          connected.signal();
                          if (!go.wait()) throw std::runtime_error("no go");
                          for (int i = 0; i < each; ++i)
                            co_await tx.send(point{s, i, static_cast<std::uint64_t>(s * each + i)});
                        }(address, s, connected, go));
      return 0;
    });
  }
  ipcoro::io_context ctx;
  std::vector<point> got =
      ipcoro::sync_wait(ctx,
                        [](std::string address, const ipcoro::test::handshake& created,
                           const ipcoro::test::handshake& connected, const ipcoro::test::handshake& go,
                           int senders) -> task<std::vector<point>> {
                          channel_receiver<point> rx = co_await ipcoro::open_receiver<point>(address);
                          for (int s = 0; s < senders; ++s) created.signal();
                          for (int s = 0; s < senders; ++s) {
                            if (!connected.wait()) throw std::runtime_error("a sender did not connect");
                          }
                          for (int s = 0; s < senders; ++s) go.signal();
                          co_return co_await drain(rx);
                        }(address, created, connected, go, senders));
  for (child_process& c : children) CHECK(c.wait() == 0);
  // Every message once, and each sender's messages in its order.
  std::vector<int> next(senders, 0);
  bool ordered = true;
  for (const point& p : got) {
    ordered = ordered && p.x >= 0 && p.x < senders && p.y == next[static_cast<std::size_t>(p.x)]++;
  }
  CHECK(ordered);
  CHECK(got.size() == senders * each);
  CHECK(nothing_left_behind());
}

TEST_CASE("an MPMC shared-memory channel carries many senders to many receivers", "[channel][ipc]") {
  const std::string address = fresh_address("shm-mpmc", "capacity=64&message_size=64");
  constexpr int each = 2000;
  // What the consumers received, added up in memory they share with the test.
  struct tally {
    std::atomic<std::uint64_t> count;
    std::atomic<std::uint64_t> sum;
  };
  void* mem = ::mmap(nullptr, sizeof(tally), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  REQUIRE(mem != MAP_FAILED);
  tally* t = new (mem) tally{};
  {
    channel_link link = channel_link::create(address);
    auto consumer = [&]() -> int {
      ipcoro::io_context ctx;
      channel_receiver<point> rx = link.receiver<point>();
      link.reset();
      std::vector<point> got = ipcoro::sync_wait(ctx, drain(rx));
      for (const point& p : got) t->sum += p.seq;
      t->count += got.size();
      return 0;
    };
    auto producer = [&](int id) {
      return [&, id]() -> int {
        ipcoro::io_context ctx;
        channel_sender<point> tx = link.sender<point>();
        link.reset();
        ipcoro::sync_wait(ctx, [](channel_sender<point>& tx, int id) -> task<void> {
          for (int i = 0; i < each; ++i)
            co_await tx.send(point{id, i, static_cast<std::uint64_t>(id * each + i)});
        }(tx, id));
        tx.detach();  // one of several: leave without ending the stream
        return 0;
      };
    };
    child_process first_consumer(consumer);
    child_process second_consumer(consumer);
    child_process first_producer(producer(0));
    child_process second_producer(producer(1));
    CHECK(first_producer.wait() == 0);
    CHECK(second_producer.wait() == 0);
    // Both producers are done: whoever knows that ends the stream.
    channel_sender<point> closer = link.sender<point>();
    link.reset();
    closer.close();
    CHECK(first_consumer.wait() == 0);
    CHECK(second_consumer.wait() == 0);
  }
  const std::uint64_t n = 2 * each;
  CHECK(t->count.load() == n);
  CHECK(t->sum.load() == n * (n - 1) / 2);
  ::munmap(mem, sizeof(tally));
  CHECK(nothing_left_behind());
}

namespace {
std::string channel_peer_path() {
  return (std::filesystem::read_symlink("/proc/self/exe").parent_path() / "channel_peer").string();
}
}  // namespace

TEST_CASE("an exec'd program speaks channels over descriptors wired into it", "[channel][process][ipc]") {
  ipcoro::io_context ctx;
  SECTION("over its standard output") {
    ipcoro::pipe_pair out = ipcoro::make_pipe();
    ipcoro::process peer = ipcoro::process::exec(channel_peer_path(), {"send", "1", "1000"},
                                                 {.name = "peer", .fds = {{1, out.writer.native_handle()}}});
    out.writer.close();
    const std::string address = "fd:" + std::to_string(out.reader.release_fd().release());
    std::vector<std::uint64_t> got =
        ipcoro::sync_wait(ctx, [](std::string address) -> task<std::vector<std::uint64_t>> {
          channel_receiver<std::uint64_t> rx = co_await ipcoro::open_receiver<std::uint64_t>(address);
          co_return co_await drain(rx);
        }(address));
    ipcoro::exit_status st = ipcoro::sync_wait(ctx, peer.wait());
    CHECK(st.success());
    REQUIRE(got.size() == 1000);
    CHECK(got[999] == 999);
  }
  SECTION("as a filter between two channels, with a type check across programs") {
    ipcoro::pipe_pair in = ipcoro::make_pipe();
    ipcoro::pipe_pair out = ipcoro::make_pipe();
    ipcoro::process peer = ipcoro::process::exec(
        channel_peer_path(), {"double", "3", "4"},
        {.name = "doubler", .fds = {{3, in.reader.native_handle()}, {4, out.writer.native_handle()}}});
    in.reader.close();
    out.writer.close();
    const std::string to_peer = "fd:" + std::to_string(in.writer.release_fd().release());
    const std::string from_peer = "fd:" + std::to_string(out.reader.release_fd().release());
    std::vector<std::uint64_t> got = ipcoro::sync_wait(
        ctx, [](std::string to_peer, std::string from_peer) -> task<std::vector<std::uint64_t>> {
          channel_sender<std::uint64_t> tx = co_await ipcoro::open_sender<std::uint64_t>(to_peer);
          channel_receiver<std::uint64_t> rx = co_await ipcoro::open_receiver<std::uint64_t>(from_peer);
          for (std::uint64_t i = 0; i < 100; ++i) co_await tx.send(i);
          tx.close();
          co_return co_await drain(rx);
        }(to_peer, from_peer));
    ipcoro::exit_status st = ipcoro::sync_wait(ctx, peer.wait());
    CHECK(st.success());
    REQUIRE(got.size() == 100);
    CHECK(got[50] == 100);
  }
  SECTION("a program sending another type is refused") {
    ipcoro::pipe_pair out = ipcoro::make_pipe();
    ipcoro::process peer = ipcoro::process::exec(channel_peer_path(), {"send", "1", "10"},
                                                 {.name = "peer", .fds = {{1, out.writer.native_handle()}}});
    out.writer.close();
    const std::string address = "fd:" + std::to_string(out.reader.release_fd().release());
    std::string error;
    try {
      ipcoro::sync_wait(ctx, [](std::string address) -> task<void> {
        channel_receiver<std::string> rx = co_await ipcoro::open_receiver<std::string>(address);
        (void)co_await rx.receive();
      }(address));
    } catch (const ipcoro::channel_type_mismatch& e) {
      error = e.what();
    }
    CHECK(contains(error, "std::string"));
    CHECK(contains(error, "long unsigned int"));
    (void)ipcoro::sync_wait(ctx, peer.wait());
  }
}

// ---- closing while another coroutine of the same process waits ----

namespace {

enum class leave_how { close, detach, abort, destroy };

const char* to_string(leave_how how) {
  switch (how) {
    case leave_how::close:
      return "close";
    case leave_how::detach:
      return "detach";
    case leave_how::abort:
      return "abort";
    case leave_how::destroy:
      return "destroy";
  }
  return "?";
}

/// A transport sized so that a known number of messages fills it and the next one waits.
struct full_transport {
  std::string address;
  int fits = 0;         // data messages that go in before one has to wait
  bool stream = false;  // a pipe or FIFO: detach is close, abort a cut stream
  bool queue = false;   // a message queue: abort leaves without a trace, as detach
};

constexpr std::size_t full_payload = 3600;

// A pipe of one page holds the greeting and one message, and its sender holds one more
// (up to the pipe's capacity unwritten); the next send waits. A queue of two holds the greeting and one
// message (a sender packs the messages of a loop turn after its first, and begins to hold them only
// while the queue has room for them); an MPMC ring of four slots the greeting and
// three; an SPSC ring of 8 KiB the greeting and two 3.6 KiB records.
full_transport sized_transport(const std::string& transport) {
  if (transport == "pipe") return {fresh_address("pipe", "capacity=4096"), 2, true, false};
  if (transport == "fifo") return {fresh_address("fifo", "capacity=4096"), 2, true, false};
  if (transport == "mq") return {fresh_address("mq", "capacity=2&message_size=4096"), 1, false, true};
  if (transport == "shm") return {fresh_address("shm", "capacity=8192"), 2, false, false};
  if (transport == "file") return {fresh_address("file", "capacity=8192"), 2, false, false};
  return {fresh_address("shm-mpmc", "capacity=4&message_size=4096"), 3, false, false};
}

}  // namespace

TEST_CASE("closing a receiver wakes its receive waiting in another coroutine, over every transport",
          "[channel][ipc][close]") {
  const std::string transport = GENERATE("pipe", "fifo", "mq", "shm", "shm-mpmc", "file");
  const leave_how how = GENERATE(leave_how::close, leave_how::destroy);
  const bool through_select = GENERATE(false, true);
  const std::string address = fresh_address(transport);
  CAPTURE(address, to_string(how), through_select);
  // Only these tell a sender that the receiver has gone; a queue keeps taking.
  const bool sender_told = transport != "mq";
  {
    channel_link link = channel_link::create(address);
    ipcoro::test::handshake closed;
    child_process child([&]() -> int {
      ipcoro::io_context ctx;
      channel_sender<int> tx = link.sender<int>();
      link.reset();
      if (!closed.wait()) return 3;
      try {
        ipcoro::sync_wait(ctx, [](channel_sender<int>& tx, bool sender_told) -> task<void> {
          const int count = sender_told ? 100000 : 1;  // a stream buffers a few before it notices
          for (int i = 0; i < count; ++i) co_await tx.send(i);
        }(tx, sender_told));
      } catch (const ipcoro::channel_closed&) {
        return 0;
      }
      return 10;
    });
    std::optional<channel_receiver<int>> rx{link.receiver<int>()};
    link.reset();
    ipcoro::io_context ctx;
    bool ended = false;
    ipcoro::sync_wait(ctx, ipcoro::when_all(
                               [](std::optional<channel_receiver<int>>& rx, bool through_select,
                                  bool& ended) -> task<void> {
                                 if (through_select) {
                                   // A closed receiver is "ready": its stream has ended.
                                   ended = co_await ipcoro::select(*rx) == 0;
                                 } else {
                                   ended = !(co_await rx->receive());
                                 }
                               }(rx, through_select, ended),
                               // Runs once the receive waits in the transport: when_all starts
                               // its tasks in order, each until it first suspends.
                               [](std::optional<channel_receiver<int>>& rx, leave_how how) -> task<void> {
                                 if (how == leave_how::close) {
                                   rx->close();
                                 } else {
                                   rx.reset();
                                 }
                                 co_return;
                               }(rx, how)));
    CHECK(ended);
    closed.signal();
    CHECK(child.wait() == (sender_told ? 0 : 10));
  }
  CHECK(nothing_left_behind());
}

TEST_CASE(
    "leaving a sender wakes its send waiting in another coroutine with channel_closed, over every transport",
    "[channel][ipc][close]") {
  const std::string transport = GENERATE("pipe", "fifo", "mq", "shm", "shm-mpmc", "file");
  const leave_how how = GENERATE(leave_how::close, leave_how::detach, leave_how::abort, leave_how::destroy);
  const full_transport t = sized_transport(transport);
  CAPTURE(t.address, to_string(how));
  {
    channel_link link = channel_link::create(t.address);
    ipcoro::test::handshake left;
    child_process child([&]() -> int {
      ipcoro::io_context ctx;
      std::optional<channel_sender<std::string>> tx{link.sender<std::string>()};
      link.reset();
      ipcoro::event full;
      int sent = 0;
      std::string error;
      ipcoro::sync_wait(ctx, ipcoro::when_all(
                                 [](std::optional<channel_sender<std::string>>& tx, ipcoro::event& full,
                                    int fits, int& sent, std::string& error) -> task<void> {
                                   try {
                                     for (;;) {
                                       // The next send finds the transport full.
                                       if (sent == fits) full.set();
                                       std::string message(full_payload, static_cast<char>('a' + sent));
                                       co_await tx->send(std::move(message));
                                       ++sent;
                                     }
                                   } catch (const ipcoro::channel_closed& e) {
                                     error = e.what();
                                   }
                                 }(tx, full, t.fits, sent, error),
                                 [](std::optional<channel_sender<std::string>>& tx, ipcoro::event& full,
                                    leave_how how, const ipcoro::test::handshake& left) -> task<void> {
                                   co_await full.wait();
                                   switch (how) {
                                     case leave_how::close:
                                       tx->close();
                                       break;
                                     case leave_how::detach:
                                       tx->detach();
                                       break;
                                     case leave_how::abort:
                                       tx->abort();
                                       break;
                                     case leave_how::destroy:
                                       tx.reset();
                                       break;
                                   }
                                   // The waiting send is cancelled in the kernel by now: the receiver may
                                   // make room without letting it through. (A queue's end marker needs
                                   // that room.)
                                   left.signal();
                                 }(tx, full, how, left)));
      if (sent != t.fits || !contains(error, "while the send waited")) {
        std::fprintf(stderr, "sender: %d sent (expected %d), error \"%s\"\n", sent, t.fits, error.c_str());
        return 1;
      }
      return 0;
    });
    channel_receiver<std::string> rx = link.receiver<std::string>();
    // What the receiver should see after the messages that went in.
    const bool clean_end =
        how == leave_how::close || how == leave_how::destroy || (t.stream && how == leave_how::detach);
    const bool error_end = how == leave_how::abort && !t.queue;
    // Otherwise the sender left the stream open: a sender of this process ends it.
    bool closer_needed = !clean_end && !error_end;
    if (!closer_needed) link.reset();
    REQUIRE(left.wait());
    ipcoro::io_context ctx;
    int got = 0;
    bool intact = true;
    bool ended = false;
    std::string error;
    int code = -1;
    try {
      for (;;) {
        if (got == t.fits && closer_needed) {
          code = child.wait();  // its sender has left: another may take its place
          channel_sender<std::string> closer = link.sender<std::string>();
          link.reset();
          closer.close();
          closer_needed = false;
        }
        std::optional<std::string> v = ipcoro::sync_wait(ctx, rx.receive());
        if (!v) {
          ended = true;
          break;
        }
        intact = intact && v->size() == full_payload && v->front() == static_cast<char>('a' + got) &&
                 v->back() == v->front();
        ++got;
      }
    } catch (const std::exception& e) {
      error = e.what();
    }
    CAPTURE(error);
    if (code == -1) code = child.wait();
    CHECK(code == 0);
    CHECK(got == t.fits);
    CHECK(intact);
    if (error_end) {
      CHECK_FALSE(ended);
      // A stream sees end of file without the end frame; a ring's receiver learns that
      // the sender's process, which the ring still records, has died.
      CHECK(contains(error, t.stream ? "without closing" : "died"));
    } else {
      CHECK(ended);
      CHECK(error.empty());
    }
  }
  CHECK(nothing_left_behind());
}

TEST_CASE("a large stream message sent just before close arrives whole, then a clean end",
          "[channel][ipc][close]") {
  const std::string transport = GENERATE("pipe", "fifo");
  const std::string address = fresh_address(transport, "capacity=4096");
  CAPTURE(address);
  {
    channel_link link = channel_link::create(address);
    child_process child([&]() -> int {
      ipcoro::io_context ctx;
      channel_sender<std::string> tx = link.sender<std::string>();
      link.reset();
      // 64 KiB through a pipe of one page: the send takes it whole, and the close writes
      // what the pipe had no room for (through the ring, then at shutdown waiting here).
      std::string big(64 * 1024, 'x');
      ipcoro::sync_wait(ctx, tx.send(std::move(big)));
      tx.close();
      return 0;
    });
    channel_receiver<std::string> rx = link.receiver<std::string>();
    link.reset();
    ipcoro::io_context ctx;
    std::vector<std::string> got = ipcoro::sync_wait(ctx, drain(rx));
    REQUIRE(got.size() == 1);
    CHECK(got[0] == std::string(64 * 1024, 'x'));
    CHECK(child.wait() == 0);
  }
  CHECK(nothing_left_behind());
}

TEST_CASE("a stream message is taken whole or not at all: a caller's cancellation never cuts it",
          "[channel][close]") {
  channel_link link = channel_link::create("pipe:?capacity=4096");
  channel_sender<std::string> tx = link.sender<std::string>();
  channel_receiver<std::string> rx = link.receiver<std::string>();
  link.reset();
  ipcoro::io_context ctx;
  std::stop_source stop;
  bool cancelled = false;
  ipcoro::sync_wait(
      ctx, ipcoro::when_all(
               [](channel_sender<std::string>& tx, std::stop_token token, bool& cancelled) -> task<void> {
                 std::string big(64 * 1024, 'x');
                 try {
                   co_await tx.send(std::move(big)).with_stop_token(std::move(token));
                 } catch (const ipcoro::operation_cancelled&) {
                   cancelled = true;
                 }
               }(tx, stop.get_token(), cancelled),
               [](std::stop_source& stop) -> task<void> {
                 stop.request_stop();
                 co_return;
               }(stop)));
  std::vector<std::string> got;
  ipcoro::sync_wait(ctx,
                    ipcoro::when_all(
                        [](channel_sender<std::string>& tx) -> task<void> {
                          co_await tx.send("after");
                          tx.close();
                        }(tx),
                        [](channel_receiver<std::string>& rx, std::vector<std::string>& got) -> task<void> {
                          got = co_await drain(rx);
                        }(rx, got)));
  REQUIRE(got.size() == (cancelled ? 1u : 2u));
  if (!cancelled) CHECK(got[0] == std::string(64 * 1024, 'x'));
  CHECK(got.back() == "after");
}

TEST_CASE(
    "a caller's cancellation of a waiting send or receive still surfaces as operation_cancelled, and the "
    "channel goes on",
    "[channel][close]") {
  const std::string transport = GENERATE("pipe", "mq", "shm", "shm-mpmc");
  const full_transport t = sized_transport(transport);
  CAPTURE(t.address);
  channel_link link = channel_link::create(t.address);
  channel_sender<std::string> tx = link.sender<std::string>();
  channel_receiver<std::string> rx = link.receiver<std::string>();
  link.reset();
  ipcoro::io_context ctx;
  const auto cancel = [](std::stop_source& stop) -> task<void> {
    stop.request_stop();
    co_return;
  };
  // Several rounds: each cancellation uses up the port's stop source, which is renewed.
  for (int round = 0; round < 3; ++round) {
    std::stop_source stop;
    bool cancelled = false;
    ipcoro::sync_wait(
        ctx, ipcoro::when_all(
                 [](channel_receiver<std::string>& rx, std::stop_token token, bool& cancelled) -> task<void> {
                   try {
                     (void)co_await rx.receive().with_stop_token(std::move(token));
                   } catch (const ipcoro::operation_cancelled&) {
                     cancelled = true;
                   }
                 }(rx, stop.get_token(), cancelled),
                 cancel(stop)));
    CHECK(cancelled);
  }
  // Fill the transport, then cancel a send that waits for room: its message is not sent.
  for (int i = 0; i < t.fits; ++i) ipcoro::sync_wait(ctx, tx.send(std::string(full_payload, 'a')));
  for (int round = 0; round < 3; ++round) {
    std::stop_source stop;
    bool cancelled = false;
    ipcoro::sync_wait(
        ctx, ipcoro::when_all(
                 [](channel_sender<std::string>& tx, std::stop_token token, bool& cancelled) -> task<void> {
                   try {
                     co_await tx.send(std::string(full_payload, 'b')).with_stop_token(std::move(token));
                   } catch (const ipcoro::operation_cancelled&) {
                     cancelled = true;
                   }
                 }(tx, stop.get_token(), cancelled),
                 cancel(stop)));
    CHECK(cancelled);
  }
  std::vector<std::string> got;
  ipcoro::sync_wait(ctx,
                    ipcoro::when_all(
                        [](channel_sender<std::string>& tx) -> task<void> {
                          co_await tx.send("last");
                          tx.close();
                        }(tx),
                        [](channel_receiver<std::string>& rx, std::vector<std::string>& got) -> task<void> {
                          got = co_await drain(rx);
                        }(rx, got)));
  REQUIRE(got.size() == static_cast<std::size_t>(t.fits) + 1);
  CHECK(got.front() == std::string(full_payload, 'a'));
  CHECK(got.back() == "last");
}

TEST_CASE("closing a sender wakes a send waiting in the transport and one waiting for its turn",
          "[channel][close]") {
  const bool destroy = GENERATE(false, true);
  CAPTURE(destroy);
  channel_link link = channel_link::create("pipe:?capacity=4096");
  auto tx = std::make_unique<channel_sender<std::string>>(link.sender<std::string>());
  channel_receiver<std::string> rx = link.receiver<std::string>();
  link.reset();
  ipcoro::io_context ctx;
  std::string first_error;
  std::string second_error;
  const auto send_one = [](channel_sender<std::string>& tx, std::string& error) -> task<void> {
    try {
      co_await tx.send(std::string(full_payload, 'w'));
    } catch (const ipcoro::channel_closed& e) {
      error = e.what();
    }
  };
  ipcoro::sync_wait(ctx, [](channel_sender<std::string>& tx) -> task<void> {
    co_await tx.send(std::string(full_payload, 'a'));  // the pipe's only page
    co_await tx.send(std::string(full_payload, 'a'));  // what its sender holds unwritten
  }(*tx));
  // The first send waits in the pipe, the second for the lock the first holds.
  ipcoro::sync_wait(
      ctx, ipcoro::when_all(send_one(*tx, first_error), send_one(*tx, second_error),
                            [](std::unique_ptr<channel_sender<std::string>>& tx, bool destroy) -> task<void> {
                              if (destroy) {
                                tx.reset();
                              } else {
                                tx->close();
                              }
                              co_return;
                            }(tx, destroy)));
  CHECK(contains(first_error, "while the send waited"));
  CHECK(contains(second_error, "before the send waited"));
  std::vector<std::string> got = ipcoro::sync_wait(ctx, drain(rx));
  REQUIRE(got.size() == 2);
  CHECK(got[0] == std::string(full_payload, 'a'));
  CHECK(got[1] == std::string(full_payload, 'a'));
}

TEST_CASE("destroying an in-process channel half while another coroutine waits on it is safe",
          "[channel][close]") {
  ipcoro::io_context ctx;
  SECTION("a receiver destroyed while its receive waits") {
    auto [tx, rx] = ipcoro::make_channel<int>(1);
    auto owned = std::make_unique<channel_receiver<int>>(std::move(rx));
    bool ended = false;
    ipcoro::sync_wait(ctx, ipcoro::when_all(
                               [](channel_receiver<int>& rx, bool& ended) -> task<void> {
                                 ended = !(co_await rx.receive());
                               }(*owned, ended),
                               [](std::unique_ptr<channel_receiver<int>>& rx) -> task<void> {
                                 rx.reset();
                                 co_return;
                               }(owned)));
    CHECK(ended);
  }
  SECTION("a sender destroyed while its send waits for room") {
    auto [tx, rx] = ipcoro::make_channel<int>(1);
    auto owned = std::make_unique<channel_sender<int>>(std::move(tx));
    std::string error;
    ipcoro::sync_wait(ctx, ipcoro::when_all(
                               [](channel_sender<int>& tx, std::string& error) -> task<void> {
                                 co_await tx.send(1);
                                 try {
                                   co_await tx.send(2);  // full: waits
                                 } catch (const ipcoro::channel_closed& e) {
                                   error = e.what();
                                 }
                               }(*owned, error),
                               [](std::unique_ptr<channel_sender<int>>& tx) -> task<void> {
                                 tx.reset();
                                 co_return;
                               }(owned)));
    CHECK(contains(error, "closed"));
    CHECK(ipcoro::sync_wait(ctx, rx.receive()) == 1);
  }
  SECTION("both halves gone before a woken receive runs") {
    auto [tx, rx] = ipcoro::make_channel<int>(1);
    auto sender = std::make_unique<channel_sender<int>>(std::move(tx));
    auto receiver = std::make_unique<channel_receiver<int>>(std::move(rx));
    bool ended = false;
    ipcoro::sync_wait(ctx, ipcoro::when_all(
                               [](channel_receiver<int>& rx, bool& ended) -> task<void> {
                                 ended = !(co_await rx.receive());
                               }(*receiver, ended),
                               [](std::unique_ptr<channel_sender<int>>& tx,
                                  std::unique_ptr<channel_receiver<int>>& rx) -> task<void> {
                                 tx.reset();  // wakes the receive, which runs later
                                 rx.reset();  // the last owner of the channel's state
                                 co_return;
                               }(sender, receiver)));
    CHECK(ended);
  }
}

TEST_CASE("message counts outlive close, in process and across processes", "[channel][close]") {
  const bool linked = GENERATE(false, true);
  CAPTURE(linked);
  ipcoro::io_context ctx;
  channel_sender<int> tx;
  channel_receiver<int> rx;
  if (linked) {
    channel_link link = channel_link::create("pipe:");
    tx = link.sender<int>();
    rx = link.receiver<int>();
  } else {
    auto [s, r] = ipcoro::make_channel<int>(4);
    tx = std::move(s);
    rx = std::move(r);
  }
  ipcoro::sync_wait(ctx, tx.send(1));
  ipcoro::sync_wait(ctx, tx.send(2));
  CHECK(ipcoro::sync_wait(ctx, rx.receive()) == 1);
  tx.close();
  rx.close();
  CHECK(tx.messages_sent() == 2);
  CHECK(rx.messages_received() == 1);
}

TEST_CASE("cross-process channel round trips allocate nothing once warm", "[channel][alloc]") {
  const std::string transport = GENERATE("pipe", "mq", "shm", "shm-mpmc", "file");
  const std::string address = fresh_address(transport);
  CAPTURE(address);
  {
    channel_link link = channel_link::create(address);
    channel_sender<point> tx = link.sender<point>();
    channel_receiver<point> rx = link.receiver<point>();
    link.reset();
    ipcoro::io_context ctx;
    CHECK(allocations_per_long_run(ctx, tx, rx, 5000) == 0);
  }
  CHECK(nothing_left_behind());
}

TEST_CASE("select over cross-process receivers cancels the waits it does not take and loses nothing",
          "[channel][close]") {
  channel_link a = channel_link::create("pipe:");
  channel_link b = channel_link::create(fresh_address("shm"));
  channel_sender<int> a_tx = a.sender<int>();
  channel_receiver<int> a_rx = a.receiver<int>();
  channel_sender<std::string> b_tx = b.sender<std::string>();
  channel_receiver<std::string> b_rx = b.receiver<std::string>();
  a.reset();
  b.reset();
  ipcoro::io_context ctx;
  std::vector<std::size_t> order;
  int sum = 0;
  std::size_t chars = 0;
  ipcoro::sync_wait(ctx,
                    [](channel_sender<int>& a_tx, channel_receiver<int>& a_rx,
                       channel_sender<std::string>& b_tx, channel_receiver<std::string>& b_rx,
                       std::vector<std::size_t>& order, int& sum, std::size_t& chars) -> task<void> {
                      // Each round one receiver has a value; the other's wait is cancelled by select, which
                      // uses up that port's stop source: the next round needs a fresh one.
                      for (int i = 0; i < 6; ++i) {
                        if (i % 2 == 0) {
                          co_await a_tx.send(i);
                        } else {
                          std::string s(static_cast<std::size_t>(i), 's');
                          co_await b_tx.send(std::move(s));
                        }
                        const std::size_t chosen = co_await ipcoro::select(a_rx, b_rx);
                        order.push_back(chosen);
                        if (chosen == 0) {
                          sum += (co_await a_rx.receive()).value_or(-100);
                        } else {
                          chars += (co_await b_rx.receive()).value_or(std::string()).size();
                        }
                      }
                    }(a_tx, a_rx, b_tx, b_rx, order, sum, chars));
  CHECK(order == std::vector<std::size_t>{0, 1, 0, 1, 0, 1});
  CHECK(sum == 0 + 2 + 4);
  CHECK(chars == 1 + 3 + 5);
}

TEST_CASE(
    "receive_into reuses the receiver's buffer: byte buffers arrive intact and allocate nothing once warm",
    "[channel][ipc][alloc]") {
  const std::string transport = GENERATE("inproc", "pipe", "fifo", "mq", "shm", "shm-mpmc", "file");
  CAPTURE(transport);
  constexpr int count = 2000;
  constexpr int warm = 100;
  // Sizes vary (up to 1000 bytes, within every transport's defaults) and each buffer's
  // bytes depend on its index, so a reused buffer with stale bytes or length shows.
  const auto size_of = [](int i) { return static_cast<std::size_t>(1 + (i * 37) % 1000); };
  const auto fill = [](std::vector<std::byte>& b, int i) {
    for (std::size_t k = 0; k < b.size(); ++k) b[k] = static_cast<std::byte>((i + 3 * k) & 0xff);
  };
  const auto check = [](const std::vector<std::byte>& b, int i) {
    for (std::size_t k = 0; k < b.size(); ++k) {
      if (b[k] != static_cast<std::byte>((i + 3 * k) & 0xff)) return false;
    }
    return true;
  };
  const auto receive_all = [&](channel_receiver<std::vector<std::byte>>& rx,
                               std::uint64_t& allocs) -> task<int> {
    std::vector<std::byte> buf;
    buf.reserve(1000);
    int i = 0;
    std::uint64_t before = 0;
    for (;; ++i) {
      if (i == warm) before = ipcoro::test::allocations();
      const bool got = co_await rx.receive_into(buf);
      if (!got) break;
      if (buf.size() != size_of(i) || !check(buf, i)) co_return -1 - i;
    }
    allocs = ipcoro::test::allocations() - before;
    co_return i;
  };
  std::uint64_t allocs = 0;
  int received = 0;
  if (transport == "inproc") {
    ipcoro::io_context ctx;
    auto [tx, rx] = ipcoro::make_channel<std::vector<std::byte>>(8);
    received = ipcoro::sync_wait(ctx, [&]() -> task<int> {
      auto [n, sent] = co_await ipcoro::when_all(receive_all(rx, allocs), [&]() -> task<int> {
        for (int i = 0; i < count; ++i) {
          std::vector<std::byte> b(size_of(i));
          fill(b, i);
          co_await tx.send(std::move(b));
        }
        tx.close();
        co_return 0;
      }());
      co_return n + sent;
    }());
    // In process the vector itself moves: the receiver's buffer is replaced, not refilled,
    // so only the count and the bytes are checked here.
  } else {
    const std::string address = fresh_address(transport);
    CAPTURE(address);
    channel_link link = channel_link::create(address);
    child_process child([&]() -> int {
      ipcoro::io_context ctx;
      channel_sender<std::vector<std::byte>> tx = link.sender<std::vector<std::byte>>();
      link.reset();
      ipcoro::sync_wait(ctx, [&]() -> task<void> {
        for (int i = 0; i < count; ++i) {
          std::vector<std::byte> b(size_of(i));
          fill(b, i);
          co_await tx.send(std::move(b));
        }
      }());
      return 0;
    });
    channel_receiver<std::vector<std::byte>> rx = link.receiver<std::vector<std::byte>>();
    link.reset();
    ipcoro::io_context ctx;
    received = ipcoro::sync_wait(ctx, receive_all(rx, allocs));
    CHECK(child.wait() == 0);
    // Across processes every message is decoded into the same vector: nothing allocated.
    CHECK(allocs == 0);
  }
  REQUIRE(received == count);
  CHECK(nothing_left_behind());
}
