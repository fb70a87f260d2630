// SPDX-License-Identifier: MIT
// The cross-process async mutex: exclusion across processes, takeover from dead holders,
// timeouts, cancellation, and the typed shared object.
#include <ipcoro/ipcoro.hpp>

#include "process.hpp"

using ipcoro::test::handshake;

#include <catch2/catch.hpp>

#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <new>
#include <stdexcept>
#include <string>
#include <system_error>
#include <vector>

namespace {

using namespace std::chrono_literals;
using ipcoro::process_mutex;
using ipcoro::process_mutex_state;
using ipcoro::shared_object;
using ipcoro::task;
using ipcoro::test::child_process;
using ipcoro::test::unique_name;
using clock_type = std::chrono::steady_clock;

constexpr std::uint32_t waiters_bit = 1u << 31;

/// An anonymous MAP_SHARED page holding a mutex state, inherited by forked children.
class shared_state {
 public:
  shared_state() {
    void* p = ::mmap(nullptr, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) throw std::runtime_error("mmap failed");
    state_ = new (p) process_mutex_state{};
  }
  ~shared_state() { ::munmap(state_, 4096); }
  shared_state(const shared_state&) = delete;
  shared_state& operator=(const shared_state&) = delete;
  process_mutex_state& get() noexcept { return *state_; }
  /// Plain shared data next to the state (same page).
  std::uint64_t& data() noexcept { return word_at(128); }
  /// The pid of the last process that incremented data(), and how often that changed.
  std::uint64_t& last_pid() noexcept { return word_at(136); }
  std::uint64_t& handovers() noexcept { return word_at(144); }

 private:
  std::uint64_t& word_at(std::size_t offset) noexcept {
    return *reinterpret_cast<std::uint64_t*>(reinterpret_cast<char*>(state_) + offset);
  }
  process_mutex_state* state_;
};

/// Removes the segment `name` when the test ends, however it ends.
struct name_guard {
  std::string name;
  explicit name_guard(std::string n) : name(std::move(n)) {}
  ~name_guard() {
    try {
      ipcoro::shm_segment::unlink(name);
    } catch (...) {
    }
  }
  name_guard(const name_guard&) = delete;
  name_guard& operator=(const name_guard&) = delete;
};

/// A one-byte handshake between processes over a pipe.

/// A read-modify-write that suspends in the middle, so an unprotected increment would lose
/// updates whenever another holder runs in between.
task<void> increment(const process_mutex& m, std::uint64_t& value, int times) {
  for (int i = 0; i < times; ++i) {
    auto guard = co_await m.lock();
    const std::uint64_t v = value;
    co_await ipcoro::nop();
    value = v + 1;
  }
}

struct counter {
  std::uint64_t count;
  std::uint64_t half_done;  // set while an update is in progress
};

const process_mutex::options quick_check{.liveness_check_interval = 20ms, .spin = 100};

}  // namespace

TEST_CASE("an uncontended lock is taken without suspending and released by its guard", "[process_mutex]") {
  ipcoro::io_context ctx;
  shared_state s;
  const process_mutex m(s.get());
  const auto before = ctx.stats().submitted;
  ipcoro::sync_wait(ctx, [&]() -> task<void> {
    auto guard = co_await m.lock();
    CHECK(guard.owns_lock());
    CHECK_FALSE(guard.inconsistent());
    CHECK_FALSE(guard.took_over());
    CHECK(m.holder_pid() == ::getpid());
    CHECK(m.holder_alive());
    CHECK_FALSE(m.try_lock().has_value());
  }());
  CHECK(ctx.stats().submitted == before);  // nothing went through the ring
  CHECK(m.holder_pid() == 0);
  CHECK_FALSE(m.holder_alive());
  auto g = m.try_lock();
  REQUIRE(g.has_value());
  g->unlock();
  CHECK(s.get().word.load() == 0);
}

