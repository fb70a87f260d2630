// SPDX-License-Identifier: MIT
// The checks of feature_xxh3 rings, through libxxhash when the build has it.
#include "ring/checksum.hpp"

#if IPCORO_HAVE_XXHASH
#include <xxhash.h>
#endif

namespace ipcoro::detail {
namespace {
// What a record's check covers besides its payload; the hash of it seeds the payload's.
struct record_fields {
  std::uint64_t position;
  std::uint32_t length;
  std::uint32_t type;
};
constexpr std::uint32_t end_type = 0x45;  // not a record type: an end of stream has no record
}  // namespace

#if IPCORO_HAVE_XXHASH

bool record_checks_available() noexcept { return true; }

std::uint64_t record_check(std::uint64_t position, std::uint32_t length, std::uint32_t type,
                           std::span<const std::byte> payload) noexcept {
  const record_fields f{position, length, type};
  return XXH3_64bits_withSeed(payload.data(), payload.size(), XXH3_64bits(&f, sizeof f));
}

#else

bool record_checks_available() noexcept { return false; }

std::uint64_t record_check(std::uint64_t, std::uint32_t, std::uint32_t, std::span<const std::byte>) noexcept {
  return 0;  // never called: a ring with checks is refused on attach and on format
}

#endif

std::uint64_t end_mark(std::uint64_t position) noexcept { return record_check(position, 0, end_type, {}); }

}  // namespace ipcoro::detail
