// SPDX-License-Identifier: MIT
// Races, timeouts and stop requests over channels: a receive that loses leaves its message,
// and every channel operation takes a deadline (task::with_timeout / with_deadline).
#include "ipcoro/channel.hpp"
#include "ipcoro/error.hpp"
#include "ipcoro/fifo.hpp"
#include "ipcoro/io_context.hpp"
#include "ipcoro/mqueue.hpp"
#include "ipcoro/sync_wait.hpp"
#include "ipcoro/task.hpp"
#include "ipcoro/timer.hpp"
#include "ipcoro/when_all.hpp"
#include "ipcoro/when_any.hpp"

#include "channel_support.hpp"
#include "process.hpp"

#include <catch2/catch.hpp>

#include <chrono>
#include <cstdint>
#include <optional>
#include <random>
#include <string>
#include <vector>

namespace {

using namespace std::chrono_literals;
using ipcoro::channel_link;
using ipcoro::channel_receiver;
using ipcoro::channel_sender;
using ipcoro::task;
using ipcoro::test::child_process;
using ipcoro::test::fresh_address;
using ipcoro::test::nothing_left_behind;

/// What a receiving process saw on one channel: the values in arrival order.
struct stream_record {
  std::vector<std::uint64_t> values;
  bool ended = false;

  /// Exactly 0 .. count-1, in order, each once.
  bool exactly(std::uint64_t count) const {
    if (values.size() != count) return false;
    for (std::uint64_t i = 0; i < count; ++i) {
      if (values[i] != i) return false;
    }
    return true;
  }
};

/// A child that sends 0 .. count-1 on each of two links' senders, interleaved, then closes.
child_process send_numbers_on_both(channel_link& a, channel_link& b, std::uint64_t count) {
  return child_process([&a, &b, count]() -> int {
    ipcoro::io_context ctx;
    channel_sender<std::uint64_t> ta = a.sender<std::uint64_t>();
    channel_sender<std::uint64_t> tb = b.sender<std::uint64_t>();
    a.reset();
    b.reset();
    ipcoro::sync_wait(ctx,
                      [](channel_sender<std::uint64_t>& ta, channel_sender<std::uint64_t>& tb,
                         std::uint64_t count) -> task<void> {
                        for (std::uint64_t i = 0; i < count; ++i) {
                          co_await ta.send(i);
                          co_await tb.send(i);
                        }
                      }(ta, tb, count));
    return 0;
  });
}

}  // namespace

TEST_CASE("when_any over two in-process receives takes one value and leaves the other", "[channel][race]") {
  ipcoro::io_context ctx;
  auto [tx1, rx1] = ipcoro::make_channel<int>(4);
  auto [tx2, rx2] = ipcoro::make_channel<int>(4);
  std::vector<int> got;
  ipcoro::sync_wait(
      ctx,
      [](channel_sender<int>& tx1, channel_receiver<int>& rx1, channel_sender<int>& tx2,
         channel_receiver<int>& rx2, std::vector<int>& got) -> task<void> {
        for (int round = 0; round < 100; ++round) {
          co_await tx1.send(2 * round);
          co_await tx2.send(2 * round + 1);
          auto first = co_await ipcoro::when_any(rx1.receive(), rx2.receive());
          const std::optional<int> won = first.index() == 0 ? std::get<0>(first) : std::get<1>(first);
          got.push_back(won.value_or(-1));
          // The loser's value is still there, for the next receive of that channel.
          std::optional<int> rest = first.index() == 0 ? co_await rx2.receive() : co_await rx1.receive();
          got.push_back(rest.value_or(-1));
        }
        tx1.close();
        tx2.close();
        CHECK_FALSE(co_await rx1.receive());
        CHECK_FALSE(co_await rx2.receive());
      }(tx1, rx1, tx2, rx2, got));
  REQUIRE(got.size() == 200);
  for (int round = 0; round < 100; ++round) {
    const int a = got[2 * static_cast<std::size_t>(round)];
    const int b = got[2 * static_cast<std::size_t>(round) + 1];
    CHECK(std::min(a, b) == 2 * round);
    CHECK(std::max(a, b) == 2 * round + 1);
  }
}

