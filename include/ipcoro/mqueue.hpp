// SPDX-License-Identifier: MIT
// POSIX message queues: awaitable send and receive with priorities, and labelled messages
// that several consumers of one process take from a shared queue, each its own label.
#pragma once

#include "ipcoro/deadline.hpp"
#include "ipcoro/detail/wait_list.hpp"
#include "ipcoro/event.hpp"
#include "ipcoro/export.hpp"
#include "ipcoro/io_operation.hpp"
#include "ipcoro/task.hpp"

#include <sys/types.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <memory>
#include <optional>
#include <span>
#include <stop_token>
#include <string>
#include <string_view>

namespace ipcoro {

class message_queue;

/// The fixed shape of a queue, chosen when it is created (struct mq_attr).
struct mq_attributes {
  /// How many messages the queue holds before senders wait (mq_maxmsg). 0 when creating:
  /// the system default, /proc/sys/fs/mqueue/msg_default. At most
  /// /proc/sys/fs/mqueue/msg_max (checked for every caller, root included).
  long max_messages = 0;
  /// The largest message in bytes (mq_msgsize). 0 when creating: the system default,
  /// /proc/sys/fs/mqueue/msgsize_default. At most /proc/sys/fs/mqueue/msgsize_max.
  long message_size = 0;
};

/// Which directions a descriptor allows.
enum class mq_access { read_only, write_only, read_write };

/// How `message_queue::open` opens or creates a queue.
struct mq_open_options {
  mq_access access = mq_access::read_write;
  bool create = false;         ///< O_CREAT: create the queue if it does not exist
  bool exclusive = false;      ///< with `create`, O_EXCL: fail with EEXIST if it exists
  mq_attributes attributes{};  ///< used only when the queue is created
  unsigned mode = 0600;        ///< permission bits of a created queue (the umask applies)
};

/// What a receive delivered: the message's size in bytes and its priority.
struct mq_message {
  std::size_t size = 0;
  unsigned priority = 0;
};

/// Priorities run from 0 (lowest) to mq_priority_max - 1; higher ones are received first.
inline constexpr unsigned mq_priority_max = 32768;
/// Bytes that `send_labelled` puts before the payload: the label, a native-endian uint32.
inline constexpr std::size_t mq_label_header_size = sizeof(std::uint32_t);

/// A labelled message taken apart: its label and the payload after the header.
struct mq_labelled_view {
  std::uint32_t label = 0;
  std::span<const std::byte> payload;
};
/// Splits a message sent with `send_labelled`; std::nullopt when it is shorter than the
/// label header.
IPCORO_API std::optional<mq_labelled_view> mq_split_label(std::span<const std::byte> message) noexcept;

/// One message sent: tries `mq_send` on the non-blocking descriptor first and, when the
/// queue is full, waits for POLLOUT through the ring and tries again (another sender may
/// have taken the room first). Completes once the message is in the queue. Throws
/// std::system_error naming the queue and the limit: EMSGSIZE for a message larger than
/// the queue's message size, EINVAL for a priority not below mq_priority_max, EBADF on a
/// read-only queue. Allocates nothing. The queue and the message stay alive until it completes.
class [[nodiscard]] IPCORO_API mq_send_operation : public io_operation<mq_send_operation> {
 public:
  mq_send_operation(const message_queue& queue, std::span<const std::byte> message,
                    unsigned priority) noexcept;
  void finish(int res) const;

 private:
  friend class message_queue;
  /// The labelled form: the header and `payload` are copied into the queue's scratch
  /// buffer (allocated by message_queue::send_labelled) right before each attempt.
  mq_send_operation(const message_queue& queue, std::uint32_t label, std::span<const std::byte> payload,
                    unsigned priority) noexcept;
  static void prep(detail::op_base& op, ::io_uring_sqe* sqe) noexcept;
  static bool progress(detail::op_base& op, int res) noexcept;
  static int attempt(detail::op_base& op) noexcept;
  bool try_send() noexcept;

  const message_queue* queue_;
  const std::byte* data_;
  std::size_t size_;
  unsigned priority_;
  std::uint32_t label_ = 0;
  int error_ = 0;
  bool labelled_ = false;
  bool done_ = false;
};

/// One message received into a buffer: tries `mq_receive` on the non-blocking descriptor
/// first and, when the queue is empty, waits for POLLIN through the ring and tries again
/// (retrying when a receiver in another process won the race). Completes with the size and
/// priority of the message, the highest-priority oldest one. Throws std::system_error
/// naming the queue: EMSGSIZE when the buffer is smaller than the queue's message size,
/// EBADF on a write-only queue. A cancelled or timed-out receive has taken no message.
/// Allocates nothing. The queue and the buffer stay alive until it completes.
class [[nodiscard]] IPCORO_API mq_receive_operation : public io_operation<mq_receive_operation> {
 public:
  mq_receive_operation(const message_queue& queue, std::span<std::byte> buffer) noexcept;
  mq_message finish(int res) const;

