// SPDX-License-Identifier: MIT
// transport: what a transport provides to the channel layer, and the table of address schemes.
#pragma once

#include "ipcoro/channel_address.hpp"
#include "ipcoro/detail/channel_port.hpp"
#include "ipcoro/export.hpp"
#include "ipcoro/task.hpp"

#include <concepts>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace ipcoro {

/// A transport that keeps message boundaries (a queue, a ring), seen from the sending end
/// of a channel. The channel layer frames each message (a head and the payload) and
/// hands whole frames to `send`, which completes once the frame is in the transport.
///
/// - `max_message()`: the largest frame it carries;
/// - `send(frame)`: an awaitable; throws std::system_error(EPIPE) once every receiver
///   closed, ipcoro::peer_died once they died, timed_out / operation_cancelled;
/// - `size_advice(n)`: what the user should change so that a frame of `n` bytes fits;
/// - `close(fingerprint)`: a clean end of stream, never waiting (the fingerprint marks the
///   transport's own end frame, where it needs one); `detach()`: leave, others go on;
///   `abort()`: leave so that receivers see a failure, not an end.
template <class T>
concept message_sending_transport = requires(T& t, const T& c, std::span<const std::byte> frame,
                                             std::uint32_t fingerprint, std::size_t n) {
  { c.max_message() } -> std::same_as<std::size_t>;
  t.send(frame);
  { c.size_advice(n) } -> std::convertible_to<std::string>;
  t.close(fingerprint);
  t.detach();
  t.abort();
};

/// A transport that keeps message boundaries, seen from the receiving end of a channel.
///
/// - `max_message()`: the largest frame it carries;
/// - `receive(buffer)`: an awaitable giving what `T::size_of` turns into the frame's size,
///   or an empty optional at the transport's own end of stream;
/// - `pass_end_on(fingerprint)`: an end frame was read; put it back for other receivers
///   when the transport is shared by several (a queue), or do nothing;
/// - `close()`: leave; the last receiver of a ring closes it for the senders.
///
/// A transport that keeps messages until they are acknowledged (a durable file ring) also
/// has `position()` and `ack(position)`.
template <class T>
concept message_receiving_transport = requires(T& t, const T& c, std::span<std::byte> buffer,
                                               std::uint32_t fingerprint) {
  { c.max_message() } -> std::same_as<std::size_t>;
  t.receive(buffer);
  t.pass_end_on(fingerprint);
  t.close();
};

/// A byte-stream transport (a pipe, a FIFO, an inherited descriptor, later a socket)
/// provides the channel layer with one connected descriptor per end: the channel layer
/// frames messages on it itself (detail::make_stream_sender / make_stream_receiver in the
/// library). Nothing else is required of it.

namespace detail {
/// The two ends of a link, made before fork: each is taken once, in any process that
/// holds a copy of the link.
class IPCORO_API link_ends {
 public:
  link_ends() = default;
  link_ends(const link_ends&) = delete;
  link_ends& operator=(const link_ends&) = delete;
  virtual ~link_ends() = default;
  virtual std::unique_ptr<send_port> take_sender() = 0;
  virtual std::unique_ptr<receive_port> take_receiver() = 0;
};
}  // namespace detail

/// The form of the part of an address after `scheme:`.
enum class address_name : unsigned char {
  none,      ///< nothing: `pipe:`
  path,      ///< an absolute file-system path: `fifo:/tmp/jobs`
  ipc_name,  ///< '/' and a name without further slashes: `mq:/jobs`
  number,    ///< a non-negative integer: `fd:3`
};

/// The options of an address (`?key=value&...`), as bits of channel_scheme::options.
namespace address_option {
inline constexpr unsigned capacity = 1u << 0;
inline constexpr unsigned message_size = 1u << 1;
inline constexpr unsigned mode = 1u << 2;
inline constexpr unsigned ring = 1u << 3;
inline constexpr unsigned durable = 1u << 4;
inline constexpr unsigned checksum = 1u << 5;
}  // namespace address_option

/// One row of the table of address schemes: everything the channel layer, and tools, know
/// about a transport. Parsing, opening a sender or a receiver, making a link, listing and
/// inspecting are lookups in this table; a new transport is one source file that defines
/// its row, and one line in the table. A null function means the scheme cannot do that
/// (the error says so, naming the address).
struct channel_scheme {
  std::string_view name;     ///< the scheme, as written before the colon
  std::string_view example;  ///< a complete example address, for messages
  std::string_view about;    ///< what the transport is, in a few words
  address_name name_form = address_name::none;
  unsigned options = 0;  ///< address_option bits it accepts
  /// What the options mean for this transport, added to an EINVAL from creating it.
  std::string_view option_notes;
  /// Checks beyond the name's form and each option's syntax; throws bad_channel_address.
  void (*check)(const channel_address&) = nullptr;
  /// Opens the sending end of an existing channel (throws channel_error "no channel at").
  task<std::unique_ptr<detail::send_port>> (*open_sender)(channel_address) = nullptr;
  /// Opens or creates the receiving end, reclaiming a dead receiver's name.
  task<std::unique_ptr<detail::receive_port>> (*open_receiver)(channel_address) = nullptr;
  /// Makes both ends of a link in this process.
  std::unique_ptr<detail::link_ends> (*make_link)(const channel_address&) = nullptr;
  /// The addresses of the channels of this scheme that exist now (their receivers made them).
  std::vector<std::string> (*list)() = nullptr;
  /// One line on the channel at an address: what is there and who holds it.
  std::string (*inspect)(const channel_address&) = nullptr;
};

/// Every scheme, in the order addresses list them.
IPCORO_API std::span<const channel_scheme* const> channel_schemes() noexcept;
/// The row of `name` ("fifo"), or nullptr.
IPCORO_API const channel_scheme* find_channel_scheme(std::string_view name) noexcept;

/// The addresses of every channel whose receiver has made it and that exists now, for the
/// schemes that can be listed (`mq:` and `shm:`; FIFOs and files can be anywhere).
IPCORO_API std::vector<std::string> list_channels();
/// One line on the channel at `address`; throws bad_channel_address for a bad address, and
/// std::system_error naming it when there is nothing there.
IPCORO_API std::string inspect_channel(std::string_view address);

}  // namespace ipcoro