TEST_CASE("when_any over receives of two cross-process channels loses and reorders nothing",
          "[channel][race][ipc]") {
  const auto [first, second] = GENERATE(std::pair<std::string, std::string>{"mq", "shm"},
                                        std::pair<std::string, std::string>{"pipe", "fifo"},
                                        std::pair<std::string, std::string>{"file", "shm-mpmc"});
  CAPTURE(first, second);
  constexpr std::uint64_t count = 3000;
  stream_record ra;
  stream_record rb;
  {
    channel_link a = channel_link::create(fresh_address(first));
    channel_link b = channel_link::create(fresh_address(second));
    child_process child = send_numbers_on_both(a, b, count);
    channel_receiver<std::uint64_t> rxa = a.receiver<std::uint64_t>();
    channel_receiver<std::uint64_t> rxb = b.receiver<std::uint64_t>();
    a.reset();
    b.reset();
    ipcoro::io_context ctx;
    ipcoro::sync_wait(ctx,
                      [](channel_receiver<std::uint64_t>& rxa, channel_receiver<std::uint64_t>& rxb,
                         stream_record& ra, stream_record& rb) -> task<void> {
                        while (!ra.ended || !rb.ended) {
                          if (ra.ended || rb.ended) {
                            stream_record& r = ra.ended ? rb : ra;
                            std::optional<std::uint64_t> v = co_await (ra.ended ? rxb : rxa).receive();
                            if (v) r.values.push_back(*v);
                            r.ended = !v;
                            continue;
                          }
                          auto won = co_await ipcoro::when_any(rxa.receive(), rxb.receive());
                          stream_record& r = won.index() == 0 ? ra : rb;
                          const std::optional<std::uint64_t> v =
                              won.index() == 0 ? std::get<0>(won) : std::get<1>(won);
                          if (v) r.values.push_back(*v);
                          r.ended = !v;
                        }
                      }(rxa, rxb, ra, rb));
    CHECK(child.wait() == 0);
  }
  CHECK(ra.values.size() == count);
  CHECK(rb.values.size() == count);
  CHECK(ra.exactly(count));
  CHECK(rb.exactly(count));
  CHECK(nothing_left_behind());
}

TEST_CASE("receives with short timeouts racing a sender in another process lose nothing",
          "[channel][race][ipc]") {
  const std::string transport = GENERATE("pipe", "fifo", "mq", "shm", "shm-mpmc", "file");
  CAPTURE(transport);
  constexpr std::uint64_t count = 2000;
  stream_record got;
  std::uint64_t timeouts = 0;
  {
    channel_link link = channel_link::create(fresh_address(transport));
    child_process child([&link]() -> int {
      ipcoro::io_context ctx;
      channel_sender<std::uint64_t> tx = link.sender<std::uint64_t>();
      link.reset();
      ipcoro::sync_wait(ctx, [](channel_sender<std::uint64_t>& tx) -> task<void> {
        for (std::uint64_t i = 0; i < count; ++i) co_await tx.send(i);
      }(tx));
      return 0;
    });
    channel_receiver<std::uint64_t> rx = link.receiver<std::uint64_t>();
    link.reset();
    ipcoro::io_context ctx;
    ipcoro::sync_wait(
        ctx,
        [](channel_receiver<std::uint64_t>& rx, stream_record& got, std::uint64_t& timeouts) -> task<void> {
          std::minstd_rand random(42);
          while (!got.ended) {
            // Deadlines from 0 to 40 µs: many expire while a message is on its way.
            const auto patience = std::chrono::microseconds(random() % 40);
            try {
              std::optional<std::uint64_t> v = co_await rx.receive().with_timeout(patience);
              if (v) got.values.push_back(*v);
              got.ended = !v;
            } catch (const ipcoro::timed_out&) {
              ++timeouts;
            }
          }
        }(rx, got, timeouts));
    CHECK(child.wait() == 0);
  }
  INFO("timeouts: " << timeouts);
  CHECK(got.exactly(count));
  CHECK(nothing_left_behind());
}