TEST_CASE("coroutines of one process take turns on the mutex", "[process_mutex]") {
  ipcoro::io_context ctx;
  shared_state s;
  const process_mutex m(s.get());
  ipcoro::sync_wait(ctx, ipcoro::when_all(increment(m, s.data(), 1000), increment(m, s.data(), 1000),
                                          increment(m, s.data(), 1000)));
  CHECK(s.data() == 3000);
  CHECK(s.get().word.load() == 0);
}

TEST_CASE("processes incrementing under the mutex lose no update, on either futex path",
          "[process_mutex][process]") {
  shared_state s;
  constexpr int processes = 4;
  constexpr int increments = 5000;
  handshake go;
  std::vector<child_process> children;
  for (int i = 0; i < processes; ++i) {
    children.emplace_back([&, i] {
      // Half the processes park through the futex fallback.
      ::setenv("IPCORO_FUTEX_FALLBACK", i % 2 == 0 ? "0" : "1", 1);
      ipcoro::io_context ctx;
      const process_mutex m(s.get());
      if (!go.wait()) return 3;
      auto count_handovers = [&]() -> task<void> {
        for (int k = 0; k < increments / 2; ++k) {
          auto guard = co_await m.lock();
          const std::uint64_t v = s.data();
          co_await ipcoro::nop();
          s.data() = v + 1;
          if (s.last_pid() != static_cast<std::uint64_t>(::getpid())) {
            ++s.handovers();
            s.last_pid() = static_cast<std::uint64_t>(::getpid());
          }
        }
      };
      ipcoro::sync_wait(ctx, ipcoro::when_all(count_handovers(), count_handovers()));
      return 0;
    });
  }
  for (int i = 0; i < processes; ++i) go.signal();
  for (auto& c : children) CHECK(c.wait(60s) == 0);
  CHECK(s.data() == static_cast<std::uint64_t>(processes) * increments);
  // The processes really did contend: the lock moved between them many times.
  INFO("the lock moved between processes " << s.handovers() << " times");
  CHECK(s.handovers() > static_cast<std::uint64_t>(processes));
  CHECK(s.get().word.load() == 0);
  CHECK(s.get().takeovers.load() == 0);
}

TEST_CASE(
    "a waiter takes over the lock of a holder killed with SIGKILL and learns the data may be inconsistent",
    "[process_mutex][process]") {
  const name_guard g(unique_name("mutex-kill"));
  auto obj = shared_object<counter>::create(
      g.name, {.type_tag = 0x434e5452, .version = 1, .mode = 0600, .mutex = quick_check});
  handshake locked;
  child_process holder([&] {
    ipcoro::io_context ctx;
    auto mine = shared_object<counter>::open(
        g.name, {.type_tag = 0x434e5452, .version = 1, .mode = 0600, .mutex = quick_check});
    ipcoro::sync_wait(ctx, [&]() -> task<void> {
      auto v = co_await mine.lock();
      v->half_done = 1;  // dies in the middle of an update
      locked.signal();
      ::pause();
    }());
    return 0;
  });
  REQUIRE(locked.wait());
  CHECK(obj.mutex().holder_pid() == holder.pid());
  CHECK(obj.mutex().holder_alive());
  holder.kill(SIGKILL);
  REQUIRE(holder.wait() == 128 + SIGKILL);
  CHECK_FALSE(obj.mutex().holder_alive());

  ipcoro::io_context ctx;
  ipcoro::sync_wait(ctx, [&]() -> task<void> {
    {
      auto v = co_await obj.lock().with_timeout(10s);
      CHECK(v.took_over());
      CHECK(v.inconsistent());
      CHECK(v->half_done == 1);
      v->half_done = 0;  // repaired
      v.mark_consistent();
      CHECK_FALSE(v.inconsistent());
    }
    auto again = co_await obj.lock();
    CHECK_FALSE(again.took_over());
    CHECK_FALSE(again.inconsistent());
  }());
  CHECK(obj.mutex().takeovers() == 1);
}

