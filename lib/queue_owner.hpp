// queue_owner: which live process owns a channel's message queue, so a restarted receiver
// can tell a dead owner's queue from a live one's.
#pragma once

#include "ipcoro/mqueue.hpp"
#include "ipcoro/shm_segment.hpp"

#include <string>

namespace ipcoro::detail {

/// A queue created by a channel receiver, with its owner record: a small shm segment
/// (/dev/shm/ipcoro-mq-owner.<name>) whose header names the creating process (pid, start
/// time, boot), so that "the owner is dead" can be proven even after the pid is reused.
/// Remove the queue (close it) before the record: a record without a queue is harmless,
/// a queue without a record cannot be reclaimed.
struct owned_queue {
  shm_segment record;
  message_queue queue;
};

/// Creates the queue `name` for the receiver of the channel `address` (for messages), and
/// its owner record. When the queue exists and its record names a dead process, the old
/// queue is removed and created anew. Throws std::system_error(EEXIST) naming the address
/// when the recorded owner is alive, or when the queue exists without a record (not made
/// by a channel receiver: never removed); otherwise what message_queue::create and
/// shm_segment::create throw.
[[nodiscard]] owned_queue create_owned_queue(const std::string& name, const mq_attributes& attributes,
                                             unsigned mode, const std::string& address);

/// The name of the owner record of queue `name` (for tests and cleanup).
[[nodiscard]] std::string queue_owner_record_name(const std::string& name);

}  // namespace ipcoro::detail
