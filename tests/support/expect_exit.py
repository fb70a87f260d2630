#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Runs a command and checks its exit status and that its stderr says something.

Usage: expect_exit.py STATUS EXPECTED COMMAND [ARGS...]
Exits 0 when COMMAND exits with STATUS (not by a signal) and its stderr contains EXPECTED;
77 (skip) when COMMAND exits 77; 1 otherwise.
"""
import subprocess
import sys

status, expected, *command = sys.argv[1:]
run = subprocess.run(command, capture_output=True, text=True, timeout=60)
if run.returncode == 77:
    print(f"skipped: {run.stderr.strip()}")
    sys.exit(77)
if run.returncode != int(status) or expected not in run.stderr:
    print(f"{command[0]} exited {run.returncode} (wanted {status}); stderr:\n{run.stderr}")
    sys.exit(1)
print(f"exited {status}, saying: {run.stderr.strip()}")