TEST_CASE("the data stays marked inconsistent until a holder repairs it", "[process_mutex][process]") {
  shared_state s;
  const process_mutex m(s.get(), quick_check);
  child_process holder([&] {
    ipcoro::io_context ctx;
    auto g = m.try_lock();
    ::_exit(g.has_value() ? 0 : 1);  // exits holding the lock
    return 2;
  });
  REQUIRE(holder.wait() == 0);
  ipcoro::io_context ctx;
  ipcoro::sync_wait(ctx, [&]() -> task<void> {
    {
      auto first = co_await m.lock();
      CHECK(first.took_over());
    }  // not repaired
    auto second = co_await m.lock();
    CHECK_FALSE(second.took_over());
    CHECK(second.inconsistent());
  }());
}

TEST_CASE("a waiter parked before the holder dies takes the lock over within a liveness check",
          "[process_mutex][process]") {
  shared_state s;
  const process_mutex m(s.get(), quick_check);
  handshake locked;
  child_process holder([&] {
    ipcoro::io_context ctx;
    auto g = m.try_lock();
    locked.signal();
    ::pause();
    return g ? 0 : 1;
  });
  REQUIRE(locked.wait());
  ipcoro::io_context ctx;
  clock_type::time_point killed;
  const auto acquired = ipcoro::sync_wait(ctx, [&]() -> task<clock_type::time_point> {
    auto waiter = [&]() -> task<clock_type::time_point> {
      auto g = co_await m.lock().with_timeout(20s);
      CHECK(g.took_over());
      co_return clock_type::now();
    };
    auto killer = [&]() -> task<void> {
      // The waiter has parked once it set the waiters bit; only then kill the holder.
      const auto give_up = clock_type::now() + 10s;
      while ((s.get().word.load() & waiters_bit) == 0 && clock_type::now() < give_up) co_await ipcoro::nop();
      killed = clock_type::now();
      holder.kill(SIGKILL);
    };
    auto [t, unit] = co_await ipcoro::when_all(waiter(), killer());
    (void)unit;
    co_return t;
  }());
  CHECK(holder.wait() == 128 + SIGKILL);
  CHECK(acquired - killed < 5s);
  CHECK(m.takeovers() == 1);
}

TEST_CASE("lock().with_timeout times out while a live process holds the lock, and never takes it over",
          "[process_mutex][process]") {
  shared_state s;
  const process_mutex m(s.get(), quick_check);
  handshake locked;
  handshake release;
  child_process holder([&] {
    auto g = m.try_lock();
    locked.signal();
    return release.wait() && g ? 0 : 1;
  });
  REQUIRE(locked.wait());
  ipcoro::io_context ctx;
  const auto t0 = clock_type::now();
  CHECK_THROWS_AS(
      ipcoro::sync_wait(ctx, [&]() -> task<void> { auto g = co_await m.lock().with_timeout(200ms); }()),
      ipcoro::timed_out);
  CHECK(clock_type::now() - t0 >= 200ms);
  CHECK(m.holder_pid() == holder.pid());
  CHECK(m.takeovers() == 0);
  release.signal();
  CHECK(holder.wait() == 0);
  // Released by its holder, the lock is free again.
  CHECK(m.try_lock().has_value());
}

TEST_CASE("a stop request cancels a lock wait and leaves the mutex usable", "[process_mutex]") {
  ipcoro::io_context ctx;
  shared_state s;
  const process_mutex m(s.get());
  auto held = m.try_lock();
  REQUIRE(held.has_value());
  std::stop_source source;
  bool cancelled = false;
  ipcoro::sync_wait(ctx, [&]() -> task<void> {
    auto waiter = [&]() -> task<void> {
      try {
        auto g = co_await m.lock();
      } catch (const ipcoro::operation_cancelled&) {
        cancelled = true;
      }
    };
    auto stopper = [&]() -> task<void> {
      while ((s.get().word.load() & waiters_bit) == 0) co_await ipcoro::nop();
      source.request_stop();
    };
    co_await ipcoro::when_all(waiter().with_stop_token(source.get_token()), stopper());
  }());
  CHECK(cancelled);
  held->unlock();
  CHECK(ipcoro::sync_wait(ctx, [&]() -> task<bool> {
    auto g = co_await m.lock().with_timeout(1s);
    co_return g.owns_lock();
  }()));
}

