// SPDX-License-Identifier: MIT
// Results of ipcoro-bench: the rows it measures, the fmt tables with ratios (and the peer
// libraries beside ipcoro's channels), the JSON list of rows, and the gnuplot chart.
#pragma once

#include <fmt/core.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

namespace ipcoro::bench {

/// One 64-byte round-trip measurement.
struct rtt_row {
  std::string transport;                        ///< pipe fifo mq shm file inproc, or a peer library's
  std::string impl;                             ///< raw ipcoro ipcoro-channel asio, or zmq boost
  std::string mode;                             ///< "" or busy-poll, embedded, spin, sleep, futex
  std::string placement;                        ///< cross-core, same-core, one-thread
  double p50 = 0, p99 = 0, p999 = 0, mean = 0;  ///< microseconds
  double cpu_us = 0;                            ///< user + system time of both sides per round trip
  double allocs = 0;      ///< heap allocations per message, both sides (2 messages per round trip)
  std::string base_mode;  ///< the raw row the ratio compares with (same transport and placement)
  std::string note;       ///< why it was skipped or failed; empty when measured
  bool failed = false;
  bool peer = false;  ///< a library people pick instead of ipcoro (zmq, boost-mq, asio-local)
};

/// One one-way throughput measurement.
struct tput_row {
  std::string transport, impl, mode, placement;
  std::size_t size = 0;
  double msgs_per_s = 0, bytes_per_s = 0;
  double cpu_us = 0;  ///< per message, both sides
  double allocs = 0;  ///< per message, both sides
  std::string base_impl = "raw", base_mode;
  std::string note;
  bool failed = false;
  bool peer = false;  ///< a library people pick instead of ipcoro
};

/// A single figure: task switch cost, memcpy bandwidth.
struct scalar_row {
  std::string transport, impl, metric;
  std::size_t size = 0;
  double value = 0;
  std::string unit;
};

struct results {
  std::vector<rtt_row> rtt;
  std::vector<tput_row> tput;
  std::vector<scalar_row> scalars;
  std::string allocation_counting;  ///< what allocs/msg counts, said under the peer table

