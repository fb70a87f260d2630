// SPDX-License-Identifier: MIT
// The checks of feature_xxh3 rings: XXH3-64 over a record's position, length, type and payload.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>

namespace ipcoro::detail {

/// Whether this build has libxxhash, so that it can write and read feature_xxh3 rings.
bool record_checks_available() noexcept;

/// The check of the record at ring position `position` with header fields `length` and
/// `type` and payload `payload` (empty for a padding record, whose length only says how far
/// it reaches): it covers the position too, so a record read at another position (a stale
/// lap, a moved position) fails it.
std::uint64_t record_check(std::uint64_t position, std::uint32_t length, std::uint32_t type,
                           std::span<const std::byte> payload) noexcept;

/// The check of an end of stream at `position`, which the closing sender stores in
/// ring_header::end_check before it sets the close flag.
std::uint64_t end_mark(std::uint64_t position) noexcept;

}  // namespace ipcoro::detail
