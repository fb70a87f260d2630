// SPDX-License-Identifier: MIT
// ZeroMQ as a peer row of ipcoro-bench: PAIR sockets for round trips and PUSH/PULL for
// throughput, over ipc:// (a Unix socket under a fresh directory), one context per process.
#include "bench_loops.hpp"
#include "peers.hpp"

#include <zmq.hpp>

#include <ipcoro/unique_fd.hpp>

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <stdexcept>
#include <string>
#include <system_error>

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
  // The peer keeps its socket open until the measurer has every message. A PUSH side that
  // closed and exited at once sometimes left its receiver waiting for the last messages
  // (seen in an ASan build under load: the sender gone, the receiver short); a program that
  // stays up does not meet that, so the row should not either. Both windows have ended by then.
  int done_fds[2];
  if (::pipe2(done_fds, O_CLOEXEC) != 0) throw std::system_error(errno, std::system_category(), "pipe2");
  ipcoro::unique_fd done_read{done_fds[0]}, done_write{done_fds[1]};
  // The measuring side binds, the peer connects; a connect that comes first is retried by
  // zmq (after 10 ms here instead of 100), during the warm-up.
  const auto side = [&](bool peer, window& w) {
    (peer ? done_write : done_read) = {};  // so that a side that dies is an end of file
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
    if (peer) {
      char byte = 0;
      while (::read(done_read.get(), &byte, 1) < 0 && errno == EINTR) {
      }
    } else {
      [[maybe_unused]] const ssize_t n = ::write(done_write.get(), "x", 1);
    }
  };
  return run_pair(
      j.where, [&](window& w) { side(true, w); }, [&](window& w) { side(false, w); });
}

}  // namespace ipcoro::bench