TEST_CASE("a lock word naming a dead process that never recorded itself is taken over",
          "[process_mutex][process]") {
  shared_state s;
  child_process gone([] { return 0; });
  REQUIRE(gone.wait() == 0);
  // As if the holder died between winning the word and writing its record.
  s.get().word.store(static_cast<std::uint32_t>(gone.pid()));
  const process_mutex m(s.get(), quick_check);
  CHECK_FALSE(m.holder_alive());
  ipcoro::io_context ctx;
  ipcoro::sync_wait(ctx, [&]() -> task<void> {
    auto g = co_await m.lock().with_timeout(10s);
    CHECK(g.took_over());
    CHECK(m.holder_pid() == ::getpid());
  }());
}

TEST_CASE("unlock throws EPERM when the lock was taken over meanwhile", "[process_mutex]") {
  shared_state s;
  const process_mutex m(s.get());
  auto g = m.try_lock();
  REQUIRE(g.has_value());
  s.get().word.store(1);  // pid 1 (init) now holds it, as far as the word says
  try {
    g->unlock();
    FAIL("unlock succeeded");
  } catch (const std::system_error& e) {
    CHECK(e.code().value() == EPERM);
  }
  CHECK(s.get().word.load() == 1);  // the new holder's lock is left alone
}

TEST_CASE("a shared object is seen by other processes and refused to a different type",
          "[process_mutex][process]") {
  const name_guard g(unique_name("object"));
  auto obj = shared_object<counter>::create(g.name, {}, [](counter& c) { c.count = 40; });
  child_process child([&] {
    ipcoro::io_context ctx;
    auto other = shared_object<counter>::open(g.name);
    ipcoro::sync_wait(ctx, [&]() -> task<void> {
      auto v = co_await other.lock();
      v->count += 2;
    }());
    try {
      struct bigger {
        std::uint64_t a, b, c;
      };
      (void)shared_object<bigger>::open(g.name);
      return 1;
    } catch (const std::system_error& e) {
      if (e.code().value() != EPROTO) return 2;
    }
    try {
      // Another type of the same size, as a program built with another T would have.
      struct same_size_other {
        char bytes[sizeof(counter)];
      };
      static_assert(sizeof(same_size_other) == sizeof(counter));
      (void)shared_object<same_size_other>::open(g.name);
      return 3;
    } catch (const std::system_error& e) {
      return e.code().value() == EPROTO ? 0 : 4;
    }
  });
  CHECK(child.wait() == 0);
  CHECK(obj.unsafe_value().count == 42);
  CHECK(obj.segment().creator_pid() == ::getpid());
}

TEST_CASE("a process mutex in a mapped file works across processes too", "[process_mutex][process]") {
  const std::string path = "/tmp/" + unique_name("mutex-file");
  struct remove_file {
    std::string p;
    ~remove_file() { ::unlink(p.c_str()); }
  } cleanup{path};
  auto file = ipcoro::mapped_file::create(path, {0x4d545846, 1, 4096});
  std::vector<child_process> children;
  for (int i = 0; i < 2; ++i) {
    children.emplace_back([&] {
      ipcoro::io_context ctx;
      auto mine = ipcoro::mapped_file::open(path, {0x4d545846, 1, 4096});
      const process_mutex m(mine.payload(), 0);
      auto& value = *reinterpret_cast<std::uint64_t*>(mine.payload().data() + 64);
      ipcoro::sync_wait(ctx, increment(m, value, 500));
      return 0;
    });
  }
  for (auto& c : children) CHECK(c.wait(60s) == 0);
  CHECK(*reinterpret_cast<std::uint64_t*>(file.payload().data() + 64) == 1000);
  CHECK_THROWS_AS(process_mutex(file.payload(), 8), std::system_error);  // misaligned
}
