// SPDX-License-Identifier: MIT
// fnv1a: the one 64-bit hash of ipcoro (type fingerprints, shared-memory header checks, names).
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>

namespace ipcoro {

/// FNV-1a's 64-bit offset basis: the hash of no bytes, and the seed of a new running hash.
inline constexpr std::uint64_t fnv1a_basis = 14695981039346656037ull;

/// The 64-bit FNV-1a hash of `text`, continuing from `h` (pass a previous result to hash
/// data given in pieces). Its values are stored in shared memory and in names, so they
/// never change.
constexpr std::uint64_t fnv1a(std::string_view text, std::uint64_t h = fnv1a_basis) noexcept {
  for (char c : text) h = (h ^ static_cast<unsigned char>(c)) * 1099511628211ull;
  return h;
}

/// The 64-bit FNV-1a hash of `bytes`, continuing from `h`; equal to fnv1a() of the same text.
constexpr std::uint64_t fnv1a(std::span<const std::byte> bytes, std::uint64_t h = fnv1a_basis) noexcept {
  for (std::byte b : bytes) h = (h ^ std::to_integer<std::uint64_t>(b)) * 1099511628211ull;
  return h;
}

// The published FNV-1a test vectors: a change here would break every existing segment.
static_assert(fnv1a("") == 0xcbf29ce484222325ull);
static_assert(fnv1a("a") == 0xaf63dc4c8601ec8cull);
static_assert(fnv1a("foobar") == 0x85944171f73967e8ull);
static_assert(fnv1a("bar", fnv1a("foo")) == fnv1a("foobar"));

}  // namespace ipcoro
