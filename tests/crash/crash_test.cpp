// SPDX-License-Identifier: MIT
// The crash matrix: every transport, as a link and by name, with the sender and then the
// receiver killed (SIGKILL) at each step; the survivor must not hang, must not take the kill
// for a clean end, must lose and repeat nothing, and no name may outlive the recovery.
#include "ipcoro/channel.hpp"
#include "ipcoro/error.hpp"
#include "ipcoro/fd_io.hpp"
#include "ipcoro/io_context.hpp"
#include "ipcoro/pipeline.hpp"
#include "ipcoro/process_mutex.hpp"
#include "ipcoro/shm_ring.hpp"
#include "ipcoro/sync_wait.hpp"
#include "ipcoro/task.hpp"
#include "ipcoro/when_all.hpp"

#include "channel_support.hpp"
#include "crash_support.hpp"
#include "process.hpp"

#include <catch2/catch.hpp>

#include <fcntl.h>
#include <mqueue.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace {

using namespace std::chrono_literals;
using namespace ipcoro::test::crash;
using ipcoro::channel_link;
using ipcoro::channel_receiver;
using ipcoro::channel_sender;
using ipcoro::task;
using ipcoro::test::child_process;
using ipcoro::test::contains;
using steady = std::chrono::steady_clock;

// ---- settings ----

/// How long a peer's death may take to be seen: the check interval of rings and queues
/// (ring_options::liveness_check_interval) plus slack for a loaded machine (IPCORO_CRASH_SLACK_MS).
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
constexpr int default_slack_ms = 4000;  // sanitized builds run several times slower
#else
constexpr int default_slack_ms = 1500;
#endif

std::chrono::milliseconds bound() {
  return ipcoro::ring_options{}.liveness_check_interval +
         std::chrono::milliseconds(env_int("IPCORO_CRASH_SLACK_MS", default_slack_ms));
}
/// The longest a step before the kill (a fork, an open) may take before the trial fails.
constexpr std::chrono::seconds setup_limit{20};
int trials_per_cell() { return env_int("IPCORO_CRASH_TRIALS", 29) * soak_factor(); }
int parallel_trials() { return env_int("IPCORO_CRASH_PARALLEL", 8); }

// ---- the matrix ----

enum class point { before_end, before_first, mid_stream, mid_frame, during_close };
constexpr point all_points[] = {point::before_end, point::before_first, point::mid_stream, point::mid_frame,
                                point::during_close};
const char* to_string(point p) {
  switch (p) {
    case point::before_end:
      return "before_end";
    case point::before_first:
      return "before_first";
    case point::mid_stream:
      return "mid_stream";
    case point::mid_frame:
      return "mid_frame";
    case point::during_close:
      return "during_close";
  }
  return "?";
}

struct cell {
  std::string transport;  // as fresh_address takes it
  bool link = true;
  bool sender_dies = true;
  point when = point::mid_stream;
};

bool byte_stream(const std::string& transport) { return transport == "pipe" || transport == "fifo"; }
bool ring(const std::string& transport) {
  return transport == "shm" || transport == "shm-mpmc" || transport == "file";
}

/// Why a cell cannot be run, or "" when it can.
std::string not_applicable(const cell& c) {
  if (c.transport == "pipe" && !c.link) return "pipe: is a link-only transport (no name to open)";
  if (c.transport == "mq" && c.when == point::mid_frame)
    return "a queue message is posted and taken by one system call, whole or not at all: there is no "
           "frame to cut; covered by mid_stream";
  return "";
}
/// How a cell is approximated, or "".
std::string remark_of(const cell& c) {
  if (ring(c.transport) && c.when == point::mid_frame)
    return "approximated: 64 KiB records, killed at a varied record; a record is published by one atomic "
           "store after its copy, so a kill during the copy cannot be placed deterministically";
  if (byte_stream(c.transport) && c.when == point::mid_frame && c.sender_dies)
    return "deterministic: killed while its send of a 256 KiB message is blocked with part of it in the 64 "
           "KiB "
           "pipe (seen through FIONREAD); the receiver must report the cut frame as one";
  if (byte_stream(c.transport) && c.when == point::mid_frame)
    return "256 KiB messages through a 64 KiB pipe: the receiver is killed while the next one arrives";
  if (!c.link && c.sender_dies && c.when == point::before_end)
    return "no sender ever opened the name: the receiver must go on waiting (bounded) and then serve a "
           "new sender";
  if (!c.link && !c.sender_dies && c.when == point::before_end)
    return "no receiver ever opened the name: open_sender must fail";
  return "";
}

/// One trial's fixed choices: the address, the sizes, and the kill point in the stream.
struct trial_plan {
  cell c;
  std::string address;
  std::size_t words = 2;         // of an ordinary message
  std::size_t big_words = 2;     // of the message cut on a byte stream
  std::uint64_t k = 0;           // the victim is killed once this many messages went through
  std::uint64_t total = 0;       // during_close: the victim closes after this many (k + a few)
  bool cut_frame = false;        // byte stream, sender dies mid-frame
  bool read_after_kill = false;  // the survivor reads only after the kill (so the pipe fills)
};

