// SPDX-License-Identifier: MIT
// Tests of the coroutine core: task, stop-token inheritance, when_all, when_any, scopes, spawn, sync_wait.
#include "ipcoro/ipcoro.hpp"

#include <catch2/catch.hpp>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstddef>
#include <memory>
#include <stdexcept>
#include <stop_token>
#include <string>
#include <tuple>
#include <utility>
#include <variant>
#include <vector>

using namespace ipcoro;
using namespace std::chrono_literals;

namespace {

// ---- small building blocks (free functions: their parameters live in the frame) ----

task<int> value_now(int v) { co_return v; }

task<int> value_after_nop(int v) {
  co_await nop();
  co_return v;
}

task<int> value_after_sleep(std::chrono::milliseconds d, int v) {
  co_await sleep_for(d);
  co_return v;
}

task<void> fail_now(const char* what) {
  throw std::runtime_error(what);
  co_return;
}

task<void> fail_after_nop(const char* what) {
  co_await nop();
  throw std::runtime_error(what);
}

task<int> int_fail_after_nop(const char* what) {
  co_await nop();
  throw std::runtime_error(what);
}

// Waits for `ev`; records operation_cancelled in `cancelled` and lets it propagate.
task<void> wait_noting_cancel(event& ev, bool& cancelled) {
  try {
    co_await ev.wait();
  } catch (const operation_cancelled&) {
    cancelled = true;
    throw;
  }
}

task<int> int_wait_noting_cancel(event& ev, bool& cancelled) {
  co_await wait_noting_cancel(ev, cancelled);
  co_return -1;
}

task<void> sleep_noting_cancel(std::chrono::milliseconds d, bool& cancelled) {
  try {
    co_await sleep_for(d);
  } catch (const operation_cancelled&) {
    cancelled = true;
    throw;
  }
}

task<int> int_sleep_noting_cancel(std::chrono::milliseconds d, bool& cancelled) {
  co_await sleep_noting_cancel(d, cancelled);
  co_return -1;
}

task<int> read_noting_cancel(const pipe_reader& r, bool& cancelled) {
  std::array<std::byte, 16> buf{};
  try {
    co_return static_cast<int>(co_await r.read(buf));
  } catch (const operation_cancelled&) {
    cancelled = true;
    throw;
  }
}

// One asynchronous step that the stop request cannot interrupt (it runs under an empty
// token), so whoever waits for the caller must also wait for this.
task<void> shielded_step(bool& done) {
  co_await nop();
  done = true;
}

// Sleeps for a long time; once cancelled, finishes an asynchronous clean-up step before
// ending with operation_cancelled. `cleaned` turns true only at the very end.
task<int> sleep_then_clean_up(bool& cleaned) {
  bool cancelled = false;
  try {
    co_await sleep_for(30s);
  } catch (const operation_cancelled&) {
    cancelled = true;
  }
  if (cancelled) {
    bool step = false;
    co_await shielded_step(step).with_stop_token(std::stop_token{});
    cleaned = step;
  }
  throw operation_cancelled{};
}

task<void> request_stop_after_nop(std::stop_source& source) {
  co_await nop();
  source.request_stop();
}

task<void> set_after_nop(event& ev) {
  co_await nop();
  ev.set();
}

// Keeps a count of live instances, to prove that frames holding one were destroyed.
struct instance_counter {
  explicit instance_counter(int& n) : n_(n) { ++n_; }
  instance_counter(const instance_counter&) = delete;
  instance_counter& operator=(const instance_counter&) = delete;
  ~instance_counter() { --n_; }
  int& n_;
};

}  // namespace

// ============================== task ==============================

TEST_CASE("a task hands its value to sync_wait", "[task][sync_wait]") {
  io_context ctx;
  CHECK(sync_wait(ctx, value_now(42)) == 42);
  CHECK(sync_wait(ctx, value_after_nop(7)) == 7);
}

namespace {
task<std::unique_ptr<int>> make_boxed(int v) {
  co_await nop();
  co_return std::make_unique<int>(v);
}
task<int> unbox_sum() {
  std::unique_ptr<int> a = co_await make_boxed(3);
  std::unique_ptr<int> b = co_await make_boxed(4);
  co_return *a + *b;
}
}  // namespace

TEST_CASE("a task can return a move-only value", "[task]") {
  io_context ctx;
  std::unique_ptr<int> p = sync_wait(ctx, make_boxed(11));
  REQUIRE(p != nullptr);
  CHECK(*p == 11);
  CHECK(sync_wait(ctx, unbox_sum()) == 7);
}

namespace {
task<int&> pick(std::array<int, 3>& values, std::size_t i) {
  co_await nop();
  co_return values[i];
}
task<void> bump_through_reference(std::array<int, 3>& values, const int*& seen) {
  int& r = co_await pick(values, 1);
  seen = &r;
  r += 100;
}
}  // namespace

TEST_CASE("a task<int&> returns a reference to the very object, not a copy", "[task]") {
  io_context ctx;
  std::array<int, 3> values{1, 2, 3};
  const int* seen = nullptr;
  sync_wait(ctx, bump_through_reference(values, seen));
  CHECK(seen == &values[1]);
  CHECK(values[1] == 102);
}

