// SPDX-License-Identifier: MIT
// channel_port: the channel layer's core: greetings, leaving while an operation waits, errors.
#include "ipcoro/channel.hpp"

#include "ipcoro/error.hpp"
#include "ipcoro/transport.hpp"

#include "channel_wire.hpp"

#include <fmt/core.h>

#include <cstring>
#include <string>
#include <system_error>
#include <typeinfo>

namespace ipcoro::detail {

void throw_channel_closed(const char* what) { throw channel_closed(what); }

void rethrow_for_address(std::string_view address, const std::system_error& e) {
  std::string what = e.what();
  // Only plain system errors: cancellation, timeouts and the library's own kinds keep
  // their type (and say what they say).
  if (typeid(e) != typeid(std::system_error) || what.starts_with("channel ") ||
      what.find(address) != std::string::npos) {
    throw;
  }
  // system_error appends ": <errno text>"; the new one appends it again.
  if (const std::string tail = ": " + e.code().message(); what.ends_with(tail))
    what.resize(what.size() - tail.size());
  std::string hint;
  if (e.code() == std::errc::invalid_argument) {
    const channel_scheme* s = find_channel_scheme(address.substr(0, address.find(':')));
    if (s != nullptr && !s->option_notes.empty())
      hint = fmt::format(" (in the address, {})", s->option_notes);
  }
  throw std::system_error(e.code(), fmt::format("channel {}: {}{}", address, what, hint));
}
void throw_channel_error(int errno_value, const char* what) { throw channel_error(errno_value, what); }

void throw_decode_size(std::string_view type, std::size_t expected, std::size_t got) {
  throw decode_error(fmt::format("decoding {}: a message of {} bytes, expected {}", type, got, expected));
}

void copy_bytes(void* to, const void* from, std::size_t size) noexcept { std::memcpy(to, from, size); }

task<void> send_port::drain(pooled_frame) { co_return; }

std::span<const std::byte> send_port::greeting() {
  if (greeting_.empty()) {
    const std::string& name = identity().name;
    const std::size_t name_size = std::min<std::size_t>(name.size(), 1024);
    greeting_head h{
        greeting_magic,        wire_protocol, static_cast<std::uint16_t>(name_size), identity().version, 0,
        identity().fingerprint};
    greeting_.resize(sizeof h + name_size);
    std::memcpy(greeting_.data(), &h, sizeof h);
    std::memcpy(greeting_.data() + sizeof h, name.data(), name_size);
  }
  return std::as_bytes(std::span{greeting_.data(), greeting_.size()});
}

void receive_port::check_greeting(std::span<const std::byte> payload) const {
  if (payload.size() < sizeof(greeting_head)) {
    throw channel_error(
        EPROTO, fmt::format("channel {}: the peer's greeting is {} bytes, too short: it is not an ipcoro "
                            "channel sender",
                            address(), payload.size()));
  }
  const auto h = read_head<greeting_head>(payload.data());
  if (h.magic != greeting_magic) {
    throw channel_error(
        EPROTO,
        fmt::format("channel {}: the peer is not an ipcoro channel sender (bad greeting)", address()));
  }
  if (h.protocol != wire_protocol) {
    throw channel_error(
        EPROTO, fmt::format("channel {}: the peer speaks channel protocol {}, this program {}", address(),
                            h.protocol, wire_protocol));
  }
  if (h.fingerprint != identity().fingerprint) {
    const std::size_t n = std::min<std::size_t>(h.name_size, payload.size() - sizeof h);
    const std::string_view name(reinterpret_cast<const char*>(payload.data() + sizeof h), n);
    throw channel_type_mismatch(
        fmt::format("channel {}: the sender sends '{}' (codec version {}), but this receiver "
                    "expects '{}' (codec version {})",
                    address(), name, h.version, identity().name, identity().version));
  }
}

// ---- leaving while an operation waits ----

void port_base::leave(port_exit how) noexcept {
  if (leaving_) return;
  leaving_ = true;
  exit_ = how;
  if (in_flight_ == 0) {
    finish_once();
  } else {
    // Interrupts the operation waiting in the transport; its in_flight finishes the end
    // on the way out, once nothing uses the transport any more.
    stop_.request_stop();
  }
}

void port_base::finish_once() noexcept {
  if (finished_) return;
  finished_ = true;
  finish(exit_);
}

void unpin(port_base* port) noexcept {
  if (--port->pins_ == 0 && port->orphaned_) delete port;
}

void port_deleter::operator()(port_base* port) const noexcept {
  if (port->pins_ > 0) {
    port->orphaned_ = true;  // the loan or view pinning it deletes it (unpin)
  } else {
    delete port;
  }
}

bool port_wait::start(std::coroutine_handle<> awaiter) {
  if (port_.leaving_) return false;
  started_ = true;
  if (caller_ != nullptr && caller_->stop_requested()) {
    // Cancelled already: the task sees it at once, as under the caller's own token.
    promise_.set_stop_token(*caller_);
  } else {
    promise_.set_stop_token(port_.stop_.get_token());
  }
  if (!promise_.start_for(awaiter, task_)) return false;
  // Only a task that waits can be cancelled by its caller: forwarding (a registration on
  // the caller's token) is left out of the path where the transport takes it at once.
  if (caller_ != nullptr && caller_->stop_possible()) forward_.emplace(*caller_, forward_stop{&port_});
  return true;
}

void port_wait::end() {
  forward_.reset();
  // The caller's cancellation used the stop source up; the next operation needs a fresh
  // one (the only allocation here, and only after a cancellation).
  if (!port_.leaving_ && port_.stop_.stop_requested()) port_.stop_ = std::stop_source{};
}

bool port_wait::left() const noexcept {
  return port_.leaving_ && (caller_ == nullptr || !caller_->stop_requested());
}

namespace {
const char* left_word(port_exit how) noexcept {
  switch (how) {
    case port_exit::close:
      return "closed";
    case port_exit::detach:
      return "detached";
    case port_exit::abort:
      return "aborted";
  }
  return "closed";
}
}  // namespace

void throw_sender_left(const port_base& port, bool waited) {
  throw channel_closed(fmt::format("channel {}: this sender was {} {} the send waited", port.address(),
                                   left_word(port.left_how()), waited ? "while" : "before"));
}

void send_port::send_operation::await_resume() {
  end();
  if (started()) {
    try {
      commit_.handle().promise().take_result();
      return;
    } catch (const operation_cancelled&) {
      if (!left()) throw;
    }
  }
  throw_sender_left(port(), started());
}

void throw_loan_open(const send_port& port) {
  throw channel_error(EBUSY,
                      fmt::format("channel {}: a loan is open on this sender; commit or drop it before "
                                  "the next send or loan",
                                  port.address()));
}

void check_object_view(std::span<const std::byte> bytes, std::size_t size, std::size_t align,
                       std::string_view type) {
  if (bytes.size() != size) throw_decode_size(type, size, bytes.size());
  if (reinterpret_cast<std::uintptr_t>(bytes.data()) % align != 0) {
    throw channel_error(EINVAL,
                        fmt::format("channel receive_object_view: the message of {} sits at an address "
                                    "not aligned to {}",
                                    type, align));
  }
}

std::span<std::byte> send_port::lend_operation::await_resume() {
  end();
  if (started()) {
    try {
      return lend_.handle().promise().take_result();
    } catch (const operation_cancelled&) {
      if (!left()) throw;
    }
  }
  throw_sender_left(port(), started());
}

void send_port::throw_cannot_lend() const {
  throw channel_error(EOPNOTSUPP,
                      fmt::format("channel {}: zero-copy loans need an SPSC ring (a shm: or file: address "
                                  "without ring=mpmc); this transport copies every message: use send()",
                                  address()));
}

bool send_port::try_lend(std::size_t, std::span<std::byte>&) { throw_cannot_lend(); }

task<std::span<std::byte>> send_port::lend_task(pooled_frame, std::size_t) {
  throw_cannot_lend();
  co_return std::span<std::byte>{};
}

void send_port::commit_loan(std::size_t) { throw_cannot_lend(); }

bool receive_port::next_operation::await_resume() {
  end();
  if (!started()) return false;
  try {
    return fill_.handle().promise().take_result();
  } catch (const operation_cancelled&) {
    if (!left()) throw;
    return false;
  }
}

// ---- errors shared by the transports' adapters ----

void rethrow_for(const channel_address& a, const std::system_error& e) {
  std::string what = e.what();
  const std::string suffix = ": " + e.code().message();
  if (what.size() > suffix.size() && what.compare(what.size() - suffix.size(), suffix.size(), suffix) == 0) {
    what.resize(what.size() - suffix.size());
  }
  throw std::system_error(e.code(), fmt::format("channel {}: {}", a.text, what));
}

bool has_errno(const std::system_error& e, int err) noexcept {
  return e.code() == std::error_code(err, std::system_category());
}

void no_channel(const channel_address& a, const std::system_error& e) {
  throw channel_error(
      e.code(), fmt::format("no channel at \"{}\": nobody has opened its receiver ({})", a.text, e.what()));
}

void throw_peer_died(const std::string& address, const peer_died& e) {
  std::string_view what = e.what();
  if (what.starts_with("channel ")) throw e;
  const std::string suffix = ": " + e.code().message();  // system_error appends it again
  if (what.ends_with(suffix)) what.remove_suffix(suffix.size());
  throw peer_died(e.pid(), fmt::format("channel {}: {}", address, what));
}

}  // namespace ipcoro::detail