trial_plan plan_for(const cell& c, std::size_t trial) {
  trial_plan p;
  p.c = c;
  const bool big = c.when == point::mid_frame;
  std::string options;
  if (byte_stream(c.transport)) {
    p.big_words = 32768;  // 256 KiB, four times the pipe
    if (big && !c.sender_dies) p.words = p.big_words;
  } else if (c.transport == "mq") {
    options = "capacity=8&message_size=256";
  } else if (c.transport == "shm-mpmc") {
    options = big ? "capacity=8&message_size=80k" : "capacity=16&message_size=256";
    if (big) p.words = 8192;
  } else {
    options = big ? "capacity=1m" : "capacity=64k";
    if (big) p.words = 8192;
  }
  p.address = ipcoro::test::fresh_address(c.transport, options);
  switch (c.when) {
    case point::before_end:
    case point::before_first:
      p.k = 0;
      break;
    case point::mid_stream:
      p.k = 1 + (trial * 37) % 400;
      break;
    case point::mid_frame:
      p.k = byte_stream(c.transport) && c.sender_dies ? (trial * 7) % 120 : 1 + trial % 6;
      break;
    case point::during_close:
      // The victim says it reached k, then goes on for a few messages and closes: the kill,
      // which takes the survivor a fraction of a millisecond, lands before, during or after
      // the close, depending on the trial.
      p.k = 1 + (trial * 13) % 100;
      p.total = p.k + (trial * 5) % 40;
      break;
  }
  p.cut_frame = big && c.sender_dies && byte_stream(c.transport);
  p.read_after_kill = p.cut_frame;
  return p;
}

// ---- what the victim tells the survivor through a pipe ----

constexpr std::uint64_t opened_marker = std::uint64_t{1} << 61;  // a named receiver exists
constexpr std::uint64_t closed_marker = std::uint64_t{1} << 62;  // close() returned
constexpr std::uint64_t failure_bit = std::uint64_t{1} << 63;    // | outcome: the victim saw a fault

constexpr std::uint64_t cut_bit = std::uint64_t{1} << 60;  // | k: blocked with part of a frame written

/// The bytes waiting in every pipe or FIFO this process holds, but `except`: FIONREAD
/// counts a pipe's contents through either end.
long bytes_in_pipes(int except) {
  long total = 0;
  std::vector<ino_t> seen;
  for (int fd = 0; fd < 1024; ++fd) {
    struct stat st {};
    if (fd == except || ::fstat(fd, &st) != 0 || !S_ISFIFO(st.st_mode)) continue;
    if (std::find(seen.begin(), seen.end(), st.st_ino) != seen.end()) continue;
    seen.push_back(st.st_ino);
    int n = 0;
    if (::ioctl(fd, FIONREAD, &n) == 0) total += n;
  }
  return total;
}

void say(int fd, std::uint64_t v) noexcept { (void)!::write(fd, &v, sizeof v); }
[[noreturn]] void wait_to_be_killed() {
  for (;;) ::pause();
}

task<void> send_big(channel_sender<message>& tx, message big) { co_await tx.send(std::move(big)); }

/// Says `k` once the pipe holds more than `before` bytes (with cut_bit: a frame is cut), or
/// after 10 s without (then the survivor expects no cut).
task<void> watch_pipe(long before, std::uint64_t k, int say_fd) {
  const auto give_up = steady::now() + 10s;
  while (bytes_in_pipes(say_fd) <= before && steady::now() < give_up) co_await ipcoro::nop();
  say(say_fd, k | (bytes_in_pipes(say_fd) > before ? cut_bit : 0));
  wait_to_be_killed();
}

task<void> send_as_victim(channel_sender<message>& tx, const trial_plan& p, int say_fd) {
  for (std::uint64_t seq = 0;; ++seq) {
    if (p.cut_frame && seq == p.k) {
      // Nobody reads yet: the send of a frame four times the pipe's size blocks with part
      // of it written. A watcher on this loop sees the pipe grow past what it held before
      // (FIONREAD), and only then says the point is reached: the kill lands mid-frame.
      co_await tx.flush();  // what was sent before is in the pipe, not held: only the big frame grows it
      const long before = bytes_in_pipes(say_fd);
      message big = make_message(seq, p.big_words);
      task<void> blocked = send_big(tx, std::move(big));  // named: GCC 12 and co_await temporaries
      task<void> watcher = watch_pipe(before, p.k, say_fd);
      co_await ipcoro::when_all(std::move(blocked), std::move(watcher));
      wait_to_be_killed();
    }
    message m = make_message(seq, p.words);
    co_await tx.send(std::move(m));
    // A completed send promises delivery once the message reached the kernel: at the end of
    // the loop's turn, or on flush() (docs/channels.md). Only then may the victim claim it.
    if (seq + 1 == p.k && !p.cut_frame) {
      co_await tx.flush();
      say(say_fd, p.k);
    }
    if (p.c.when == point::during_close && seq + 1 == p.total) {
      tx.close();
      say(say_fd, closed_marker);
      wait_to_be_killed();
    }
  }
}

int sender_victim(const trial_plan& p, channel_link* link, int say_fd) {
  if (p.c.when == point::before_end) {
    say(say_fd, 0);
    wait_to_be_killed();
  }
  ipcoro::io_context ctx;
  channel_sender<message> tx;
  if (link != nullptr) {
    tx = link->sender<message>();
    link->reset();
  } else {
    tx = ipcoro::sync_wait(ctx, ipcoro::open_sender<message>(p.address));
  }
  if (p.c.when == point::before_first) {
    say(say_fd, 0);
    wait_to_be_killed();
  }
  ipcoro::sync_wait(ctx, send_as_victim(tx, p, say_fd));
  wait_to_be_killed();
}