 private:
  static void prep(detail::op_base& op, ::io_uring_sqe* sqe) noexcept;
  static bool progress(detail::op_base& op, int res) noexcept;
  static int attempt(detail::op_base& op) noexcept;
  bool try_receive() noexcept;

  const message_queue* queue_;
  std::byte* data_;
  std::size_t size_;
  mq_message received_{};
  int error_ = 0;
  bool done_ = false;
};

/// A POSIX message queue descriptor (mq_open with O_NONBLOCK | O_CLOEXEC): messages keep
/// their boundaries and come out highest priority first, oldest first within a priority.
/// Move-only; operations in flight point at it, so it must stay in place until they
/// complete. A queue obtained from `create` owns its name: its destructor, in the process
/// that created it, unlinks the name (see `release_name`). Use it from one thread.
class IPCORO_API message_queue {
 public:
  message_queue() noexcept = default;
  message_queue(message_queue&& other) noexcept;
  message_queue& operator=(message_queue&& other) noexcept;
  message_queue(const message_queue&) = delete;
  message_queue& operator=(const message_queue&) = delete;
  ~message_queue();

  /// Creates a new queue (O_CREAT | O_EXCL) that this object owns. `name` must start with
  /// '/', contain no other '/', and have at most NAME_MAX (255) bytes after it. Throws
  /// std::system_error saying what to change: a bad name (EINVAL, ENAMETOOLONG),
  /// attributes above /proc/sys/fs/mqueue/msg_max or msgsize_max (EINVAL, naming the file
  /// and its value), EEXIST (already there: in use, or left by a crashed process — unlink
  /// it), EMFILE (RLIMIT_MSGQUEUE or RLIMIT_NOFILE, naming the limit and its value),
  /// ENOSPC (/proc/sys/fs/mqueue/queues_max).
  [[nodiscard]] static message_queue create(std::string_view name, const mq_attributes& attributes = {},
                                            mq_access access = mq_access::read_write, unsigned mode = 0600);
  /// Opens an existing queue (ENOENT if there is none), or with `opts.create` creates it.
  /// Such an object does not own the name. Throws as `create` does.
  [[nodiscard]] static message_queue open(std::string_view name, const mq_open_options& opts = {});
  /// Removes `name` from the system: the queue lives on until every descriptor is closed.
  /// Returns false when no such queue exists; throws std::system_error for a bad name or
  /// EACCES.
  static bool unlink(std::string_view name);

  /// Sends `message` with `priority`. See mq_send_operation.
  [[nodiscard]] mq_send_operation send(std::span<const std::byte> message,
                                       unsigned priority = 0) const noexcept {
    return {*this, message, priority};
  }
  /// Sends `payload` preceded by a label header (mq_label_header_size bytes), for an
  /// mq_demux to route to that label's consumer. The payload may have at most
  /// `attributes().message_size - mq_label_header_size` bytes. Allocates a scratch buffer
  /// of one message size on the first call (std::bad_alloc), never afterwards.
  [[nodiscard]] mq_send_operation send_labelled(std::uint32_t label, std::span<const std::byte> payload,
                                                unsigned priority = 0) const;
  /// Receives one message into `buffer`, which must hold `attributes().message_size`
  /// bytes. See mq_receive_operation.
  [[nodiscard]] mq_receive_operation receive(std::span<std::byte> buffer) const noexcept {
    return {*this, buffer};
  }

  /// The attributes read when the queue was opened (they never change).
  const mq_attributes& attributes() const noexcept { return attributes_; }
  /// How many messages are in the queue right now (mq_getattr). Throws std::system_error.
  long current_messages() const;
  const std::string& name() const noexcept { return name_; }
  int native_handle() const noexcept { return mqd_; }
  explicit operator bool() const noexcept { return mqd_ >= 0; }
  /// True when the destructor will unlink the name.
  bool owns_name() const noexcept { return owner_pid_ != 0; }
  /// Keeps the name in the system when this object goes away.
  void release_name() noexcept { owner_pid_ = 0; }
  /// Closes the descriptor (and unlinks the name if this object owns it).
  void close() noexcept;

 private:
  friend class mq_send_operation;
  friend class mq_receive_operation;

  message_queue(int mqd, std::string name, const mq_attributes& attributes, pid_t owner) noexcept
      : mqd_(mqd), name_(std::move(name)), attributes_(attributes), owner_pid_(owner) {}

