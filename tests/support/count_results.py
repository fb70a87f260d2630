#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Counts results in meson testlog.json files; prints 'passed failed skipped'."""
import json
import sys

PASSED = {"OK", "EXPECTEDFAIL"}
SKIPPED = {"SKIP"}  # everything else (FAIL, TIMEOUT, ERROR, UNEXPECTEDPASS, ...) is a failure


def main(paths):
    if not paths:
        sys.exit("usage: count_results.py testlog.json [testlog.json ...]")
    passed = failed = skipped = 0
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    result = json.loads(line).get("result")
                except (ValueError, AttributeError):
                    sys.exit(f"{path}:{lineno}: not a JSON object")
                if result in PASSED:
                    passed += 1
                elif result in SKIPPED:
                    skipped += 1
                else:
                    failed += 1
    print(passed, failed, skipped)


if __name__ == "__main__":
    main(sys.argv[1:])
