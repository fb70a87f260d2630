// SPDX-License-Identifier: MIT
// mq_demux: routes labelled messages of one queue to the consumers waiting for each label.
#include "ipcoro/error.hpp"
#include "ipcoro/mqueue.hpp"

#include <fmt/core.h>

#include <cstring>
#include <exception>
#include <optional>
#include <stdexcept>
#include <utility>

namespace ipcoro {

struct mq_demux::slot {
  slot* next = nullptr;
  std::byte* data = nullptr;  ///< the whole message: header, then payload
  mq_message message{};       ///< the payload's size and the priority
};

struct mq_demux::label_state {
  detail::wait_list waiters;
  slot* head = nullptr;  ///< held messages, oldest first
  slot* tail = nullptr;
  std::size_t held = 0;
  std::size_t reserved = 0;  ///< held messages promised to consumers already woken
  std::size_t waiting = 0;   ///< consumers parked with nothing reserved
};

mq_demux::mq_demux(const message_queue& queue, std::uint32_t labels, std::size_t max_held)
    : queue_(&queue), labels_(labels), slot_size_(static_cast<std::size_t>(queue.attributes().message_size)) {
  if (labels == 0) throw std::invalid_argument("mq_demux: needs at least one label");
  if (max_held == 0) throw std::invalid_argument("mq_demux: max_held must be at least 1");
  if (slot_size_ < mq_label_header_size) {
    throw std::invalid_argument(
        fmt::format("mq_demux: queue {} has a message size of {} bytes, too small for the "
                    "{}-byte label header",
                    queue.name(), slot_size_, mq_label_header_size));
  }
  storage_ = std::make_unique<std::byte[]>(slot_size_ * max_held);
  slots_ = std::make_unique<slot[]>(max_held);
  states_ = std::make_unique<label_state[]>(labels);
  for (std::size_t i = max_held; i-- > 0;) {
    slots_[i].data = storage_.get() + i * slot_size_;
    slots_[i].next = free_;
    free_ = &slots_[i];
  }
}

mq_demux::~mq_demux() = default;

task<void> mq_demux::run() {
  if (started_) throw std::logic_error("mq_demux::run: a demux runs once");
  started_ = true;
  if (closed_) co_return;  // closed before it ran: consumers have been told already
  struct forward_stop {
    std::stop_source* source;
    void operator()() const noexcept { source->request_stop(); }
  };
  const std::stop_token outer = co_await get_stop_token();
  std::optional<std::stop_callback<forward_stop>> link;
  if (outer.stop_possible()) link.emplace(outer, forward_stop{&stop_});
  std::exception_ptr failure;
  try {
    co_await pump().with_stop_token(stop_.get_token());
  } catch (const operation_cancelled&) {
    if (!closed_) failure = std::current_exception();
  } catch (...) {
    failure = std::current_exception();
  }
  end(failure);
  if (failure) std::rethrow_exception(failure);
}

task<void> mq_demux::pump() {
  for (;;) {
    // Take a message off the queue only for a waiting consumer, so that a process does
    // not hoard what other processes could handle, and only into a free slot.
    while (!closed_ && (parked_ == 0 || free_ == nullptr)) {
      demand_.reset();
      co_await demand_.wait();
    }
    if (closed_) co_return;
    slot* s = free_;
    free_ = s->next;
    mq_message m;
    try {
      m = co_await queue_->receive(std::span<std::byte>(s->data, slot_size_));
    } catch (...) {
      s->next = free_;
      free_ = s;
      throw;
    }
    deliver(*s, m);
  }
}

void mq_demux::deliver(slot& s, const mq_message& m) {
  std::uint32_t label = 0;
  if (m.size >= mq_label_header_size) std::memcpy(&label, s.data, sizeof label);
  if (m.size < mq_label_header_size || label >= labels_) {
    s.next = free_;
    free_ = &s;
    if (m.size < mq_label_header_size) {
      throw_errno(EBADMSG,
                  fmt::format("mq_demux on queue {}: a message of {} bytes has no label header ({} bytes); "
                              "send with message_queue::send_labelled. The message was dropped",
                              queue_->name(), m.size, mq_label_header_size));
    }
    throw_errno(EBADMSG,
                fmt::format("mq_demux on queue {}: a message with label {} arrived, but this demux routes "
                            "labels 0 to {}; construct it with more labels or fix the sender. The "
                            "message ({} bytes, priority {}) was dropped",
                            queue_->name(), label, labels_ - 1, m.size, m.priority));
  }
  s.message = {m.size - mq_label_header_size, m.priority};
  s.next = nullptr;
  label_state& st = states_[label];
  if (st.tail != nullptr)
    st.tail->next = &s;
  else
    st.head = &s;
  st.tail = &s;
  ++st.held;
  ++held_total_;
  // A consumer cancelled but not yet resumed has left the list already: it gets nothing.
  if (!st.waiters.empty()) {
    --st.waiting;
    --parked_;
    ++st.reserved;
    st.waiters.wake_one();
  }
}

void mq_demux::end(std::exception_ptr failure) noexcept {
  ended_ = true;
  failure_ = std::move(failure);
  for (std::uint32_t i = 0; i < labels_; ++i) {
    states_[i].waiting = 0;
    states_[i].waiters.wake_all();
  }
  parked_ = 0;
}

void mq_demux::close() noexcept {
  if (closed_) return;
  closed_ = true;
  stop_.request_stop();
  demand_.set();
  if (!started_) end(nullptr);  // no pump will run to do it
}

std::optional<mq_message> mq_demux::take(mq_demux_receive_operation& op) {
  label_state& st = states_[op.label_];
  const bool granted = op.parked_ && st.reserved != 0;
  if (!granted && st.held == st.reserved) {
    if (failure_) std::rethrow_exception(failure_);
    return std::nullopt;  // ended, with nothing left for this label
  }
  if (granted) --st.reserved;
  slot* s = st.head;
  st.head = s->next;
  if (st.head == nullptr) st.tail = nullptr;
  --st.held;
  --held_total_;
  const mq_message m = s->message;
  if (m.size != 0) std::memcpy(op.buffer_.data(), s->data + mq_label_header_size, m.size);
  s->next = free_;
  free_ = s;
  demand_.set();  // the pump may be waiting for a free slot
  return m;
}

// ---- mq_demux_receive_operation ----

bool mq_demux_receive_operation::await_ready() noexcept {
  if (label_ >= demux_.labels_) {
    error_ = EINVAL;
    return true;
  }
  if (buffer_.size() < demux_.max_payload()) {
    error_ = EMSGSIZE;
    return true;
  }
  const auto& st = demux_.states_[label_];
  return st.held > st.reserved || demux_.ended_;
}

bool mq_demux_receive_operation::suspend(std::coroutine_handle<> h, const std::stop_token& token) {
  auto& st = demux_.states_[label_];
  if (!park(st.waiters, h, token)) return false;  // already stopped: await_resume throws
  parked_ = true;
  ++st.waiting;
  ++demux_.parked_;
  demux_.demand_.set();
  return true;
}

std::optional<mq_message> mq_demux_receive_operation::resume_untimed() {
  if (error_ == EINVAL) {
    throw_errno(EINVAL, fmt::format("mq_demux on queue {}: label {} is not below the demux's label count {}",
                                    demux_.queue_->name(), label_, demux_.labels_));
  }
  if (error_ == EMSGSIZE) {
    throw_errno(EMSGSIZE,
                fmt::format("mq_demux on queue {}: the buffer of {} bytes is smaller than the largest "
                            "payload ({} bytes: message size less the label header)",
                            demux_.queue_->name(), buffer_.size(), demux_.max_payload()));
  }
  if (parked_) {
    try {
      unpark();
    } catch (...) {
      // Cancelled while still parked: nothing was reserved for it.
      auto& st = demux_.states_[label_];
      if (!demux_.ended_) {
        --st.waiting;
        --demux_.parked_;
      }
      parked_ = false;
      throw;
    }
    if (token_ != nullptr && token_->stop_requested()) {
      // Handed a message as the stop came (it lost a race or a deadline): the message
      // stays held, and the turn goes to the next consumer of the label, if any.
      auto& st = demux_.states_[label_];
      if (st.reserved != 0) {
        if (!st.waiters.empty() && !demux_.ended_) {
          --st.waiting;  // as deliver() does for the consumer it hands the message to
          --demux_.parked_;
          st.waiters.wake_one();
        } else {
          --st.reserved;
        }
      }
      parked_ = false;
      throw operation_cancelled{};
    }
  }
  return demux_.take(*this);
}

}  // namespace ipcoro
