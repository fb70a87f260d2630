// SPDX-License-Identifier: MIT
// channel: opening ends and making links, as lookups in the table of schemes.
#include "ipcoro/channel.hpp"

#include "ipcoro/error.hpp"
#include "ipcoro/transport.hpp"

#include <fmt/core.h>

#include <stdexcept>
#include <string>
#include <vector>

namespace ipcoro {

namespace {

const channel_scheme& scheme_of(const channel_address& a) {
  const channel_scheme* s = find_channel_scheme(a.scheme);
  if (s == nullptr) {
    // Only an address not made by parse() gets here.
    throw bad_channel_address(
        fmt::format("channel address \"{}\": unknown transport \"{}\"", a.text, a.scheme));
  }
  return *s;
}

[[noreturn]] void cannot(const channel_address& a, const char* what) {
  throw bad_channel_address(
      fmt::format("channel address \"{}\": a {}: channel cannot {}", a.text, a.scheme, what));
}

}  // namespace

namespace detail {

task<std::unique_ptr<receive_port>> open_receive_port(channel_address a) {
  const channel_scheme& s = scheme_of(a);
  if (s.open_receiver == nullptr) cannot(a, "be opened by name");
  return s.open_receiver(std::move(a));
}

task<std::unique_ptr<send_port>> open_send_port(channel_address a) {
  const channel_scheme& s = scheme_of(a);
  if (s.open_sender == nullptr) cannot(a, "be opened by name");
  return s.open_sender(std::move(a));
}

}  // namespace detail

// ---- links ----

struct channel_link::state {
  channel_address address;
  std::unique_ptr<detail::link_ends> ends;
  bool sender_taken = false;
  bool receiver_taken = false;
};

channel_link::channel_link() noexcept = default;
channel_link::channel_link(channel_link&&) noexcept = default;
channel_link& channel_link::operator=(channel_link&&) noexcept = default;
channel_link::~channel_link() = default;

void channel_link::reset() noexcept { state_.reset(); }

const channel_address& channel_link::address() const {
  if (!state_) throw std::logic_error("channel_link: empty link");
  return state_->address;
}

channel_link channel_link::create(std::string_view address) {
  auto s = std::make_unique<state>();
  s->address = channel_address::parse(address);
  const channel_scheme& scheme = scheme_of(s->address);
  if (scheme.make_link == nullptr) cannot(s->address, "make a link");
  try {
    s->ends = scheme.make_link(s->address);
  } catch (const std::system_error& e) {
    detail::rethrow_for_address(s->address.text, e);
  }
  channel_link link;
  link.state_ = std::move(s);
  return link;
}

namespace detail {

std::unique_ptr<send_port> link_send_port(void* link_state) {
  auto* s = static_cast<channel_link::state*>(link_state);
  if (s == nullptr) throw std::logic_error("channel_link::sender: empty link");
  if (s->sender_taken) throw std::logic_error("channel_link::sender: the sending end was taken already");
  s->sender_taken = true;
  return s->ends->take_sender();
}

std::unique_ptr<receive_port> link_receive_port(void* link_state) {
  auto* s = static_cast<channel_link::state*>(link_state);
  if (s == nullptr) throw std::logic_error("channel_link::receiver: empty link");
  if (s->receiver_taken)
    throw std::logic_error("channel_link::receiver: the receiving end was taken already");
  s->receiver_taken = true;
  return s->ends->take_receiver();
}

}  // namespace detail

// ---- what exists ----

std::vector<std::string> list_channels() {
  std::vector<std::string> out;
  for (const channel_scheme* s : channel_schemes()) {
    if (s->list == nullptr) continue;
    std::vector<std::string> found = s->list();
    out.insert(out.end(), found.begin(), found.end());
  }
  return out;
}

std::string inspect_channel(std::string_view address) {
  const channel_address a = channel_address::parse(address);
  const channel_scheme& s = scheme_of(a);
  if (s.inspect == nullptr) return fmt::format("{}: {}", a.text, s.about);
  try {
    return s.inspect(a);
  } catch (const std::system_error& e) {
    detail::rethrow_for_address(a.text, e);
  }
}

}  // namespace ipcoro
