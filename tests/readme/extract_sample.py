#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Copies the C++ code block between the <!-- tour:begin --> and <!-- tour:end --> markers
of README.md into a source file, so that the README's sample is compiled and run as a test."""
import re
import sys

readme, out = sys.argv[1], sys.argv[2]
text = open(readme, encoding="utf-8").read()
m = re.search(r"<!-- tour:begin -->\s*```cpp\n(.*?)```\s*<!-- tour:end -->", text, re.S)
if not m:
    sys.exit(f"{readme}: no ```cpp block between <!-- tour:begin --> and <!-- tour:end -->")
with open(out, "w", encoding="utf-8") as f:
    f.write("// Generated from README.md by tests/readme/extract_sample.py: edit the README.\n")
    f.write(m.group(1))