TEST_CASE("sync_wait, when_all and when_any hand back references from task<int&>",
          "[task][when_all][when_any]") {
  io_context ctx;
  std::array<int, 3> values{1, 2, 3};
  int& direct = sync_wait(ctx, pick(values, 2));
  CHECK(&direct == &values[2]);

  auto [a, b] = sync_wait(ctx, when_all(pick(values, 0), pick(values, 1)));
  CHECK(&a.get() == &values[0]);
  CHECK(&b.get() == &values[1]);

  std::vector<task<int&>> many;
  for (std::size_t i = 0; i < values.size(); ++i) many.push_back(pick(values, i));
  auto refs = sync_wait(ctx, when_all(std::move(many)));
  REQUIRE(refs.size() == 3);
  for (std::size_t i = 0; i < refs.size(); ++i) CHECK(&refs[i].get() == &values[i]);

  auto winner = sync_wait(ctx, when_any(pick(values, 1), pick(values, 2)));
  const int* won = winner.index() == 0 ? &std::get<0>(winner).get() : &std::get<1>(winner).get();
  CHECK(won == &values[1 + winner.index()]);
}

namespace {
task<void> append(std::vector<int>& out, int v) {
  co_await nop();
  out.push_back(v);
}
task<void> append_three(std::vector<int>& out) {
  co_await append(out, 1);
  co_await append(out, 2);
  co_await append(out, 3);
}
}  // namespace

TEST_CASE("a task<void> runs to completion and its effects are visible after sync_wait", "[task]") {
  io_context ctx;
  std::vector<int> out;
  sync_wait(ctx, append_three(out));
  CHECK(out == std::vector<int>{1, 2, 3});
}

namespace {
task<void> mark_started(bool& started) {
  started = true;
  co_return;
}
task<void> check_laziness(bool& started, bool& seen_before_await) {
  task<void> child = mark_started(started);
  co_await nop();  // the loop turns; a lazy child must still not have run
  seen_before_await = started;
  co_await std::move(child);
}
}  // namespace

TEST_CASE("a task does not start until it is awaited", "[task]") {
  io_context ctx;
  bool started = false;
  {
    task<void> t = mark_started(started);
    CHECK_FALSE(started);
    CHECK_FALSE(t.done());
  }  // destroyed without ever running
  CHECK_FALSE(started);

  bool seen_before_await = true;
  sync_wait(ctx, check_laziness(started, seen_before_await));
  CHECK_FALSE(seen_before_await);
  CHECK(started);
}

namespace {
task<std::string> catch_child_failure() {
  try {
    co_await fail_after_nop("child broke");
  } catch (const std::runtime_error& e) {
    co_return std::string("caught: ") + e.what();
  }
  co_return "not thrown";
}
}  // namespace

TEST_CASE("a task's exception reaches its awaiter and propagates out of sync_wait", "[task][sync_wait]") {
  io_context ctx;
  CHECK(sync_wait(ctx, catch_child_failure()) == "caught: child broke");
  CHECK_THROWS_WITH(sync_wait(ctx, fail_now("thrown before suspending")), "thrown before suspending");
  CHECK_THROWS_WITH(sync_wait(ctx, fail_after_nop("thrown after suspending")), "thrown after suspending");
  CHECK_THROWS_AS(sync_wait(ctx, int_fail_after_nop("typed")), std::runtime_error);
}

namespace {
task<int> await_empty_and_moved_from(int& logic_errors) {
  task<int> empty;
  try {
    co_await std::move(empty);
  } catch (const std::logic_error&) {
    ++logic_errors;
  }
  task<int> original = value_now(5);
  task<int> moved_to = std::move(original);
  try {
    co_await original;  // moved from: must throw
  } catch (const std::logic_error&) {
    ++logic_errors;
  }
  co_return co_await std::move(moved_to);
}
}  // namespace

TEST_CASE("awaiting an empty or moved-from task throws std::logic_error", "[task]") {
  io_context ctx;
  int logic_errors = 0;
  CHECK(sync_wait(ctx, await_empty_and_moved_from(logic_errors)) == 5);
  CHECK(logic_errors == 2);
  CHECK_THROWS_AS(sync_wait(ctx, task<int>{}), std::logic_error);

  task<int> a = value_now(1);
  task<int> b = std::move(a);
  CHECK_FALSE(a.valid());
  CHECK(b.valid());
  CHECK_THROWS_AS(sync_wait(ctx, std::move(a)), std::logic_error);
  CHECK(sync_wait(ctx, std::move(b)) == 1);
}

namespace {
task<int> one() { co_return 1; }
task<long> sum_of_ones(int n) {
  long sum = 0;
  for (int i = 0; i < n; ++i) sum += co_await one();
  co_return sum;
}
}  // namespace

TEST_CASE("a million sequential awaits of tasks that finish at once run in constant stack", "[task]") {
  io_context ctx;
  CHECK(sync_wait(ctx, sum_of_ones(1'000'000)) == 1'000'000);
}

namespace {
task<int> chain(int depth, bool suspend_at_bottom) {
  if (depth == 0) {
    if (suspend_at_bottom) co_await nop();
    co_return 0;
  }
  co_return 1 + co_await chain(depth - 1, suspend_at_bottom);
}
}  // namespace

