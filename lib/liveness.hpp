// SPDX-License-Identifier: MIT
// Whether a process recorded in shared memory still lives: the one rule every record uses.
#pragma once

#include "ipcoro/detail/region.hpp"

#include <sys/types.h>

#include <cstdint>

namespace ipcoro::detail {

// The rule, for every record (a region's creator, a mutex holder, a queue's or a ring's
// peers): a process is dead only when that is certain: no such pid (kill(pid, 0) says
// ESRCH, asked again when /proc does not show the pid, so that /proc mounted with hidepid
// or not at all hides nothing), a zombie, another start time than recorded (the pid was
// reused), or another boot than recorded. Anything that cannot be told (an error reading
// /proc) counts as alive: nothing is taken from a process that may still run.

/// This process's identity, computed once per process (again in a forked child).
/// Throws std::system_error when /proc is not mounted (it names /proc).
const process_identity& this_process();

/// This process's start time (clock ticks after boot), or 0 when /proc cannot tell. Never throws.
std::uint64_t this_process_start_time() noexcept;

/// False when `who` is certainly gone (see the rule above); true otherwise.
bool process_alive(const process_identity& who) noexcept;

/// The same rule for a record that keeps less of the identity: the bits `start_mask` of
/// the start time (`start_time` 0: not recorded) and no boot.
bool pid_alive(pid_t pid, std::uint64_t start_time, std::uint64_t start_mask) noexcept;

/// The same rule without a start time: a reused pid counts as running.
bool pid_running(pid_t pid) noexcept;

/// Whether every write end of the pipe whose read end is `fd` is closed, so that none of
/// the processes that held one can still come (POLLHUP). Never waits.
bool write_ends_closed(int fd) noexcept;

/// A hash of /proc/sys/kernel/random/boot_id, or 1 when it cannot be read (then every
/// identity looks like this boot's, which errs on the side of "alive").
std::uint64_t boot_id_hash() noexcept;

/// Fields 3 (state, 'Z' for a zombie), 9 (the kernel's flags) and 22 (start time in clock
/// ticks since boot) of /proc/<pid>/stat.
struct proc_stat_fields {
  char state = '?';
  std::uint64_t flags = 0;
  std::uint64_t start_time = 0;
};
/// Reads them; returns 0, or -errno (-ENOENT / -ESRCH when there is no such process).
int read_proc_stat(pid_t pid, proc_stat_fields& out) noexcept;

/// True when `pid` is on its way out: the kernel has begun its exit (it may have closed its
/// descriptors, so its peers already see it gone) or it is a zombie. False when it runs, or
/// when /proc cannot tell.
bool pid_exiting(pid_t pid) noexcept;

}  // namespace ipcoro::detail
