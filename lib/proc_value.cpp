// SPDX-License-Identifier: MIT
// Reading one number from a /proc/sys file.
#include "proc_value.hpp"

#include <cstdio>

namespace ipcoro::detail {

long read_proc_long(const char* path) noexcept {
  std::FILE* f = std::fopen(path, "re");
  if (f == nullptr) return -1;
  long v = -1;
  if (std::fscanf(f, "%ld", &v) != 1) v = -1;
  std::fclose(f);
  return v;
}

}  // namespace ipcoro::detail