TEST_CASE("a chain of 2000 nested tasks each awaiting the next completes", "[task]") {
  io_context ctx;
  CHECK(sync_wait(ctx, chain(2000, false)) == 2000);
  CHECK(sync_wait(ctx, chain(2000, true)) == 2000);
}

// ============================== stop tokens ==============================

namespace {
task<std::stop_token> token_of_grandchild() { co_return co_await get_stop_token(); }
task<std::stop_token> token_of_child_chain(std::stop_token& child) {
  child = co_await get_stop_token();
  co_return co_await token_of_grandchild();
}
task<void> check_inheritance(bool& ok) {
  std::stop_token mine = co_await get_stop_token();
  std::stop_token child;
  std::stop_token grandchild = co_await token_of_child_chain(child);
  ok = mine.stop_possible() && child == mine && grandchild == mine;
}
}  // namespace

TEST_CASE("a child task sees its parent's stop token", "[task]") {
  io_context ctx;
  bool ok = false;
  sync_wait(ctx, check_inheritance(ok));
  CHECK(ok);
}

namespace {
task<void> check_override(bool& child_has_override, bool& grandchild_has_override, bool& parent_unchanged,
                          bool& empty_token_unstoppable) {
  std::stop_token mine = co_await get_stop_token();
  std::stop_source other;
  std::stop_token child;
  std::stop_token grandchild = co_await token_of_child_chain(child).with_stop_token(other.get_token());
  child_has_override = child == other.get_token() && child != mine;
  grandchild_has_override = grandchild == other.get_token();
  parent_unchanged = (co_await get_stop_token()) == mine;
  std::stop_token none = co_await token_of_grandchild().with_stop_token(std::stop_token{});
  empty_token_unstoppable = !none.stop_possible();
}

task<void> override_cancels_only_the_child(bool& child_cancelled, bool& parent_went_on) {
  std::stop_source stopped;
  stopped.request_stop();
  try {
    co_await sleep_noting_cancel(30s, child_cancelled).with_stop_token(stopped.get_token());
  } catch (const operation_cancelled&) {
  }
  co_await nop();  // the parent's own token is untouched
  parent_went_on = true;
}
}  // namespace

TEST_CASE("with_stop_token runs a task under the given token instead of its parent's", "[task]") {
  io_context ctx;
  bool child_has_override = false;
  bool grandchild_has_override = false;
  bool parent_unchanged = false;
  bool empty_token_unstoppable = false;
  sync_wait(ctx, check_override(child_has_override, grandchild_has_override, parent_unchanged,
                                empty_token_unstoppable));
  CHECK(child_has_override);
  CHECK(grandchild_has_override);
  CHECK(parent_unchanged);
  CHECK(empty_token_unstoppable);

  bool child_cancelled = false;
  bool parent_went_on = false;
  const auto start = std::chrono::steady_clock::now();
  sync_wait(ctx, override_cancels_only_the_child(child_cancelled, parent_went_on));
  CHECK(std::chrono::steady_clock::now() - start < 5s);
  CHECK(child_cancelled);
  CHECK(parent_went_on);
}

namespace {
task<int> nested_sleeper(int depth, bool& cancelled) {
  if (depth == 0) co_return co_await int_sleep_noting_cancel(30s, cancelled);
  co_return co_await nested_sleeper(depth - 1, cancelled);
}
task<void> cancel_deep(bool& cancelled, bool& propagated) {
  std::stop_source source;
  try {
    co_await when_all(nested_sleeper(5, cancelled).with_stop_token(source.get_token()),
                      request_stop_after_nop(source));
  } catch (const operation_cancelled&) {
    propagated = true;
  }
}
}  // namespace

TEST_CASE("a stop request on a parent's token cancels the operation its descendant waits on", "[task]") {
  io_context ctx;
  bool cancelled = false;
  bool propagated = false;
  const auto start = std::chrono::steady_clock::now();
  sync_wait(ctx, cancel_deep(cancelled, propagated));
  CHECK(std::chrono::steady_clock::now() - start < 5s);
  CHECK(cancelled);
  CHECK(propagated);
}

// ============================== when_all ==============================

namespace {
task<int> int_when_set(event& ev, std::vector<int>& order) {
  co_await ev.wait();
  order.push_back(0);
  co_return 7;
}
task<std::string> string_when_set(event& ev, std::vector<int>& order) {
  co_await ev.wait();
  order.push_back(1);
  co_return "seven";
}
task<void> void_when_set(event& ev, std::vector<int>& order) {
  co_await ev.wait();
  order.push_back(2);
}
task<std::unique_ptr<int>> ptr_when_set(event& ev, std::vector<int>& order) {
  co_await ev.wait();
  order.push_back(3);
  co_return std::make_unique<int>(77);
}
task<void> set_in_turn(std::vector<event*> events) {
  for (event* ev : events) {
    co_await nop();
    ev->set();
  }
}
task<void> mixed_when_all(std::vector<int>& order, bool& results_ok) {
  event e0, e1, e2, e3;
  std::vector<event*> release_order;  // not a braced list: GCC 12 mishandles one inside co_await
  release_order.push_back(&e3);
  release_order.push_back(&e1);
  release_order.push_back(&e0);
  release_order.push_back(&e2);
  auto both = co_await when_all(when_all(int_when_set(e0, order), string_when_set(e1, order),
                                         void_when_set(e2, order), ptr_when_set(e3, order)),
                                set_in_turn(std::move(release_order)));
  static_assert(
      std::is_same_v<
          decltype(both),
          std::tuple<std::tuple<int, std::string, std::monostate, std::unique_ptr<int>>, std::monostate>>);
  auto& results = std::get<0>(both);
  const std::unique_ptr<int>& p = std::get<3>(results);
  results_ok = std::get<0>(results) == 7 && std::get<1>(results) == "seven" && p != nullptr && *p == 77;
}
}  // namespace

