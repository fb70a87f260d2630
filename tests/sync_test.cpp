// SPDX-License-Identifier: MIT
// Tests of the coroutine synchronisation primitives: event, mutex and semaphore.
#include "ipcoro/ipcoro.hpp"

#include <catch2/catch.hpp>

#include <algorithm>
#include <chrono>
#include <stdexcept>
#include <stop_token>
#include <vector>

using namespace ipcoro;
using namespace std::chrono_literals;

namespace {

// How one waiter ended.
struct outcome {
  bool done = false;       // it returned normally
  bool cancelled = false;  // it got operation_cancelled
  int completions = 0;     // how many times it ended at all (must never exceed 1)
};

// Turns the loop until the waiter behind `o` has ended. Each nop is a full loop turn, so
// this waits for progress, not for time.
task<void> turn_until(const outcome& o) {
  while (o.completions == 0) co_await nop();
}

task<void> turns(int n) {
  for (int i = 0; i < n; ++i) co_await nop();
}

// ---- event ----

task<void> wait_event(event& ev, outcome& o) {
  try {
    co_await ev.wait();
    o.done = true;
  } catch (const operation_cancelled&) {
    o.cancelled = true;
  }
  ++o.completions;
}

}  // namespace

// ============================== event ==============================

namespace {
task<void> set_after_checking(event& ev, std::vector<outcome>& waiters, int& done_before_set) {
  co_await turns(3);
  done_before_set = 0;
  for (const outcome& o : waiters) done_before_set += o.completions;
  ev.set();
}
}  // namespace

TEST_CASE("setting an event wakes every waiter and no waiter wakes before", "[event]") {
  io_context ctx;
  event ev;
  CHECK_FALSE(ev.is_set());
  std::vector<outcome> waiters(5);
  int done_before_set = -1;
  std::vector<task<void>> tasks;
  for (outcome& o : waiters) tasks.push_back(wait_event(ev, o));
  tasks.push_back(set_after_checking(ev, waiters, done_before_set));
  sync_wait(ctx, when_all(std::move(tasks)));
  CHECK(done_before_set == 0);
  CHECK(ev.is_set());
  for (const outcome& o : waiters) {
    CHECK(o.done);
    CHECK(o.completions == 1);
  }
}

namespace {
task<int> wait_many_times(event& ev, int n) {
  int passed = 0;
  for (int i = 0; i < n; ++i) {
    co_await ev.wait();
    ++passed;
  }
  co_return passed;
}
}  // namespace

TEST_CASE("waiting on an event that is already set completes without suspending", "[event]") {
  io_context ctx;
  event initially_set(true);
  CHECK(initially_set.is_set());
  const auto before = ctx.stats();
  // Had any wait suspended, nothing would be in flight to resume it: sync_wait would
  // report a deadlock.
  CHECK(sync_wait(ctx, wait_many_times(initially_set, 1000)) == 1000);

  event later;
  later.set();
  CHECK(sync_wait(ctx, wait_many_times(later, 10)) == 10);
  CHECK(ctx.stats().submitted == before.submitted);
}

namespace {
task<void> reset_then_check(event& ev, const outcome& waiter, bool& blocked_after_reset) {
  co_await turns(3);
  blocked_after_reset = waiter.completions == 0;
  ev.set();
}
}  // namespace

TEST_CASE("after reset an event blocks new waiters until it is set again", "[event]") {
  io_context ctx;
  event ev;
  ev.set();
  ev.reset();
  CHECK_FALSE(ev.is_set());
  outcome waiter;
  bool blocked_after_reset = false;
  sync_wait(ctx, when_all(wait_event(ev, waiter), reset_then_check(ev, waiter, blocked_after_reset)));
  CHECK(blocked_after_reset);
  CHECK(waiter.done);

  // Resetting with no waiter parked leaves nothing to wake; a wait now blocks again.
  ev.reset();
  outcome second;
  CHECK_THROWS_AS(sync_wait(ctx, wait_event(ev, second)), std::logic_error);  // deadlock: nobody sets it
  CHECK(second.cancelled);
}

