// SPDX-License-Identifier: MIT
// The table of peer libraries ipcoro-bench compares, and the choice of which one measures a row.
#include "peers.hpp"

#include <fmt/core.h>

#include <array>
#include <stdexcept>
#include <string>

namespace ipcoro::bench {

namespace {
constexpr std::array<peer_library, 3> peers{{
    {"zmq", "zmq", "pair", "push-pull", "libzmq3-dev cppzmq-dev", IPCORO_BENCH_ZMQ != 0},
    {"boost-mq", "boost", "", "", "libboost-dev", IPCORO_BENCH_BOOST_MQ != 0},
    {"asio-local", "asio", "", "", "libasio-dev", IPCORO_BENCH_ASIO != 0},
}};
}  // namespace

std::span<const peer_library> peer_libraries() noexcept { return peers; }

const peer_library* find_peer(std::string_view transport) noexcept {
  for (const peer_library& p : peers) {
    if (p.transport == transport) return &p;
  }
  return nullptr;
}

std::string describe_peers() {
  std::string list;
  for (const peer_library& p : peers) {
    list += fmt::format("{}{} {}", list.empty() ? "" : ", ", p.transport,
                        p.built ? std::string("built") : fmt::format("not built (needs {})", p.packages));
  }
  return list;
}

pair_result measure_peer(const job& j, [[maybe_unused]] std::vector<double>* rtt) {
  const peer_library* p = find_peer(j.transport);
  if (p == nullptr || !p->built) throw std::runtime_error("peer not built: " + j.transport);
#if IPCORO_BENCH_ZMQ
  if (j.transport == "zmq") return measure_zmq(j, rtt);
#endif
#if IPCORO_BENCH_BOOST_MQ
  if (j.transport == "boost-mq") return measure_boost_mq(j, rtt);
#endif
#if IPCORO_BENCH_ASIO
  if (j.transport == "asio-local") return measure_asio_local(j, rtt);
#endif
  throw std::runtime_error("peer not built: " + j.transport);
}

}  // namespace ipcoro::bench