task<void> receive_as_victim(channel_receiver<message>& rx, const trial_plan& p, int say_fd) {
  sequence_check check;
  for (;;) {
    std::optional<message> m = co_await rx.receive();
    if (!m) {
      say(say_fd, failure_bit | static_cast<std::uint64_t>(outcome::silent_end));
      co_return;
    }
    check.take(*m);
    if (check.bad != outcome::survived) {
      say(say_fd, failure_bit | static_cast<std::uint64_t>(check.bad));
      co_return;
    }
    if (check.next == p.k) say(say_fd, p.k);
    if (p.c.when == point::during_close && check.next == p.total) {
      rx.close();
      say(say_fd, closed_marker);
      co_return;
    }
  }
}

int receiver_victim(const trial_plan& p, channel_link* link, int say_fd) {
  if (p.c.when == point::before_end) {
    say(say_fd, 0);
    wait_to_be_killed();
  }
  ipcoro::io_context ctx;
  channel_receiver<message> rx;
  if (link != nullptr) {
    rx = link->receiver<message>();
    link->reset();
  } else {
    rx = ipcoro::sync_wait(ctx, ipcoro::open_receiver<message>(p.address));
    say(say_fd, opened_marker);
  }
  if (p.c.when != point::before_first) ipcoro::sync_wait(ctx, receive_as_victim(rx, p, say_fd));
  if (p.c.when == point::before_first) say(say_fd, 0);
  wait_to_be_killed();
}

// ---- the survivor ----

/// The victim, the pipe it speaks through, and when it was killed.
struct kill_state {
  child_process* victim = nullptr;
  int fd = -1;
  bool killed = false;
  steady::time_point killed_at{};
  std::uint64_t reached = 0;
  bool cut = false;  // the victim is blocked with part of a frame in the pipe
  outcome victim_saw = outcome::survived;
  bool victim_silent = false;  // the victim ended without reaching its point
  bool closed = false;

  void kill_now() {
    if (killed) return;
    killed_at = steady::now();
    victim->kill(SIGKILL);
    killed = true;
  }
};

task<std::optional<std::uint64_t>> read_word(int fd) {
  std::uint64_t v = 0;
  const std::size_t n = co_await ipcoro::read_exact(fd, std::as_writable_bytes(std::span(&v, 1)));
  if (n != sizeof v) co_return std::nullopt;
  co_return v;
}

/// Kills the victim once it says it reached its point (or saw a fault).
task<void> kill_at_signal(kill_state& ks) {
  for (;;) {
    std::optional<std::uint64_t> v;
    try {
      v = co_await read_word(ks.fd).with_timeout(setup_limit);
    } catch (const ipcoro::timed_out&) {
    }
    if (!v) {
      ks.victim_silent = !ks.killed;
      ks.kill_now();
      co_return;
    }
    if (*v == opened_marker) continue;
    if ((*v & failure_bit) != 0) {
      ks.victim_saw = static_cast<outcome>(*v & 0xff);
    } else if ((*v & cut_bit) != 0) {
      ks.reached = *v & ~cut_bit;
      ks.cut = true;
    } else {
      ks.reached = *v;
    }
    ks.kill_now();
    co_return;
  }
}

/// After the victim is dead: what else it said before it died (the closed marker).
void read_rest(kill_state& ks) {
  std::uint64_t v = 0;
  while (::read(ks.fd, &v, sizeof v) == static_cast<ssize_t>(sizeof v)) {
    if (v == closed_marker) ks.closed = true;
    if ((v & failure_bit) != 0 && v != closed_marker) ks.victim_saw = static_cast<outcome>(v & 0xff);
  }
}

/// How a survivor's waits ended.
struct survivor_state {
  sequence_check check;
  bool clean_end = false;
  bool timed_out = false;
  bool ended_before_kill = false;
  bool unexpected_error = false;
  std::string error;
  steady::time_point ended{};
  double longest_wait_ms = 0;  // of the waits after the kill, from the later of its start and the kill

  void note_wait(const kill_state& ks, steady::time_point started, bool started_after_kill) {
    if (!ks.killed) return;
    const steady::time_point from = started_after_kill ? started : ks.killed_at;
    longest_wait_ms =
        std::max(longest_wait_ms, std::chrono::duration<double, std::milli>(steady::now() - from).count());
  }
};

template <class F>
void classify(survivor_state& st, F&& f) {
  try {
    f();
  } catch (const ipcoro::timed_out&) {
    st.timed_out = true;
  } catch (const ipcoro::channel_error& e) {
    st.error = e.what();
  } catch (const ipcoro::peer_died& e) {
    st.error = e.what();
  } catch (const std::exception& e) {
    st.error = e.what();
    st.unexpected_error = true;
  }
}

task<void> receive_loop(channel_receiver<message>& rx, kill_state& ks, survivor_state& st) {
  for (std::uint64_t turn = 0;; ++turn) {
    // Receives that find a message ready complete without suspending: give the loop a
    // turn now and then, or the killer never learns that the victim reached its point.
    if (!ks.killed && turn % 8 == 7) co_await ipcoro::nop();
    std::exception_ptr failure;
    const steady::time_point started = steady::now();
    const bool after_kill = ks.killed;
    try {
      std::optional<message> m;
      if (after_kill) {
        m = co_await rx.receive().with_timeout(bound());
      } else {
        m = co_await rx.receive().with_timeout(setup_limit);
      }
      st.note_wait(ks, started, after_kill);
      if (!m) {
        st.clean_end = true;
        break;
      }
      st.check.take(*m);
      if (st.check.bad != outcome::survived) break;
    } catch (...) {
      failure = std::current_exception();
    }
    if (failure) {
      st.note_wait(ks, started, after_kill);
      classify(st, [&] { std::rethrow_exception(failure); });
      break;
    }
  }
  st.ended = steady::now();
  st.ended_before_kill = !ks.killed;
  ks.kill_now();
}