TEST_CASE("a receive raced against a timer in when_any loses nothing when the timer wins",
          "[channel][race]") {
  ipcoro::io_context ctx;
  auto [tx, rx] = ipcoro::make_channel<int>(8);
  stream_record got;
  ipcoro::sync_wait(
      ctx, [](channel_sender<int>& tx, channel_receiver<int>& rx, stream_record& got) -> task<void> {
        for (int i = 0; i < 200; ++i) {
          // A timer that has already expired starts first, so it wins while a value is ready.
          auto won = co_await ipcoro::when_any(
              []() -> task<void> { co_await ipcoro::sleep_until(std::chrono::steady_clock::now()); }(),
              rx.receive());
          if (won.index() == 1)
            got.values.push_back(static_cast<std::uint64_t>(std::get<1>(won).value_or(-1)));
          if (i % 2 == 0) co_await tx.send(i / 2);
        }
        tx.close();
        while (std::optional<int> v = co_await rx.receive())
          got.values.push_back(static_cast<std::uint64_t>(*v));
      }(tx, rx, got));
  CHECK(got.exactly(100));
}

TEST_CASE("send, receive and receive_into take a deadline and lose nothing when it expires",
          "[channel][deadline]") {
  const std::string transport = GENERATE("local", "pipe", "mq", "shm", "shm-mpmc", "file");
  CAPTURE(transport);
  ipcoro::io_context ctx;
  channel_link link;
  channel_sender<std::uint64_t> tx;
  channel_receiver<std::uint64_t> rx;
  if (transport == "local") {
    auto pair = ipcoro::make_channel<std::uint64_t>(4);
    tx = std::move(pair.sender);
    rx = std::move(pair.receiver);
  } else {
    link = channel_link::create(fresh_address(transport, transport == "mq" ? "capacity=4" : ""));
    tx = link.sender<std::uint64_t>();
    rx = link.receiver<std::uint64_t>();
    link.reset();
  }
  ipcoro::sync_wait(
      ctx, [](channel_sender<std::uint64_t>& tx, channel_receiver<std::uint64_t>& rx) -> task<void> {
        // An empty channel: receive and receive_into time out, and the next value still comes.
        const auto start = std::chrono::steady_clock::now();
        bool timed_out = false;
        try {
          (void)co_await rx.receive().with_timeout(20ms);
        } catch (const ipcoro::timed_out&) {
          timed_out = true;
        }
        CHECK(timed_out);
        CHECK(std::chrono::steady_clock::now() - start >= 20ms);
        std::uint64_t into = 7;
        timed_out = false;
        try {
          (void)co_await rx.receive_into(into).with_deadline(std::chrono::steady_clock::now() + 5ms);
        } catch (const ipcoro::timed_out&) {
          timed_out = true;
        }
        CHECK(timed_out);
        CHECK(into == 7);
        // A full channel: a send times out, and its value is not delivered.
        std::uint64_t sent = 0;
        timed_out = false;
        while (!timed_out) {
          try {
            co_await tx.send(sent).with_timeout(20ms);
            ++sent;
          } catch (const ipcoro::timed_out&) {
            timed_out = true;
          }
          REQUIRE(sent < 100'000'000);
        }
        CHECK(sent > 0);
        tx.close();
        std::uint64_t expected = 0;
        while (std::optional<std::uint64_t> v = co_await rx.receive().with_timeout(5s)) {
          CHECK(*v == expected);
          ++expected;
        }
        CHECK(expected == sent);
      }(tx, rx));
  CHECK(nothing_left_behind());
}

