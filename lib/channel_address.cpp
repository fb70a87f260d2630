// SPDX-License-Identifier: MIT
// channel_address: parsing an address against the table of schemes.
#include "ipcoro/channel_address.hpp"

#include "ipcoro/size.hpp"
#include "ipcoro/transport.hpp"

#include "channel_wire.hpp"
#include "ring/checksum.hpp"

#include <fmt/core.h>

#include <charconv>
#include <climits>
#include <stdexcept>
#include <string>

namespace ipcoro {
namespace {

[[noreturn]] void bad_address(std::string_view address, const std::string& why) {
  throw bad_channel_address(fmt::format("channel address \"{}\": {}", address, why));
}

/// "pipe:, fifo:/path, ... or fd:N", from the table.
std::string address_forms() {
  std::string out;
  const auto schemes = channel_schemes();
  for (std::size_t i = 0; i < schemes.size(); ++i) {
    if (i > 0) out += i + 1 == schemes.size() ? " or " : ", ";
    out += schemes[i]->example;
  }
  return out;
}

/// What the options of `s` are, for a message about one it does not take.
std::string option_list(const channel_scheme& s) {
  static constexpr std::pair<unsigned, const char*> names[] = {
      {address_option::capacity, "capacity"}, {address_option::message_size, "message_size"},
      {address_option::mode, "mode"},         {address_option::ring, "ring"},
      {address_option::durable, "durable"},   {address_option::checksum, "checksum"},
  };
  std::string out;
  for (const auto& [bit, name] : names) {
    if ((s.options & bit) == 0) continue;
    out += out.empty() ? "" : ", ";
    out += name;
  }
  return out.empty() ? "no options" : "the options " + out;
}

void check_name(std::string_view address, const channel_scheme& s, std::string_view rest) {
  switch (s.name_form) {
    case address_name::none:
      if (!rest.empty())
        bad_address(address, fmt::format("a {} has no name: write just \"{}:\"", s.name, s.name));
      return;
    case address_name::path:
      if (rest.empty() || rest.front() != '/') {
        bad_address(address, fmt::format("{}: needs an absolute path, as in {}", s.name, s.example));
      }
      if (rest.back() == '/') bad_address(address, "the path names a directory");
      return;
    case address_name::ipc_name:
      if (rest.size() < 2 || rest.front() != '/' || rest.find('/', 1) != std::string_view::npos) {
        bad_address(address,
                    fmt::format("a {} name is one '/' followed by a name without further slashes, as in {}",
                                s.name, s.example));
      }
      if (rest.size() > NAME_MAX)
        bad_address(address, fmt::format("the name is longer than NAME_MAX ({})", NAME_MAX));
      return;
    case address_name::number: {
      int n = -1;
      auto [p, ec] = std::from_chars(rest.data(), rest.data() + rest.size(), n);
      if (rest.empty() || ec != std::errc{} || p != rest.data() + rest.size() || n < 0) {
        bad_address(address, fmt::format("{}: takes a descriptor number, as in {}", s.name, s.example));
      }
      return;
    }
  }
}

std::size_t parse_size(std::string_view address, std::string_view key, std::string_view value) {
  const std::optional<std::uint64_t> n = ipcoro::parse_size(value);
  if (!n || *n == 0 || *n > SIZE_MAX) {
    bad_address(address, fmt::format("option {}={} is not a positive size ({})", key, value, size_forms));
  }
  return static_cast<std::size_t>(*n);
}

/// Applies one `key=value` to `a`; `seen` collects the options given, to refuse repeats.
void apply_option(channel_address& a, const channel_scheme& s, std::string_view item, unsigned& seen) {
  const std::string_view address = a.text;
  const std::size_t eq = item.find('=');
  if (eq == std::string_view::npos || eq == 0 || eq + 1 == item.size()) {
    bad_address(address, fmt::format("option \"{}\" is not key=value", item));
  }
  const std::string_view key = item.substr(0, eq);
  const std::string_view value = item.substr(eq + 1);
  unsigned bit = 0;
  if (key == "capacity") bit = address_option::capacity;
  if (key == "message_size") bit = address_option::message_size;
  if (key == "mode") bit = address_option::mode;
  if (key == "ring") bit = address_option::ring;
  if (key == "durable") bit = address_option::durable;
  if (key == "checksum") bit = address_option::checksum;
  if ((s.options & bit) == 0) {
    bad_address(address,
                fmt::format("option \"{}\" does not apply to {}: it takes {}", key, s.name, option_list(s)));
  }
  if ((seen & bit) != 0) bad_address(address, fmt::format("option {} is given twice", key));
  seen |= bit;
  if (bit == address_option::capacity) {
    a.capacity = parse_size(address, key, value);
  } else if (bit == address_option::message_size) {
    a.message_size = parse_size(address, key, value);
    if (*a.message_size < detail::min_message_size) {
      bad_address(address,
                  fmt::format("message_size={} is too small: a channel message needs at least {} bytes "
                              "(its 8-byte frame head, and the 24-byte greeting a sender starts with); "
                              "ask for message_size={} or more",
                              *a.message_size, detail::min_message_size, detail::min_message_size));
    }
  } else if (bit == address_option::mode) {
    unsigned mode = 0;
    auto [p, ec] = std::from_chars(value.data(), value.data() + value.size(), mode, 8);
    if (ec != std::errc{} || p != value.data() + value.size() || mode > 0777) {
      bad_address(address, fmt::format("mode={} is not octal permission bits such as 0600", value));
    }
    a.mode = mode;
  } else if (bit == address_option::ring) {
    if (value != "spsc" && value != "mpmc") bad_address(address, "ring= takes spsc or mpmc");
    a.mpmc = value == "mpmc";
  } else if (bit == address_option::checksum) {
    if (value != "none" && value != "xxh3") bad_address(address, "checksum= takes none or xxh3");
    a.checksum = value == "xxh3";
    if (a.checksum && !detail::record_checks_available()) {
      bad_address(address,
                  "checksum=xxh3 needs libxxhash, which this build of ipcoro was built without; install "
                  "libxxhash-dev and rebuild ipcoro");
    }
  } else {
    if (value != "1" && value != "0") bad_address(address, "durable= takes 1 or 0");
    a.durable = value == "1";
  }
}

}  // namespace

channel_address channel_address::parse(std::string_view address) {
  channel_address a;
  a.text = std::string(address);
  const std::size_t colon = address.find(':');
  if (colon == std::string_view::npos) {
    bad_address(address, fmt::format("no transport; expected one of {}", address_forms()));
  }
  const std::string_view scheme = address.substr(0, colon);
  const channel_scheme* s = find_channel_scheme(scheme);
  if (s == nullptr) {
    bad_address(address,
                fmt::format("unknown transport \"{}\"; expected one of {}", scheme, address_forms()));
  }
  std::string_view rest = address.substr(colon + 1);
  std::string_view options;
  if (const std::size_t q = rest.find('?'); q != std::string_view::npos) {
    options = rest.substr(q + 1);
    rest = rest.substr(0, q);
  }
  check_name(address, *s, rest);
  a.scheme = std::string(scheme);
  a.name = std::string(rest);
  unsigned seen = 0;
  while (!options.empty()) {
    const std::size_t amp = options.find('&');
    apply_option(a, *s, options.substr(0, amp), seen);
    options = amp == std::string_view::npos ? std::string_view{} : options.substr(amp + 1);
  }
  if (s->check != nullptr) s->check(a);
  return a;
}

int channel_address::fd() const {
  const channel_scheme* s = find_channel_scheme(scheme);
  if (s == nullptr || s->name_form != address_name::number) {
    throw std::logic_error("channel_address::fd: not an fd: address");
  }
  return std::stoi(name);
}

}  // namespace ipcoro