TEST_CASE("when_all returns mixed results, void included, in argument order whatever the finishing order",
          "[when_all]") {
  io_context ctx;
  std::vector<int> order;
  bool results_ok = false;
  sync_wait(ctx, mixed_when_all(order, results_ok));
  CHECK(order == std::vector<int>{3, 1, 0, 2});
  CHECK(results_ok);
}

namespace {
task<int> sleep_then_record(std::chrono::milliseconds d, int v, std::vector<int>& finished) {
  co_await sleep_for(d);
  finished.push_back(v);
  co_return v;
}
}  // namespace

TEST_CASE("when_all over a vector returns results in input order when timers finish out of order",
          "[when_all]") {
  io_context ctx;
  std::vector<int> finished;
  std::vector<task<int>> tasks;
  tasks.push_back(sleep_then_record(45ms, 0, finished));
  tasks.push_back(sleep_then_record(5ms, 1, finished));
  tasks.push_back(sleep_then_record(25ms, 2, finished));
  tasks.push_back(value_now(3));
  std::vector<int> results = sync_wait(ctx, when_all(std::move(tasks)));
  CHECK(results == std::vector<int>{0, 1, 2, 3});
  CHECK(finished == std::vector<int>{1, 2, 0});

  std::vector<int> out;
  std::vector<task<void>> voids;
  for (int i = 0; i < 4; ++i) voids.push_back(append(out, i));
  sync_wait(ctx, when_all(std::move(voids)));
  CHECK(out.size() == 4);

  CHECK(sync_wait(ctx, when_all(std::vector<task<int>>{})).empty());
}

namespace {
task<void> first_failure_cancels(event& never, bool& waiter_cancelled, bool& sleeper_cancelled,
                                 std::string& error) {
  try {
    co_await when_all(int_wait_noting_cancel(never, waiter_cancelled), int_fail_after_nop("first failure"),
                      int_sleep_noting_cancel(30s, sleeper_cancelled));
  } catch (const std::runtime_error& e) {
    error = e.what();
  }
}
}  // namespace

TEST_CASE("when_all cancels the siblings of the first failure, awaits them and rethrows it", "[when_all]") {
  io_context ctx;
  event never;
  bool waiter_cancelled = false;
  bool sleeper_cancelled = false;
  std::string error;
  const auto start = std::chrono::steady_clock::now();
  sync_wait(ctx, first_failure_cancels(never, waiter_cancelled, sleeper_cancelled, error));
  CHECK(std::chrono::steady_clock::now() - start < 5s);
  CHECK(error == "first failure");
  CHECK(waiter_cancelled);
  CHECK(sleeper_cancelled);
}

namespace {
task<void> raise_after_cancel(std::vector<int>& order, bool& cleaned, bool& cleaned_when_thrown,
                              std::string& error) {
  std::vector<task<int>> tasks;
  tasks.push_back(sleep_then_clean_up(cleaned));
  tasks.push_back(int_fail_after_nop("vector failure"));
  tasks.push_back(sleep_then_record(1ms, 2, order));
  try {
    co_await when_all(std::move(tasks));
  } catch (const std::runtime_error& e) {
    error = e.what();
    cleaned_when_thrown = cleaned;
  }
}
}  // namespace

TEST_CASE("when_all over a vector waits for a cancelled sibling's asynchronous clean-up before rethrowing",
          "[when_all]") {
  io_context ctx;
  std::vector<int> order;
  bool cleaned = false;
  bool cleaned_when_thrown = false;
  std::string error;
  sync_wait(ctx, raise_after_cancel(order, cleaned, cleaned_when_thrown, error));
  CHECK(error == "vector failure");
  CHECK(cleaned_when_thrown);
}

TEST_CASE("when_all rethrows a failure that happens before the siblings even start", "[when_all]") {
  io_context ctx;
  event never;
  bool waiter_cancelled = false;
  CHECK_THROWS_WITH(
      sync_wait(ctx, when_all(fail_now("at once"), wait_noting_cancel(never, waiter_cancelled))), "at once");
  CHECK(waiter_cancelled);
}

namespace {
task<void> cancel_when_all(event& never, const pipe_reader& r, std::array<bool, 3>& cancelled,
                           bool& rethrown) {
  std::stop_source source;
  try {
    co_await when_all(
        when_all(int_wait_noting_cancel(never, cancelled[0]), int_sleep_noting_cancel(30s, cancelled[1]),
                 read_noting_cancel(r, cancelled[2]))
            .with_stop_token(source.get_token()),
        request_stop_after_nop(source));
  } catch (const operation_cancelled&) {
    rethrown = true;
  }
}
}  // namespace

