// SPDX-License-Identifier: MIT
// Why io_uring_setup failed, and what to change, as an error message.
#include "setup_error.hpp"

#include "ipcoro/error.hpp"
#include "proc_value.hpp"

#include <fmt/core.h>

#include <cerrno>
#include <cstdio>
#include <string>
#include <system_error>

namespace ipcoro::detail {

namespace {

/// Why io_uring_setup said EPERM, and what to change, for each value of the sysctl.
std::string io_uring_refused_advice() {
  const long disabled = read_proc_long("/proc/sys/kernel/io_uring_disabled");
  const long group = read_proc_long("/proc/sys/kernel/io_uring_group");
  switch (disabled) {
    case 2:
      return "io_uring_setup: io_uring is disabled for every process (kernel.io_uring_disabled = 2); "
             "set it to 0 (sysctl kernel.io_uring_disabled=0)";
    case 1:
      return fmt::format(
          "io_uring_setup: io_uring is allowed only to privileged processes and to the group "
          "kernel.io_uring_group ({}) (kernel.io_uring_disabled = 1); add this user to that "
          "group, or set kernel.io_uring_disabled to 0",
          group < 0 ? std::string("not set") : fmt::format("gid {}", group));
    default:
      return "io_uring_setup: refused (EPERM) though the kernel allows io_uring "
             "(kernel.io_uring_disabled is 0 or absent): a seccomp filter or security policy (a container "
             "runtime's, for example) blocks it; allow io_uring_setup, io_uring_enter and io_uring_register "
             "there";
  }
}

}  // namespace

void throw_io_uring_setup_error(int err) {
  switch (err) {
    case ENOSYS:
      throw std::system_error(err, std::system_category(),
                              "io_uring_setup: this kernel has no io_uring (needs Linux 5.11 or later, "
                              "built with CONFIG_IO_URING)");
    case EPERM:
      throw std::system_error(err, std::system_category(), io_uring_refused_advice());
    case ENOMEM:
      throw std::system_error(err, std::system_category(),
                              "io_uring_setup: cannot lock the ring's memory; raise RLIMIT_MEMLOCK "
                              "(ulimit -l) or use fewer entries");
    default:
      throw_errno(err, "io_uring_setup");
  }
}

}  // namespace ipcoro::detail
