// SPDX-License-Identifier: MIT
// intrusive_queue: the one FIFO of objects linked through their own members (no allocation).
#pragma once

#include <utility>

namespace ipcoro::detail {

/// A FIFO of `T`s linked through the member `Next` (and, when given, `Prev`). It owns
/// nothing: an element must stay alive, and in one queue of this kind at a time, until it
/// is popped or removed. With `Prev`, remove() unlinks any element in O(1); without, the
/// links cost one pointer per element and only the front can leave.
template <class T, T* T::*Next, T* T::*Prev = nullptr>
class intrusive_queue {
 public:
  static constexpr bool doubly_linked = Prev != nullptr;

  intrusive_queue() noexcept = default;
  intrusive_queue(const intrusive_queue&) = delete;
  intrusive_queue& operator=(const intrusive_queue&) = delete;
  intrusive_queue(intrusive_queue&& other) noexcept : head_(other.head_), tail_(other.tail_) {
    other.head_ = other.tail_ = nullptr;
  }

  bool empty() const noexcept { return head_ == nullptr; }
  T* front() const noexcept { return head_; }
  /// The element after `x` in its queue, or nullptr.
  static T* next(const T& x) noexcept { return x.*Next; }

  void push_back(T& x) noexcept {
    x.*Next = nullptr;
    if constexpr (doubly_linked) x.*Prev = tail_;
    if (tail_ != nullptr)
      tail_->*Next = &x;
    else
      head_ = &x;
    tail_ = &x;
  }

  /// Unlinks and returns the oldest element, or nullptr when empty. Reads nothing from the
  /// element after returning it, so the caller may resume (and so free) it at once.
  T* pop_front() noexcept {
    T* x = head_;
    if (x == nullptr) return nullptr;
    head_ = x->*Next;
    if (head_ == nullptr) {
      tail_ = nullptr;
    } else if constexpr (doubly_linked) {
      head_->*Prev = nullptr;
    }
    if constexpr (doubly_linked) x->*Next = nullptr;
    return x;
  }

  /// Unlinks `x`, which must be in this queue.
  void remove(T& x) noexcept requires doubly_linked {
    if (x.*Prev != nullptr)
      x.*Prev->*Next = x.*Next;
    else
      head_ = x.*Next;
    if (x.*Next != nullptr)
      x.*Next->*Prev = x.*Prev;
    else
      tail_ = x.*Prev;
    x.*Prev = x.*Next = nullptr;
  }

  /// True when `x` is in this queue (a walk from the front).
  bool contains(const T& x) const noexcept {
    for (const T* p = head_; p != nullptr; p = p->*Next) {
      if (p == &x) return true;
    }
    return false;
  }

  /// Moves every element out into the returned queue, leaving this one empty.
  [[nodiscard]] intrusive_queue take_all() noexcept { return intrusive_queue(std::move(*this)); }

 private:
  T* head_ = nullptr;
  T* tail_ = nullptr;
};

}  // namespace ipcoro::detail