TEST_CASE("cancelling the parent of when_all reaches every child", "[when_all]") {
  io_context ctx;
  event never;
  auto [r, w] = make_pipe();
  std::array<bool, 3> cancelled{};
  bool rethrown = false;
  const auto start = std::chrono::steady_clock::now();
  sync_wait(ctx, cancel_when_all(never, r, cancelled, rethrown));
  CHECK(std::chrono::steady_clock::now() - start < 5s);
  CHECK(cancelled == std::array<bool, 3>{true, true, true});
  CHECK(rethrown);
}

// ============================== when_any ==============================

namespace {
task<void> race_with_cleanup(std::size_t& index, int& value, bool& cleaned_on_return) {
  bool cleaned = false;
  auto result = co_await when_any(sleep_then_clean_up(cleaned), value_after_nop(5));
  cleaned_on_return = cleaned;  // checked before anything else can run
  index = result.index();
  value = std::get<1>(result);
}
}  // namespace

TEST_CASE("when_any returns the winner and has cancelled and awaited the losers before returning",
          "[when_any]") {
  io_context ctx;
  std::size_t index = 99;
  int value = 0;
  bool cleaned_on_return = false;
  const auto start = std::chrono::steady_clock::now();
  sync_wait(ctx, race_with_cleanup(index, value, cleaned_on_return));
  CHECK(std::chrono::steady_clock::now() - start < 5s);
  CHECK(index == 1);
  CHECK(value == 5);
  CHECK(cleaned_on_return);
}

namespace {
task<std::string> string_after_sleep(std::chrono::milliseconds d, std::string s) {
  co_await sleep_for(d);
  co_return s;
}
task<void> void_after_sleep(std::chrono::milliseconds d) { co_await sleep_for(d); }
}  // namespace

TEST_CASE("when_any over mixed types reports the winner's index and value", "[when_any]") {
  io_context ctx;
  auto a = sync_wait(
      ctx, when_any(value_after_sleep(40ms, 1), string_after_sleep(5ms, "fast"), void_after_sleep(60ms)));
  REQUIRE(a.index() == 1);
  CHECK(std::get<1>(a) == "fast");

  auto b = sync_wait(
      ctx, when_any(value_after_sleep(40ms, 1), string_after_sleep(60ms, "slow"), void_after_sleep(5ms)));
  CHECK(b.index() == 2);

  // Both finish without suspending: the first one started wins.
  auto c = sync_wait(ctx, when_any(value_now(10), value_now(20)));
  REQUIRE(c.index() == 0);
  CHECK(std::get<0>(c) == 10);
}

namespace {
task<void> race_against_pipe(const pipe_reader& r, bool& loser_cancelled, bool& cancelled_on_return,
                             std::size_t& index) {
  auto result = co_await when_any(read_noting_cancel(r, loser_cancelled), value_after_sleep(5ms, 9));
  cancelled_on_return = loser_cancelled;
  index = result.index();
}
}  // namespace

TEST_CASE("a when_any loser blocked reading a pipe nobody writes to is cancelled", "[when_any]") {
  io_context ctx;
  auto [r, w] = make_pipe();  // the writer stays open, so the read can only end by cancellation
  bool loser_cancelled = false;
  bool cancelled_on_return = false;
  std::size_t index = 99;
  sync_wait(ctx, race_against_pipe(r, loser_cancelled, cancelled_on_return, index));
  CHECK(index == 1);
  CHECK(cancelled_on_return);
}

namespace {
task<void> winner_fails(bool& loser_cancelled, std::string& error) {
  try {
    (void)co_await when_any(int_fail_after_nop("winner broke"),
                            int_sleep_noting_cancel(30s, loser_cancelled));
  } catch (const std::runtime_error& e) {
    error = e.what();
  }
}

task<int> fail_on_cancel(event& ev) {
  try {
    co_await ev.wait();
  } catch (const operation_cancelled&) {
    throw std::runtime_error("loser failed while unwinding");
  }
  co_return 0;
}
}  // namespace

TEST_CASE("when_any rethrows the winner's exception after cancelling the losers", "[when_any]") {
  io_context ctx;
  bool loser_cancelled = false;
  std::string error;
  const auto start = std::chrono::steady_clock::now();
  sync_wait(ctx, winner_fails(loser_cancelled, error));
  CHECK(std::chrono::steady_clock::now() - start < 5s);
  CHECK(error == "winner broke");
  CHECK(loser_cancelled);

  // A loser that fails with anything but operation_cancelled is not swallowed either.
  event never;
  CHECK_THROWS_WITH(sync_wait(ctx, when_any(value_after_nop(1), fail_on_cancel(never))),
                    "loser failed while unwinding");
}

TEST_CASE("when_any over a vector reports the winner's position and value", "[when_any]") {
  io_context ctx;
  std::vector<int> finished;
  bool cleaned = false;
  std::vector<task<int>> tasks;
  tasks.push_back(sleep_then_record(60ms, 0, finished));
  tasks.push_back(sleep_then_clean_up(cleaned));
  tasks.push_back(sleep_then_record(5ms, 2, finished));
  tasks.push_back(sleep_then_record(40ms, 3, finished));
  when_any_result<int> result = sync_wait(ctx, when_any(std::move(tasks)));
  CHECK(result.index == 2);
  CHECK(result.value == 2);
  CHECK(finished == std::vector<int>{2});  // the others were cancelled, not left to finish
  CHECK(cleaned);

  std::vector<task<void>> voids;
  voids.push_back(void_after_sleep(50ms));
  voids.push_back(void_after_sleep(1ms));
  CHECK(sync_wait(ctx, when_any(std::move(voids))).index == 1);
}