task<void> send_loop(channel_sender<message>& tx, std::size_t words, kill_state& ks, survivor_state& st) {
  for (std::uint64_t seq = 0;; ++seq) {
    if (!ks.killed && seq % 8 == 7) co_await ipcoro::nop();  // as in receive_loop
    message m = make_message(seq, words);
    std::exception_ptr failure;
    const steady::time_point started = steady::now();
    const bool after_kill = ks.killed;
    try {
      if (after_kill) {
        co_await tx.send(std::move(m)).with_timeout(bound());
      } else {
        co_await tx.send(std::move(m)).with_timeout(setup_limit);
      }
    } catch (...) {
      failure = std::current_exception();
    }
    st.note_wait(ks, started, after_kill);
    if (failure) {
      classify(st, [&] { std::rethrow_exception(failure); });
      break;
    }
  }
  st.ended = steady::now();
  st.ended_before_kill = !ks.killed;
  ks.kill_now();
}

double ms_between(steady::time_point a, steady::time_point b) {
  return std::chrono::duration<double, std::milli>(b - a).count();
}

/// Removes what names_left_behind found, and returns how many there were.
int remove_leftovers(trial_result& r) {
  const ipcoro::test::leftovers left =
      ipcoro::test::names_left_behind("ipcoro-test-" + std::to_string(::getpid()) + "-");
  for (const std::string& name : left.names) {
    if (name.rfind("mq:", 0) == 0) {
      ::mq_unlink(name.substr(3).c_str());
    } else {
      ::unlink(name.c_str());
    }
  }
  if (!left.names.empty()) {
    std::string note = r.note;
    r.set_note((note.empty() ? "" : note + "; ") + "left behind: " + left.names.front());
  }
  return static_cast<int>(left.names.size());
}

void fail(trial_result& r, outcome o, const std::string& why) {
  r.outcome = static_cast<int>(o);
  r.set_note(why);
}

/// The receiver survives; the sender is killed.
void survive_as_receiver(const trial_plan& p, trial_result& r) {
  ipcoro::io_context ctx;
  std::optional<channel_link> link;
  channel_receiver<message> rx;
  if (p.c.link) {
    link.emplace(channel_link::create(p.address));
  } else {
    rx = ipcoro::sync_wait(ctx, ipcoro::open_receiver<message>(p.address));
  }
  int fds[2];
  if (::pipe2(fds, O_CLOEXEC) != 0) throw std::runtime_error("pipe2 failed");
  child_process victim([&]() -> int {
    ::close(fds[0]);
    return sender_victim(p, link ? &*link : nullptr, fds[1]);
  });
  ::close(fds[1]);
  if (link) {
    rx = link->receiver<message>();
    link->reset();
  }
  kill_state ks;
  ks.victim = &victim;
  ks.fd = fds[0];
  survivor_state st;

  const bool named_before_end = !p.c.link && p.c.when == point::before_end;
  if (named_before_end) {
    // Nobody ever opened a sender: the receiver must neither end nor fail, and must then
    // serve a new sender whole.
    ipcoro::sync_wait(ctx, kill_at_signal(ks));
    ipcoro::sync_wait(ctx, [](channel_receiver<message>& rx, survivor_state& st) -> task<void> {
      std::exception_ptr failure;
      try {
        std::optional<message> m = co_await rx.receive().with_timeout(bound());
        if (m) st.check.take(*m);
        st.clean_end = !m;
      } catch (...) {
        failure = std::current_exception();
      }
      if (failure) classify(st, [&] { std::rethrow_exception(failure); });
    }(rx, st));
    if (st.clean_end) {
      fail(r, outcome::silent_end, "the receiver ended its stream although no sender ever came");
    } else if (!st.timed_out) {
      fail(r, outcome::wrong_error, "the receiver failed although no sender ever came: " + st.error);
    } else {
      child_process next([&p]() -> int {
        ipcoro::io_context c2;
        channel_sender<message> tx = ipcoro::sync_wait(c2, ipcoro::open_sender<message>(p.address));
        for (std::uint64_t seq = 0; seq < 3; ++seq) {
          message m = make_message(seq, p.words);
          ipcoro::sync_wait(c2, tx.send(std::move(m)));
        }
        tx.close();
        return 0;
      });
      survivor_state again;
      ks.killed_at = steady::now();  // the bound now runs from the new sender's start
      ipcoro::sync_wait(ctx, receive_loop(rx, ks, again));
      if (!again.clean_end || again.check.next != 3 || again.check.bad != outcome::survived)
        fail(r, outcome::wrong_error,
             "a new sender after the dead one was not served whole: " + std::to_string(again.check.next) +
                 " messages, " + (again.clean_end ? "clean end" : again.error));
      (void)next.wait(setup_limit);
    }
    rx.close();
  } else {
    if (p.read_after_kill) {
      ipcoro::sync_wait(ctx, kill_at_signal(ks));
      (void)victim.wait(setup_limit);
      ipcoro::sync_wait(ctx, receive_loop(rx, ks, st));
    } else {
      ipcoro::sync_wait(ctx, ipcoro::when_all(kill_at_signal(ks), receive_loop(rx, ks, st)));
      (void)victim.wait(setup_limit);
    }
    read_rest(ks);
    rx.close();

    r.acknowledged = ks.reached;
    r.received = st.check.next;
    r.peer_closed = ks.closed ? 1 : 0;
    if (!st.ended_before_kill) r.detect_ms = ms_between(ks.killed_at, st.ended);
    r.longest_wait_ms = st.longest_wait_ms;
    const double limit_ms = static_cast<double>(bound().count());
    const bool during_close = p.c.when == point::during_close;
    if (ks.victim_silent) {
      fail(r, outcome::setup_failed, "the sender ended before reaching its point");
    } else if (st.check.bad != outcome::survived) {
      fail(r, st.check.bad, st.check.note);
    } else if (st.timed_out || st.longest_wait_ms > limit_ms) {
      fail(r, outcome::hang,
           "a receive waited " + std::to_string(static_cast<long>(st.longest_wait_ms)) +
               " ms after the kill (bound " + std::to_string(static_cast<long>(limit_ms)) + " ms)");
    } else if (st.clean_end && !during_close) {
      fail(r, outcome::silent_end,
           "a killed sender was taken for a clean end after " + std::to_string(r.received) + " messages");
    } else if (st.clean_end && r.received != p.total) {
      fail(r, outcome::lost,
           "clean end after " + std::to_string(r.received) + " of " + std::to_string(p.total));
    } else if (!st.clean_end && st.unexpected_error) {
      fail(r, outcome::wrong_error, "unexpected error: " + st.error);
    } else if (!st.clean_end && st.ended_before_kill) {
      fail(r, outcome::wrong_error, "an error before the kill: " + st.error);
    } else if (!st.clean_end && during_close && ks.closed) {
      fail(r, outcome::wrong_error, "the sender had closed, yet the receiver got: " + st.error);
    } else if (r.received < r.acknowledged) {
      fail(r, outcome::lost,
           std::to_string(r.received) + " received of " + std::to_string(r.acknowledged) + " sent");
    } else {
      r.outcome = static_cast<int>(outcome::survived);
      r.cut_frame = contains(st.error, "inside a message") ? 1 : 0;
      if (p.cut_frame && r.cut_frame != (ks.cut ? 1 : 0))
        fail(r, outcome::wrong_error,
             std::string(ks.cut ? "part of a frame was in the pipe" : "no part of a frame was in the pipe") +
                 ", yet the receiver said: " + st.error);
      else
        r.set_note(st.clean_end ? "clean end (close had been called)" : st.error);
    }
  }
  link.reset();
  ::close(fds[0]);
}

