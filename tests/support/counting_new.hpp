// SPDX-License-Identifier: MIT
// Counts of global operator new / delete calls in this process (tests/support/counting_new.cpp
// replaces every form). Calling either function links the replacements into the program.
#pragma once

#include <cstdint>

namespace ipcoro::test {
std::uint64_t allocations() noexcept;
std::uint64_t deallocations() noexcept;
/// The size of the largest single allocation since the last call, which starts anew.
std::uint64_t take_largest_allocation() noexcept;
}  // namespace ipcoro::test
