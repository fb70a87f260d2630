// SPDX-License-Identifier: MIT
// parse_size: the one parser of byte counts with K/M/G suffixes.
#include "ipcoro/size.hpp"

#include <array>
#include <charconv>
#include <cstddef>
#include <limits>
#include <system_error>

namespace ipcoro {

namespace {

bool equal_ignoring_case(std::string_view a, std::string_view b) noexcept {
  if (a.size() != b.size()) return false;
  for (std::size_t i = 0; i < a.size(); ++i) {
    const auto lower = [](char c) { return c >= 'A' && c <= 'Z' ? static_cast<char>(c - 'A' + 'a') : c; };
    if (lower(a[i]) != lower(b[i])) return false;
  }
  return true;
}

struct suffix {
  std::string_view short_form;
  std::string_view long_form;
  unsigned shift;
};

constexpr std::array<suffix, 3> suffixes{{{"k", "kib", 10}, {"m", "mib", 20}, {"g", "gib", 30}}};

}  // namespace

std::optional<std::uint64_t> parse_size(std::string_view text) noexcept {
  std::uint64_t n = 0;
  const char* const end = text.data() + text.size();
  const auto [p, ec] = std::from_chars(text.data(), end, n);
  if (ec != std::errc{}) return std::nullopt;  // no digits, or too many
  const std::string_view rest(p, static_cast<std::size_t>(end - p));
  if (rest.empty()) return n;
  for (const suffix& s : suffixes) {
    if (!equal_ignoring_case(rest, s.short_form) && !equal_ignoring_case(rest, s.long_form)) continue;
    if (n > (std::numeric_limits<std::uint64_t>::max() >> s.shift)) return std::nullopt;
    return n << s.shift;
  }
  return std::nullopt;
}

}  // namespace ipcoro