TEST_CASE("when_any over an empty vector throws", "[when_any]") {
  io_context ctx;
  CHECK_THROWS_AS(sync_wait(ctx, when_any(std::vector<task<int>>{})), std::invalid_argument);
}

// ============================== scopes ==============================

namespace {
task<void> count_after_sleep(std::chrono::milliseconds d, int& counter) {
  co_await sleep_for(d);
  ++counter;
}
}  // namespace

TEST_CASE("with_scope joins every spawned child before it returns", "[scope]") {
  io_context ctx;
  int counter = 0;
  bool body_done = false;
  int counter_after_body = -1;
  auto body = [&](scope& s) -> task<void> {
    for (int i = 0; i < 3; ++i) s.spawn(count_after_sleep(std::chrono::milliseconds(5 * (i + 1)), counter));
    s.spawn(value_now(1));  // a task with a value: the value is discarded
    counter_after_body = counter;
    body_done = true;
    co_return;
  };
  sync_wait(ctx, with_scope(body));
  CHECK(body_done);
  CHECK(counter_after_body == 0);
  CHECK(counter == 3);
}

namespace {
task<void> scope_child_fails(event& never, bool& child_cancelled, bool& body_cancelled,
                             bool& sleeper_cancelled, std::string& error) {
  try {
    co_await with_scope([&](scope& s) -> task<void> {
      s.spawn(wait_noting_cancel(never, child_cancelled));
      s.spawn(sleep_noting_cancel(30s, sleeper_cancelled));
      s.spawn(fail_after_nop("child failed"));
      co_await sleep_noting_cancel(30s, body_cancelled);
    });
  } catch (const std::runtime_error& e) {
    error = e.what();
  }
}
}  // namespace

TEST_CASE("a failing child cancels the scope's other children and its body, and is rethrown", "[scope]") {
  io_context ctx;
  event never;
  bool child_cancelled = false;
  bool body_cancelled = false;
  bool sleeper_cancelled = false;
  std::string error;
  const auto start = std::chrono::steady_clock::now();
  sync_wait(ctx, scope_child_fails(never, child_cancelled, body_cancelled, sleeper_cancelled, error));
  CHECK(std::chrono::steady_clock::now() - start < 5s);
  CHECK(error == "child failed");
  CHECK(child_cancelled);
  CHECK(sleeper_cancelled);
  CHECK(body_cancelled);
}

namespace {
task<void> cleanup_child(bool& cleaned) {
  try {
    (void)co_await sleep_then_clean_up(cleaned);
  } catch (const operation_cancelled&) {
  }
}

task<void> body_fails(bool& cleaned, bool& cleaned_when_thrown, std::string& error) {
  try {
    co_await with_scope([&](scope& s) -> task<void> {
      s.spawn(cleanup_child(cleaned));
      co_await nop();
      throw std::runtime_error("body failed");
    });
  } catch (const std::runtime_error& e) {
    error = e.what();
    cleaned_when_thrown = cleaned;
  }
}
}  // namespace

TEST_CASE("a scope whose body throws still joins its children before rethrowing", "[scope]") {
  io_context ctx;
  bool cleaned = false;
  bool cleaned_when_thrown = false;
  std::string error;
  sync_wait(ctx, body_fails(cleaned, cleaned_when_thrown, error));
  CHECK(error == "body failed");
  CHECK(cleaned_when_thrown);
}

namespace {
task<void> inner_scope(int& counter, int& counter_after_inner) {
  co_await with_scope([&counter](scope& s) -> task<void> {
    for (int i = 0; i < 3; ++i) s.spawn(count_after_sleep(std::chrono::milliseconds(3 * (i + 1)), counter));
    co_return;
  });
  counter_after_inner = counter;
}

task<void> inner_scope_blocked(event& never, bool& a, bool& b) {
  co_await with_scope([&](scope& s) -> task<void> {
    s.spawn(wait_noting_cancel(never, a));
    s.spawn(sleep_noting_cancel(30s, b));
    co_return;
  });
}

task<void> inner_scope_failing(event& never, bool& sibling_cancelled) {
  co_await with_scope([&](scope& s) -> task<void> {
    s.spawn(wait_noting_cancel(never, sibling_cancelled));
    s.spawn(fail_after_nop("deep failure"));
    co_return;
  });
}
}  // namespace

