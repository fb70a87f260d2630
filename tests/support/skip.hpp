// SPDX-License-Identifier: MIT
// Skipping a test case whose kernel feature or privilege is missing, saying why.
#pragma once

#include <catch2/catch.hpp>

#include <string>

namespace ipcoro::test {

/// Records that the running test case is skipped and why. The shared runner lists every
/// skip at the end, and exits 77 (Meson's "skipped") when each test case that ran was
/// skipped; a skip among passing test cases is listed, and the run passes.
void note_skip(const std::string& reason);

}  // namespace ipcoro::test

/// Ends the running test case as skipped, with `reason` (a string): use it where a kernel
/// feature or a privilege the test needs is absent, never to hide a failure.
#define IPCORO_SKIP(reason)                 \
  do {                                      \
    const std::string ipcoro_why_ = reason; \
    ::ipcoro::test::note_skip(ipcoro_why_); \
    return;                                 \
  } while (0)
