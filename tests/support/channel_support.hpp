// SPDX-License-Identifier: MIT
// Test helpers for channels: fresh addresses of every transport and the leftover check.
#pragma once

#include "process.hpp"

#include <catch2/catch.hpp>

#include <unistd.h>

#include <string>

namespace ipcoro::test {

/// A channel address of the given transport ("pipe", "fifo", "mq", "shm", "shm-mpmc",
/// "file") with a fresh name, and `options` appended.
inline std::string fresh_address(const std::string& transport, const std::string& options = "") {
  const std::string name = unique_name("ch");
  std::string a;
  if (transport == "pipe") a = "pipe:";
  if (transport == "fifo") a = "fifo:/tmp/" + name;
  if (transport == "mq") a = "mq:/" + name;
  if (transport == "shm") a = "shm:/" + name;
  if (transport == "shm-mpmc") a = "shm:/" + name + "?ring=mpmc";
  if (transport == "file") a = "file:/tmp/" + name;
  if (!options.empty()) a += (a.find('?') == std::string::npos ? "?" : "&") + options;
  return a;
}

/// Nothing named after this process is left in /dev/shm, /tmp or the mqueue namespace.
inline bool nothing_left_behind() {
  const leftovers left = names_left_behind("ipcoro-test-" + std::to_string(::getpid()) + "-");
  for (const std::string& name : left.names) UNSCOPED_INFO("left behind: " << name);
  return left.names.empty();
}

}  // namespace ipcoro::test
