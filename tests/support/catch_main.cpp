// SPDX-License-Identifier: MIT
// The shared Catch2 runner: compiled once, linked into every test executable. It lists the
// test cases skipped (skip.hpp) and exits 77 when every test case that ran was skipped.
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>

#include <cstdio>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "skip.hpp"

namespace {

std::set<std::string> ran;
std::set<std::string> skipped;
std::vector<std::pair<std::string, std::string>> reasons;

struct count_test_cases : Catch::TestEventListenerBase {
  using TestEventListenerBase::TestEventListenerBase;
  void testCaseStarting(const Catch::TestCaseInfo& info) override { ran.insert(info.name); }
};

}  // namespace

CATCH_REGISTER_LISTENER(count_test_cases)

namespace ipcoro::test {

void note_skip(const std::string& reason) {
  const std::string name = Catch::getResultCapture().getCurrentTestName();
  if (skipped.insert(name).second) reasons.emplace_back(name, reason);
  std::printf("SKIPPED: %s: %s\n", name.c_str(), reason.c_str());
}

}  // namespace ipcoro::test

int main(int argc, char* argv[]) {
  const int failed = Catch::Session().run(argc, argv);
  if (!reasons.empty()) {
    std::printf("%zu test case(s) skipped:\n", reasons.size());
    for (const auto& [name, why] : reasons) std::printf("  %s: %s\n", name.c_str(), why.c_str());
  }
  if (failed != 0) return failed == 77 ? 78 : failed;  // never a failure that reads as a skip
  // 77: Meson counts the test as skipped, which it is when nothing else ran.
  return !skipped.empty() && skipped == ran ? 77 : 0;
}
