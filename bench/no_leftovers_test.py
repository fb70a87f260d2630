#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""ipcoro-bench stopped by SIGTERM in the middle of a row leaves nothing in /dev/shm.

Usage: no_leftovers_test.py IPCORO_BENCH TRANSPORT:KIND...
For each TRANSPORT:KIND pair (e.g. shm:shm, boost-mq:boostmq), starts a run of that
transport alone, waits until a name /dev/shm/ipcoro-bench-PID-KIND-* exists (the row is
under way), sends SIGTERM, and checks that the run ended on the signal and that no name
of it is left.
"""
import glob
import os
import signal
import subprocess
import sys
import time


def check(bench, transport, kind):
    # Enough round trips that the first row is still running when the signal comes.
    run = subprocess.Popen([bench, "--quick", "--pin", "--transport", transport, "--iterations", "2000000"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    names = f"/dev/shm/ipcoro-bench-{run.pid}-*"
    row_names = f"/dev/shm/ipcoro-bench-{run.pid}-{kind}-*"
    try:
        deadline = time.monotonic() + 60
        while not glob.glob(row_names):  # a condition polled, not a sleep that synchronises
            if run.poll() is not None:
                return f"{transport}: the run ended (status {run.returncode}) before creating {row_names}"
            if time.monotonic() > deadline:
                return f"{transport}: no {row_names} within 60 s"
            time.sleep(0.005)
        run.send_signal(signal.SIGTERM)
        status = run.wait(timeout=60)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    left = glob.glob(names)
    for name in left:
        os.unlink(name)  # this test's own leftovers, named by the run's pid
    if status != -signal.SIGTERM:
        return f"{transport}: expected the run to end on SIGTERM, got status {status}"
    if left:
        return f"{transport}: left behind {left}"
    return None


def main(argv):
    if len(argv) < 3:
        sys.exit(__doc__)
    failures = [f for f in (check(argv[1], *pair.split(":")) for pair in argv[2:]) if f]
    for f in failures:
        print("FAIL:", f)
    if not failures:
        print("no names left behind:", " ".join(argv[2:]))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
