// SPDX-License-Identifier: MIT
// when_all: run tasks concurrently and wait for all of them.
#pragma once

#include "ipcoro/detail/group.hpp"
#include "ipcoro/task.hpp"

#include <optional>
#include <tuple>
#include <utility>
#include <vector>

namespace ipcoro {

namespace detail {
template <class T>
root_task run_into(task<T> t, std::optional<value_or_monostate<T>>& slot, group_state& group) {
  try {
    if constexpr (std::is_void_v<T>) {
      co_await std::move(t);
      slot.emplace();
    } else {
      slot.emplace(co_await std::move(t));
    }
  } catch (...) {
    group.record_failure(std::current_exception());
  }
}
}  // namespace detail

/// Runs every task concurrently on this loop and completes when all have finished, with
/// their results in order (`std::monostate` for `task<void>`, std::reference_wrapper for
/// `task<U&>`). When one fails, the others are cancelled through their stop token, all are
/// awaited, and the first error is rethrown. If a child ends with operation_cancelled
/// (there is then no complete result), when_all throws operation_cancelled too.
template <class... T>
[[nodiscard]] task<std::tuple<detail::value_or_monostate<T>...>> when_all(task<T>... tasks) {
  detail::group_state group;
  group.follow(co_await get_stop_token());
  std::tuple<std::optional<detail::value_or_monostate<T>>...> slots;
  [&]<std::size_t... I>(std::index_sequence<I...>) {
    (group.launch(detail::run_into(std::move(tasks), std::get<I>(slots), group)), ...);
  }
  (std::index_sequence_for<T...>{});
  co_await group.join();
  group.rethrow_error();
  group.rethrow_cancellation();
  co_return std::apply(
      [](auto&... slot) { return std::tuple<detail::value_or_monostate<T>...>(std::move(*slot)...); }, slots);
}

/// when_all over a run-time number of tasks of one type; results in input order.
template <class T>
[[nodiscard]] task<std::conditional_t<std::is_void_v<T>, void, std::vector<detail::value_or_monostate<T>>>>
when_all(std::vector<task<T>> tasks) {
  detail::group_state group;
  group.follow(co_await get_stop_token());
  std::vector<std::optional<detail::value_or_monostate<T>>> slots(tasks.size());
  for (std::size_t i = 0; i < tasks.size(); ++i) {
    group.launch(detail::run_into(std::move(tasks[i]), slots[i], group));
  }
  co_await group.join();
  group.rethrow_error();
  group.rethrow_cancellation();
  if constexpr (!std::is_void_v<T>) {
    std::vector<detail::value_or_monostate<T>> out;
    out.reserve(slots.size());
    for (auto& slot : slots) out.push_back(std::move(*slot));
    co_return out;
  }
}

}  // namespace ipcoro
