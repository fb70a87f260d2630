#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Compiles one file that must fail, and checks that the compiler says `expected`.

Usage: expect_compile_error.py EXPECTED SOURCE COMPILER [ARGS...]
Exits 0 when the compile fails and its output contains EXPECTED; 1 otherwise.
"""
import subprocess
import sys

expected, source, *compiler = sys.argv[1:]
run = subprocess.run([*compiler, "-fsyntax-only", source], capture_output=True, text=True)
output = run.stdout + run.stderr
if run.returncode == 0:
    print(f"{source} compiled, but it should have failed with: {expected}")
    sys.exit(1)
if expected not in output:
    print(f"{source} failed to compile without saying: {expected}\n--- compiler output ---\n{output}")
    sys.exit(1)
print(f"{source}: refused with \"{expected}\" as it should be")