namespace {
task<void> cancel_middle_waiter(event& ev, std::stop_source& source, const outcome& middle,
                                bool& others_still_waiting) {
  co_await nop();
  source.request_stop();
  co_await turn_until(middle);  // the middle waiter's frame is gone after this
  co_await turns(2);
  others_still_waiting = true;
  ev.set();  // must not touch the freed waiter
}
}  // namespace

TEST_CASE("a waiter cancelled through its stop token gets operation_cancelled and leaves the list",
          "[event]") {
  io_context ctx;
  event ev;
  std::stop_source source;
  outcome first;
  outcome middle;
  outcome last;
  bool others_still_waiting = false;
  std::vector<task<void>> tasks;
  tasks.push_back(wait_event(ev, first));
  tasks.push_back(wait_event(ev, middle).with_stop_token(source.get_token()));
  tasks.push_back(wait_event(ev, last));
  tasks.push_back(cancel_middle_waiter(ev, source, middle, others_still_waiting));
  sync_wait(ctx, when_all(std::move(tasks)));
  CHECK(middle.cancelled);
  CHECK_FALSE(middle.done);
  CHECK(middle.completions == 1);
  CHECK(others_still_waiting);
  CHECK(first.done);
  CHECK(first.completions == 1);
  CHECK(last.done);
  CHECK(last.completions == 1);
}

TEST_CASE("a waiter whose token is already stopped is cancelled at once without parking", "[event]") {
  io_context ctx;
  event ev;
  std::stop_source source;
  source.request_stop();
  outcome o;
  sync_wait(ctx, wait_event(ev, o).with_stop_token(source.get_token()));
  CHECK(o.cancelled);
  ev.set();  // nothing is parked: nothing to touch
  CHECK(o.completions == 1);
}

namespace {
task<void> set_then_stop(event& ev, std::stop_source& source) {
  co_await nop();
  ev.set();
  source.request_stop();  // the wake-up was granted first: it stands
}
}  // namespace

TEST_CASE("a waiter woken by set keeps its wake-up when a stop request arrives before it runs", "[event]") {
  io_context ctx;
  event ev;
  std::stop_source source;
  outcome o;
  sync_wait(ctx, when_all(wait_event(ev, o).with_stop_token(source.get_token()), set_then_stop(ev, source)));
  CHECK(o.done);
  CHECK_FALSE(o.cancelled);
}

// ============================== mutex ==============================

namespace {
struct exclusion_stats {
  int holders = 0;
  int max_holders = 0;
  int entries = 0;
  int found_locked = 0;  // times a locker found the mutex taken (proves there was contention)
};

task<void> contend(mutex& m, exclusion_stats& st, int id, int rounds) {
  for (int r = 0; r < rounds; ++r) {
    if (m.locked()) ++st.found_locked;
    auto guard = co_await m.lock();
    ++st.holders;
    st.max_holders = std::max(st.max_holders, st.holders);
    ++st.entries;
    switch ((id + r) % 4) {
      case 0:
        co_await sleep_for(1ms);
        break;
      case 1:
        co_await nop();
        break;
      case 2:
        co_await nop();
        co_await nop();
        break;
      default:
        break;  // no suspension inside
    }
    CHECK(st.holders == 1);
    --st.holders;
    if (r % 2 == 0) co_await nop();  // sometimes come back at once, sometimes after a turn
  }
}
}  // namespace

TEST_CASE("a mutex admits one coroutine at a time across suspensions", "[mutex]") {
  io_context ctx;
  mutex m;
  exclusion_stats st;
  std::vector<task<void>> tasks;
  constexpr int workers = 16;
  constexpr int rounds = 8;
  for (int i = 0; i < workers; ++i) tasks.push_back(contend(m, st, i, rounds));
  sync_wait(ctx, when_all(std::move(tasks)));
  CHECK(st.entries == workers * rounds);
  CHECK(st.max_holders == 1);
  CHECK(st.found_locked > 0);
  CHECK_FALSE(m.locked());
}

