// SPDX-License-Identifier: MIT
// channel: addresses, the wire format, and the send / receive ports of every transport.
#include "ipcoro/channel.hpp"

#include "ipcoro/error.hpp"
#include "ipcoro/fd_io.hpp"
#include "ipcoro/fifo.hpp"
#include "ipcoro/io_context.hpp"
#include "ipcoro/mapped_file.hpp"
#include "ipcoro/mqueue.hpp"
#include "ipcoro/pipe.hpp"
#include "ipcoro/shm_ring.hpp"
#include "ipcoro/shm_segment.hpp"
#include "ipcoro/size.hpp"
#include "ipcoro/unique_fd.hpp"

#include "mq_peers.hpp"
#include "proc_value.hpp"

#include <fcntl.h>
#include <fmt/core.h>
#include <mqueue.h>
#include <poll.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <charconv>
#include <chrono>
#include <climits>
#include <concepts>
#include <cstring>
#include <ctime>
#include <system_error>
#include <typeinfo>

namespace ipcoro {

// ---- addresses ----

const char* to_string(channel_transport t) noexcept {
  switch (t) {
    case channel_transport::pipe:
      return "pipe";
    case channel_transport::fifo:
      return "fifo";
    case channel_transport::mq:
      return "mq";
    case channel_transport::shm:
      return "shm";
    case channel_transport::file:
      return "file";
    case channel_transport::fd:
      return "fd";
  }
  return "?";
}

namespace {

constexpr const char* address_forms = "pipe:, fifo:/path, mq:/name, shm:/name, file:/path or fd:N";

[[noreturn]] void bad_address(std::string_view address, const std::string& why) {
  throw bad_channel_address(fmt::format("channel address \"{}\": {}", address, why));
}

/// The smallest message_size a queue or MPMC ring channel can work with: a message's frame
/// head and a greeting (checked against the wire structs below).
constexpr std::size_t min_message_size = 32;

std::size_t parse_size(std::string_view address, std::string_view key, std::string_view value) {
  const std::optional<std::uint64_t> n = ipcoro::parse_size(value);
  if (!n || *n == 0 || *n > SIZE_MAX) {
    bad_address(address, fmt::format("option {}={} is not a positive size ({})", key, value, size_forms));
  }
  return static_cast<std::size_t>(*n);
}

/// Refuses a ring size above what a ring can hold, naming both figures: the ring would
/// otherwise be clamped silently to a size the user never wrote.
void check_ring_limits(std::string_view address, const channel_address& a) {
  if (a.transport != channel_transport::shm && a.transport != channel_transport::file) return;
  const std::size_t max_capacity = a.mpmc ? mpmc_ring_max_slots : spsc_ring_max_capacity;
  if (a.capacity && *a.capacity > max_capacity) {
    bad_address(address, fmt::format("capacity={} is more than the largest {} allows, {} {}", *a.capacity,
                                     a.mpmc ? "MPMC ring" : "SPSC ring", max_capacity,
                                     a.mpmc ? "slots" : "bytes (1 TiB)"));
  }
  if (a.message_size && *a.message_size > mpmc_ring_max_message) {
    bad_address(address,
                fmt::format("message_size={} is more than the largest MPMC ring message, {} bytes (1 GiB)",
                            *a.message_size, mpmc_ring_max_message));
  }
}

}  // namespace

channel_address channel_address::parse(std::string_view address) {
  channel_address a;
  a.text = std::string(address);
  const std::size_t colon = address.find(':');
  if (colon == std::string_view::npos) {
    bad_address(address, fmt::format("no transport; expected one of {}", address_forms));
  }
  const std::string_view scheme = address.substr(0, colon);
  std::string_view rest = address.substr(colon + 1);
  std::string_view options;
  if (const std::size_t q = rest.find('?'); q != std::string_view::npos) {
    options = rest.substr(q + 1);
    rest = rest.substr(0, q);
  }
  if (scheme == "pipe") {
    a.transport = channel_transport::pipe;
    if (!rest.empty()) bad_address(address, "a pipe has no name: write just \"pipe:\"");
  } else if (scheme == "fifo" || scheme == "file") {
    a.transport = scheme == "fifo" ? channel_transport::fifo : channel_transport::file;
    if (rest.empty() || rest.front() != '/') {
      bad_address(address, fmt::format("a {} needs an absolute path, as in {}:/tmp/name", scheme, scheme));
    }
    if (rest.back() == '/') bad_address(address, "the path names a directory");
  } else if (scheme == "mq" || scheme == "shm") {
    a.transport = scheme == "mq" ? channel_transport::mq : channel_transport::shm;
    if (rest.size() < 2 || rest.front() != '/' || rest.find('/', 1) != std::string_view::npos) {
      bad_address(
          address,
          fmt::format("a {} name is one '/' followed by a name without further slashes, as in {}:/jobs",
                      scheme == "mq" ? "message queue" : "shared-memory segment", scheme));
    }
    if (rest.size() > NAME_MAX)
      bad_address(address, fmt::format("the name is longer than NAME_MAX ({})", NAME_MAX));
  } else if (scheme == "fd") {
    a.transport = channel_transport::fd;
    int fd = -1;
    auto [p, ec] = std::from_chars(rest.data(), rest.data() + rest.size(), fd);
    if (rest.empty() || ec != std::errc{} || p != rest.data() + rest.size() || fd < 0) {
      bad_address(address, "fd: takes a descriptor number, as in fd:3");
    }
  } else {
    bad_address(address, fmt::format("unknown transport \"{}\"; expected one of {}", scheme, address_forms));
  }
  a.name = std::string(rest);

  bool seen_capacity = false, seen_size = false, seen_mode = false, seen_ring = false, seen_durable = false;
  while (!options.empty()) {
    const std::size_t amp = options.find('&');
    const std::string_view item = options.substr(0, amp);
    options = amp == std::string_view::npos ? std::string_view{} : options.substr(amp + 1);
    const std::size_t eq = item.find('=');
    if (eq == std::string_view::npos || eq == 0 || eq + 1 == item.size()) {
      bad_address(address, fmt::format("option \"{}\" is not key=value", item));
    }
    const std::string_view key = item.substr(0, eq);
    const std::string_view value = item.substr(eq + 1);
    const auto once = [&](bool& seen) {
      if (seen) bad_address(address, fmt::format("option {} is given twice", key));
      seen = true;
    };
    const bool named = a.transport != channel_transport::pipe && a.transport != channel_transport::fd;
    if (key == "capacity" && a.transport != channel_transport::fd) {
      once(seen_capacity);
      a.capacity = parse_size(address, key, value);
    } else if (key == "message_size" &&
               (a.transport == channel_transport::mq || a.transport == channel_transport::shm ||
                a.transport == channel_transport::file)) {
      once(seen_size);
      a.message_size = parse_size(address, key, value);
    } else if (key == "mode" && named) {
      once(seen_mode);
      unsigned mode = 0;
      auto [p, ec] = std::from_chars(value.data(), value.data() + value.size(), mode, 8);
      if (ec != std::errc{} || p != value.data() + value.size() || mode > 0777) {
        bad_address(address, fmt::format("mode={} is not octal permission bits such as 0600", value));
      }
      a.mode = mode;
    } else if (key == "ring" &&
               (a.transport == channel_transport::shm || a.transport == channel_transport::file)) {
      once(seen_ring);
      if (value != "spsc" && value != "mpmc") bad_address(address, "ring= takes spsc or mpmc");
      a.mpmc = value == "mpmc";
    } else if (key == "durable" && a.transport == channel_transport::file) {
      once(seen_durable);
      if (value != "1" && value != "0") bad_address(address, "durable= takes 1 or 0");
      a.durable = value == "1";
    } else {
      bad_address(address,
                  fmt::format("option \"{}\" does not apply to {}: transports take capacity (not fd:), "
                              "message_size (mq, shm, file), mode (named transports), ring (shm, file) "
                              "and durable (file)",
                              key, scheme));
    }
  }
  if (a.message_size && !a.mpmc && a.transport != channel_transport::mq) {
    bad_address(address,
                "message_size applies to an MPMC ring (ring=mpmc); an SPSC ring's largest message "
                "follows from its capacity");
  }
  if (a.message_size && *a.message_size < min_message_size) {
    bad_address(address,
                fmt::format("message_size={} is too small: a channel message needs at least {} bytes "
                            "(its 8-byte frame head, and the 24-byte greeting a sender starts with); "
                            "ask for message_size={} or more",
                            *a.message_size, min_message_size, min_message_size));
  }
  if (a.durable && a.mpmc) {
    bad_address(address,
                "durable=1 applies to an SPSC ring: its one receiver acknowledges what it has received");
  }
  check_ring_limits(address, a);
  return a;
}

int channel_address::fd() const {
  if (transport != channel_transport::fd) throw std::logic_error("channel_address::fd: not an fd: address");
  return std::stoi(name);
}

namespace detail {

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
    if (address.starts_with("mq:")) {
      hint = " (in the address, capacity= is the queue's max_messages and message_size= its message size)";
    } else if (address.starts_with("pipe:") || address.starts_with("fifo:")) {
      hint = " (in the address, capacity= is the pipe capacity)";
    }
  }
  throw std::system_error(e.code(), fmt::format("channel {}: {}{}", address, what, hint));
}
void throw_channel_error(const char* what) { throw channel_error(what); }

