// SPDX-License-Identifier: MIT
// link_claims: who may still take each end of a link whose transport records its ends.
#pragma once

#include "ipcoro/channel_address.hpp"
#include "ipcoro/error.hpp"
#include "ipcoro/unique_fd.hpp"

#include <fcntl.h>
#include <fmt/core.h>
#include <unistd.h>

#include <cerrno>

namespace ipcoro::detail {

/// Who may still take each end of a ring (or queue) link. A ring records the processes attached to
/// it, but before an end is taken its entry is empty, which alone means "not yet" forever.
/// The processes that can still take an end are exactly those holding a copy of the link
/// state with that end untaken: the creator and every process forked from it while it
/// held the link. So each end has a pipe whose write end (the claim) lives in the link
/// state: fork copies it, exec drops it (close-on-exec, and the link is gone with the
/// old program), death closes it, and taking the end closes it once the ring records the
/// taker, as does destroying the link. The other end's port keeps the read end: when it
/// hangs up and the ring still records nobody for that end, nobody ever will.
struct link_claims {
  unique_fd sender_claim;
  unique_fd sender_watch;
  unique_fd receiver_claim;
  unique_fd receiver_watch;

  static link_claims make(const channel_address& a) {
    link_claims c;
    int fds[2];
    if (::pipe2(fds, O_CLOEXEC) != 0)
      throw_errno(errno, fmt::format("channel {}: pipe2 for the link", a.text));
    c.sender_watch = unique_fd{fds[0]};
    c.sender_claim = unique_fd{fds[1]};
    if (::pipe2(fds, O_CLOEXEC) != 0)
      throw_errno(errno, fmt::format("channel {}: pipe2 for the link", a.text));
    c.receiver_watch = unique_fd{fds[0]};
    c.receiver_claim = unique_fd{fds[1]};
    return c;
  }
};

}  // namespace ipcoro::detail
