// SPDX-License-Identifier: MIT
// ZeroMQ as a peer row of ipcoro-bench: PAIR sockets for round trips and PUSH/PULL for
// throughput, over ipc:// (a Unix socket under a fresh directory), one context per process.
#include "bench_loops.hpp"
#include "peers.hpp"

#include <zmq.hpp>

#include <stdexcept>
#include <string>

namespace ipcoro::bench {

namespace {

/// One socket with blocking sends and receives of whole messages. zmq's own batching and
/// the default high-water marks are left as they are.
struct zmq_end {
  zmq::socket_t* socket = nullptr;
  void send(std::span<const std::byte> m) const {
    if (!socket->send(zmq::const_buffer(m.data(), m.size()), zmq::send_flags::none))
      throw std::runtime_error("zmq: no room within the time limit (did the peer die?)");
  }
  void receive(std::span<std::byte> m) const {
    const auto got = socket->recv(zmq::mutable_buffer(m.data(), m.size()), zmq::recv_flags::none);
    if (!got) throw std::runtime_error("zmq: no message within the time limit (did the peer die?)");
    if (got->size != m.size() || got->truncated()) throw std::runtime_error("zmq: short or long message");
  }
};

}  // namespace

pair_result measure_zmq(const job& j, std::vector<double>* rtt) {
  const owned_name dir = make_owned_directory("/tmp/ipcoro-bench-zmq-");
  const owned_name socket_file(name_kind::file, dir.name() + "/socket");
  const std::string endpoint = "ipc://" + socket_file.name();
  const bool round_trips = j.what == kind::rtt;
  // The measuring side binds, the peer connects; a connect that comes first is retried by
  // zmq (after 10 ms here instead of 100), during the warm-up.
  const auto side = [&](bool peer, window& w) {
    zmq::context_t context(1);
    zmq::socket_t socket(context, round_trips ? zmq::socket_type::pair
                                  : peer      ? zmq::socket_type::push
                                              : zmq::socket_type::pull);
    // A peer that dies fails the row instead of leaving the other side waiting forever.
    socket.set(zmq::sockopt::rcvtimeo, static_cast<int>(peer_time_limit.count() * 1000));
    socket.set(zmq::sockopt::sndtimeo, static_cast<int>(peer_time_limit.count() * 1000));
    if (peer) {
      socket.set(zmq::sockopt::reconnect_ivl, 10);
      socket.connect(endpoint);
    } else {
      socket.bind(endpoint);
    }
    const zmq_end e{&socket};
    if (round_trips) {
      peer ? sync_echo(e, j.size, j.warmup, j.n, w) : sync_ping(e, j.size, j.warmup, j.n, w, *rtt);
    } else {
      peer ? sync_produce(e, j.size, j.warmup, j.n, w) : sync_consume(e, j.size, j.warmup, j.n, w);
    }
    // Closing the context waits until the pushed messages are delivered (infinite linger).
  };
  return run_pair(
      j.where, [&](window& w) { side(true, w); }, [&](window& w) { side(false, w); });
}

}  // namespace ipcoro::bench