/// The sender survives; the receiver is killed.
void survive_as_sender(const trial_plan& p, trial_result& r) {
  ipcoro::io_context ctx;
  std::optional<channel_link> link;
  if (p.c.link) link.emplace(channel_link::create(p.address));
  int fds[2];
  if (::pipe2(fds, O_CLOEXEC) != 0) throw std::runtime_error("pipe2 failed");
  child_process victim([&]() -> int {
    ::close(fds[0]);
    return receiver_victim(p, link ? &*link : nullptr, fds[1]);
  });
  ::close(fds[1]);
  kill_state ks;
  ks.victim = &victim;
  ks.fd = fds[0];
  survivor_state st;
  channel_sender<message> tx;
  const bool named_before_end = !p.c.link && p.c.when == point::before_end;

  if (link) {
    tx = link->sender<message>();
    link->reset();
  } else if (!named_before_end) {
    std::optional<std::uint64_t> opened = ipcoro::sync_wait(ctx, read_word(ks.fd).with_timeout(setup_limit));
    if (opened != opened_marker) {
      fail(r, outcome::setup_failed, "the receiver did not open its end");
      ::close(fds[0]);
      return;
    }
    tx = ipcoro::sync_wait(ctx, ipcoro::open_sender<message>(p.address));
  }

  if (named_before_end) {
    ipcoro::sync_wait(ctx, kill_at_signal(ks));
    ipcoro::sync_wait(ctx, [](const std::string& address, survivor_state& st) -> task<void> {
      std::exception_ptr failure;
      try {
        channel_sender<message> tx = co_await ipcoro::open_sender<message>(address).with_timeout(bound());
      } catch (...) {
        failure = std::current_exception();
      }
      if (failure) classify(st, [&] { std::rethrow_exception(failure); });
    }(p.address, st));
    st.ended = steady::now();
    r.detect_ms = ms_between(ks.killed_at, st.ended);
    if (st.timed_out) {
      fail(r, outcome::hang, "open_sender waited for a receiver that never came");
    } else if (st.error.empty() || st.unexpected_error) {
      fail(r, outcome::wrong_error,
           "open_sender without a receiver: " + (st.error.empty() ? "succeeded" : st.error));
    } else {
      r.outcome = static_cast<int>(outcome::survived);
      r.set_note(st.error);
    }
  } else {
    ipcoro::sync_wait(ctx, ipcoro::when_all(kill_at_signal(ks), send_loop(tx, p.words, ks, st)));
    (void)victim.wait(setup_limit);
    read_rest(ks);
    tx.close();
    r.acknowledged = ks.reached;
    r.peer_closed = ks.closed ? 1 : 0;
    if (!st.ended_before_kill) r.detect_ms = ms_between(ks.killed_at, st.ended);
    r.longest_wait_ms = st.longest_wait_ms;
    const double limit_ms = static_cast<double>(bound().count());
    if (ks.victim_silent) {
      fail(r, outcome::setup_failed, "the receiver ended before reaching its point");
    } else if (ks.victim_saw != outcome::survived) {
      fail(r, ks.victim_saw,
           std::string("the receiver saw: ") + outcome_names[static_cast<int>(ks.victim_saw)]);
    } else if (st.timed_out || st.longest_wait_ms > limit_ms) {
      fail(r, outcome::hang,
           "a send waited " + std::to_string(static_cast<long>(st.longest_wait_ms)) +
               " ms after the kill (bound " + std::to_string(static_cast<long>(limit_ms)) + " ms)");
    } else if (st.unexpected_error) {
      fail(r, outcome::wrong_error, "unexpected error: " + st.error);
    } else if (st.ended_before_kill && p.c.when != point::during_close) {
      fail(r, outcome::wrong_error, "an error before the kill: " + st.error);
    } else {
      r.outcome = static_cast<int>(outcome::survived);
      r.set_note(st.error);
    }
    // Recovery: a restarted receiver takes the dead one's name over, and removes it.
    if (!p.c.link) {
      std::string refused;
      try {
        channel_receiver<message> again =
            ipcoro::sync_wait(ctx, ipcoro::open_receiver<message>(p.address).with_timeout(bound()));
        again.close();
      } catch (const std::exception& e) {
        refused = e.what();
      }
      if (!refused.empty()) {
        const std::string note = r.note;
        r.set_note(note + "; the restarted receiver was refused: " + refused);
        if (r.outcome == static_cast<int>(outcome::survived))
          r.outcome = static_cast<int>(outcome::wrong_error);
      }
    }
  }
  link.reset();
  ::close(fds[0]);
}

