// SPDX-License-Identifier: MIT
// The shared Catch2 runner: compiled once, linked into every test executable.
#define CATCH_CONFIG_MAIN
#include <catch2/catch.hpp>
