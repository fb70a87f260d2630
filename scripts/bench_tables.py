#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Renders the JSON of `ipcoro-bench --json FILE` as the Markdown tables of docs/benchmarks.md.

Usage: scripts/bench_tables.py out.json > tables.md
Ratios compare with the raw row of the same transport and placement, as the program's own
table does: a raw futex ping-pong for sleeping rings and channels, a raw busy-spin
ping-pong for spinning rings, streaming memcpy for ring throughput.
"""
import json
import sys
from collections import OrderedDict


def split_metric(metric):
    """'rtt_p50.busy-poll.cross-core' -> ('rtt_p50', 'busy-poll', 'cross-core')."""
    parts = metric.split(".")
    if len(parts) == 3:
        return parts[0], parts[1], parts[2]
    if len(parts) == 2:
        return parts[0], "", parts[1]
    return parts[0], "", ""


def si(value, unit=""):
    for factor, prefix in ((1e9, " G"), (1e6, " M"), (1e3, " k")):
        if value >= factor:
            return f"{value / factor:.2f}{prefix}{unit}"
    return f"{value:.2f} {unit}".rstrip()


def size_name(size):
    return f"{size // 1024} KiB" if size >= 1024 else f"{size} B"


def raw_mode_for(transport, mode):
    if transport in ("shm", "file"):
        return "spin" if mode == "spin" else ("memcpy" if mode == "tput" else "futex")
    return mode if mode in ("1MiB-pipe",) else ""


PEERS = ("zmq", "boost-mq", "asio-local")


def print_peers(rtt, tput):
    """Each peer library's row beside each channel row of the same kind, as the program's table."""
    links = []
    for (t, impl, mode, place, size) in list(rtt) + list(tput):
        if impl == "ipcoro-channel" and mode == "" and t != "inproc" and t not in links:
            links.append(t)
    peer_rtt = [(k, v) for k, v in rtt.items() if k[0] in PEERS]
    peer_tput = [(k, v) for k, v in tput.items() if k[0] in PEERS]
    if not peer_rtt and not peer_tput:
        return
    print("\n### Peer libraries beside ipcoro's channels\n")
    print("Each cell is the channel's advantage over the peer: the peer's p50 over the channel's, or the "
          "channel's messages/s over the peer's; above 1× the channel wins.\n")
    print("| row | peer | peer figure | " + " | ".join(f"{t} channel" for t in links) + " |")
    print("|---|---|--:|" + "--:|" * len(links))
    for (t, impl, mode, place, size), v in peer_rtt:
        cells = []
        for link in links:
            ch = rtt.get((link, "ipcoro-channel", "", place, size))
            cells.append(f"{v['p50'] / ch['p50']:.2f}×" if ch else "–")
        name = f"{t} {mode}".strip()
        print(f"| rtt p50 {place} | {name} | {v['p50']:.2f} µs | " + " | ".join(cells) + " |")
    for (t, impl, mode, place, size), v in peer_tput:
        cells = []
        for link in links:
            ch = tput.get((link, "ipcoro-channel", "", place, size))
            cells.append(f"{ch['msgs'] / v['msgs']:.2f}×" if ch else "–")
        name = f"{t} {mode}".strip()
        print(f"| throughput {size_name(size)} | {name} | {si(v['msgs'], ' msg/s')} | "
              + " | ".join(cells) + " |")


def main(path):
    rows = json.load(open(path))
    rtt = OrderedDict()
    tput = OrderedDict()
    scalars = []
    for r in rows:
        base, mode, placement = split_metric(r["metric"])
        key = (r["transport"], r["impl"], mode, placement, r["size"])
        if base.startswith("rtt_"):
            rtt.setdefault(key, {})[base[4:]] = r["value"]
        elif base.startswith("throughput_"):
            tput.setdefault(key, {})[base[11:]] = r["value"]
        else:
            scalars.append(r)

    print("### 64-byte round trip\n")
    print("| link | impl | mode | placement | p50 µs | p99 µs | p99.9 µs | mean µs | p50 / raw "
          "| CPU µs per rtt | allocs per msg |")
    print("|---|---|---|---|--:|--:|--:|--:|--:|--:|--:|")
    for (t, impl, mode, place, size), v in rtt.items():
        raw = rtt.get((t, "raw", raw_mode_for(t, mode), place, size))
        ratio = f"{v['p50'] / raw['p50']:.3f}×" if raw and impl != "raw" else ("1.000×" if impl == "raw" else "–")
        print(f"| {t} | {impl} | {mode} | {place} | {v['p50']:.2f} | {v['p99']:.2f} | {v['p999']:.2f} | "
              f"{v['mean']:.2f} | {ratio} | {v['cpu']:.2f} | {v['allocs_per_msg']:.3f} |")

    print("\n### Throughput, one way\n")
    print("| link | impl | mode | size | msgs/s | bytes/s | vs raw | CPU µs per msg | allocs per msg |")
    print("|---|---|---|--:|--:|--:|--:|--:|--:|")
    for (t, impl, mode, place, size), v in tput.items():
        if t in ("shm", "file"):
            raw = tput.get((t, "raw", "memcpy", "one-thread", size))
        else:
            raw = tput.get((t, "raw", mode if mode == "1MiB-pipe" else "", place, size))
            if mode == "vmsplice":
                raw = tput.get((t, "raw", "1MiB-pipe", place, size))
        ratio = "1.000×" if impl == "raw" and mode in ("", "memcpy", "1MiB-pipe") else (
            f"{v['bytes'] / raw['bytes']:.3f}×" if raw else "–")
        print(f"| {t} | {impl} | {mode} | {size_name(size)} | {si(v['msgs'])} | {si(v['bytes'], 'B')} | "
              f"{ratio} | {v['cpu']:.3f} | {v['allocs_per_msg']:.3f} |")

    print_peers(rtt, tput)

    print("\n### Task switch and other figures\n")
    print("| figure | impl | value |")
    print("|---|---|--:|")
    for r in scalars:
        print(f"| {r['metric']} | {r['impl']} | {r['value']:.3f} {r['unit']} |")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: bench_tables.py OUT.json")
    main(sys.argv[1])
