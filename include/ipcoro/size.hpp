// SPDX-License-Identifier: MIT
// parse_size: byte counts as people write them ("4096", "64k", "1MiB"), for addresses and flags.
#pragma once

#include "ipcoro/export.hpp"

#include <cstdint>
#include <optional>
#include <string_view>

namespace ipcoro {

/// What parse_size() accepts, for error messages that tell the user what to write.
inline constexpr std::string_view size_forms = "digits, optionally followed by K, KiB, M, MiB, G or GiB";

/// Parses a byte count: decimal digits, optionally followed by a binary suffix, K or KiB
/// (1024), M or MiB (1024²), G or GiB (1024³), in any case ("64k", "4M", "1gib"). Returns
/// nullopt for anything else: empty text, a sign, spaces, another suffix, or a value above
/// 2⁶⁴ − 1. Zero is a size; callers that need a positive one check for it.
IPCORO_API std::optional<std::uint64_t> parse_size(std::string_view text) noexcept;

}  // namespace ipcoro