  const rtt_row* find_rtt(const std::string& transport, const std::string& impl, const std::string& mode,
                          const std::string& placement) const {
    for (const auto& r : rtt) {
      if (r.transport == transport && r.impl == impl && r.mode == mode && r.placement == placement &&
          r.note.empty())
        return &r;
    }
    return nullptr;
  }
  const tput_row* find_tput(const std::string& transport, const std::string& impl, const std::string& mode,
                            std::size_t size) const {
    for (const auto& r : tput) {
      if (r.transport == transport && r.impl == impl && r.mode == mode && r.size == size && r.note.empty())
        return &r;
    }
    return nullptr;
  }
  std::optional<double> find_scalar(const std::string& transport, const std::string& impl,
                                    const std::string& metric) const {
    for (const auto& r : scalars) {
      if (r.transport == transport && r.impl == impl && r.metric == metric) return r.value;
    }
    return std::nullopt;
  }
};

inline std::string size_label(std::size_t size) {
  if (size >= 1024 * 1024 && size % (1024 * 1024) == 0) return fmt::format("{} MiB", size >> 20);
  if (size >= 1024 && size % 1024 == 0) return fmt::format("{} KiB", size >> 10);
  return fmt::format("{} B", size);
}

/// 1234567 -> "1.23 M".
inline std::string si(double v) {
  if (v >= 1e9) return fmt::format("{:.2f} G", v / 1e9);
  if (v >= 1e6) return fmt::format("{:.2f} M", v / 1e6);
  if (v >= 1e3) return fmt::format("{:.2f} k", v / 1e3);
  return fmt::format("{:.2f}", v);
}

inline std::string qualified(const std::string& metric, const std::string& a, const std::string& b = {}) {
  std::string m = metric;
  if (!a.empty()) m += "." + a;
  if (!b.empty()) m += "." + b;
  return m;
}

/// The links whose channel rows (impl ipcoro-channel, no mode) were measured across processes.
inline std::vector<std::string> channel_links(const results& res) {
  std::vector<std::string> links;
  const auto note = [&](const std::string& t) {
    if (t != "inproc" && std::find(links.begin(), links.end(), t) == links.end()) links.push_back(t);
  };
  for (const auto& r : res.rtt)
    if (r.impl == "ipcoro-channel" && r.mode.empty() && r.note.empty()) note(r.transport);
  for (const auto& r : res.tput)
    if (r.impl == "ipcoro-channel" && r.mode.empty() && r.note.empty()) note(r.transport);
  return links;
}

template <class Row>
std::string peer_label(const Row& r) {
  return r.mode.empty() ? r.transport : r.transport + " " + r.mode;
}

/// Each measured peer row beside each channel row of the same kind: round trip p50 per
/// placement, throughput per size. A cell is the channel's advantage, so above 1 the channel
/// wins: the peer's p50 over the channel's, or the channel's messages/s over the peer's.
inline void print_peer_comparison(const results& res) {
  const std::vector<std::string> links = channel_links(res);
  bool any = false;
  for (const auto& r : res.rtt) any = any || (r.peer && r.note.empty());
  for (const auto& r : res.tput) any = any || (r.peer && r.note.empty());
  if (!any) return;
  fmt::print(
      "\nPeer libraries beside ipcoro's channels (cell = the channel's advantage: peer p50 / channel p50,\n"
      "or channel msgs/s / peer msgs/s; above 1 the channel wins)\n");
  fmt::print("{:<22} {:<22} {:>12}", "row", "peer", "peer figure");
  for (const auto& t : links) fmt::print(" {:>9}", t + " ch");
  fmt::print("\n");
  for (const auto& r : res.rtt) {
    if (!r.peer || !r.note.empty()) continue;
    fmt::print("{:<22} {:<22} {:>9.2f} us", "rtt p50 " + r.placement, peer_label(r), r.p50);
    for (const auto& t : links) {
      const rtt_row* ch = res.find_rtt(t, "ipcoro-channel", "", r.placement);
      fmt::print(" {:>9}", ch ? fmt::format("{:.2f}x", r.p50 / ch->p50) : std::string("-"));
    }
    fmt::print("\n");
  }
  for (const auto& r : res.tput) {
    if (!r.peer || !r.note.empty()) continue;
    fmt::print("{:<22} {:<22} {:>10}/s", "throughput " + size_label(r.size), peer_label(r), si(r.msgs_per_s));
    for (const auto& t : links) {
      const tput_row* ch = res.find_tput(t, "ipcoro-channel", "", r.size);
      fmt::print(" {:>9}", ch ? fmt::format("{:.2f}x", ch->msgs_per_s / r.msgs_per_s) : std::string("-"));
    }
    fmt::print("\n");
  }
  if (!res.allocation_counting.empty())
    fmt::print("allocs/msg, as for every row: {}\n", res.allocation_counting);
}

inline void print_tables(const results& res) {
  fmt::print("\n64-byte round trip (us; ratio = p50 / p50 of the raw row in the same placement)\n");
  fmt::print("{:<10} {:<15} {:<10} {:<11} {:>9} {:>9} {:>9} {:>9} {:>8} {:>11} {:>10}\n", "link", "impl",
             "mode", "placement", "p50", "p99", "p99.9", "mean", "x raw", "cpu us/rtt", "allocs/msg");
  for (const auto& r : res.rtt) {
    if (!r.note.empty()) {
      fmt::print("{:<10} {:<15} {:<10} {:<11} {}: {}\n", r.transport, r.impl, r.mode, r.placement,
                 r.failed ? "FAILED" : "skipped", r.note);
      continue;
    }
    const rtt_row* base = r.impl == "raw" && r.mode == r.base_mode
                              ? &r
                              : res.find_rtt(r.transport, "raw", r.base_mode, r.placement);
    const std::string ratio = base ? fmt::format("{:.3f}x", r.p50 / base->p50) : std::string("-");
    fmt::print("{:<10} {:<15} {:<10} {:<11} {:>9.2f} {:>9.2f} {:>9.2f} {:>9.2f} {:>8} {:>11.2f} {:>10.3f}\n",
               r.transport, r.impl, r.mode, r.placement, r.p50, r.p99, r.p999, r.mean, ratio, r.cpu_us,
               r.allocs);
  }
  fmt::print("\nOne-way throughput (ratio = bytes/s / the comparison row: raw, or memcpy for rings)\n");
  fmt::print("{:<10} {:<15} {:<10} {:<11} {:>7} {:>11} {:>11} {:>8} {:>11} {:>10}\n", "link", "impl", "mode",
             "placement", "size", "msgs/s", "bytes/s", "x raw", "cpu us/msg", "allocs/msg");
  for (const auto& r : res.tput) {
    if (!r.note.empty()) {
      fmt::print("{:<10} {:<15} {:<10} {:<11} {:>7} {}: {}\n", r.transport, r.impl, r.mode, r.placement,
                 size_label(r.size), r.failed ? "FAILED" : "skipped", r.note);
      continue;
    }
    const tput_row* base = res.find_tput(r.transport, r.base_impl, r.base_mode, r.size);
    const std::string ratio =
        base ? fmt::format("{:.3f}x", r.bytes_per_s / base->bytes_per_s) : std::string("-");
    fmt::print("{:<10} {:<15} {:<10} {:<11} {:>7} {:>11} {:>11} {:>8} {:>11.3f} {:>10.3f}\n", r.transport,
               r.impl, r.mode, r.placement, size_label(r.size), si(r.msgs_per_s), si(r.bytes_per_s) + "B",
               ratio, r.cpu_us, r.allocs);
  }
  print_peer_comparison(res);
  if (!res.scalars.empty()) {
    fmt::print("\nOther figures\n");
    for (const auto& s : res.scalars) {
      fmt::print("{:<10} {:<15} {:<28} {:>7} {:>12.3f} {}\n", s.transport, s.impl, s.metric,
                 s.size ? size_label(s.size) : std::string(), s.value, s.unit);
    }
  }
}

/// Writes every measured figure as a JSON list of
/// {"transport", "impl", "metric", "size", "value", "unit"}; a row's mode and placement
/// are suffixes of its metric ("rtt_p50.busy-poll.cross-core").
inline bool write_json(const results& res, const std::string& path) {
  std::FILE* f = std::fopen(path.c_str(), "w");
  if (f == nullptr) {
    fmt::print(stderr, "ipcoro-bench: cannot write {}: {}\n", path, std::strerror(errno));
    return false;
  }
  bool first = true;
  const auto row = [&](const std::string& transport, const std::string& impl, const std::string& metric,
                       std::size_t size, double value, const char* unit) {
    // JSON has no inf or NaN: a figure that could not be computed is null.
    const std::string v = std::isfinite(value) ? fmt::format("{}", value) : std::string("null");
    fmt::print(
        f,
        "{}\n  {{\"transport\": \"{}\", \"impl\": \"{}\", \"metric\": \"{}\", \"size\": {}, \"value\": {}, "
        "\"unit\": \"{}\"}}",
        first ? "" : ",", transport, impl, metric, size, v, unit);
    first = false;
  };
  std::fputc('[', f);
  for (const auto& r : res.rtt) {
    if (!r.note.empty()) continue;
    row(r.transport, r.impl, qualified("rtt_p50", r.mode, r.placement), 64, r.p50, "us");
    row(r.transport, r.impl, qualified("rtt_p99", r.mode, r.placement), 64, r.p99, "us");
    row(r.transport, r.impl, qualified("rtt_p999", r.mode, r.placement), 64, r.p999, "us");
    row(r.transport, r.impl, qualified("rtt_mean", r.mode, r.placement), 64, r.mean, "us");
    row(r.transport, r.impl, qualified("rtt_cpu", r.mode, r.placement), 64, r.cpu_us, "us");
    row(r.transport, r.impl, qualified("rtt_allocs_per_msg", r.mode, r.placement), 64, r.allocs,
        "allocations");
  }
  for (const auto& r : res.tput) {
    if (!r.note.empty()) continue;
    row(r.transport, r.impl, qualified("throughput_msgs", r.mode, r.placement), r.size, r.msgs_per_s,
        "msg/s");
    row(r.transport, r.impl, qualified("throughput_bytes", r.mode, r.placement), r.size, r.bytes_per_s,
        "B/s");
    row(r.transport, r.impl, qualified("throughput_cpu", r.mode, r.placement), r.size, r.cpu_us, "us");
    row(r.transport, r.impl, qualified("throughput_allocs_per_msg", r.mode, r.placement), r.size, r.allocs,
        "allocations");
  }
  for (const auto& s : res.scalars) row(s.transport, s.impl, s.metric, s.size, s.value, s.unit.c_str());
  std::fputs("\n]\n", f);
  return std::fclose(f) == 0;
}

/// True when `gnuplot` can be run.
inline bool have_gnuplot() { return std::system("gnuplot --version >/dev/null 2>&1") == 0; }

/// Draws the chart with gnuplot: round-trip p50 per row (log scale) for each placement,
/// and throughput in bytes/s at 64 KiB and in messages/s at 64 B.
inline bool write_plot(const results& res, const std::string& png, const std::string& title) {
  char dir_template[] = "/tmp/ipcoro-bench-plot-XXXXXX";
  if (::mkdtemp(dir_template) == nullptr) return false;
  const std::string dir = dir_template;
  // A peer's link names its library already: "zmq pair", not "zmq zmq pair".
  const auto label = [](const auto& r) {
    std::string s = r.peer ? r.transport : r.transport + " " + r.impl;
    if (!r.mode.empty()) s += " " + r.mode;
    return s;
  };
  // Colour by implementation: raw grey, ipcoro blue, channel green, Asio orange, peers purple.
  const auto colour = [](const auto& row) {
    const std::string& impl = row.impl;
    return row.peer ? 5 : impl == "raw" ? 1 : impl == "ipcoro" ? 2 : impl == "ipcoro-channel" ? 3 : 4;
  };
  const auto open = [&](const char* name) { return std::fopen((dir + "/" + name).c_str(), "w"); };
  std::FILE* cross = open("rtt_cross.dat");
  std::FILE* same = open("rtt_same.dat");
  std::FILE* big = open("tput_big.dat");
  std::FILE* small = open("tput_small.dat");
  if (!cross || !same || !big || !small) return false;
  for (const auto& r : res.rtt) {
    if (!r.note.empty()) continue;
    std::FILE* f = r.placement == "same-core" ? same : cross;
    fmt::print(f, "\"{}\" {} {}\n", label(r), r.p50, colour(r));
  }
  for (const auto& r : res.tput) {
    if (!r.note.empty()) continue;
    if (r.size == 65536) fmt::print(big, "\"{}\" {} {}\n", label(r), r.bytes_per_s / 1e9, colour(r));
    if (r.size == 64) fmt::print(small, "\"{}\" {} {}\n", label(r), r.msgs_per_s / 1e6, colour(r));
  }
  for (std::FILE* f : {cross, same, big, small}) std::fclose(f);
  const std::string script = dir + "/plot.gp";
  std::FILE* gp = std::fopen(script.c_str(), "w");
  if (!gp) return false;
  fmt::print(gp, R"gp(set terminal pngcairo size 1800,1300 font "sans,10" noenhanced
set output "{png}"
set multiplot layout 2,2 title "{title}  —  grey: raw syscalls, blue: ipcoro, green: ipcoro channel, orange: Asio, purple: peer libraries"
set style fill solid 0.8 border -1
set boxwidth 0.7
set grid ytics
set xtics rotate by -50 left
set key off
set linetype 1 lc rgb "#999999"
set linetype 2 lc rgb "#4477aa"
set linetype 3 lc rgb "#228833"
set linetype 4 lc rgb "#ee7733"
set linetype 5 lc rgb "#aa3377"
set bmargin 9
set rmargin 12
set logscale y
set title "64 B round trip p50, cross-core (us, log scale)"
plot "{dir}/rtt_cross.dat" using 0:2:3:xtic(1) with boxes lc variable
set title "64 B round trip p50, same core (us, log scale)"
plot "{dir}/rtt_same.dat" using 0:2:3:xtic(1) with boxes lc variable
unset logscale y
set title "throughput at 64 KiB messages (GB/s)"
plot "{dir}/tput_big.dat" using 0:2:3:xtic(1) with boxes lc variable
set logscale y
set title "throughput at 64 B messages (million msgs/s, log scale)"
plot "{dir}/tput_small.dat" using 0:2:3:xtic(1) with boxes lc variable
unset multiplot
)gp",
             fmt::arg("png", png), fmt::arg("title", title), fmt::arg("dir", dir));
  std::fclose(gp);
  const int rc = std::system(fmt::format("gnuplot '{}'", script).c_str());
  for (const char* name : {"rtt_cross.dat", "rtt_same.dat", "tput_big.dat", "tput_small.dat", "plot.gp"})
    ::unlink((dir + "/" + name).c_str());
  ::rmdir(dir.c_str());
  if (rc != 0) fmt::print(stderr, "ipcoro-bench: gnuplot failed (exit status {})\n", rc);
  return rc == 0;
}

}  // namespace ipcoro::bench