void throw_decode_size(std::string_view type, std::size_t expected, std::size_t got) {
  throw decode_error(fmt::format("decoding {}: a message of {} bytes, expected {}", type, got, expected));
}

// ---- the wire format ----

namespace {

constexpr std::uint32_t greeting_magic = 0x48435049;  // "IPCH"
constexpr std::uint16_t wire_protocol = 1;

struct greeting_head {
  std::uint32_t magic;
  std::uint16_t protocol;
  std::uint16_t name_size;
  std::uint32_t version;
  std::uint32_t reserved;
  std::uint64_t fingerprint;
};
static_assert(sizeof(greeting_head) == 24);

/// A frame on a byte stream: {payload length, kind} then the payload.
struct stream_head {
  std::uint32_t length;
  std::uint32_t kind;
};
/// A frame on a message transport (queue, ring): {kind, short fingerprint} then the payload.
struct message_head {
  std::uint32_t kind;
  std::uint32_t fingerprint;
};
static_assert(sizeof(stream_head) == 8 && sizeof(message_head) == 8);
static_assert(min_message_size == sizeof(message_head) + sizeof(greeting_head));
constexpr std::size_t head_size = 8;
constexpr std::size_t max_stream_payload = std::size_t{1} << 30;

std::uint32_t short_fingerprint(std::uint64_t f) noexcept {
  return static_cast<std::uint32_t>(f ^ (f >> 32));
}

/// Storage that grows without zero-filling and keeps its contents.
class byte_buffer {
 public:
  std::byte* data() noexcept { return data_.get(); }
  std::size_t size() const noexcept { return size_; }
  void grow(std::size_t need, std::size_t keep) {
    if (need <= size_) return;
    std::size_t n = std::max<std::size_t>(need, size_ * 2);
    auto fresh = std::make_unique_for_overwrite<std::byte[]>(n);
    if (keep > 0) std::memcpy(fresh.get(), data_.get(), keep);
    data_ = std::move(fresh);
    size_ = n;
  }