TEST_CASE("a deadline that is met returns the value; a stop request still gives operation_cancelled",
          "[channel][deadline]") {
  ipcoro::io_context ctx;
  auto [tx, rx] = ipcoro::make_channel<std::string>(2);
  ipcoro::sync_wait(
      ctx, [](channel_sender<std::string>& tx, channel_receiver<std::string>& rx) -> task<void> {
        std::string hello = "hello";
        co_await tx.send(std::move(hello)).with_timeout(1s);
        std::optional<std::string> v = co_await rx.receive().with_timeout(1s);
        CHECK(v == "hello");
        std::stop_source stop;
        auto receive_then_note = [](channel_receiver<std::string>& rx, std::stop_token token) -> task<bool> {
          try {
            (void)co_await rx.receive().with_timeout(10s).with_stop_token(token);
          } catch (const ipcoro::timed_out&) {
            co_return false;
          } catch (const ipcoro::operation_cancelled&) {
            co_return true;
          }
          co_return false;
        };
        auto stop_soon = [](std::stop_source& stop) -> task<void> {
          co_await ipcoro::sleep_for(1ms);
          stop.request_stop();
        };
        auto [cancelled, ignored] =
            co_await ipcoro::when_all(receive_then_note(rx, stop.get_token()), stop_soon(stop));
        (void)ignored;
        CHECK(cancelled);
      }(tx, rx));
}

TEST_CASE("open_sender and open_receiver take a deadline; open_sender on a FIFO nobody reads ends by it",
          "[channel][deadline][ipc]") {
  ipcoro::io_context ctx;
  const std::string name = "/tmp/" + ipcoro::test::unique_name("lonely");
  {
    // A FIFO whose receiver is gone: the name is there, nobody reads.
    ipcoro::fifo node(name, ipcoro::fifo_options{});
    const auto start = std::chrono::steady_clock::now();
    bool timed_out = false;
    try {
      (void)ipcoro::sync_wait(ctx, ipcoro::open_sender<int>("fifo:" + name).with_timeout(50ms));
    } catch (const ipcoro::timed_out&) {
      timed_out = true;
    }
    CHECK(timed_out);
    CHECK(std::chrono::steady_clock::now() - start < 5s);
  }
  const std::string address = fresh_address("shm");
  channel_receiver<int> rx = ipcoro::sync_wait(ctx, ipcoro::open_receiver<int>(address).with_timeout(1s));
  channel_sender<int> tx = ipcoro::sync_wait(ctx, ipcoro::open_sender<int>(address).with_timeout(1s));
  CHECK(tx);
  CHECK(rx);
  tx.close();
  rx.close();
  CHECK(nothing_left_behind());
}

TEST_CASE("mq_demux::receive takes a deadline and takes no message when it expires", "[mq][deadline]") {
  ipcoro::io_context ctx;
  const std::string name = std::string("/").append(ipcoro::test::unique_name("demux"));
  ipcoro::mq_attributes attributes;
  attributes.max_messages = 8;
  attributes.message_size = 64;
  ipcoro::message_queue q = ipcoro::message_queue::create(name, attributes);
  ipcoro::mq_demux demux(q, 2);
  std::vector<std::string> got;
  ipcoro::sync_wait(
      ctx,
      [](ipcoro::message_queue& q, ipcoro::mq_demux& demux, std::vector<std::string>& got) -> task<void> {
        auto consumer = [](ipcoro::message_queue& q, ipcoro::mq_demux& demux,
                           std::vector<std::string>& got) -> task<void> {
          std::vector<std::byte> buf(demux.max_payload());
          bool timed_out = false;
          try {
            (void)co_await demux.receive(1, buf).with_timeout(10ms);
          } catch (const ipcoro::timed_out&) {
            timed_out = true;
          }
          CHECK(timed_out);
          const std::string word = "late";
          co_await q.send_labelled(1, std::as_bytes(std::span{word}));
          std::optional<ipcoro::mq_message> m = co_await demux.receive(1, buf).with_timeout(1s);
          REQUIRE(m);
          got.emplace_back(reinterpret_cast<const char*>(buf.data()), m->size);
          demux.close();
        };
        co_await ipcoro::when_all(demux.run(), consumer(q, demux, got));
      }(q, demux, got));
  CHECK(got == std::vector<std::string>{"late"});
  q.close();  // removes the name: this object created the queue
  CHECK(nothing_left_behind());
}
