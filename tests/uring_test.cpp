// SPDX-License-Identifier: MIT
// Tests of the private liburing layer: ring setup with and without SINGLE_ISSUER, opcode probing, and the
// futex and waitid SQEs liburing 2.3 lacks.
#include "uring/prep.hpp"
#include "uring/ring.hpp"

#include "process.hpp"
#include "skip.hpp"

#include <catch2/catch.hpp>

#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <optional>
#include <vector>

namespace {

using ipcoro::uring::ring;
using ipcoro::uring::setup_request;
using namespace std::chrono_literals;

using ipcoro::test::kernel_version;
using ipcoro::test::running_kernel;

struct completion {
  std::uint64_t user_data;
  int res;
};

/// Runs pending task work and returns every CQE that is ready now, without waiting.
std::vector<completion> ready_completions(ring& r) {
  REQUIRE(r.submit_and_wait(0) >= 0);
  std::vector<completion> out;
  ::io_uring_cqe* cqes[64];
  for (;;) {
    const unsigned n = r.peek_batch(cqes, 64);
    for (unsigned i = 0; i < n; ++i) out.push_back({cqes[i]->user_data, cqes[i]->res});
    r.advance(n);
    if (n == 0) return out;
  }
}

/// Waits up to `timeout` for one CQE (a bound against hanging, not a synchronisation).
std::optional<completion> wait_one(ring& r, std::chrono::milliseconds timeout) {
  REQUIRE(r.submit() >= 0);
  ::__kernel_timespec ts{};
  ts.tv_sec = timeout.count() / 1000;
  ts.tv_nsec = (timeout.count() % 1000) * 1'000'000;
  ::io_uring_cqe* cqe = nullptr;
  int rc;
  do {
    rc = ::io_uring_wait_cqe_timeout(r.raw(), &cqe, &ts);
  } while (rc == -EINTR);
  if (rc == -ETIME) return std::nullopt;
  REQUIRE(rc == 0);
  completion c{cqe->user_data, cqe->res};
  ::io_uring_cqe_seen(r.raw(), cqe);
  return c;
}

::io_uring_sqe* sqe_for(ring& r, std::uint64_t user_data) {
  ::io_uring_sqe* sqe = r.try_get_sqe();
  REQUIRE(sqe != nullptr);
  // The prep helpers go through io_uring_prep_rw, which sets every field they use.
  ::io_uring_sqe_set_data64(sqe, user_data);
  return sqe;
}

void prep_nop(ring& r, std::uint64_t user_data) {
  ::io_uring_sqe* sqe = r.try_get_sqe();
  REQUIRE(sqe != nullptr);
  ::io_uring_prep_nop(sqe);
  ::io_uring_sqe_set_data64(sqe, user_data);
}

/// Submits a NOP and waits for it: proves the ring works end to end.
void nop_round_trip(ring& r) {
  prep_nop(r, 77);
  REQUIRE(r.submit_and_wait(1) == 1);
  auto done = ready_completions(r);
  REQUIRE(done.size() == 1);
  CHECK(done[0].user_data == 77);
  CHECK(done[0].res == 0);
}

struct shared_word {
  std::uint32_t* word = nullptr;
  shared_word() {
    void* mem = ::mmap(nullptr, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    REQUIRE(mem != MAP_FAILED);
    word = static_cast<std::uint32_t*>(mem);
  }
  ~shared_word() { ::munmap(word, 4096); }
  shared_word(const shared_word&) = delete;
  shared_word& operator=(const shared_word&) = delete;
};

struct raw_pipe {
  int fds[2] = {-1, -1};
  raw_pipe() { REQUIRE(::pipe2(fds, O_CLOEXEC) == 0); }
  ~raw_pipe() {
    for (int fd : fds)
      if (fd >= 0) ::close(fd);
  }
  raw_pipe(const raw_pipe&) = delete;
  raw_pipe& operator=(const raw_pipe&) = delete;
};

constexpr std::uint32_t private_u32 = ipcoro::uring::futex2_size_u32 | ipcoro::uring::futex2_private;
constexpr std::uint64_t any_bit = ipcoro::uring::futex_bitset_match_any;

}  // namespace

TEST_CASE("a ring set up with single_issuer gets SINGLE_ISSUER and DEFER_TASKRUN on Linux 6.1 and later",
          "[uring]") {
  const kernel_version k = running_kernel();
  if (ipcoro::test::no_defer_taskrun_forced())
    IPCORO_SKIP("IPCORO_NO_DEFER_TASKRUN is set: rings are made as before Linux 6.0");
  ring r;
  REQUIRE_FALSE(r.initialised());
  REQUIRE(r.init(setup_request{}) == 0);
  REQUIRE(r.initialised());
  const auto& f = r.probed();
  CHECK(f.kernel_major == k.major);
  CHECK(f.kernel_minor == k.minor);
  if (k.at_least(6, 1)) {
    CHECK(f.single_issuer);
    CHECK(f.defer_taskrun);
    CHECK((f.setup_flags & IORING_SETUP_SINGLE_ISSUER) != 0);
    CHECK((f.setup_flags & IORING_SETUP_DEFER_TASKRUN) != 0);
  }
  CHECK(f.single_issuer == ((f.setup_flags & IORING_SETUP_SINGLE_ISSUER) != 0));
  CHECK(f.defer_taskrun == ((f.setup_flags & IORING_SETUP_DEFER_TASKRUN) != 0));
  nop_round_trip(r);
}

TEST_CASE("a ring set up without single_issuer has neither SINGLE_ISSUER nor DEFER_TASKRUN and works",
          "[uring]") {
  ring r;
  setup_request req;
  req.single_issuer = false;
  REQUIRE(r.init(req) == 0);
  const auto& f = r.probed();
  CHECK_FALSE(f.single_issuer);
  CHECK_FALSE(f.defer_taskrun);
  CHECK((f.setup_flags & (IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN)) == 0);
  CHECK(f.nodrop);
  CHECK(f.ext_arg);
  nop_round_trip(r);
  nop_round_trip(r);
}

TEST_CASE("init on a ring that is already set up returns -EBUSY, and exit can be called twice", "[uring]") {
  ring r;
  REQUIRE(r.init(setup_request{}) == 0);
  CHECK(r.init(setup_request{}) == -EBUSY);
  nop_round_trip(r);  // the refused second init left the ring intact
  r.exit();
  CHECK_FALSE(r.initialised());
  r.exit();
  CHECK_FALSE(r.initialised());
  // A ring that was exited can be set up again.
  REQUIRE(r.init(setup_request{}) == 0);
  nop_round_trip(r);
}

TEST_CASE("the ring gets the requested queue sizes and hands out no SQE when the SQ is full", "[uring]") {
  SECTION("an explicit completion queue size") {
    ring r;
    setup_request req;
    req.entries = 4;
    req.cq_entries = 8;
    REQUIRE(r.init(req) == 0);
    CHECK(r.raw()->sq.ring_entries == 4);
    CHECK(r.raw()->cq.ring_entries == 8);
    CHECK(r.sq_space_left() == 4);
    for (std::uint64_t i = 1; i <= 4; ++i) prep_nop(r, i);
    CHECK(r.sq_ready() == 4);
    CHECK(r.sq_space_left() == 0);
    CHECK(r.try_get_sqe() == nullptr);
    REQUIRE(r.submit() == 4);
    CHECK(r.sq_space_left() == 4);
    REQUIRE(r.submit_and_wait(0) >= 0);
    auto done = ready_completions(r);
    REQUIRE(done.size() == 4);
    for (std::size_t i = 0; i < 4; ++i) CHECK(done[i].user_data == i + 1);
  }
  SECTION("the default completion queue is four times the submission queue") {
    ring r;
    setup_request req;
    req.entries = 16;
    REQUIRE(r.init(req) == 0);
    CHECK(r.raw()->sq.ring_entries == 16);
    CHECK(r.raw()->cq.ring_entries == 64);
  }
}

TEST_CASE("completions beyond a full CQ are held by the kernel and flagged as overflow, not dropped",
          "[uring]") {
  ring r;
  setup_request req;
  req.entries = 4;
  req.cq_entries = 8;
  REQUIRE(r.init(req) == 0);
  REQUIRE(r.probed().nodrop);
  constexpr std::uint64_t total = 20;
  for (std::uint64_t i = 0; i < total; ++i) {
    if (r.sq_space_left() == 0) REQUIRE(r.submit() == 4);
    prep_nop(r, i + 1);
  }
  REQUIRE(r.submit() == 4);
  REQUIRE(r.submit_and_wait(0) >= 0);
  CHECK(r.cq_overflow_pending());
  CHECK(r.cq_dropped() == 0);

  std::vector<completion> all;
  while (all.size() < total) {
    auto batch = ready_completions(r);
    REQUIRE_FALSE(batch.empty());
    all.insert(all.end(), batch.begin(), batch.end());
  }
  CHECK_FALSE(r.cq_overflow_pending());
  CHECK(r.cq_dropped() == 0);
  REQUIRE(all.size() == total);
  for (std::size_t i = 0; i < total; ++i) {
    CHECK(all[i].user_data == i + 1);
    CHECK(all[i].res == 0);
  }
}

TEST_CASE("the probe finds the opcodes this kernel has", "[uring]") {
  const kernel_version k = running_kernel();
  ring r;
  REQUIRE(r.init(setup_request{}) == 0);
  const auto& f = r.probed();

  // liburing's own probe, on a ring of its own, is the independent witness.
  ::io_uring_probe* p = ::io_uring_get_probe();
  REQUIRE(p != nullptr);
  auto has = [p](int op) { return op <= p->last_op && (p->ops[op].flags & IO_URING_OP_SUPPORTED) != 0; };
  CHECK(f.op_async_cancel == has(IORING_OP_ASYNC_CANCEL));
  CHECK(f.op_link_timeout == has(IORING_OP_LINK_TIMEOUT));
  CHECK(f.op_splice == has(IORING_OP_SPLICE));
  CHECK(f.op_msg_ring == has(IORING_OP_MSG_RING));
  CHECK(f.op_waitid == has(IPCORO_IORING_OP_WAITID));
  CHECK(f.op_futex_wait == has(IPCORO_IORING_OP_FUTEX_WAIT));
  CHECK(f.op_futex_wake == has(IPCORO_IORING_OP_FUTEX_WAKE));
  CHECK(f.op_futex_waitv == has(IPCORO_IORING_OP_FUTEX_WAITV));
  ::io_uring_free_probe(p);

  // And the kernel version says what must be there.
  CHECK(f.op_async_cancel);
  CHECK(f.op_link_timeout);
  CHECK(f.op_splice);
  if (k.at_least(5, 18)) CHECK(f.op_msg_ring);
  if (k.at_least(6, 7)) {
    CHECK(f.op_waitid);
    CHECK(f.op_futex_wait);
    CHECK(f.op_futex_wake);
    CHECK(f.op_futex_waitv);
  }
}

TEST_CASE("a futex wait whose expected value differs from the word completes with -EAGAIN", "[uring]") {
  ring r;
  REQUIRE(r.init(setup_request{}) == 0);
  if (!r.probed().op_futex_wait) {
    IPCORO_SKIP("this kernel has no IORING_OP_FUTEX_WAIT (Linux 6.7)");
  }
  alignas(4) std::uint32_t word = 5;
  ipcoro::uring::prep_futex_wait(sqe_for(r, 1), &word, 4, any_bit, private_u32);
  auto c = wait_one(r, 5s);
  REQUIRE(c.has_value());
  CHECK(c->user_data == 1);
  CHECK(c->res == -EAGAIN);
}

TEST_CASE("a futex wake with no waiter completes with 0 woken", "[uring]") {
  ring r;
  REQUIRE(r.init(setup_request{}) == 0);
  if (!r.probed().op_futex_wake) {
    IPCORO_SKIP("this kernel has no IORING_OP_FUTEX_WAKE (Linux 6.7)");
  }
  alignas(4) std::uint32_t word = 0;
  ipcoro::uring::prep_futex_wake(sqe_for(r, 1), &word, 1, any_bit, private_u32);
  auto c = wait_one(r, 5s);
  REQUIRE(c.has_value());
  CHECK(c->res == 0);
}

TEST_CASE("a futex wait on a matching word stays pending until a futex wake SQE completes it with 0",
          "[uring]") {
  auto single_issuer = GENERATE(true, false);
  CAPTURE(single_issuer);
  ring r;
  setup_request req;
  req.single_issuer = single_issuer;
  REQUIRE(r.init(req) == 0);
  if (!r.probed().op_futex_wait || !r.probed().op_futex_wake) {
    IPCORO_SKIP("this kernel has no IORING_OP_FUTEX_WAIT/WAKE (Linux 6.7)");
  }
  alignas(4) std::uint32_t word = 0;
  ipcoro::uring::prep_futex_wait(sqe_for(r, 1), &word, 0, any_bit, private_u32);
  // The NOP is issued after the wait; once its CQE is in, the wait has been issued too,
  // and had it failed, its CQE would have been posted first.
  prep_nop(r, 2);
  REQUIRE(r.submit_and_wait(1) >= 0);
  auto first = ready_completions(r);
  REQUIRE(first.size() == 1);
  CHECK(first[0].user_data == 2);

  std::atomic_ref<std::uint32_t>(word).store(1);
  ipcoro::uring::prep_futex_wake(sqe_for(r, 3), &word, 1, any_bit, private_u32);
  std::vector<completion> done;
  while (done.size() < 2) {
    auto c = wait_one(r, 5s);
    REQUIRE(c.has_value());
    done.push_back(*c);
  }
  for (const completion& c : done) {
    CAPTURE(c.user_data);
    if (c.user_data == 1)
      CHECK(c.res == 0);  // the wait: woken
    else if (c.user_data == 3)
      CHECK(c.res == 1);  // the wake: one waiter woken
    else
      FAIL("unexpected CQE");
  }
  CHECK(done[0].user_data != done[1].user_data);
}

TEST_CASE("a futex wait on a MAP_SHARED word is completed by a wake from another process", "[uring]") {
  shared_word shared;
  *shared.word = 0;
  ring r;
  REQUIRE(r.init(setup_request{}) == 0);
  if (!r.probed().op_futex_wait || !r.probed().op_futex_wake) {
    IPCORO_SKIP("this kernel has no IORING_OP_FUTEX_WAIT/WAKE (Linux 6.7)");
  }
  // Without FUTEX2_PRIVATE: the futex is keyed by the shared page, not by this process.
  constexpr std::uint32_t shared_u32 = ipcoro::uring::futex2_size_u32;
  ipcoro::uring::prep_futex_wait(sqe_for(r, 1), shared.word, 0, any_bit, shared_u32);
  prep_nop(r, 2);
  REQUIRE(r.submit_and_wait(1) >= 0);
  auto first = ready_completions(r);
  REQUIRE(first.size() == 1);
  REQUIRE(first[0].user_data == 2);

  std::uint32_t* word = shared.word;
  ipcoro::test::child_process child([word] {
    ring cr;
    if (cr.init(setup_request{}) != 0) return 10;
    std::atomic_ref<std::uint32_t>(*word).store(1);
    ::io_uring_sqe* sqe = cr.try_get_sqe();
    ipcoro::uring::prep_futex_wake(sqe, word, 1, any_bit, shared_u32);
    if (cr.submit_and_wait(1) != 1) return 11;
    ::io_uring_cqe* cqe = nullptr;
    if (cr.peek_batch(&cqe, 1) != 1) return 12;
    const int woken = cqe->res;
    cr.advance(1);
    return woken == 1 ? 0 : 20 + (woken < 0 ? 0 : woken);  // 20: nobody woken
  });
  REQUIRE(child.wait() == 0);
  auto c = wait_one(r, 5s);
  REQUIRE(c.has_value());
  CHECK(c->user_data == 1);
  CHECK(c->res == 0);
  CHECK(*shared.word == 1);
}

TEST_CASE("waitid through the ring completes when a forked child exits and fills siginfo", "[uring]") {
  ring r;
  REQUIRE(r.init(setup_request{}) == 0);
  if (!r.probed().op_waitid) {
    WARN("skipped: this kernel has no IORING_OP_WAITID (Linux 6.7)");
    return;
  }
  raw_pipe go;
  const int go_read = go.fds[0];
  ipcoro::test::child_process child([go_read] {
    char c = 0;
    while (::read(go_read, &c, 1) < 0 && errno == EINTR) {
    }
    return 7;
  });

  siginfo_t info{};
  // WNOWAIT leaves the zombie for child_process::wait, which cross-checks the code.
  ipcoro::uring::prep_waitid(sqe_for(r, 1), P_PID, static_cast<id_t>(child.pid()), &info, WEXITED | WNOWAIT);
  prep_nop(r, 2);
  REQUIRE(r.submit_and_wait(1) >= 0);
  auto first = ready_completions(r);
  REQUIRE(first.size() == 1);  // the child is still blocked on the pipe: waitid is pending
  REQUIRE(first[0].user_data == 2);

  REQUIRE(::write(go.fds[1], "x", 1) == 1);
  auto c = wait_one(r, 10s);
  REQUIRE(c.has_value());
  CHECK(c->user_data == 1);
  CHECK(c->res == 0);
  CHECK(info.si_signo == SIGCHLD);
  CHECK(info.si_pid == child.pid());
  CHECK(info.si_code == CLD_EXITED);
  CHECK(info.si_status == 7);
  CHECK(child.wait() == 7);
}

TEST_CASE("waitid through the ring on a child that has already exited completes at once", "[uring]") {
  ring r;
  REQUIRE(r.init(setup_request{}) == 0);
  if (!r.probed().op_waitid) {
    WARN("skipped: this kernel has no IORING_OP_WAITID (Linux 6.7)");
    return;
  }
  ipcoro::test::child_process child([] { return 7; });
  siginfo_t seen{};
  // Block (outside any loop) until the child is a zombie, without reaping it.
  while (::waitid(P_PID, static_cast<id_t>(child.pid()), &seen, WEXITED | WNOWAIT) < 0)
    REQUIRE(errno == EINTR);

  siginfo_t info{};
  // WNOWAIT again: child_process reaps it, so no pid is ever signalled after reaping.
  ipcoro::uring::prep_waitid(sqe_for(r, 1), P_PID, static_cast<id_t>(child.pid()), &info, WEXITED | WNOWAIT);
  auto c = wait_one(r, 5s);
  REQUIRE(c.has_value());
  CHECK(c->res == 0);
  CHECK(info.si_pid == child.pid());
  CHECK(info.si_code == CLD_EXITED);
  CHECK(info.si_status == 7);
  CHECK(child.wait() == 7);
}
