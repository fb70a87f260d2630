// SPDX-License-Identifier: MIT
// ignore_sigpipe: SIGPIPE to SIG_IGN once, unless the program chose its own handling.
#include "ipcoro/sigpipe.hpp"

#include <signal.h>

#include <mutex>

namespace ipcoro {

void ignore_sigpipe() noexcept {
  static std::once_flag once;
  std::call_once(once, [] {
    struct sigaction old {};
    if (::sigaction(SIGPIPE, nullptr, &old) == 0 && old.sa_handler == SIG_DFL &&
        (old.sa_flags & SA_SIGINFO) == 0) {
      struct sigaction ign {};
      ign.sa_handler = SIG_IGN;
      sigemptyset(&ign.sa_mask);
      ::sigaction(SIGPIPE, &ign, nullptr);
    }
  });
}

}  // namespace ipcoro
