// SPDX-License-Identifier: MIT
// What the harnesses share: one event loop per process, and names unique to this process.
#pragma once

#include "ipcoro/io_context.hpp"
#include "ipcoro/sync_wait.hpp"
#include "ipcoro/task.hpp"

#include <unistd.h>

#include <cstdint>
#include <string>
#include <utility>

namespace ipcoro::fuzz {

/// The loop every input runs on: set up once, as a long-running program would.
inline io_context& loop() {
  static io_context ctx;
  return ctx;
}

template <class T>
T run(task<T> t) {
  return sync_wait(loop(), std::move(t));
}

/// A name no other process uses, for shm segments and files: pid plus a counter.
inline std::string unique_name(const char* what) {
  static std::uint64_t counter = 0;
  return std::string("ipcoro-fuzz-") + what + "-" + std::to_string(::getpid()) + "-" +
         std::to_string(counter++);
}

}  // namespace ipcoro::fuzz
