// SPDX-License-Identifier: MIT
// POSIX message queues: opening with checked limits, and send/receive operations that poll
// through the ring and transfer with the non-blocking mq_* calls (the label demux is in
// mq_demux.cpp).
#include "ipcoro/mqueue.hpp"

#include "ipcoro/error.hpp"
#include "ipcoro/io_context.hpp"
#include "proc_value.hpp"

#include <fcntl.h>
#include <fmt/core.h>
#include <liburing.h>
#include <mqueue.h>
#include <poll.h>
#include <sys/resource.h>
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <cstdio>
#include <cstring>
#include <stdexcept>
#include <utility>

namespace ipcoro {

namespace {

using detail::read_proc_long;

constexpr const char* msg_max_file = "/proc/sys/fs/mqueue/msg_max";
constexpr const char* msgsize_max_file = "/proc/sys/fs/mqueue/msgsize_max";
constexpr const char* msg_default_file = "/proc/sys/fs/mqueue/msg_default";
constexpr const char* msgsize_default_file = "/proc/sys/fs/mqueue/msgsize_default";
constexpr const char* queues_max_file = "/proc/sys/fs/mqueue/queues_max";

std::string rlimit_text(rlim_t v) {
  return v == RLIM_INFINITY ? std::string("unlimited")
                            : fmt::format("{} bytes", static_cast<unsigned long long>(v));
}

/// The kernel's rules (glibc strips the '/', the kernel looks the rest up as one name).
void check_name(std::string_view name) {
  auto bad = [&](const char* rule, int err = EINVAL) {
    throw_errno(err, fmt::format("message queue name \"{}\": {}", name, rule));
  };
  if (name.empty() || name.front() != '/') bad("must start with '/', as in \"/jobs\"");
  const std::string_view rest = name.substr(1);
  if (rest.empty()) bad("needs a name after the '/', as in \"/jobs\"");
  if (rest.find('/') != std::string_view::npos) bad("must contain no '/' after the first character");
  if (rest.find('\0') != std::string_view::npos) bad("must contain no NUL character");
  if (rest == "." || rest == "..") bad("\".\" and \"..\" are not queue names");
  if (rest.size() > NAME_MAX) {
    throw_errno(ENAMETOOLONG, fmt::format("message queue name \"{:.40}...\": {} bytes after the '/', at most "
                                          "NAME_MAX ({}) allowed; use a shorter name",
                                          name, rest.size(), NAME_MAX));
  }
}

/// Checks the attributes against the /proc limits for every caller: the kernel lets a
/// process with CAP_SYS_RESOURCE (root) exceed them, and a program should not behave
/// differently depending on who runs it.
void check_attributes(std::string_view name, const mq_attributes& a) {
  if (a.max_messages < 0 || a.message_size < 0) {
    throw_errno(EINVAL,
                fmt::format("message queue {}: max_messages ({}) and message_size ({}) must be positive "
                            "(0 picks the system default)",
                            name, a.max_messages, a.message_size));
  }
  const long msg_max = read_proc_long(msg_max_file);
  if (msg_max > 0 && a.max_messages > msg_max) {
    throw_errno(EINVAL,
                fmt::format("message queue {}: max_messages {} is above {} ({}); ask for at most {} or "
                            "raise the limit (sysctl fs.mqueue.msg_max={})",
                            name, a.max_messages, msg_max_file, msg_max, msg_max, a.max_messages));
  }
  const long msgsize_max = read_proc_long(msgsize_max_file);
  if (msgsize_max > 0 && a.message_size > msgsize_max) {
    throw_errno(
        EINVAL,
        fmt::format("message queue {}: message_size {} bytes is above {} ({}); ask for at most {} "
                    "or raise the limit (sysctl fs.mqueue.msgsize_max={})",
                    name, a.message_size, msgsize_max_file, msgsize_max, msgsize_max, a.message_size));
  }
}

/// Fills in the system default for an attribute left at 0.
mq_attributes complete_attributes(const mq_attributes& a) {
  mq_attributes r = a;
  if (r.max_messages == 0) {
    r.max_messages = read_proc_long(msg_default_file);
    if (r.max_messages <= 0) r.max_messages = 10;  // the kernel's DFLT_MSG
  }
  if (r.message_size == 0) {
    r.message_size = read_proc_long(msgsize_default_file);
    if (r.message_size <= 0) r.message_size = 8192;  // the kernel's DFLT_MSGSIZE
  }
  return r;
}

/// True when the process could still open a descriptor (so EMFILE came from elsewhere).
bool descriptor_available() noexcept {
  const int fd = ::fcntl(0, F_DUPFD_CLOEXEC, 0);
  if (fd < 0) return errno != EMFILE;
  ::close(fd);
  return true;
}

[[noreturn]] void throw_open_error(int err, std::string_view name, bool creating,
                                   const mq_attributes& wanted) {
  switch (err) {
    case EEXIST:
      throw_errno(err,
                  fmt::format("message queue {} already exists: another program uses it, or a crashed one "
                              "left it behind; pick another name or remove it (message_queue::unlink)",
                              name));
    case ENOENT:
      throw_errno(err,
                  fmt::format("message queue {} does not exist: create it first (message_queue::create, or "
                              "open with mq_open_options::create)",
                              name));
    case EACCES:
      throw_errno(err,
                  fmt::format("message queue {}: permission denied; the queue's mode or owner does not allow "
                              "this access",
                              name));
    case ENOSPC:
      throw_errno(err,
                  fmt::format("message queue {}: too many queues in the system: {} allows {}; remove unused "
                              "queues (mount -t mqueue none /dev/mqueue to list them) or raise the limit "
                              "(sysctl fs.mqueue.queues_max)",
                              name, queues_max_file, read_proc_long(queues_max_file)));
    case ENFILE:
      throw_errno(
          err,
          fmt::format("message queue {}: the system's file table is full (/proc/sys/fs/file-max)", name));
    case EMFILE: {
      rlimit lim{};
      if (creating && descriptor_available()) {
        ::getrlimit(RLIMIT_MSGQUEUE, &lim);
        const mq_attributes a = complete_attributes(wanted);
        throw_errno(
            err, fmt::format("message queue {}: creating it would exceed this user's RLIMIT_MSGQUEUE ({}), "
                             "which counts every queue's max_messages x message_size ({} x {} here) plus "
                             "overhead; remove unused queues, ask for fewer or smaller messages, or raise "
                             "the limit (ulimit -q, setrlimit(RLIMIT_MSGQUEUE))",
                             name, rlimit_text(lim.rlim_cur), a.max_messages, a.message_size));
      }
      ::getrlimit(RLIMIT_NOFILE, &lim);
      throw_errno(err,
                  fmt::format("message queue {}: this process has too many open descriptors (RLIMIT_NOFILE "
                              "{}); close some or raise it (ulimit -n)",
                              name, static_cast<unsigned long long>(lim.rlim_cur)));
    }
    case EINVAL:
      throw_errno(
          err, fmt::format("message queue {}: the kernel refused the name or the attributes (max_messages "
                           "{}, message_size {}; limits in {} and {})",
                           name, wanted.max_messages, wanted.message_size, msg_max_file, msgsize_max_file));
    case ENAMETOOLONG:
      throw_errno(
          err, fmt::format("message queue name \"{:.40}...\" is too long (at most NAME_MAX = {} bytes)", name,
                           NAME_MAX));
    default:
      throw_errno(err, fmt::format("mq_open {}", name));
  }
}

int open_flags(mq_access access) noexcept {
  switch (access) {
    case mq_access::read_only:
      return O_RDONLY;
    case mq_access::write_only:
      return O_WRONLY;
    case mq_access::read_write:
      break;
  }
  return O_RDWR;
}

std::pair<int, mq_attributes> open_queue(std::string_view name, const mq_open_options& opts) {
  check_name(name);
  const std::string path(name);
  int flags = open_flags(opts.access) | O_NONBLOCK | O_CLOEXEC;
  ::mq_attr attr{};
  ::mq_attr* attr_ptr = nullptr;
  if (opts.create) {
    flags |= O_CREAT;
    if (opts.exclusive) flags |= O_EXCL;
    if (opts.attributes.max_messages != 0 || opts.attributes.message_size != 0) {
      // mq_open takes both attributes or neither: the one left at 0 gets its default.
      const mq_attributes full = complete_attributes(opts.attributes);
      check_attributes(name, full);
      attr.mq_maxmsg = full.max_messages;
      attr.mq_msgsize = full.message_size;
      attr_ptr = &attr;
    }
  }
  const mqd_t mqd = ::mq_open(path.c_str(), flags, static_cast<mode_t>(opts.mode), attr_ptr);
  if (mqd == static_cast<mqd_t>(-1)) throw_open_error(errno, name, opts.create, opts.attributes);
  ::mq_attr got{};
  if (::mq_getattr(mqd, &got) != 0) {
    const int err = errno;
    ::mq_close(mqd);
    throw_errno(err, fmt::format("mq_getattr {}", name));
  }
  return {static_cast<int>(mqd), mq_attributes{got.mq_maxmsg, got.mq_msgsize}};
}

}  // namespace

std::optional<mq_labelled_view> mq_split_label(std::span<const std::byte> message) noexcept {
  if (message.size() < mq_label_header_size) return std::nullopt;
  mq_labelled_view v;
  std::memcpy(&v.label, message.data(), sizeof v.label);
  v.payload = message.subspan(mq_label_header_size);
  return v;
}

// ---- message_queue ----

message_queue::message_queue(message_queue&& other) noexcept
    : mqd_(std::exchange(other.mqd_, -1)),
      name_(std::move(other.name_)),
      attributes_(other.attributes_),
      owner_pid_(std::exchange(other.owner_pid_, 0)),
      scratch_(std::move(other.scratch_)) {}

message_queue& message_queue::operator=(message_queue&& other) noexcept {
  if (this != &other) {
    close();
    mqd_ = std::exchange(other.mqd_, -1);
    name_ = std::move(other.name_);
    attributes_ = other.attributes_;
    owner_pid_ = std::exchange(other.owner_pid_, 0);
    scratch_ = std::move(other.scratch_);
  }
  return *this;
}

message_queue::~message_queue() { close(); }

void message_queue::close() noexcept {
  if (mqd_ >= 0) ::mq_close(static_cast<mqd_t>(mqd_));
  mqd_ = -1;
  // A forked child that inherited this object must not remove its parent's queue.
  if (owner_pid_ != 0 && owner_pid_ == ::getpid()) ::mq_unlink(name_.c_str());
  owner_pid_ = 0;
}

message_queue message_queue::create(std::string_view name, const mq_attributes& attributes, mq_access access,
                                    unsigned mode) {
  mq_open_options opts;
  opts.access = access;
  opts.create = true;
  opts.exclusive = true;
  opts.attributes = attributes;
  opts.mode = mode;
  auto [mqd, attrs] = open_queue(name, opts);
  return message_queue{mqd, std::string(name), attrs, ::getpid()};
}

message_queue message_queue::open(std::string_view name, const mq_open_options& opts) {
  auto [mqd, attrs] = open_queue(name, opts);
  return message_queue{mqd, std::string(name), attrs, 0};
}

bool message_queue::unlink(std::string_view name) {
  check_name(name);
  const std::string path(name);
  if (::mq_unlink(path.c_str()) == 0) return true;
  const int err = errno;
  if (err == ENOENT) return false;
  if (err == EACCES) {
    throw_errno(err,
                fmt::format("mq_unlink {}: permission denied (the queue belongs to another user)", name));
  }
  throw_errno(err, fmt::format("mq_unlink {}", name));
}

long message_queue::current_messages() const {
  ::mq_attr a{};
  if (::mq_getattr(static_cast<mqd_t>(mqd_), &a) != 0)
    throw_errno(errno, fmt::format("mq_getattr {}", name_));
  return a.mq_curmsgs;
}

mq_send_operation message_queue::send_labelled(std::uint32_t label, std::span<const std::byte> payload,
                                               unsigned priority) const {
  if (!scratch_) scratch_ = std::make_unique<std::byte[]>(static_cast<std::size_t>(attributes_.message_size));
  return {*this, label, payload, priority};
}

// ---- mq_send_operation ----

mq_send_operation::mq_send_operation(const message_queue& queue, std::span<const std::byte> message,
                                     unsigned priority) noexcept
    : io_operation(&prep, &progress, &attempt),
      queue_(&queue),
      data_(message.data()),
      size_(message.size()),
      priority_(priority) {}

mq_send_operation::mq_send_operation(const message_queue& queue, std::uint32_t label,
                                     std::span<const std::byte> payload, unsigned priority) noexcept
    : io_operation(&prep, &progress, &attempt),
      queue_(&queue),
      data_(payload.data()),
      size_(payload.size()),
      priority_(priority),
      label_(label),
      labelled_(true) {}

void mq_send_operation::prep(detail::op_base& op, ::io_uring_sqe* sqe) noexcept {
  auto& self = static_cast<mq_send_operation&>(op);
  ::io_uring_prep_poll_add(sqe, self.queue_->mqd_, POLLOUT);
}

bool mq_send_operation::try_send() noexcept {
  const auto limit = static_cast<std::size_t>(queue_->attributes_.message_size);
  const std::size_t total = size_ + (labelled_ ? mq_label_header_size : 0);
  if (total > limit) {
    error_ = EMSGSIZE;
    return done_ = true;
  }
  if (priority_ >= mq_priority_max) {
    error_ = EINVAL;
    return done_ = true;
  }
  const char* data = reinterpret_cast<const char*>(data_);
  if (labelled_) {
    // Copied right before the call, with no suspension in between, so one scratch buffer
    // per queue serves every labelled send of this thread.
    std::byte* scratch = queue_->scratch_.get();
    std::memcpy(scratch, &label_, sizeof label_);
    if (size_ != 0) std::memcpy(scratch + mq_label_header_size, data_, size_);
    data = reinterpret_cast<const char*>(scratch);
  }
  for (;;) {
    if (::mq_send(static_cast<mqd_t>(queue_->mqd_), data, total, priority_) == 0) return done_ = true;
    if (errno == EINTR) continue;
    if (errno == EAGAIN) return false;  // full: wait for POLLOUT
    error_ = errno;
    return done_ = true;
  }
}

int mq_send_operation::attempt(detail::op_base& op) noexcept {
  auto& self = static_cast<mq_send_operation&>(op);
  return self.try_send() ? 0 : -EAGAIN;
}

bool mq_send_operation::progress(detail::op_base& op, int res) noexcept {
  auto& self = static_cast<mq_send_operation&>(op);
  if (self.done_ || res < 0) return true;
  // POLLOUT fired, but another sender may fill the room first: then poll again.
  return self.try_send();
}

void mq_send_operation::finish(int res) const {
  const std::string& name = queue_->name_;
  if (!done_) throw_errno(-res, fmt::format("waiting to send to message queue {}", name));
  switch (error_) {
    case 0:
      return;
    case EMSGSIZE:
      throw_errno(error_, fmt::format("message of {} bytes{} is larger than the message size of queue {} ({} "
                                      "bytes); send smaller messages or create the queue with a larger "
                                      "message_size (at most {}: {})",
                                      size_ + (labelled_ ? mq_label_header_size : 0),
                                      labelled_ ? " (with its label header)" : "", name,
                                      queue_->attributes_.message_size, msgsize_max_file,
                                      read_proc_long(msgsize_max_file)));
    case EINVAL:
      if (priority_ >= mq_priority_max) {
        throw_errno(error_, fmt::format("send to message queue {}: priority {} is not below MQ_PRIO_MAX ({})",
                                        name, priority_, mq_priority_max));
      }
      break;
    case EBADF:
      throw_errno(
          error_,
          fmt::format("send to message queue {}: the queue was opened read-only (or is closed)", name));
    default:
      break;
  }
  throw_errno(error_, fmt::format("mq_send {}", name));
}

// ---- mq_receive_operation ----

mq_receive_operation::mq_receive_operation(const message_queue& queue, std::span<std::byte> buffer) noexcept
    : io_operation(&prep, &progress, &attempt), queue_(&queue), data_(buffer.data()), size_(buffer.size()) {}

void mq_receive_operation::prep(detail::op_base& op, ::io_uring_sqe* sqe) noexcept {
  auto& self = static_cast<mq_receive_operation&>(op);
  ::io_uring_prep_poll_add(sqe, self.queue_->mqd_, POLLIN);
}

bool mq_receive_operation::try_receive() noexcept {
  if (size_ < static_cast<std::size_t>(queue_->attributes_.message_size)) {
    error_ = EMSGSIZE;
    return done_ = true;
  }
  for (;;) {
    unsigned prio = 0;
    const ssize_t n =
        ::mq_receive(static_cast<mqd_t>(queue_->mqd_), reinterpret_cast<char*>(data_), size_, &prio);
    if (n >= 0) {
      received_ = {static_cast<std::size_t>(n), prio};
      return done_ = true;
    }
    if (errno == EINTR) continue;
    if (errno == EAGAIN) return false;  // empty: wait for POLLIN
    error_ = errno;
    return done_ = true;
  }
}

int mq_receive_operation::attempt(detail::op_base& op) noexcept {
  auto& self = static_cast<mq_receive_operation&>(op);
  // A receive that found the queue empty is usually followed by another that would
  // (request/response traffic): the next few go straight to the ring's poll, which
  // completes at once when a message is there, and spare the failed mq_receive (one
  // syscall of three per wait). Every eighth tries again, so a busy queue soon takes the
  // cheap path again.
  constexpr std::uint8_t skips_after_empty = 7;
  if (self.queue_->receive_skips_ > 0) {
    --self.queue_->receive_skips_;
    return -EAGAIN;
  }
  if (self.try_receive()) return 0;
  self.queue_->receive_skips_ = skips_after_empty;
  return -EAGAIN;
}

bool mq_receive_operation::progress(detail::op_base& op, int res) noexcept {
  auto& self = static_cast<mq_receive_operation&>(op);
  if (self.done_ || res < 0) return true;
  // POLLIN fired, but a receiver in another process may have taken the message: poll again.
  return self.try_receive();
}

mq_message mq_receive_operation::finish(int res) const {
  const std::string& name = queue_->name_;
  if (!done_) throw_errno(-res, fmt::format("waiting to receive from message queue {}", name));
  switch (error_) {
    case 0:
      return received_;
    case EMSGSIZE:
      throw_errno(error_,
                  fmt::format("receive from message queue {}: the buffer of {} bytes is smaller than the "
                              "queue's message size ({} bytes); pass a buffer of at least that size",
                              name, size_, queue_->attributes_.message_size));
    case EBADF:
      throw_errno(error_, fmt::format("receive from message queue {}: the queue was opened write-only (or is "
                                      "closed)",
                                      name));
    default:
      break;
  }
  throw_errno(error_, fmt::format("mq_receive {}", name));
}

}  // namespace ipcoro
