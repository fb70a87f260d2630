// SPDX-License-Identifier: MIT
// channel_address: the string form of a channel's transport, name and options.
#pragma once

#include "ipcoro/export.hpp"

#include <cstddef>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>

namespace ipcoro {

/// Thrown for an address that cannot be parsed; the message quotes it and says what is
/// expected instead.
class IPCORO_API bad_channel_address : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

/// `pipe:`, `fifo:/path`, `mq:/name`, `shm:/name`, `file:/path` or `fd:N`, optionally
/// followed by `?option=value&...`. Options:
///   capacity=N      bytes of pipe / FIFO buffer or shm / file ring; messages of a queue
///   message_size=N  largest message in bytes (queue message size, or the largest
///                   record of an MPMC ring)
///   mode=0NNN       permission bits of what the receiver creates (octal)
///   ring=spsc|mpmc  the kind of shared-memory ring (shm: and file:); mpmc lets several
///                   processes send and receive
///   durable=1       (file:, SPSC) a persistent queue: the receiver keeps the file when it
///                   closes (leaving without telling the sender) and reopens it when it
///                   starts again, resuming after the last value it acknowledged
///                   (channel_receiver::ack; unacknowledged values keep their room in the
///                   file). The sender waits for a restarted receiver instead of failing
///                   with peer_died. Both ends must say durable=1 (an end that does not is
///                   refused); capacity applies when the file is created.
///   checksum=none|xxh3  (shm:, file:; SPSC) xxh3: every record carries an XXH3-64 checksum of
///                   its position, length and payload, and a close carries one of the final
///                   position, so a damaged or edited record, a moved position or a stray
///                   close flag is an error (EBADMSG naming the record's offset), never
///                   delivered or read as an end. Recorded in the ring when the receiver
///                   creates it; an end whose address says otherwise is refused (EPROTO).
///                   Needs a build with libxxhash (otherwise refused, naming it). See
///                   ring_checksum in ipcoro/shm_ring.hpp for what it does not protect.
/// Each scheme is a row of the table in ipcoro/transport.hpp, which says which options it
/// takes. Sizes are what parse_size() accepts: digits with an optional K, KiB, M, MiB, G or
/// GiB (any case, powers of 1024); shm: and file: ring sizes above the largest ring
/// (spsc_ring_max_capacity, mpmc_ring_max_slots / _max_message) are refused.
///
/// Restarting after a crash: a receiver that opens a name left behind by a receiver that
/// died takes it over, by default: the FIFO (when no process has it open for reading),
/// queue, segment or (non-durable) file is removed and created anew. Only a provably dead
/// owner is replaced (its pid, start time and boot are recorded; a queue's in the
/// record beside it): a live owner's name is refused with EEXIST (EBUSY for a FIFO being
/// read, or for a durable file whose receiver runs), and so is a name not made by a
/// channel receiver.
struct IPCORO_API channel_address {
  std::string scheme;  ///< the transport, as written before the colon: "pipe", "shm", ...
  std::string name;    ///< path, queue or segment name; the number for fd:
  std::optional<std::size_t> capacity;
  std::optional<std::size_t> message_size;
  unsigned mode = 0600;
  bool mpmc = false;
  bool durable = false;   ///< file: only; see durable=1 above
  bool checksum = false;  ///< shm: and file: SPSC rings; checksum=xxh3 (see above)
  std::string text;       ///< the address as given, for messages

  /// Parses and checks an address; throws bad_channel_address naming what is wrong.
  [[nodiscard]] static channel_address parse(std::string_view address);
  int fd() const;  ///< the descriptor of an fd: address
};

}  // namespace ipcoro