namespace {
task<void> lock_and_record(mutex& m, int id, std::vector<int>& order) {
  auto guard = co_await m.lock();
  order.push_back(id);
  co_await nop();  // hold it across a turn
}

task<void> fifo_handoff(mutex& m, std::vector<int>& order, bool& handed_off, bool& barged) {
  co_await with_scope([&](scope& s) -> task<void> {
    auto guard = co_await m.lock();
    for (int i = 0; i < 6; ++i) s.spawn(lock_and_record(m, i, order));  // each queues at once
    co_await nop();
    guard.unlock();
    // The lock went to waiter 0, which has not run yet: it is not free for the taking.
    handed_off = m.locked();
    barged = m.try_lock();
    if (barged) m.unlock();
    s.spawn(lock_and_record(m, 6, order));  // arrives after the hand-off: queues behind 1..5
  });
}
}  // namespace

TEST_CASE("a mutex hands the lock to its waiters in FIFO order without barging", "[mutex]") {
  io_context ctx;
  mutex m;
  std::vector<int> order;
  bool handed_off = false;
  bool barged = true;
  sync_wait(ctx, fifo_handoff(m, order, handed_off, barged));
  CHECK(handed_off);
  CHECK_FALSE(barged);
  CHECK(order == std::vector<int>{0, 1, 2, 3, 4, 5, 6});
  CHECK_FALSE(m.locked());
}

namespace {
task<void> throw_while_locked(mutex& m) {
  auto guard = co_await m.lock();
  co_await nop();
  throw std::runtime_error("failed inside the critical section");
}

task<void> catch_and_check(mutex& m, bool& caught, bool& locked_after) {
  try {
    co_await throw_while_locked(m);
  } catch (const std::runtime_error&) {
    caught = true;
  }
  locked_after = m.locked();
}

task<void> lock_after_failure(mutex& m, bool& caught, bool& got_lock) {
  try {
    co_await throw_while_locked(m);
  } catch (const std::runtime_error&) {
    caught = true;
  }
  auto guard = co_await m.lock();
  got_lock = guard.owns_lock();
}

task<void> lock_once(mutex& m, bool& got_lock) {
  auto guard = co_await m.lock();
  got_lock = guard.owns_lock();
}
}  // namespace

TEST_CASE("a mutex guard unlocks when an exception leaves the critical section", "[mutex]") {
  io_context ctx;
  mutex m;
  bool caught = false;
  bool locked_after = true;
  sync_wait(ctx, catch_and_check(m, caught, locked_after));
  CHECK(caught);
  CHECK_FALSE(locked_after);

  // With a waiter queued, the unwinding hands the lock over to it.
  bool waiter_got_lock = false;
  bool relocked = false;
  caught = false;
  sync_wait(ctx, when_all(lock_after_failure(m, caught, relocked), lock_once(m, waiter_got_lock)));
  CHECK(caught);
  CHECK(waiter_got_lock);
  CHECK(relocked);
  CHECK_FALSE(m.locked());
}

namespace {
task<void> lock_noting(mutex& m, outcome& o) {
  try {
    auto guard = co_await m.lock();
    o.done = true;
    co_await nop();
  } catch (const operation_cancelled&) {
    o.cancelled = true;
  }
  ++o.completions;
}

task<void> hold_then_cancel_first_waiter(mutex& m, std::stop_source& source, const outcome& victim,
                                         bool& still_locked_after_cancel) {
  auto guard = co_await m.lock();
  co_await nop();  // both waiters are parked now
  source.request_stop();
  co_await turn_until(victim);
  still_locked_after_cancel = m.locked();
  guard.unlock();
}
}  // namespace