 private:
  std::unique_ptr<std::byte[]> data_;
  std::size_t size_ = 0;
};

template <class Head>
Head read_head(const std::byte* p) noexcept {
  Head h;
  std::memcpy(&h, p, sizeof h);
  return h;
}

}  // namespace

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
        fmt::format("channel {}: the peer's greeting is {} bytes, too short: it is not an ipcoro "
                    "channel sender",
                    address(), payload.size()));
  }
  const auto h = read_head<greeting_head>(payload.data());
  if (h.magic != greeting_magic) {
    throw channel_error(
        fmt::format("channel {}: the peer is not an ipcoro channel sender (bad greeting)", address()));
  }
  if (h.protocol != wire_protocol) {
    throw channel_error(fmt::format("channel {}: the peer speaks channel protocol {}, this program {}",
                                    address(), h.protocol, wire_protocol));
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

// ---- byte streams: pipes, FIFOs, inherited descriptors ----

namespace {

/// How long a close waits for room for its end marker before giving up.
constexpr std::chrono::seconds end_patience{30};

/// True once `fd` can take a write of at most PIPE_BUF bytes without blocking (or would
/// fail at once: no reader left), waiting at most `wait` milliseconds for that.
bool writable_within(int fd, int wait) noexcept {
  pollfd pfd{fd, POLLOUT, 0};
  int n = 0;
  while ((n = ::poll(&pfd, 1, wait)) < 0 && errno == EINTR) {
  }
  return n > 0;
}

/// Writes a small frame (at most PIPE_BUF bytes: all or nothing) that poll() said fits.
void write_small(int fd, const void* data, std::size_t size) noexcept {
  while (::write(fd, data, size) < 0 && errno == EINTR) {
  }
}

/// Writes a close's last frames (at most PIPE_BUF bytes: all or nothing) once the pipe has
/// room, waiting for it at most `end_patience`; without room by then, or without a reader,
/// they are not written and the receiver reports a sender that went away.
void post_patiently(int fd, std::span<const std::byte> frames) noexcept {
  const auto patience = std::chrono::duration_cast<std::chrono::milliseconds>(end_patience);
  if (writable_within(fd, static_cast<int>(patience.count()))) write_small(fd, frames.data(), frames.size());
}

/// Writes a close's last frames through the ring once the pipe has room: the reader is
/// slow, and a close must not block the loop's thread waiting for it. It ends when they
/// are written or when the reader is gone (EPIPE). If the io_context shuts down first
/// (the process is most likely ending), it waits there, bounded, so that a clean close
/// still reads as one.
task<void> post_when_room(pooled_frame, unique_fd fd, write_path path, std::vector<std::byte> frames) {
  try {
    co_await write_all_operation{fd.get(), frames, path};
  } catch (const operation_cancelled&) {
    post_patiently(fd.get(), frames);
  } catch (...) {  // nobody reads any more: nothing to tell
  }
}

/// Posts a close's last frames (at most PIPE_BUF bytes) from a close(), which cannot
/// await. When the pipe is full, the write is handed to this thread's loop; with no loop
/// running here, it waits for room, bounded.
void post_at_close(unique_fd fd, write_path path, std::vector<std::byte> frames) noexcept {
  if (writable_within(fd.get(), 0)) {
    write_small(fd.get(), frames.data(), frames.size());
    return;
  }
  if (io_context* ctx = io_context::current_or_null(); ctx != nullptr && !ctx->stopping()) {
    try {
      ctx->spawn(post_when_room(pooled_frame{}, std::move(fd), path, std::move(frames)));
      return;
    } catch (...) {  // no memory for the task: fall back to waiting here, bounded
    }
  }
  post_patiently(fd.get(), frames);
}

class stream_send_port final : public send_port {
 public:
  /// `greet_at_open`: greet as soon as the end has its identity rather than with the first
  /// message (a FIFO opened by name, whose receiver waits for a greeting before it can
  /// tell a sender's end of file from "nobody came yet").
  stream_send_port(std::string address, unique_fd fd, write_path path, bool greet_at_open = false)
      : send_port(std::move(address)), fd_(std::move(fd)), path_(path), greet_at_open_(greet_at_open) {
    ignore_sigpipe();  // a close() may write without a loop
  }

  std::span<std::byte> prepare(std::size_t size) override {
    if (size > max_stream_payload) {
      throw channel_error(
          fmt::format("channel {}: a message of {} bytes is larger than a stream frame allows ({})",
                      address(), size, max_stream_payload));
    }
    used_ = 0;
    if (!greeted_) put_greeting();
    buf_.grow(used_ + head_size + size, used_);
    put(frame_kind::data, size);
    std::span<std::byte> out{buf_.data() + used_, size};
    used_ += size;
    return out;
  }

  std::size_t max_payload() const noexcept override { return max_stream_payload; }

 protected:
  task<void> commit(pooled_frame) override {
    if (cut_) {
      throw channel_error(
          fmt::format("channel {}: an earlier send was cancelled half way through its message; "
                      "the stream cannot go on (close() now aborts it)",
                      address()));
    }
    write_all_operation write{fd_.get(), std::span<const std::byte>{buf_.data(), used_}, path_};
    try {
      co_await write;
    } catch (const operation_cancelled&) {
      // Part of a frame is in the pipe: whatever follows would be read as the rest of it.
      // Writes of up to PIPE_BUF bytes are atomic, so only large messages get here.
      if (write.written() > 0) cut_ = true;
      throw;
    } catch (const std::system_error& e) {
      if (e.code() == std::errc::broken_pipe) {
        throw channel_closed(
            fmt::format("channel {}: the receiver has gone: it closed the channel, or its "
                        "process ended",
                        address()));
      }
      throw;
    }
    greeted_ = true;
  }

  /// A byte stream's end of file cannot tell a closed sender from a dead one, so a sender
  /// that has spoken says goodbye with an end frame; a receiver that sees end of file
  /// without it knows the sender died mid-stream. A stream with a cut frame can only be
  /// aborted: the receiver then reports the cut instead of misreading what follows.
  void finish(port_exit how) noexcept override {
    if (how != port_exit::abort && fd_ && !cut_) {
      try {
        // A sender that never sent still greets first: end of file before any greeting
        // means a sender that died before it started.
        used_ = 0;
        if (!greeted_) put_greeting();
        buf_.grow(used_ + head_size, used_);
        put(frame_kind::end, 0);
        post_at_close(std::move(fd_), path_, std::vector<std::byte>(buf_.data(), buf_.data() + used_));
      } catch (...) {  // no memory: the receiver reports a sender that went away
      }
    }
    fd_.reset();
  }

  /// Greets at once when asked to and the pipe has room (it nearly always has), so that
  /// the receiver can tell this sender's death from its not having come yet.
  void opened() noexcept override {
    if (!greet_at_open_ || greeted_ || !fd_ || !writable_within(fd_.get(), 0)) return;
    try {
      used_ = 0;
      put_greeting();
      if (used_ > PIPE_BUF) return;  // not atomic: it goes with the first message
      const ssize_t n = ::write(fd_.get(), buf_.data(), used_);
      greeted_ = n == static_cast<ssize_t>(used_);
    } catch (...) {  // no memory: it goes with the first message
    }
  }

 private:
  void put(frame_kind kind, std::size_t length) noexcept {
    const stream_head h{static_cast<std::uint32_t>(length), static_cast<std::uint32_t>(kind)};
    std::memcpy(buf_.data() + used_, &h, sizeof h);
    used_ += sizeof h;
  }
  /// Puts the greeting frame at the start of the (empty) buffer.
  void put_greeting() {
    const std::span<const std::byte> g = greeting();
    buf_.grow(head_size + g.size(), 0);
    put(frame_kind::hello, g.size());
    std::memcpy(buf_.data() + used_, g.data(), g.size());
    used_ += g.size();
  }

  unique_fd fd_;
  write_path path_;
  byte_buffer buf_;
  std::size_t used_ = 0;
  bool greet_at_open_ = false;
  bool greeted_ = false;
  bool cut_ = false;
};

class stream_receive_port final : public receive_port {
 public:
  /// `placeholder`: a writer of our own that keeps end of file away until the first
  /// sender has greeted (a FIFO receiver opened before any sender).
  stream_receive_port(std::string address, unique_fd fd, std::shared_ptr<void> keep = {},
                      unique_fd placeholder = {})
      : receive_port(std::move(address)),
        keep_(std::move(keep)),
        fd_(std::move(fd)),
        placeholder_(std::move(placeholder)) {
    buf_.grow(64 * 1024, 0);
  }

  std::span<const std::byte> current() const noexcept override {
    return {buf_data() + begin_ + head_size, length_};
  }
  void consume() noexcept override {
    begin_ += head_size + length_;
    current_ = false;
    if (begin_ == end_) begin_ = end_ = 0;
  }

 protected:
  task<bool> fill(pooled_frame) override {
    if (current_) co_return true;
    if (ended_) co_return false;
    for (;;) {
      const std::size_t avail = end_ - begin_;
      std::size_t need = head_size;
      if (avail >= head_size) {
        const auto h = read_head<stream_head>(buf_.data() + begin_);
        if (h.length > max_stream_payload) {
          throw channel_error(
              fmt::format("channel {}: a frame announces {} bytes: the peer is not an ipcoro "
                          "channel sender, or the stream is corrupt",
                          address(), h.length));
        }
        need = head_size + h.length;
        if (avail >= need) {
          const std::span<const std::byte> payload{buf_.data() + begin_ + head_size, h.length};
          if (h.kind == static_cast<std::uint32_t>(frame_kind::hello)) {
            check_greeting(payload);
            ++greetings_;
            placeholder_.reset();
            begin_ += need;
            continue;
          }
          if (h.kind == static_cast<std::uint32_t>(frame_kind::end) && greetings_ > goodbyes_) {
            ++goodbyes_;
            begin_ += need;
            continue;
          }
          if (greetings_ == 0 || h.kind != static_cast<std::uint32_t>(frame_kind::data)) {
            throw channel_error(
                fmt::format("channel {}: the peer is not an ipcoro channel sender (its first "
                            "message is not a greeting)",
                            address()));
          }
          length_ = h.length;
          current_ = true;
          co_return true;
        }
      }
      if (begin_ + need > buf_.size()) {
        std::memmove(buf_.data(), buf_.data() + begin_, avail);
        begin_ = 0;
        end_ = avail;
        // Room grows with what has arrived, not with what a frame head announces: a
        // head alone must not make this process reserve a gigabyte.
        if (end_ == buf_.size()) buf_.grow(std::min(need, 2 * buf_.size()), avail);
      }
      const std::size_t n =
          co_await read_operation{fd_.get(), std::span<std::byte>{buf_.data() + end_, buf_.size() - end_}};
      if (n == 0) {
        if (avail > 0) {
          throw channel_error(fmt::format(
              "channel {}: the stream ended inside a message ({} of {} bytes came)", address(), avail, need));
        }
        if (greetings_ > goodbyes_) {
          throw channel_error(
              fmt::format("channel {}: the sender went away without closing the channel: it died "
                          "or was killed mid-stream",
                          address()));
        }
        if (greetings_ == 0) {
          // Every sender greets before it can close, so this one never started.
          throw channel_error(
              fmt::format("channel {}: the sender went away before its greeting: it died or was "
                          "killed before it began (or the writer is not an ipcoro channel sender)",
                          address()));
        }
        ended_ = true;
        co_return false;
      }
      end_ += n;
    }
  }

  void finish(port_exit) noexcept override {
    placeholder_.reset();
    fd_.reset();
    ended_ = true;
    current_ = false;
  }

 private:
  const std::byte* buf_data() const noexcept { return const_cast<byte_buffer&>(buf_).data(); }

  std::shared_ptr<void> keep_;
  unique_fd fd_;
  unique_fd placeholder_;
  byte_buffer buf_;
  std::size_t begin_ = 0;
  std::size_t end_ = 0;
  std::size_t length_ = 0;
  std::size_t greetings_ = 0;
  std::size_t goodbyes_ = 0;
  bool current_ = false;
  bool ended_ = false;
};

// ---- message queues ----

std::string mq_size_advice(std::size_t wanted) {
  const long limit = read_proc_long("/proc/sys/fs/mqueue/msgsize_max");
  return fmt::format(
      "create the channel with message_size={} or more (this system allows up to {}, "
      "/proc/sys/fs/mqueue/msgsize_max)",
      wanted, limit);
}

bool try_send_end(int mqd, std::uint32_t fingerprint) noexcept {
  const message_head h{static_cast<std::uint32_t>(frame_kind::end), fingerprint};
  const timespec now{0, 0};  // an absolute time in the past: never block
  return ::mq_timedsend(static_cast<mqd_t>(mqd), reinterpret_cast<const char*>(&h), sizeof h, 0, &now) == 0;
}

/// Why a queue's peer counts as dead: `pid` died, or (pid 0) a link's `end` that nobody
/// took and nobody can take any more.
std::string why_dead(pid_t pid, const char* peer, const char* end) {
  if (pid == 0) {
    return fmt::format(
        "the link's {} end was never taken, and no process can take it any more (each one that "
        "held the link exited or dropped it)",
        end);
  }
  return fmt::format("the {} (process {}) died", peer, pid);
}

/// The queue under a message channel's sending end, and its peer record. A wait for room
/// in a full queue is looked at every check interval (mq_watched_wait) and ends with
/// peer_died once every receiver recorded has died, or channel_closed once they have all
/// closed.
struct mq_sending {
  message_queue queue;
  mq_peers peers;
  std::string address;

  std::size_t max_message() const noexcept {
    return static_cast<std::size_t>(queue.attributes().message_size);
  }
  task<void> send(std::span<const std::byte> m) { return send_checked(pooled_frame{}, m); }
  std::string size_advice(std::size_t wanted) const { return mq_size_advice(wanted); }
  /// Never waits: the end goes into the peer record, where receivers find it once they
  /// have emptied the queue, and the end marker, when it fits, wakes those waiting now.
  /// (A queue without a record, made outside channels, gets the marker only if it fits.)
  void close(std::uint32_t fingerprint) noexcept {
    if (!queue) return;
    peers.mark_end();
    try_send_end(queue.native_handle(), fingerprint);
    peers.close();
    queue.close();
  }
  void detach() noexcept {
    peers.close();
    queue.close();
  }
  /// The record keeps this process as a sender, so its exit reads as a death (peer_died).
  void abort() noexcept {
    peers.abandon();
    queue.close();
  }

 private:
  task<void> send_checked(pooled_frame, std::span<const std::byte> m) {
    peers.ensure_attached();
    for (;;) {
      mq_send_operation op = queue.send(m);
      if (!peers) {
        co_await op;
        co_return;
      }
      {
        const mq_watched_wait watch(peers, op, mq_watched_wait::waits_for::room);
        try {
          co_await op;
          co_return;
        } catch (const operation_cancelled&) {
          if (!watch.fired()) throw;
        }
      }
      const mq_peers::verdict v = peers.peers();
      if (v.state == mq_peers::verdict::dead) {
        throw peer_died(
            v.pid, fmt::format("channel {}: {}, while this send waited for room in the full queue", address,
                               why_dead(v.pid, "receiver", "receiving")));
      }
      if (v.state == mq_peers::verdict::left) {
        throw channel_closed(fmt::format("channel {}: the receiver has closed the channel", address));
      }
    }
  }
};

/// The queue under a message channel's receiving end, and its peer record. A wait on an
/// empty queue is looked at every check interval: it ends the stream once a sender's
/// close is recorded, and throws peer_died once every sender recorded has died without
/// closing.
struct mq_receiving {
  message_queue queue;
  mq_peers peers;
  std::string address;

  std::size_t max_message() const noexcept {
    return static_cast<std::size_t>(queue.attributes().message_size);
  }
  task<std::optional<mq_message>> receive(std::span<std::byte> buffer) {
    return receive_checked(pooled_frame{}, buffer);
  }
  static std::optional<std::size_t> size_of(const std::optional<mq_message>& m) noexcept {
    return m ? std::optional<std::size_t>(m->size) : std::nullopt;
  }
  /// Puts the end marker back, so that every other receiver of the queue ends too.
  void pass_end_on(std::uint32_t fingerprint) noexcept { try_send_end(queue.native_handle(), fingerprint); }
  /// The queue goes first: a crash in between leaves a record whose dead creator a
  /// restarted receiver can prove, not a queue with no record that it must refuse.
  void close() noexcept {
    queue.close();
    peers.close();
  }

 private:
  /// A message if the queue holds one; never waits.
  std::optional<mq_message> take_now(std::span<std::byte> buffer) const {
    for (;;) {
      unsigned priority = 0;
      const ssize_t n = ::mq_receive(static_cast<mqd_t>(queue.native_handle()),
                                     reinterpret_cast<char*>(buffer.data()), buffer.size(), &priority);
      if (n >= 0) return mq_message{static_cast<std::size_t>(n), priority};
      if (errno == EAGAIN) return std::nullopt;
      if (errno != EINTR) throw_errno(errno, fmt::format("channel {}: mq_receive", address));
    }
  }

  task<std::optional<mq_message>> receive_checked(pooled_frame, std::span<std::byte> buffer) {
    peers.ensure_attached();
    for (;;) {
      // The end was recorded after the closing sender's last message went in.
      if (peers.ended()) co_return take_now(buffer);
      mq_receive_operation op = queue.receive(buffer);
      if (!peers) co_return co_await op;
      {
        const mq_watched_wait watch(peers, op, mq_watched_wait::waits_for::data);
        try {
          co_return co_await op;
        } catch (const operation_cancelled&) {
          if (!watch.fired()) throw;
        }
      }
      const mq_peers::verdict v = peers.peers();
      if (v.state == mq_peers::verdict::dead) {
        // Whatever the dead sent before it died is in the queue by now.
        if (std::optional<mq_message> m = take_now(buffer)) co_return m;
        if (peers.ended()) co_return std::nullopt;
        throw peer_died(v.pid, fmt::format("channel {}: {}{}", address, why_dead(v.pid, "sender", "sending"),
                                           v.pid != 0 ? " without closing the channel" : ""));
      }
    }
  }
};

/// A shared-memory or file ring under a message channel's sending end. The region is
/// declared first: the ring endpoint goes before its memory.
template <class Ring>
struct ring_sending {
  std::shared_ptr<void> region;
  unique_fd peer_claim;  // see ring_claims; before the ring, which polls it
  Ring ring;

  std::size_t max_message() const noexcept { return ring.max_message_size(); }
  auto send(std::span<const std::byte> m) noexcept { return ring.send(m); }
  std::string size_advice(std::size_t) const {
    return std::is_same_v<Ring, spsc_ring_sender> ? "raise the address's capacity="
                                                  : "raise the address's message_size=";
  }
  void close(std::uint32_t) noexcept { ring.close(); }
  void detach() noexcept { ring.detach(); }
  /// The ring keeps this process as a sender, so its exit reads as a death (peer_died).
  void abort() noexcept { ring.abandon(); }
};

template <class Ring>
struct ring_receiving {
  std::shared_ptr<void> region;
  unique_fd peer_claim;
  Ring ring;

  std::size_t max_message() const noexcept { return ring.max_message_size(); }
  auto receive(std::span<std::byte> buffer) noexcept { return ring.receive(buffer); }
  static std::optional<std::size_t> size_of(std::optional<std::size_t> size) noexcept { return size; }
  void pass_end_on(std::uint32_t) noexcept {}
  /// One receiver of an MPMC ring leaving does not close the ring for the others; the
  /// last one closes it for the senders.
  void close() noexcept {
    if constexpr (std::is_same_v<Ring, mpmc_ring_receiver>) {
      ring.leave();
    } else {
      ring.close();
    }
  }
};

/// A ring's peer_died, rethrown with the channel's address in front.
[[noreturn]] void throw_peer_died(const std::string& address, const peer_died& e) {
  std::string_view what = e.what();
  if (what.starts_with("channel ")) throw e;
  const std::string suffix = ": " + e.code().message();  // system_error appends it again
  if (what.ends_with(suffix)) what.remove_suffix(suffix.size());
  throw peer_died(e.pid(), fmt::format("channel {}: {}", address, what));
}

/// The ring of a durable file channel under its receiving end: messages stay in the file
/// until acknowledged, and leaving detaches instead of closing, so that the next receiver
/// resumes where this one acknowledged last and the sender is not told to stop.
struct durable_ring_receiving {
  std::shared_ptr<void> region;
  spsc_ring_receiver ring;

  std::size_t max_message() const noexcept { return ring.max_message_size(); }
  auto receive(std::span<std::byte> buffer) noexcept { return ring.receive(buffer); }
  static std::optional<std::size_t> size_of(std::optional<std::size_t> size) noexcept { return size; }
  void pass_end_on(std::uint32_t) noexcept {}
  std::uint64_t position() const noexcept { return ring.position(); }
  void ack(std::uint64_t position) noexcept { ring.ack(position); }
  void close() noexcept { ring.detach(); }
};

/// A receiving transport that keeps messages until acknowledged up to a position.
template <class Transport>
concept acknowledging = requires(Transport& t, std::uint64_t p) {
  { t.position() } -> std::same_as<std::uint64_t>;
  t.ack(p);
};

/// The sending end of a channel over a transport that keeps message boundaries (a queue
/// or a ring): each message is a {kind, short fingerprint} head and the payload.
template <class Transport>
class message_send_port final : public send_port {
 public:
  message_send_port(std::string address, Transport transport)
      : send_port(std::move(address)), transport_(std::move(transport)) {
    buf_.grow(transport_.max_message(), 0);
  }

  std::span<std::byte> prepare(std::size_t size) override {
    if (head_size + size > buf_.size()) {
      throw channel_error(
          fmt::format("channel {}: a message of {} bytes does not fit: the largest the transport "
                      "carries is {} bytes ({} of them frame it); {}",
                      address(), size, buf_.size(), head_size, transport_.size_advice(size + head_size)));
    }
    put_head(buf_.data(), frame_kind::data);
    used_ = head_size + size;
    return {buf_.data() + head_size, size};
  }

  std::size_t max_payload() const noexcept override { return buf_.size() - head_size; }

 protected:
  task<void> commit(pooled_frame) override {
    try {
      if (!greeted_) {
        // The greeting shares the size limit; a long type name is cut (the fingerprint
        // is what is compared).
        std::span<const std::byte> g = greeting();
        g = g.first(std::min(g.size(), buf_.size() - head_size));
        std::vector<std::byte> frame(head_size + g.size());
        put_head(frame.data(), frame_kind::hello);
        std::memcpy(frame.data() + head_size, g.data(), g.size());
        co_await transport_.send(frame);
        greeted_ = true;
      }
      co_await transport_.send(std::span<const std::byte>{buf_.data(), used_});
    } catch (const peer_died& e) {
      throw_peer_died(address(), e);
    } catch (const std::system_error& e) {
      if (e.code() == std::errc::broken_pipe) {
        throw channel_closed(fmt::format("channel {}: the receiver has closed the channel", address()));
      }
      throw;
    }
  }

  void finish(port_exit how) noexcept override {
    switch (how) {
      case port_exit::close:
        transport_.close(short_fingerprint(identity().fingerprint));
        break;
      case port_exit::detach:
        transport_.detach();
        break;
      case port_exit::abort:
        transport_.abort();
        break;
    }
  }

 private:
  void put_head(std::byte* at, frame_kind kind) const noexcept {
    const message_head h{static_cast<std::uint32_t>(kind), short_fingerprint(identity().fingerprint)};
    std::memcpy(at, &h, sizeof h);
  }

  Transport transport_;
  byte_buffer buf_;
  std::size_t used_ = 0;
  bool greeted_ = false;
};

/// The receiving end of a channel over a queue or a ring.
template <class Transport>
class message_receive_port final : public receive_port {
 public:
  message_receive_port(std::string address, Transport transport)
      : receive_port(std::move(address)), transport_(std::move(transport)) {
    buf_.grow(transport_.max_message(), 0);
  }

  std::span<const std::byte> current() const noexcept override {
    return {const_cast<byte_buffer&>(buf_).data() + head_size, length_};
  }
  void consume() noexcept override {
    current_ = false;
    if constexpr (acknowledging<Transport>) consumed_position_ = current_position_;
  }
  /// Up to the message consumed last, not the one next() may have read ahead (select).
  void acknowledge() noexcept override {
    if constexpr (acknowledging<Transport>) transport_.ack(consumed_position_);
  }

 protected:
  task<bool> fill(pooled_frame) override {
    if (current_) co_return true;
    if (ended_) co_return false;
    for (;;) {
      std::optional<std::size_t> size;
      try {
        size =
            Transport::size_of(co_await transport_.receive(std::span<std::byte>{buf_.data(), buf_.size()}));
      } catch (const peer_died& e) {
        throw_peer_died(address(), e);
      }
      if (!size) {
        ended_ = true;
        co_return false;
      }
      if (*size < head_size) {
        throw channel_error(fmt::format("channel {}: a message of {} bytes is not an ipcoro channel frame",
                                        address(), *size));
      }
      const auto h = read_head<message_head>(buf_.data());
      const std::span<const std::byte> payload{buf_.data() + head_size, *size - head_size};
      if (h.kind == static_cast<std::uint32_t>(frame_kind::hello)) {
        check_greeting(payload);
        continue;
      }
      if (h.kind == static_cast<std::uint32_t>(frame_kind::end)) {
        transport_.pass_end_on(h.fingerprint);
        ended_ = true;
        co_return false;
      }
      if (h.kind != static_cast<std::uint32_t>(frame_kind::data)) {
        throw channel_error(fmt::format("channel {}: a message of unknown kind {}", address(), h.kind));
      }
      if (h.fingerprint != short_fingerprint(identity().fingerprint)) {
        throw channel_type_mismatch(
            fmt::format("channel {}: a message of another type (fingerprint {:08x}) arrived; "
                        "this receiver expects '{}'",
                        address(), h.fingerprint, identity().name));
      }
      length_ = payload.size();
      current_ = true;
      if constexpr (acknowledging<Transport>) current_position_ = transport_.position();
      co_return true;
    }
  }

  void finish(port_exit) noexcept override {
    transport_.close();
    ended_ = true;
    current_ = false;
  }

 private:
  Transport transport_;
  byte_buffer buf_;
  std::size_t length_ = 0;
  std::uint64_t current_position_ = 0;   // the transport's position after the current message
  std::uint64_t consumed_position_ = 0;  // ... after the message consumed last
  bool current_ = false;
  bool ended_ = false;
};

// ---- creating and opening transports ----

constexpr std::size_t default_ring_capacity = 1024 * 1024;
constexpr std::size_t default_mpmc_slots = 256;
constexpr std::size_t default_mpmc_message = 4096;
constexpr long default_mq_messages = 10;
constexpr long default_mq_message_size = 8192;

/// The region type tag of a durable file channel: another tag than a plain SPSC ring's,
/// so that an end that disagrees about durable=1 is refused instead of removing the file
/// (a receiver's reclaim) or taking a restart for a death (a sender).
constexpr std::uint32_t durable_ring_type_tag = 0x4c425244;  // "DRBL"

region_layout ring_layout(const channel_address& a) {
  if (a.mpmc) {
    return mpmc_ring_layout(a.capacity.value_or(default_mpmc_slots),
                            a.message_size.value_or(default_mpmc_message));
  }
  region_layout l = spsc_ring_layout(a.capacity.value_or(default_ring_capacity));
  if (a.durable) l.type_tag = durable_ring_type_tag;
  return l;
}

std::function<void(std::span<std::byte>)> ring_formatter(const channel_address& a) {
  if (a.mpmc) {
    const std::size_t message = a.message_size.value_or(default_mpmc_message);
    return [message](std::span<std::byte> r) { format_mpmc_ring(r, message); };
  }
  return [](std::span<std::byte> r) { format_spsc_ring(r); };
}

region_layout expected_ring_layout(const channel_address& a) {
  region_layout l = ring_layout(a);
  l.payload_size = 0;  // the creator chose the size
  return l;
}

mq_attributes queue_attributes(const channel_address& a) {
  mq_attributes attrs;
  attrs.max_messages = a.capacity ? static_cast<long>(*a.capacity) : default_mq_messages;
  attrs.message_size = a.message_size ? static_cast<long>(*a.message_size) : default_mq_message_size;
  return attrs;
}

struct mq_created {
  message_queue queue;
  mq_peers peers;
};

/// Creates the queue of `a` and its peer record, the record first: a sender that finds
/// the queue then finds its record too. The record names the receiver that created it,
/// so it is also what proves a queue left under the name to be a dead receiver's: the
/// record is taken over only from a dead creator (mq_peers::create), and only a queue
/// whose record was so taken over is removed and created anew. A queue with no record
/// was not made by a channel receiver and is left alone. Throws std::system_error(EEXIST)
/// naming the address for a live owner or a queue without a record, and what
/// message_queue::create throws.
mq_created create_queue(const channel_address& a) {
  struct stat st {};
  const bool had_record = ::stat(("/dev/shm" + mq_record_name(a.name)).c_str(), &st) == 0;
  mq_peers peers;
  try {
    peers = mq_peers::create(a.name, a.mode);
  } catch (const std::system_error& e) {
    if (e.code() != std::errc::file_exists) throw;
    throw std::system_error(e.code(), fmt::format("channel {}: another receiver owns the queue ({})", a.text,
                                                  std::string_view(e.what())));
  }
  for (int round = 0; round < 2; ++round) {
    try {
      message_queue q = message_queue::create(a.name, queue_attributes(a), mq_access::read_write, a.mode);
      peers.bind_queue(q.native_handle());
      return {std::move(q), std::move(peers)};
    } catch (const std::system_error& e) {
      if (e.code() != std::errc::file_exists) throw;
      if (!had_record) {
        throw std::system_error(
            e.code(), fmt::format("channel {}: the queue {} exists but no channel receiver owns it (it "
                                  "has no record {}): it was made otherwise, and is left alone; remove "
                                  "it (message_queue::unlink) if nothing uses it",
                                  a.text, a.name, mq_record_name(a.name)));
      }
      message_queue::unlink(a.name);  // the dead receiver's
    }
  }
  throw std::system_error(
      EEXIST, std::system_category(),
      fmt::format("channel {}: the queue keeps reappearing after its dead receiver's was removed", a.text));
}

/// A mapped file that is removed when the receiver that created it goes: only by the
/// creating process (not a forked child's copy), and only while the path still names it.
struct owned_file {
  explicit owned_file(mapped_file f) : file(std::move(f)), owner(::getpid()) {
    struct stat st {};
    if (::stat(file.path().c_str(), &st) == 0) {
      dev = st.st_dev;
      ino = st.st_ino;
    }
  }
  owned_file(const owned_file&) = delete;
  owned_file& operator=(const owned_file&) = delete;
  mapped_file file;
  pid_t owner;
  dev_t dev = 0;
  ino_t ino = 0;
  ~owned_file() {
    struct stat st {};
    if (file && owner == ::getpid() && ::stat(file.path().c_str(), &st) == 0 && st.st_dev == dev &&
        st.st_ino == ino) {
      ::unlink(file.path().c_str());
    }
  }
};

/// `e` again, its message prefixed with the channel's address (and without the errno
/// text that system_error appends, which the new one appends again).
[[noreturn]] void rethrow_for(const channel_address& a, const std::system_error& e) {
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

/// After `e` from opening or creating a file channel: channel_error when the file is
/// that of a channel with the other durability (the ends disagree about durable=1),
/// otherwise `e` named for the channel.
[[noreturn]] void refuse_file(const channel_address& a, const std::system_error& e) {
  channel_address other = a;
  other.durable = !a.durable;
  try {
    (void)mapped_file::open(a.name, expected_ring_layout(other));
  } catch (const std::system_error&) {
    rethrow_for(a, e);
  }
  throw channel_error(
      fmt::format("channel {}: the file is {} durable channel's, but this address {} durable=1; "
                  "write it on both ends or on neither",
                  a.text, a.durable ? "not a" : "a", a.durable ? "says" : "does not say"));
}

/// The file of a durable channel: opened as it is when it exists (whatever its capacity),
/// created otherwise.
mapped_file open_or_create_durable(const channel_address& a) {
  for (int round = 0; round < 16; ++round) {
    try {
      return mapped_file::open(a.name, expected_ring_layout(a));
    } catch (const std::system_error& e) {
      if (!has_errno(e, ENOENT)) refuse_file(a, e);
    }
    try {
      return mapped_file::create(a.name, ring_layout(a), a.mode, ring_formatter(a));
    } catch (const std::system_error& e) {
      if (!has_errno(e, EEXIST)) rethrow_for(a, e);
    }
  }
  throw channel_error(fmt::format("channel {}: the file keeps appearing and disappearing", a.text));
}

ring_options claim_options(const unique_fd& peer_claim) {
  ring_options o;
  o.peer_claim_fd = peer_claim ? peer_claim.get() : -1;
  return o;
}

/// `peer_claim`: for a link's end, the read end of the other end's claim pipe (ring_claims).
std::unique_ptr<send_port> make_ring_sender(const channel_address& a, std::shared_ptr<void> region,
                                            std::span<std::byte> payload, unique_fd peer_claim = {}) {
  const ring_options o = claim_options(peer_claim);
  if (a.durable) {
    ring_options durable = o;
    durable.wait_for_new_receiver = true;
    return std::make_unique<message_send_port<ring_sending<spsc_ring_sender>>>(
        a.text, ring_sending<spsc_ring_sender>{std::move(region), std::move(peer_claim),
                                               spsc_ring_sender(payload, durable)});
  }
  if (a.mpmc) {
    return std::make_unique<message_send_port<ring_sending<mpmc_ring_sender>>>(
        a.text, ring_sending<mpmc_ring_sender>{std::move(region), std::move(peer_claim),
                                               mpmc_ring_sender(payload, o)});
  }
  return std::make_unique<message_send_port<ring_sending<spsc_ring_sender>>>(
      a.text,
      ring_sending<spsc_ring_sender>{std::move(region), std::move(peer_claim), spsc_ring_sender(payload, o)});
}

std::unique_ptr<receive_port> make_ring_receiver(const channel_address& a, std::shared_ptr<void> region,
                                                 std::span<std::byte> payload, unique_fd peer_claim = {}) {
  const ring_options o = claim_options(peer_claim);
  if (a.durable) {
    ring_options durable = o;
    durable.manual_ack = true;
    std::optional<spsc_ring_receiver> ring;
    try {
      ring.emplace(payload, durable);
    } catch (const std::system_error& e) {
      rethrow_for(a, e);  // EBUSY: a receiver that runs has it
    }
    return std::make_unique<message_receive_port<durable_ring_receiving>>(
        a.text, durable_ring_receiving{std::move(region), std::move(*ring)});
  }
  if (a.mpmc) {
    return std::make_unique<message_receive_port<ring_receiving<mpmc_ring_receiver>>>(
        a.text, ring_receiving<mpmc_ring_receiver>{std::move(region), std::move(peer_claim),
                                                   mpmc_ring_receiver(payload, o)});
  }
  return std::make_unique<message_receive_port<ring_receiving<spsc_ring_receiver>>>(
      a.text, ring_receiving<spsc_ring_receiver>{std::move(region), std::move(peer_claim),
                                                 spsc_ring_receiver(payload, o)});
}

/// Who may still take each end of a ring (or queue) link. A ring records the processes attached to
/// it, but before an end is taken its entry is empty, which alone means "not yet" forever.
/// The processes that can still take an end are exactly those holding a copy of the link
/// state with that end untaken: the creator and every process forked from it while it
/// held the link. So each end has a pipe whose write end (the claim) lives in the link
/// state: fork copies it, exec drops it (close-on-exec, and the link is gone with the
/// old program), death closes it, and taking the end closes it once the ring records the
/// taker, as does destroying the link. The other end's port keeps the read end: when it
/// hangs up and the ring still records nobody for that end, nobody ever will.
struct ring_claims {
  unique_fd sender_claim;
  unique_fd sender_watch;
  unique_fd receiver_claim;
  unique_fd receiver_watch;

  static ring_claims make(const channel_address& a) {
    ring_claims c;
    int fds[2];
    if (::pipe2(fds, O_CLOEXEC) != 0)
      throw_errno(errno, fmt::format("channel {}: pipe2 for the link", a.text));
    c.sender_watch = unique_fd{fds[0]};
    c.sender_claim = unique_fd{fds[1]};
    if (::pipe2(fds, O_CLOEXEC) != 0)
      throw_errno(errno, fmt::format("channel {}: pipe2 for the link", a.text));
    c.receiver_watch = unique_fd{fds[0]};
    c.receiver_claim = unique_fd{fds[1]};
    return c;
  }
};

struct fifo_ends {
  unique_fd read;
  unique_fd write;
};

/// Both ends of an existing FIFO, opened without waiting: the reader first, non-blocking
/// (then made blocking again, for the ring), so that the writer's open finds it.
fifo_ends open_fifo_ends(const channel_address& a) {
  fifo_ends ends;
  const int r = ::open(a.name.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC);
  if (r < 0) throw_errno(errno, fmt::format("channel {}: opening the FIFO for reading", a.text));
  ends.read = unique_fd{r};
  const int w = ::open(a.name.c_str(), O_WRONLY | O_CLOEXEC);
  if (w < 0) throw_errno(errno, fmt::format("channel {}: opening the FIFO for writing", a.text));
  ends.write = unique_fd{w};
  if (::fcntl(r, F_SETFL, ::fcntl(r, F_GETFL) & ~O_NONBLOCK) != 0) {
    throw_errno(errno, fmt::format("channel {}: fcntl", a.text));
  }
  if (a.capacity) set_pipe_capacity(w, *a.capacity);
  return ends;
}

/// The descriptor of an fd: address, once it is known to be open in this process for
/// `access` (O_RDONLY or O_WRONLY); throws channel_error naming it otherwise.
int checked_fd(const channel_address& a, int access) {
  const int fd = a.fd();
  const int flags = ::fcntl(fd, F_GETFL);
  if (flags < 0) {
    throw channel_error(
        fmt::format("channel {}: descriptor {} is not open in this process ({}); pass a "
                    "descriptor the process has, such as one process::exec wired in",
                    a.text, fd, std::strerror(errno)));
  }
  const int mode = flags & O_ACCMODE;
  if (mode != O_RDWR && mode != access) {
    throw channel_error(fmt::format("channel {}: descriptor {} is open for {} only, and a {} needs to {} it",
                                    a.text, fd, mode == O_RDONLY ? "reading" : "writing",
                                    access == O_RDONLY ? "receiver" : "sender",
                                    access == O_RDONLY ? "read" : "write"));
  }
  return fd;
}

[[noreturn]] void no_channel(const channel_address& a, const std::system_error& e) {
  throw channel_error(
      fmt::format("no channel at \"{}\": nobody has opened its receiver ({})", a.text, e.what()));
}

[[noreturn]] void pipe_has_no_name(const channel_address& a) {
  throw bad_channel_address(
      fmt::format("channel address \"{}\": a pipe has no name another process could open; "
                  "make a channel_link before fork, or pass a descriptor as fd:N",
                  a.text));
}

}  // namespace

task<std::unique_ptr<receive_port>> open_receive_port(channel_address a) {
  switch (a.transport) {
    case channel_transport::pipe:
      pipe_has_no_name(a);
    case channel_transport::fd:
      co_return std::make_unique<stream_receive_port>(a.text, unique_fd{checked_fd(a, O_RDONLY)});
    case channel_transport::fifo: {
      // Opened at once, not when the first sender comes: a writer of our own stands in
      // until that sender has greeted, so the read end sees no end of file before it.
      // A FIFO that nobody reads is a dead receiver's: it is replaced (replace_stale).
      std::shared_ptr<fifo> node;
      try {
        node = std::make_shared<fifo>(a.name, fifo_options{a.mode, true});
      } catch (const std::system_error& e) {
        if (has_errno(e, EEXIST) || has_errno(e, EBUSY)) rethrow_for(a, e);
        throw;
      }
      fifo_ends ends = open_fifo_ends(a);
      if (!node->refers_to(ends.read.get())) {
        // Another receiver starting at the same moment found ours unread and replaced it.
        node->release();
        throw std::system_error(EBUSY, std::system_category(),
                                fmt::format("channel {}: another receiver took the FIFO over as it was being "
                                            "opened; it is in use",
                                            a.text));
      }
      co_return std::make_unique<stream_receive_port>(a.text, std::move(ends.read), std::move(node),
                                                      std::move(ends.write));
    }
    case channel_transport::mq: {
      mq_created c = create_queue(a);
      c.peers.attach(mq_peers::role::receiver);
      co_return std::make_unique<message_receive_port<mq_receiving>>(
          a.text, mq_receiving{std::move(c.queue), std::move(c.peers), a.text});
    }
    case channel_transport::shm: {
      std::shared_ptr<shm_segment> seg;
      try {
        seg = std::make_shared<shm_segment>(shm_segment::create_or_reclaim(
            a.name, ring_layout(a), shm_segment::options{a.mode, ring_formatter(a)}));
      } catch (const std::system_error& e) {
        if (has_errno(e, EEXIST)) rethrow_for(a, e);
        throw;
      }
      const std::span<std::byte> payload = seg->payload();
      co_return make_ring_receiver(a, std::move(seg), payload);
    }
    case channel_transport::file: {
      if (a.durable) {
        auto file = std::make_shared<mapped_file>(open_or_create_durable(a));
        const std::span<std::byte> payload = file->payload();
        co_return make_ring_receiver(a, std::move(file), payload);
      }
      std::shared_ptr<owned_file> file;
      try {
        file = std::make_shared<owned_file>(
            mapped_file::create_or_reclaim(a.name, ring_layout(a), a.mode, ring_formatter(a)));
      } catch (const std::system_error& e) {
        // A durable channel's file is never reclaimed by a plain receiver: say why.
        if (has_errno(e, EEXIST)) refuse_file(a, e);
        throw;
      }
      const std::span<std::byte> payload = file->file.payload();
      co_return make_ring_receiver(a, std::move(file), payload);
    }
  }
  throw std::logic_error("open_receive_port: unknown transport");
}

task<std::unique_ptr<send_port>> open_send_port(channel_address a) {
  switch (a.transport) {
    case channel_transport::pipe:
      pipe_has_no_name(a);
    case channel_transport::fd:
      co_return std::make_unique<stream_send_port>(a.text, unique_fd{checked_fd(a, O_WRONLY)},
                                                   write_path::ring_only);
    case channel_transport::fifo: {
      if (::access(a.name.c_str(), F_OK) != 0 && errno == ENOENT) {
        throw channel_error(
            fmt::format("no channel at \"{}\": nobody has opened its receiver (no such FIFO)", a.text));
      }
      pipe_writer writer = co_await open_fifo_writer(a.name);
      co_return std::make_unique<stream_send_port>(a.text, writer.release_fd(), write_path::ring_only, true);
    }
    case channel_transport::mq: {
      std::optional<message_queue> q;
      try {
        q.emplace(message_queue::open(a.name, mq_open_options{mq_access::write_only}));
      } catch (const std::system_error& e) {
        if (e.code() == std::errc::no_such_file_or_directory) no_channel(a, e);
        throw;
      }
      mq_peers peers = mq_peers::open(a.name, q->native_handle());
      peers.attach(mq_peers::role::sender);
      co_return std::make_unique<message_send_port<mq_sending>>(
          a.text, mq_sending{std::move(*q), std::move(peers), a.text});
    }
    case channel_transport::shm: {
      std::shared_ptr<shm_segment> seg;
      try {
        seg = std::make_shared<shm_segment>(shm_segment::open(a.name, expected_ring_layout(a)));
      } catch (const std::system_error& e) {
        if (e.code() == std::errc::no_such_file_or_directory) no_channel(a, e);
        throw;
      }
      const std::span<std::byte> payload = seg->payload();
      co_return make_ring_sender(a, std::move(seg), payload);
    }
    case channel_transport::file: {
      std::shared_ptr<mapped_file> file;
      try {
        file = std::make_shared<mapped_file>(mapped_file::open(a.name, expected_ring_layout(a)));
      } catch (const std::system_error& e) {
        if (e.code() == std::errc::no_such_file_or_directory) no_channel(a, e);
        if (has_errno(e, EPROTO)) refuse_file(a, e);
        throw;
      }
      const std::span<std::byte> payload = file->payload();
      co_return make_ring_sender(a, std::move(file), payload);
    }
  }
  throw std::logic_error("open_send_port: unknown transport");
}

}  // namespace detail

// ---- links ----

struct channel_link::state {
  channel_address address;
  unique_fd read_fd;
  unique_fd write_fd;
  write_path path = write_path::ring_only;
  message_queue send_queue;
  message_queue receive_queue;
  detail::mq_peers queue_peers;  ///< each end records itself when it is taken
  std::shared_ptr<void> region;
  std::span<std::byte> payload;
  detail::ring_claims claims;
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

channel_link channel_link::create(std::string_view text) {
  auto s = std::make_unique<state>();
  s->address = channel_address::parse(text);
  try {
    create_transport(*s);
  } catch (const std::system_error& e) {
    detail::rethrow_for_address(s->address.text, e);
  }
  channel_link link;
  link.state_ = std::move(s);
  return link;
}

void channel_link::create_transport(state& st) {
  state* const s = &st;
  const channel_address& a = s->address;
  switch (a.transport) {
    case channel_transport::fd:
      throw bad_channel_address(
          fmt::format("channel address \"{}\": an fd: address names one end of an existing "
                      "stream; open it with open_sender / open_receiver",
                      a.text));
    case channel_transport::pipe: {
      pipe_pair p = make_pipe(pipe_options{a.capacity.value_or(0)});
      s->path = p.writer.path();
      s->read_fd = p.reader.release_fd();
      s->write_fd = p.writer.release_fd();
      break;
    }
    case channel_transport::fifo: {
      // Both ends are opened here, then the name goes: the link needs nobody to open it.
      fifo node(a.name, fifo_options{a.mode, false});
      detail::fifo_ends ends = detail::open_fifo_ends(a);
      s->read_fd = std::move(ends.read);
      s->write_fd = std::move(ends.write);
      node.remove();
      break;
    }
    case channel_transport::mq: {
      detail::mq_created c = detail::create_queue(a);
      s->receive_queue = std::move(c.queue);
      s->send_queue = message_queue::open(a.name, mq_open_options{mq_access::write_only});
      s->receive_queue.disown();
      message_queue::unlink(a.name);
      c.peers.unlink();
      s->queue_peers = std::move(c.peers);
      s->claims = detail::ring_claims::make(a);
      break;
    }
    case channel_transport::shm: {
      auto seg = std::make_shared<shm_segment>(shm_segment::create(
          a.name, detail::ring_layout(a), shm_segment::options{a.mode, detail::ring_formatter(a)}));
      seg->unlink();
      s->payload = seg->payload();
      s->region = std::move(seg);
      s->claims = detail::ring_claims::make(a);
      break;
    }
    case channel_transport::file: {
      if (a.durable) {
        throw bad_channel_address(
            fmt::format("channel address \"{}\": a link removes its file as soon as both "
                        "ends are open, so it cannot be durable; open a durable channel "
                        "with open_receiver / open_sender",
                        a.text));
      }
      auto file = std::make_shared<mapped_file>(
          mapped_file::create(a.name, detail::ring_layout(a), a.mode, detail::ring_formatter(a)));
      if (::unlink(a.name.c_str()) != 0)
        throw_errno(errno, fmt::format("channel {}: removing the file", a.text));
      s->payload = file->payload();
      s->region = std::move(file);
      s->claims = detail::ring_claims::make(a);
      break;
    }
  }
}

namespace detail {

std::unique_ptr<send_port> link_send_port(void* raw) {
  auto* s = static_cast<channel_link::state*>(raw);
  if (s == nullptr) throw std::logic_error("channel_link::sender: empty link");
  if (s->sender_taken) throw std::logic_error("channel_link::sender: the sending end was taken already");
  s->sender_taken = true;
  const channel_address& a = s->address;
  switch (a.transport) {
    case channel_transport::pipe:
    case channel_transport::fifo:
      return std::make_unique<stream_send_port>(a.text, std::move(s->write_fd), s->path);
    case channel_transport::mq: {
      auto port = std::make_unique<message_send_port<mq_sending>>(
          a.text,
          mq_sending{std::move(s->send_queue),
                     s->queue_peers.share(mq_peers::role::sender, std::move(s->claims.receiver_watch)),
                     a.text});
      s->claims.sender_claim.reset();  // the record holds this process now
      return port;
    }
    case channel_transport::shm:
    case channel_transport::file: {
      auto port = make_ring_sender(a, s->region, s->payload, std::move(s->claims.receiver_watch));
      s->claims.sender_claim.reset();  // the ring records this process now
      return port;
    }
    case channel_transport::fd:
      break;
  }
  throw std::logic_error("channel_link::sender: no such transport");
}

std::unique_ptr<receive_port> link_receive_port(void* raw) {
  auto* s = static_cast<channel_link::state*>(raw);
  if (s == nullptr) throw std::logic_error("channel_link::receiver: empty link");
  if (s->receiver_taken)
    throw std::logic_error("channel_link::receiver: the receiving end was taken already");
  s->receiver_taken = true;
  const channel_address& a = s->address;
  switch (a.transport) {
    case channel_transport::pipe:
    case channel_transport::fifo:
      return std::make_unique<stream_receive_port>(a.text, std::move(s->read_fd));
    case channel_transport::mq: {
      auto port = std::make_unique<message_receive_port<mq_receiving>>(
          a.text,
          mq_receiving{std::move(s->receive_queue),
                       s->queue_peers.share(mq_peers::role::receiver, std::move(s->claims.sender_watch)),
                       a.text});
      s->claims.receiver_claim.reset();  // the record holds this process now
      return port;
    }
    case channel_transport::shm:
    case channel_transport::file: {
      auto port = make_ring_receiver(a, s->region, s->payload, std::move(s->claims.sender_watch));
      s->claims.receiver_claim.reset();  // the ring records this process now
      return port;
    }
    case channel_transport::fd:
      break;
  }
  throw std::logic_error("channel_link::receiver: no such transport");
}

}  // namespace detail
}  // namespace ipcoro