void run_trial(const trial_plan& p, trial_result& r) {
  r.detect_ms = -1;
  try {
    if (p.c.sender_dies) {
      survive_as_receiver(p, r);
    } else {
      survive_as_sender(p, r);
    }
  } catch (const std::exception& e) {
    fail(r, outcome::setup_failed, std::string("the trial failed to run: ") + e.what());
  }
  r.leftovers = remove_leftovers(r);
}

/// Runs every cell of one transport and mode, all trials in parallel workers.
void run_matrix(const std::string& transport, bool link) {
  std::vector<cell> cells;
  for (const bool sender_dies : {true, false})
    for (const point when : all_points) cells.push_back({transport, link, sender_dies, when});
  const int trials = trials_per_cell();
  // IPCORO_CRASH_CELL=receiver:mid_stream (a part of "victim:point") runs only the matching cells.
  const char* only = std::getenv("IPCORO_CRASH_CELL");
  auto selected = [only](const cell& c) {
    const std::string name = std::string(c.sender_dies ? "sender:" : "receiver:") + to_string(c.when);
    return only == nullptr || contains(name, only);
  };
  std::vector<cell> runnable;
  for (const cell& c : cells)
    if (not_applicable(c).empty() && selected(c)) runnable.push_back(c);
  std::vector<trial_plan> plans;
  for (const cell& c : runnable)
    for (int t = 0; t < trials; ++t) plans.push_back(plan_for(c, static_cast<std::size_t>(t)));
  shared_array<trial_result> results(plans.size());
  run_trials(plans.size(), parallel_trials(), setup_limit * 3, results,
             [&plans](std::size_t i, trial_result& r) { run_trial(plans[i], r); });

  std::size_t next = 0;
  for (const cell& c : cells) {
    cell_report rep;
    rep.group = "channel";
    rep.transport = transport;
    rep.mode = link ? "link" : "named";
    rep.victim = c.sender_dies ? "sender" : "receiver";
    rep.point = to_string(c.when);
    const std::string na = not_applicable(c);
    if (na.empty() && !selected(c)) continue;
    if (!na.empty()) {
      rep.status = "n/a";
      rep.remark = na;
    } else {
      rep.remark = remark_of(c);
      tally(rep, results, next, static_cast<std::size_t>(trials));
      next += static_cast<std::size_t>(trials);
      INFO(summary(rep));
      CHECK(rep.counts[0] == rep.trials);
      CHECK(rep.leftovers == 0);
    }
    report::get().add(rep);
  }
}

}  // namespace

TEST_CASE("crash matrix: pipe link", "[crash][pipe]") { run_matrix("pipe", true); }
TEST_CASE("crash matrix: FIFO link", "[crash][fifo]") { run_matrix("fifo", true); }
TEST_CASE("crash matrix: FIFO by name", "[crash][fifo]") { run_matrix("fifo", false); }
TEST_CASE("crash matrix: message queue link", "[crash][mq]") { run_matrix("mq", true); }
TEST_CASE("crash matrix: message queue by name", "[crash][mq]") { run_matrix("mq", false); }
TEST_CASE("crash matrix: SPSC ring link", "[crash][shm]") { run_matrix("shm", true); }
TEST_CASE("crash matrix: SPSC ring by name", "[crash][shm]") { run_matrix("shm", false); }
TEST_CASE("crash matrix: MPMC ring link", "[crash][shm-mpmc]") { run_matrix("shm-mpmc", true); }
TEST_CASE("crash matrix: MPMC ring by name", "[crash][shm-mpmc]") { run_matrix("shm-mpmc", false); }
TEST_CASE("crash matrix: file ring link", "[crash][file]") { run_matrix("file", true); }
TEST_CASE("crash matrix: file ring by name", "[crash][file]") { run_matrix("file", false); }
TEST_CASE("crash matrix: pipe by name (not applicable)", "[crash][pipe]") { run_matrix("pipe", false); }

// ---- pipeline stages ----