  int mqd_ = -1;
  std::string name_;
  mq_attributes attributes_{};
  pid_t owner_pid_ = 0;                           ///< the creator's pid while this object owns the name
  mutable std::unique_ptr<std::byte[]> scratch_;  ///< header + payload of a labelled send
  /// Receives left that go straight to the ring's poll, without first trying
  /// mq_receive: set after a try found the queue empty (see mq_receive_operation::attempt).
  mutable std::uint8_t receive_skips_ = 0;
};

class mq_demux;

/// A consumer's wait for the next message of one label; see mq_demux::receive.
class [[nodiscard]] IPCORO_API mq_demux_receive_operation
    : detail::waiter,
      public detail::timer_bounded<mq_demux_receive_operation, std::optional<mq_message>> {
 public:
  mq_demux_receive_operation(mq_demux& demux, std::uint32_t label, std::span<std::byte> buffer) noexcept
      : demux_(demux), buffer_(buffer), label_(label) {}

  bool await_ready() noexcept;
  /// `.with_timeout(d)` / `.with_deadline(t)` bound the wait: timed_out, and no message is
  /// taken then.
  template <class P>
  bool suspend_untimed(std::coroutine_handle<P> h) {
    if constexpr (detail::stop_token_carrier<P>) token_ = &h.promise().stop_token();
    return suspend(h, detail::stop_token_of(h));
  }
  /// The message, or std::nullopt once the demux is closed and no message of this label
  /// is held. Throws operation_cancelled when stopped first (no message is taken: one
  /// handed to this consumer as the stop came stays held for the next), the error that
  /// ended the demux's pump, or std::system_error for a bad label or a buffer smaller than
  /// mq_demux::max_payload().
  std::optional<mq_message> resume_untimed();

 private:
  friend class mq_demux;
  bool suspend(std::coroutine_handle<> h, const std::stop_token& token);

  mq_demux& demux_;
  std::span<std::byte> buffer_;
  const std::stop_token* token_ = nullptr;
  std::uint32_t label_;
  int error_ = 0;
  bool parked_ = false;
};

/// Routes labelled messages (sent with `send_labelled`) from one queue to the consumers of
/// this process, each waiting for its own label, like parcels on a conveyor belt sorted
/// to different hands. A consumer of label A never sees label B, and each label's messages
/// arrive in queue order (priority first, then oldest first).
///
/// One pump (`run()`) takes messages off the queue, only while at least one consumer
/// waits, and keeps those whose consumer is busy in up to `max_held` preallocated slots,
/// in order; it pauses when every slot is full, which holds the senders back. So a label
/// nobody consumes can stall the others once `max_held` of its messages are held: give
/// every label that is sent a consumer. Messages the pump has taken belong to this
/// process: when several processes demultiplex one queue, each must consume every label
/// (or use a queue per group of labels). A message without a header or with a label not
/// below `labels` ends the pump with std::system_error(EBADMSG) naming it (that message
/// is dropped, loudly). Steady state allocates nothing. Use from one thread; the queue
/// must outlive the demux, and run() and every consumer must end before it is destroyed.
class IPCORO_API mq_demux {
 public:
  /// Routes labels 0 .. labels-1. Allocates `max_held` slots of one message size. Throws
  /// std::invalid_argument when `labels` or `max_held` is 0 or the queue's message size
  /// has no room for the label header.
  mq_demux(const message_queue& queue, std::uint32_t labels, std::size_t max_held = 64);
  mq_demux(const mq_demux&) = delete;
  mq_demux& operator=(const mq_demux&) = delete;
  ~mq_demux();

  /// The pump: run it concurrently with the consumers (in when_all or a scope). Returns
  /// after `close()`; throws what ended it otherwise (operation_cancelled when stopped,
  /// std::system_error for a queue error or a bad message), and consumers then see that
  /// error once the messages held for them are gone. Runs once per demux.
  [[nodiscard]] task<void> run();
  /// Stops taking messages: run() returns, and consumers get std::nullopt once the
  /// messages already taken for their label have been handed out. Messages still in the
  /// queue stay there.
  void close() noexcept;

  /// Waits for the next message with `label` and copies its payload (without the header)
  /// into `buffer`, which must hold max_payload() bytes. Many consumers may wait for the
  /// same label; they are served first come, first served.
  [[nodiscard]] mq_demux_receive_operation receive(std::uint32_t label,
                                                   std::span<std::byte> buffer) noexcept {
    return {*this, label, buffer};
  }

  /// The largest payload: the queue's message size less the label header.
  std::size_t max_payload() const noexcept { return slot_size_ - mq_label_header_size; }
  /// Messages taken off the queue and not yet handed to a consumer.
  std::size_t held() const noexcept { return held_total_; }

 private:
  friend class mq_demux_receive_operation;
  struct slot;
  struct label_state;

  task<void> pump();
  void deliver(slot& s, const mq_message& m);
  void end(std::exception_ptr failure) noexcept;
  std::optional<mq_message> take(mq_demux_receive_operation& op);

  const message_queue* queue_;
  std::uint32_t labels_;
  std::size_t slot_size_;
  std::unique_ptr<std::byte[]> storage_;
  std::unique_ptr<slot[]> slots_;
  std::unique_ptr<label_state[]> states_;
  slot* free_ = nullptr;
  std::size_t held_total_ = 0;
  std::size_t parked_ = 0;  ///< consumers waiting with nothing reserved for them
  event demand_;            ///< set when a consumer parks or a slot is freed
  std::stop_source stop_;   ///< stops the pump's wait on the queue; follows run()'s token
  std::exception_ptr failure_;
  bool started_ = false;
  bool closed_ = false;
  bool ended_ = false;
};

}  // namespace ipcoro