TEST_CASE("a cancelled lock waiter never gets the lock and later lockers are unaffected", "[mutex]") {
  io_context ctx;
  mutex m;
  std::stop_source source;
  outcome victim;
  outcome next;
  bool still_locked_after_cancel = false;
  // Launch order: the holder first, then the victim, then the next waiter.
  sync_wait(ctx, when_all(hold_then_cancel_first_waiter(m, source, victim, still_locked_after_cancel),
                          lock_noting(m, victim).with_stop_token(source.get_token()), lock_noting(m, next)));
  CHECK(victim.cancelled);
  CHECK_FALSE(victim.done);
  CHECK(victim.completions == 1);
  CHECK(still_locked_after_cancel);
  CHECK(next.done);
  CHECK_FALSE(m.locked());

  bool got_lock = false;
  sync_wait(ctx, lock_once(m, got_lock));
  CHECK(got_lock);
  CHECK_FALSE(m.locked());
}

namespace {
task<void> unlock_then_stop(mutex& m, std::stop_source& source, bool& granted_lock_held) {
  auto guard = co_await m.lock();
  co_await nop();         // the waiter is parked now
  guard.unlock();         // granted to the waiter, which has not run yet
  source.request_stop();  // too late: the grant stands
  granted_lock_held = m.locked();
}

task<void> lock_under_token(mutex& m, bool& owned, bool& cancelled) {
  try {
    auto guard = co_await m.lock();
    owned = guard.owns_lock() && m.locked();
  } catch (const operation_cancelled&) {
    cancelled = true;
  }
}
}  // namespace

TEST_CASE("a lock granted to a waiter stays granted when its stop request comes before it runs", "[mutex]") {
  io_context ctx;
  mutex m;
  std::stop_source source;
  bool granted_lock_held = false;
  bool owned = false;
  bool cancelled = false;
  outcome after;
  sync_wait(ctx, when_all(unlock_then_stop(m, source, granted_lock_held),
                          lock_under_token(m, owned, cancelled).with_stop_token(source.get_token()),
                          lock_noting(m, after)));
  CHECK(granted_lock_held);
  CHECK(owned);
  CHECK_FALSE(cancelled);
  CHECK(after.done);  // the lock was passed on when the granted waiter released it
  CHECK_FALSE(m.locked());
}

// ============================== semaphore ==============================

namespace {
task<void> use_permit(semaphore& sem, int id, int& active, int& max_active, int& finished) {
  co_await sem.acquire();
  ++active;
  max_active = std::max(max_active, active);
  if (id % 3 == 0)
    co_await sleep_for(2ms);
  else
    co_await nop();
  --active;
  ++finished;
  sem.release();
}
}  // namespace

TEST_CASE("a semaphore of N lets exactly N coroutines in at once", "[semaphore]") {
  io_context ctx;
  constexpr int limit = 3;
  semaphore sem(limit);
  int active = 0;
  int max_active = 0;
  int finished = 0;
  std::vector<task<void>> tasks;
  for (int i = 0; i < 12; ++i) tasks.push_back(use_permit(sem, i, active, max_active, finished));
  sync_wait(ctx, when_all(std::move(tasks)));
  CHECK(max_active == limit);
  CHECK(finished == 12);
  CHECK(sem.available() == limit);
}

namespace {
task<void> acquire_and_record(semaphore& sem, int id, std::vector<int>& woken) {
  co_await sem.acquire();
  woken.push_back(id);
}

task<void> release_in_steps(semaphore& sem, const std::vector<int>& woken, std::vector<std::size_t>& seen,
                            std::vector<std::size_t>& available) {
  co_await turns(2);
  seen.push_back(woken.size());
  sem.release(3);
  co_await turns(3);
  seen.push_back(woken.size());
  available.push_back(sem.available());
  sem.release(2);
  co_await turns(3);
  seen.push_back(woken.size());
  available.push_back(sem.available());
  sem.release(4);  // no waiter left: all four stay available
  available.push_back(sem.available());
}
}  // namespace