namespace {

constexpr const char* stage_names[] = {"source", "transform", "sink"};
constexpr const char* pipeline_transports[] = {"pipe", "fifo", "mq", "shm", "file"};

/// Writes this process's pid to `fd` once, when `count` reaches `k` (for the stage that dies).
struct stage_signal {
  int fd;
  bool victim;
  std::uint64_t k;
  void at(std::uint64_t count) const noexcept {
    if (victim && count == k) say(fd, static_cast<std::uint64_t>(::getpid()));
  }
};

task<void> kill_stage_at_signal(int fd, steady::time_point& killed_at, bool& killed) {
  std::optional<std::uint64_t> pid;
  try {
    pid = co_await read_word(fd).with_timeout(setup_limit);
  } catch (const ipcoro::timed_out&) {
  }
  if (!pid) co_return;
  killed_at = steady::now();
  ::kill(static_cast<pid_t>(*pid), SIGKILL);
  killed = true;
}

task<void> run_pipeline(ipcoro::pipeline& job, const ipcoro::pipeline_options& opts, survivor_state& st,
                        std::string& failed_stage) {
  std::exception_ptr failure;
  try {
    (void)co_await job.run(opts).with_timeout(setup_limit);
    st.clean_end = true;
  } catch (const ipcoro::pipeline_error& e) {
    failed_stage = e.stage();
    st.error = e.what();
  } catch (...) {
    failure = std::current_exception();
  }
  if (failure) classify(st, [&] { std::rethrow_exception(failure); });
  st.ended = steady::now();
}

void pipeline_trial(int victim_stage, std::size_t trial, trial_result& r) {
  r.detect_ms = -1;
  int fds[2];
  if (::pipe2(fds, O_CLOEXEC) != 0) throw std::runtime_error("pipe2 failed");
  const std::uint64_t k = 1 + (trial * 37) % 300;
  const stage_signal src{fds[1], victim_stage == 0, k};
  const stage_signal mid{fds[1], victim_stage == 1, k};
  const stage_signal end{fds[1], victim_stage == 2, k};
  ipcoro::pipeline job =
      ipcoro::pipeline::source<std::uint64_t>("source",
                                              [src](channel_sender<std::uint64_t>& out) -> task<void> {
                                                for (std::uint64_t i = 0;; ++i) {
                                                  co_await out.send(i);
                                                  src.at(i + 1);
                                                }
                                              })
          .then<std::uint64_t>(
              "transform",
              [mid](channel_receiver<std::uint64_t>& in, channel_sender<std::uint64_t>& out) -> task<void> {
                std::uint64_t n = 0;
                while (std::optional<std::uint64_t> v = co_await in.receive()) {
                  co_await out.send(*v * 2);
                  mid.at(++n);
                }
              })
          .sink("sink", [end](channel_receiver<std::uint64_t>& in) -> task<void> {
            std::uint64_t n = 0;
            while (std::optional<std::uint64_t> v = co_await in.receive()) {
              if (*v != 2 * n) throw std::runtime_error("sink: a value out of sequence");
              end.at(++n);
            }
          });
  ipcoro::pipeline_options opts;
  opts.transport = pipeline_transports[trial % std::size(pipeline_transports)];
  ipcoro::io_context ctx;
  survivor_state st;
  std::string failed_stage;
  steady::time_point killed_at{};
  bool killed = false;
  {
    // The stages inherit the pipe's write end; the parent's copy must go once they exist,
    // so a read sees the end if no stage ever signals. Close it after run() has forked:
    // the pipe is CLOEXEC and the stages are forked, so keep it open until run() ends.
    ipcoro::sync_wait(ctx, ipcoro::when_all(kill_stage_at_signal(fds[0], killed_at, killed),
                                            run_pipeline(job, opts, st, failed_stage)));
  }
  ::close(fds[0]);
  ::close(fds[1]);
  const std::string expected = stage_names[victim_stage];
  if (killed) r.detect_ms = r.longest_wait_ms = ms_between(killed_at, st.ended);
  if (!killed) {
    fail(r, outcome::setup_failed, "the stage never reached its point: " + st.error);
  } else if (st.timed_out || r.detect_ms > static_cast<double>(bound().count())) {
    fail(r, outcome::hang,
         "the pipeline took " + std::to_string(static_cast<long>(r.detect_ms)) + " ms to fail");
  } else if (st.clean_end) {
    fail(r, outcome::silent_end, "the pipeline finished although " + expected + " was killed");
  } else if (failed_stage != expected) {
    fail(r, outcome::wrong_error,
         std::string(opts.transport) + ": the error names '" + failed_stage + "', not '" + expected +
             "': " + st.error);
  } else {
    r.outcome = static_cast<int>(outcome::survived);
    r.set_note(st.error);
  }
}

}  // namespace

TEST_CASE("crash matrix: a killed pipeline stage is named in the pipeline's error", "[crash][pipeline]") {
  const int trials = trials_per_cell();
  shared_array<trial_result> results(static_cast<std::size_t>(3 * trials));
  run_trials(results.size(), parallel_trials(), setup_limit * 3, results,
             [trials](std::size_t i, trial_result& r) {
               pipeline_trial(static_cast<int>(i) / trials, i % static_cast<std::size_t>(trials), r);
               r.leftovers = remove_leftovers(r);
             });
  for (int stage = 0; stage < 3; ++stage) {
    cell_report rep;
    rep.group = "pipeline";
    rep.transport = "pipe, fifo, mq, shm, file (in turn)";
    rep.mode = "pipeline";
    rep.victim = stage_names[stage];
    rep.point = "mid_stream";
    tally(rep, results, static_cast<std::size_t>(stage * trials), static_cast<std::size_t>(trials));
    INFO(summary(rep));
    CHECK(rep.counts[0] == rep.trials);
    CHECK(rep.leftovers == 0);
    report::get().add(rep);
  }
}

