// SPDX-License-Identifier: MIT
// Runs a program with io_uring_setup refused (EPERM), as a container's seccomp policy does:
// without_io_uring PROGRAM [ARGS...]. Exits 77 when the kernel refuses the filter.
#include "process.hpp"

#include <unistd.h>

#include <cstdio>

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: %s PROGRAM [ARGS...]\n", argv[0]);
    return 2;
  }
  if (!ipcoro::test::forbid_io_uring_setup()) {
    std::perror("without_io_uring: seccomp");
    return 77;
  }
  ::execv(argv[1], argv + 1);
  std::perror("without_io_uring: exec");
  return 127;
}