namespace ipcoro {

void channel_loan::commit(std::size_t size) {
  if (!port_)
    detail::throw_channel_closed(
        "channel loan commit: this loan is empty (committed, dropped or moved from)");
  detail::send_port& port = *port_;
  if (size > space_.size()) {
    throw std::system_error(EINVAL, std::system_category(),
                            fmt::format("channel {}: loan commit of {} bytes, but the loan holds only {}",
                                        port.address(), size, space_.size()));
  }
  if (port.leaving()) {
    // Said before drop(), which may free the port.
    channel_closed left(
        fmt::format("channel {}: this sender was {} before the loan was committed; nothing "
                    "was sent",
                    port.address(), detail::left_word(port.left_how())));
    drop();
    throw left;
  }
  port.commit_loan(size);
  port.loan_open = false;
  ++port.messages;
  port.bytes += size;
  port_ = nullptr;
  detail::unpin(&port);
}

channel_loan& channel_loan::operator=(channel_loan&& other) noexcept {
  if (this != &other) {
    drop();
    port_ = std::exchange(other.port_, nullptr);
    space_ = other.space_;
  }
  return *this;
}

void channel_loan::drop() noexcept {
  if (!port_) return;
  detail::send_port* port = std::exchange(port_, nullptr);
  port->drop_loan();
  port->loan_open = false;
  detail::unpin(port);
}

channel_view& channel_view::operator=(channel_view&& other) noexcept {
  if (this != &other) {
    release();
    port_ = std::exchange(other.port_, nullptr);
    bytes_ = other.bytes_;
    serial_ = other.serial_;
  }
  return *this;
}

void channel_view::release() noexcept {
  if (!port_) return;
  detail::receive_port* port = std::exchange(port_, nullptr);
  if (port->viewing && port->view_serial == serial_) port->end_view();
  detail::unpin(port);
}

}  // namespace ipcoro