TEST_CASE("nested scopes join inward first, and failures and stop requests cross them", "[scope]") {
  io_context ctx;
  event never;

  int counter = 0;
  int after_first = -1;
  int after_second = -1;
  auto body = [&](scope& s) -> task<void> {
    s.spawn(inner_scope(counter, after_first));
    co_await inner_scope(counter, after_second);
  };
  sync_wait(ctx, with_scope(body));
  CHECK(after_second >= 3);  // the inner scope joined its own children before returning
  CHECK(after_first >= 3);
  CHECK(counter == 6);

  // A failure two levels down cancels the outer scope's other children.
  bool deep_sibling_cancelled = false;
  bool outer_sibling_cancelled = false;
  auto failing_body = [&](scope& s) -> task<void> {
    s.spawn(wait_noting_cancel(never, outer_sibling_cancelled));
    s.spawn(inner_scope_failing(never, deep_sibling_cancelled));
    co_return;
  };
  CHECK_THROWS_WITH(sync_wait(ctx, with_scope(failing_body)), "deep failure");
  CHECK(deep_sibling_cancelled);
  CHECK(outer_sibling_cancelled);

  // request_stop on the outer scope reaches the inner scope's children.
  bool a = false;
  bool b = false;
  bool stopped_before = true;
  auto stopping_body = [&](scope& s) -> task<void> {
    s.spawn(inner_scope_blocked(never, a, b));
    co_await nop();
    stopped_before = s.stop_token().stop_requested();
    s.request_stop();
  };
  CHECK_THROWS_AS(sync_wait(ctx, with_scope(stopping_body)), operation_cancelled);
  CHECK_FALSE(stopped_before);
  CHECK(a);
  CHECK(b);
}

namespace {
task<void> cancel_scope_from_outside(event& never, const pipe_reader& r, std::array<bool, 4>& cancelled,
                                     bool& rethrown) {
  std::stop_source source;
  try {
    co_await when_all(with_scope([&](scope& s) -> task<void> {
                        s.spawn(wait_noting_cancel(never, cancelled[0]));
                        s.spawn(sleep_noting_cancel(30s, cancelled[1]));
                        s.spawn(read_noting_cancel(r, cancelled[2]));
                        co_await wait_noting_cancel(never, cancelled[3]);
                      }).with_stop_token(source.get_token()),
                      request_stop_after_nop(source));
  } catch (const operation_cancelled&) {
    rethrown = true;
  }
}
}  // namespace

TEST_CASE("cancelling a scope's parent reaches the body and every child", "[scope]") {
  io_context ctx;
  event never;
  auto [r, w] = make_pipe();
  std::array<bool, 4> cancelled{};
  bool rethrown = false;
  const auto start = std::chrono::steady_clock::now();
  sync_wait(ctx, cancel_scope_from_outside(never, r, cancelled, rethrown));
  CHECK(std::chrono::steady_clock::now() - start < 5s);
  CHECK(cancelled == std::array<bool, 4>{true, true, true, true});
  CHECK(rethrown);
}

// ============================== spawn ==============================

namespace {
task<void> set_then_sleep_then_set(bool& started, bool& finished) {
  started = true;
  co_await sleep_for(2ms);
  finished = true;
}
}  // namespace

TEST_CASE("a detached task runs until its first suspension at once and to its end under run()", "[spawn]") {
  io_context ctx;
  bool started = false;
  bool finished = false;
  ctx.spawn(set_then_sleep_then_set(started, finished));
  CHECK(started);
  CHECK_FALSE(finished);
  ctx.run();
  CHECK(finished);

  CHECK_THROWS_AS(ctx.spawn(task<void>{}), std::invalid_argument);
}

namespace {
task<void> spawn_and_wait(event& done) {
  io_context::current().spawn(set_after_nop(done));
  co_await done.wait();
}
}  // namespace

TEST_CASE("a detached task spawned from a coroutine can wake it", "[spawn]") {
  io_context ctx;
  event done;
  sync_wait(ctx, spawn_and_wait(done));
  CHECK(done.is_set());
}

TEST_CASE("a detached task's failure is rethrown from run()", "[spawn]") {
  io_context ctx;
  ctx.spawn(fail_after_nop("detached failure"));
  CHECK_THROWS_WITH(ctx.run(), "detached failure");

  ctx.spawn(fail_now("failed at once"));
  CHECK_THROWS_WITH(ctx.run(), "failed at once");
}

TEST_CASE("a detached task's failure is rethrown from sync_wait after the awaited task unwinds",
          "[spawn][sync_wait]") {
  io_context ctx;
  event never;
  bool main_cancelled = false;
  ctx.spawn(fail_after_nop("detached failure"));
  CHECK_THROWS_WITH(sync_wait(ctx, wait_noting_cancel(never, main_cancelled)), "detached failure");
  CHECK(main_cancelled);
}

TEST_CASE("with an error handler set, a detached task's failure goes to the handler instead", "[spawn]") {
  io_context ctx;
  std::vector<std::string> errors;
  ctx.set_error_handler([&](std::exception_ptr e) {
    try {
      std::rethrow_exception(e);
    } catch (const std::exception& ex) {
      errors.emplace_back(ex.what());
    }
  });
  ctx.spawn(fail_after_nop("first"));
  ctx.spawn(fail_now("second"));
  CHECK_NOTHROW(ctx.run());
  std::sort(errors.begin(), errors.end());
  CHECK(errors == std::vector<std::string>{"first", "second"});

  ctx.spawn(fail_after_nop("third"));
  CHECK(sync_wait(ctx, value_after_sleep(5ms, 3)) == 3);
  CHECK(errors.size() == 3);
}

