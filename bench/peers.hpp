// SPDX-License-Identifier: MIT
// The libraries people pick instead of ipcoro, measured as rows of ipcoro-bench beside it:
// ZeroMQ over ipc://, Boost.Interprocess message_queue, Asio local stream sockets.
#pragma once

#include "bench_support.hpp"

#include <chrono>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace ipcoro::bench {

/// One peer library: how --transport selects it, how its rows are named, and whether this
/// build has it (the bench builds each peer when Meson finds its packages).
struct peer_library {
  std::string_view transport;  ///< the --transport name and the rows' link: zmq, boost-mq, asio-local
  std::string_view impl;       ///< the rows' impl: zmq, boost, asio
  std::string_view rtt_mode;   ///< the round-trip rows' mode ("pair" for ZeroMQ)
  std::string_view tput_mode;  ///< the throughput rows' mode ("push-pull" for ZeroMQ)
  std::string_view packages;   ///< the Debian packages that build it
  bool built = false;
};

/// How long a peer row's side waits for one message before it fails the row (as a ring's
/// receive does), so that a peer that died ends its row, not the run.
inline constexpr std::chrono::seconds peer_time_limit{30};

/// Every peer, built or not, in the order of the tables.
std::span<const peer_library> peer_libraries() noexcept;

/// "zmq built, boost-mq not built (needs libboost-dev), ...": for the run's first lines.
std::string describe_peers();

/// The peer selected by `transport`, or nullptr when it names none.
const peer_library* find_peer(std::string_view transport) noexcept;

/// Measures one row of the peer that j.transport names, as every row is measured: the
/// echoing or producing side in a forked child, the measuring side here; everything it
/// creates is removed, also on failure. Throws std::runtime_error when it is not built.
pair_result measure_peer(const job& j, std::vector<double>* rtt);

// One per peer, defined in its own file, which is built only with the peer's packages.
pair_result measure_zmq(const job& j, std::vector<double>* rtt);
pair_result measure_boost_mq(const job& j, std::vector<double>* rtt);
pair_result measure_asio_local(const job& j, std::vector<double>* rtt);

}  // namespace ipcoro::bench