TEST_CASE("release(n) wakes exactly n waiters, oldest first, and keeps the rest as permits", "[semaphore]") {
  io_context ctx;
  semaphore sem(0);
  CHECK_FALSE(sem.try_acquire());
  std::vector<int> woken;
  std::vector<std::size_t> seen;
  std::vector<std::size_t> available;
  std::vector<task<void>> tasks;
  for (int i = 0; i < 5; ++i) tasks.push_back(acquire_and_record(sem, i, woken));
  tasks.push_back(release_in_steps(sem, woken, seen, available));
  sync_wait(ctx, when_all(std::move(tasks)));
  CHECK(seen == std::vector<std::size_t>{0, 3, 5});
  CHECK(available == std::vector<std::size_t>{0, 0, 4});
  CHECK(woken == std::vector<int>{0, 1, 2, 3, 4});
  CHECK(sem.try_acquire());
  CHECK(sem.available() == 3);
}

namespace {
task<void> acquire_noting(semaphore& sem, outcome& o) {
  try {
    co_await sem.acquire();
    o.done = true;
  } catch (const operation_cancelled&) {
    o.cancelled = true;
  }
  ++o.completions;
}

task<void> cancel_then_release(semaphore& sem, std::stop_source& source, const outcome& victim,
                               const outcome& next, std::vector<std::size_t>& available) {
  co_await nop();
  source.request_stop();
  co_await turn_until(victim);
  sem.release(1);  // must go to `next`, not to the cancelled waiter
  co_await turn_until(next);
  available.push_back(sem.available());
  sem.release(1);
  available.push_back(sem.available());
}
}  // namespace

TEST_CASE("a cancelled acquire consumes no permit", "[semaphore]") {
  io_context ctx;
  semaphore sem(0);
  std::stop_source source;
  outcome victim;
  outcome next;
  std::vector<std::size_t> available;
  sync_wait(ctx,
            when_all(acquire_noting(sem, victim).with_stop_token(source.get_token()),
                     acquire_noting(sem, next), cancel_then_release(sem, source, victim, next, available)));
  CHECK(victim.cancelled);
  CHECK_FALSE(victim.done);
  CHECK(next.done);
  CHECK(available == std::vector<std::size_t>{0, 1});

  // Alone in the list: after its cancellation a release stays a free permit.
  semaphore lone(0);
  std::stop_source lone_source;
  outcome lone_victim;
  outcome unused;
  std::vector<std::size_t> lone_available;
  unused.completions = 1;  // lets cancel_then_release pass its second wait at once
  sync_wait(ctx, when_all(acquire_noting(lone, lone_victim).with_stop_token(lone_source.get_token()),
                          cancel_then_release(lone, lone_source, lone_victim, unused, lone_available)));
  CHECK(lone_victim.cancelled);
  CHECK(lone_available == std::vector<std::size_t>{1, 2});
}

namespace {
task<void> release_then_stop(semaphore& sem, std::stop_source& source, std::size_t& available_after) {
  co_await nop();
  sem.release(1);
  source.request_stop();
  available_after = sem.available();
}
}  // namespace

TEST_CASE("a permit granted to a waiter stays granted when its stop request comes before it runs",
          "[semaphore]") {
  io_context ctx;
  semaphore sem(0);
  std::stop_source source;
  outcome o;
  std::size_t available_after = 99;
  sync_wait(ctx, when_all(acquire_noting(sem, o).with_stop_token(source.get_token()),
                          release_then_stop(sem, source, available_after)));
  CHECK(o.done);
  CHECK_FALSE(o.cancelled);
  CHECK(available_after == 0);
  CHECK(sem.available() == 0);  // the waiter holds the permit (it never released it)
}