namespace {
task<void> detached_sleep(int& alive, int& cancelled) {
  instance_counter c(alive);
  auto heap = std::make_unique<std::array<char, 256>>();
  try {
    co_await sleep_for(1h);
  } catch (const operation_cancelled&) {
    ++cancelled;
    throw;
  }
}
task<void> detached_event(event& ev, int& alive, int& cancelled) {
  instance_counter c(alive);
  try {
    co_await ev.wait();
  } catch (const operation_cancelled&) {
    ++cancelled;
    throw;
  }
}
task<void> detached_read(const pipe_reader& r, int& alive, int& cancelled) {
  instance_counter c(alive);
  std::array<std::byte, 64> buf{};
  try {
    (void)co_await r.read(buf);
  } catch (const operation_cancelled&) {
    ++cancelled;
    throw;
  }
}
task<void> detached_hold_lock(mutex& m, int& alive, int& cancelled) {
  instance_counter c(alive);
  auto guard = co_await m.lock();
  try {
    co_await sleep_for(1h);
  } catch (const operation_cancelled&) {
    ++cancelled;
    throw;
  }
}
task<void> detached_lock(mutex& m, int& alive, int& cancelled) {
  instance_counter c(alive);
  try {
    auto guard = co_await m.lock();
  } catch (const operation_cancelled&) {
    ++cancelled;
    throw;
  }
}
task<void> detached_acquire(semaphore& sem, int& alive, int& cancelled) {
  instance_counter c(alive);
  try {
    co_await sem.acquire();
  } catch (const operation_cancelled&) {
    ++cancelled;
    throw;
  }
}
task<void> detached_group(event& ev, int& alive, int& cancelled) {
  instance_counter c(alive);
  try {
    co_await when_all(detached_sleep(alive, cancelled), detached_event(ev, alive, cancelled));
  } catch (const operation_cancelled&) {
    ++cancelled;
    throw;
  }
}
task<void> detached_swallows_then_retries(int& alive, int& cancelled) {
  instance_counter c(alive);
  try {
    co_await sleep_for(1h);
  } catch (const operation_cancelled&) {
    ++cancelled;
  }
  // Anything awaited during shutdown fails at once instead of hanging the destructor.
  co_await nop();
}
}  // namespace

TEST_CASE("detached tasks still suspended when the io_context is destroyed are cancelled and freed",
          "[spawn]") {
  // Everything the tasks wait on outlives the io_context.
  event never;
  mutex m;
  semaphore empty_sem(0);
  auto [r, w] = make_pipe();
  int alive = 0;
  int cancelled = 0;
  {
    io_context ctx;
    ctx.spawn(detached_sleep(alive, cancelled));
    ctx.spawn(detached_event(never, alive, cancelled));
    ctx.spawn(detached_read(r, alive, cancelled));
    ctx.spawn(detached_hold_lock(m, alive, cancelled));
    ctx.spawn(detached_lock(m, alive, cancelled));
    ctx.spawn(detached_acquire(empty_sem, alive, cancelled));
    ctx.spawn(detached_group(never, alive, cancelled));
    ctx.spawn(detached_swallows_then_retries(alive, cancelled));
    // Let every operation reach the kernel before the shutdown.
    CHECK(sync_wait(ctx, value_after_sleep(5ms, 1)) == 1);
    CHECK(alive == 10);
    CHECK(cancelled == 0);
  }
  CHECK(alive == 0);
  CHECK(cancelled == 10);
  CHECK_FALSE(m.locked());
  CHECK(empty_sem.available() == 0);
}

TEST_CASE("detached tasks whose operations were never submitted are cancelled when the io_context dies",
          "[spawn]") {
  event never;
  int alive = 0;
  int cancelled = 0;
  {
    io_context ctx;
    for (int i = 0; i < 50; ++i) {
      ctx.spawn(detached_sleep(alive, cancelled));
      ctx.spawn(detached_event(never, alive, cancelled));
    }
    CHECK(alive == 100);
  }
  CHECK(alive == 0);
  CHECK(cancelled == 100);
}

// ============================== sync_wait ==============================

TEST_CASE("sync_wait throws std::logic_error on a deadlock instead of hanging, after unwinding the task",
          "[sync_wait]") {
  // Declared before the io_context: the stuck detached task is only unwound when it dies.
  event never;
  bool cancelled = false;
  bool detached_cancelled = false;
  io_context ctx;
  CHECK_THROWS_AS(sync_wait(ctx, wait_noting_cancel(never, cancelled)), std::logic_error);
  CHECK(cancelled);

  // Still a deadlock when a detached task is stuck too.
  cancelled = false;
  ctx.spawn(wait_noting_cancel(never, detached_cancelled));
  CHECK_THROWS_AS(sync_wait(ctx, wait_noting_cancel(never, cancelled)), std::logic_error);
  CHECK(cancelled);

  // The loop is still usable afterwards.
  CHECK(sync_wait(ctx, value_after_nop(4)) == 4);
}

namespace {
task<void> lock_twice(mutex& m) {
  auto first = co_await m.lock();
  auto second = co_await m.lock();
}
}  // namespace

TEST_CASE("sync_wait reports a coroutine locking a mutex it already holds as a deadlock", "[sync_wait]") {
  io_context ctx;
  mutex m;
  CHECK_THROWS_AS(sync_wait(ctx, lock_twice(m)), std::logic_error);
  CHECK_FALSE(m.locked());
}
