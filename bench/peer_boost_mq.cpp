// SPDX-License-Identifier: MIT
// Boost.Interprocess message_queue as a peer row of ipcoro-bench: a blocking queue of
// fixed-size slots in a named shared memory object, one queue per direction.
#include "bench_loops.hpp"
#include "peers.hpp"

#include <boost/date_time/posix_time/posix_time_types.hpp>
#include <boost/interprocess/ipc/message_queue.hpp>

#include <optional>
#include <stdexcept>
#include <string>

namespace ipcoro::bench {

namespace {

namespace bip = boost::interprocess;

boost::posix_time::ptime time_limit() {
  return boost::posix_time::microsec_clock::universal_time() +
         boost::posix_time::seconds(static_cast<long>(peer_time_limit.count()));
}

/// Blocking sends and receives on the queues of one side (null where it has none). A wait
/// longer than peer_time_limit fails the row (did the peer die?).
struct boost_mq_end {
  bip::message_queue* in = nullptr;
  bip::message_queue* out = nullptr;
  void send(std::span<const std::byte> m) const {
    if (!out->timed_send(m.data(), m.size(), 0, time_limit()))
      throw std::runtime_error("boost message_queue: no room within the time limit");
  }
  void receive(std::span<std::byte> m) const {
    std::size_t got = 0;
    unsigned priority = 0;
    if (!in->timed_receive(m.data(), m.size(), got, priority, time_limit()))
      throw std::runtime_error("boost message_queue: no message within the time limit");
    if (got != m.size()) throw std::runtime_error("boost message_queue: short message");
  }
};

}  // namespace

pair_result measure_boost_mq(const job& j, std::vector<double>* rtt) {
  // As many slots as ipcoro's ring of the same row holds messages: the default 1 MiB ring of
  // a shm channel (4 MiB for 64 KiB messages, as the bench's rings), over the message size.
  const std::size_t capacity = j.size >= 65536 ? 4 << 20 : 1 << 20;
  const std::size_t slots = capacity / j.size;
  const bool round_trips = j.what == kind::rtt;
  // Owned before they exist: removed from /dev/shm however the row ends. Boost adds the
  // leading '/' that shm_open wants.
  const owned_name there_name(name_kind::shm, fmt::format("/{}", unique_name("boostmq")));
  const owned_name back_name(name_kind::shm, fmt::format("/{}", unique_name("boostmq")));
  const std::string there = there_name.name().substr(1), back = back_name.name().substr(1);
  bip::message_queue made_there(bip::create_only, there.c_str(), slots, j.size);
  std::optional<bip::message_queue> made_back;
  if (round_trips) made_back.emplace(bip::create_only, back.c_str(), slots, j.size);
  // Each side opens the queues by name, as a separate program would.
  const auto side = [&](bool peer, window& w) {
    bip::message_queue first(bip::open_only, there.c_str());
    if (round_trips) {
      bip::message_queue second(bip::open_only, back.c_str());
      const boost_mq_end e{peer ? &first : &second, peer ? &second : &first};
      peer ? sync_echo(e, j.size, j.warmup, j.n, w) : sync_ping(e, j.size, j.warmup, j.n, w, *rtt);
    } else if (peer) {
      sync_produce(boost_mq_end{nullptr, &first}, j.size, j.warmup, j.n, w);
    } else {
      sync_consume(boost_mq_end{&first, nullptr}, j.size, j.warmup, j.n, w);
    }
  };
  return run_pair(
      j.where, [&](window& w) { side(true, w); }, [&](window& w) { side(false, w); });
}

}  // namespace ipcoro::bench
