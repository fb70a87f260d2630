// SPDX-License-Identifier: MIT
// when_any: race tasks; the first to finish wins and the rest are cancelled and awaited.
#pragma once

#include "ipcoro/detail/group.hpp"
#include "ipcoro/task.hpp"

#include <optional>
#include <utility>
#include <variant>
#include <vector>

namespace ipcoro {

namespace detail {
template <std::size_t I, class T, class Result>
root_task run_race(task<T> t, std::optional<Result>& winner, group_state& group) {
  try {
    if constexpr (std::is_void_v<T>) {
      co_await std::move(t);
      if (group.claim(I)) winner.emplace(std::in_place_index<I>);
    } else {
      decltype(auto) value = co_await std::move(t);  // T& stays a reference
      if (group.claim(I)) winner.emplace(std::in_place_index<I>, static_cast<T&&>(value));
    }
  } catch (...) {
    group.claim(I);
    group.record_failure(std::current_exception());
  }
}

template <class T>
root_task run_race_at(task<T> t, std::size_t index, std::optional<value_or_monostate<T>>& winner,
                      group_state& group) {
  try {
    if constexpr (std::is_void_v<T>) {
      co_await std::move(t);
      if (group.claim(index)) winner.emplace();
    } else {
      decltype(auto) value = co_await std::move(t);  // T& stays a reference
      if (group.claim(index)) winner.emplace(static_cast<T&&>(value));
    }
  } catch (...) {
    group.claim(index);
    group.record_failure(std::current_exception());
  }
}
}  // namespace detail

/// Runs the tasks concurrently. The first to finish wins: the others are cancelled through
/// their stop token and awaited (so nothing they own outlives the call), then the winner's
/// result is returned as a variant whose index is the winner's position
/// (`std::monostate` for `task<void>`). If the winner failed, or a loser failed with
/// anything but operation_cancelled, that error is rethrown.
template <class... T>
[[nodiscard]] task<std::variant<detail::value_or_monostate<T>...>> when_any(task<T>... tasks) {
  using result = std::variant<detail::value_or_monostate<T>...>;
  detail::group_state group;
  group.follow(co_await get_stop_token());
  std::optional<result> winner;
  [&]<std::size_t... I>(std::index_sequence<I...>) {
    (group.launch(detail::run_race<I>(std::move(tasks), winner, group)), ...);
  }
  (std::index_sequence_for<T...>{});
  co_await group.join();
  group.rethrow_error();
  if (!winner) group.rethrow_cancellation();
  co_return std::move(*winner);
}

/// The result of when_any over a vector: which task won, and its value.
template <class T>
struct when_any_result {
  std::size_t index;
  detail::value_or_monostate<T> value;
};

/// when_any over a run-time number of tasks of one type. Requires at least one task.
template <class T>
[[nodiscard]] task<when_any_result<T>> when_any(std::vector<task<T>> tasks) {
  if (tasks.empty()) throw std::invalid_argument("ipcoro::when_any: no tasks to wait for");
  detail::group_state group;
  group.follow(co_await get_stop_token());
  std::optional<detail::value_or_monostate<T>> winner;
  for (std::size_t i = 0; i < tasks.size(); ++i) {
    group.launch(detail::run_race_at(std::move(tasks[i]), i, winner, group));
  }
  co_await group.join();
  group.rethrow_error();
  if (!winner) group.rethrow_cancellation();
  co_return when_any_result<T>{group.winner(), std::move(*winner)};
}

}  // namespace ipcoro
