// SPDX-License-Identifier: MIT
// The targets of the benchmark issues (6 and 12), judged from one run's rows.
#pragma once

#include "bench_report.hpp"

#include <string>
#include <vector>

namespace ipcoro::bench {

/// One target: what it asks, the figure that judges it, and the verdict.
struct verdict {
  std::string target;
  std::string figure;
  int state = 0;  ///< 1 met, 0 missed, -1 not measured
};

/// Issue 6: ipcoro's transports beside the raw syscalls and Asio.
void evaluate_issue6(const results& res, std::vector<verdict>& out);
/// Issue 12: channels as fast as their rings and faster than the peer libraries.
void evaluate_issue12(const results& res, std::vector<verdict>& out);
/// Prints both lists of targets and counts the verdicts.
void print_targets(const results& res, bool quick, int& met, int& missed);

}  // namespace ipcoro::bench