// ---- the process mutex ----

namespace {

struct alignas(64) guarded {
  ipcoro::process_mutex_state state;
  std::uint64_t data;
};

enum class holder_death { holding_next_comes_later, holding_next_waits, after_unlock };
constexpr const char* holder_death_names[] = {"while holding; the next locker comes later",
                                              "while holding; the next locker waits",
                                              "right after unlocking (control)"};

task<void> lock_after_kill(const ipcoro::process_mutex& m, kill_state& ks, bool kill_first,
                           survivor_state& st, bool& took_over, bool& inconsistent, std::uint64_t& data,
                           guarded& g) {
  std::exception_ptr failure;
  try {
    if (kill_first) ks.kill_now();
    // The wait bound: one liveness check plus slack.
    ipcoro::process_mutex_guard guard = co_await m.lock().with_timeout(bound());
    took_over = guard.took_over();
    inconsistent = guard.inconsistent();
    data = g.data;
    guard.mark_consistent();
  } catch (...) {
    failure = std::current_exception();
  }
  if (failure) classify(st, [&] { std::rethrow_exception(failure); });
  st.ended = steady::now();
}

task<ipcoro::process_mutex_guard> lock_of(const ipcoro::process_mutex& m) { co_return co_await m.lock(); }

task<void> kill_after_a_turn(kill_state& ks) {
  co_await ipcoro::nop();  // the lock above has started and found the mutex held
  ks.kill_now();
}

void mutex_trial(holder_death how, trial_result& r) {
  r.detect_ms = -1;
  shared_array<guarded> shared(1);
  guarded& g = shared[0];
  const ipcoro::process_mutex::options opts{};
  const ipcoro::process_mutex m(g.state, opts);
  int fds[2];
  if (::pipe2(fds, O_CLOEXEC) != 0) throw std::runtime_error("pipe2 failed");
  child_process holder([&]() -> int {
    ::close(fds[0]);
    ipcoro::io_context ctx;
    ipcoro::process_mutex_guard guard = ipcoro::sync_wait(ctx, lock_of(m));
    g.data = 1;  // half of an update
    if (how == holder_death::after_unlock) {
      g.data = 2;
      guard.unlock();
    }
    say(fds[1], 1);
    wait_to_be_killed();
  });
  ::close(fds[1]);
  ipcoro::io_context ctx;
  kill_state ks;
  ks.victim = &holder;
  ks.fd = fds[0];
  survivor_state st;
  bool took_over = false;
  bool inconsistent = false;
  std::uint64_t data = 0;
  const std::optional<std::uint64_t> reached =
      ipcoro::sync_wait(ctx, read_word(fds[0]).with_timeout(setup_limit));
  if (!reached) {
    fail(r, outcome::setup_failed, "the holder never took the lock");
    ::close(fds[0]);
    return;
  }
  if (how == holder_death::holding_next_waits) {
    ipcoro::sync_wait(ctx,
                      ipcoro::when_all(lock_after_kill(m, ks, false, st, took_over, inconsistent, data, g),
                                       kill_after_a_turn(ks)));
  } else {
    ipcoro::sync_wait(ctx, lock_after_kill(m, ks, true, st, took_over, inconsistent, data, g));
  }
  (void)holder.wait(setup_limit);
  ::close(fds[0]);
  r.detect_ms = r.longest_wait_ms = ms_between(ks.killed_at, st.ended);
  const bool held = how != holder_death::after_unlock;
  if (st.timed_out || r.detect_ms > static_cast<double>(bound().count())) {
    fail(r, outcome::hang,
         "the next locker waited " + std::to_string(static_cast<long>(r.detect_ms)) + " ms");
  } else if (!st.error.empty()) {
    fail(r, outcome::wrong_error, "the next lock failed: " + st.error);
  } else if (took_over != held || inconsistent != held) {
    fail(r, held ? outcome::silent_end : outcome::wrong_error,
         std::string("the next locker got took_over=") + (took_over ? "true" : "false") +
             ", inconsistent=" + (inconsistent ? "true" : "false"));
  } else if (data != (held ? 1u : 2u)) {
    fail(r, outcome::corrupt, "the protected data reads " + std::to_string(data));
  } else {
    r.outcome = static_cast<int>(outcome::survived);
    r.set_note(held ? "owner died: took_over and inconsistent" : "free and consistent");
  }
}

}  // namespace

TEST_CASE("crash matrix: a process mutex whose holder is killed is taken over, marked inconsistent",
          "[crash][process_mutex]") {
  const int trials = trials_per_cell();
  constexpr holder_death all[] = {holder_death::holding_next_comes_later, holder_death::holding_next_waits,
                                  holder_death::after_unlock};
  shared_array<trial_result> results(static_cast<std::size_t>(3 * trials));
  run_trials(
      results.size(), parallel_trials(), setup_limit * 3, results,
      [trials, &all](std::size_t i, trial_result& r) { mutex_trial(all[static_cast<int>(i) / trials], r); });
  for (int c = 0; c < 3; ++c) {
    cell_report rep;
    rep.group = "process_mutex";
    rep.transport = "process_mutex";
    rep.mode = "shared memory";
    rep.victim = "holder";
    rep.point = holder_death_names[c];
    tally(rep, results, static_cast<std::size_t>(c * trials), static_cast<std::size_t>(trials));
    INFO(summary(rep));
    CHECK(rep.counts[0] == rep.trials);
    report::get().add(rep);
  }
}
