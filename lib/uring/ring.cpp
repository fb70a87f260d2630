// SPDX-License-Identifier: MIT
// Ring setup, probing and submission for the thin liburing layer.
#include "uring/ring.hpp"

#include "uring/prep.hpp"

#include <sys/utsname.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace ipcoro::uring {

namespace {

/// IPCORO_NO_DEFER_TASKRUN set (to anything but "" or "0"): set rings up as a kernel before
/// 6.0 would, without SINGLE_ISSUER and DEFER_TASKRUN, so that tests and CI reach that path.
bool defer_taskrun_forced_off() noexcept {
  const char* v = std::getenv("IPCORO_NO_DEFER_TASKRUN");
  return v != nullptr && *v != '\0' && std::strcmp(v, "0") != 0;
}

}  // namespace

ring::~ring() { exit(); }

int ring::init(const setup_request& req) noexcept {
  if (initialised_) return -EBUSY;
  const unsigned cq = req.cq_entries != 0 ? req.cq_entries : req.entries * 4;

  // Most capable first; every kernel since 5.11 accepts the last one.
  const unsigned wanted[] = {
      IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN | IORING_SETUP_SUBMIT_ALL,
      IORING_SETUP_COOP_TASKRUN | IORING_SETUP_SUBMIT_ALL,
      0,
  };
  const bool single_issuer = req.single_issuer && !defer_taskrun_forced_off();
  int rc = -EINVAL;
  for (unsigned flags : wanted) {
    if (!single_issuer && (flags & IORING_SETUP_SINGLE_ISSUER)) continue;
    ::io_uring_params params{};
    params.flags = flags | IORING_SETUP_CQSIZE | IORING_SETUP_CLAMP;
    params.cq_entries = cq;
    rc = ::io_uring_queue_init_params(req.entries, &ring_, &params);
    if (rc == 0) {
      features_ = {};
      features_.setup_flags = params.flags;
      features_.single_issuer = (params.flags & IORING_SETUP_SINGLE_ISSUER) != 0;
      features_.defer_taskrun = (params.flags & IORING_SETUP_DEFER_TASKRUN) != 0;
      features_.nodrop = (params.features & IORING_FEAT_NODROP) != 0;
      features_.ext_arg = (params.features & IORING_FEAT_EXT_ARG) != 0;
      break;
    }
    if (rc != -EINVAL) return rc;  // ENOMEM, EPERM, ENOSYS: no flag change helps
  }
  if (rc != 0) return rc;
  initialised_ = true;
  probe_opcodes();
  // Saves a file-table lookup on every io_uring_enter; optional (5.18).
  (void)::io_uring_register_ring_fd(&ring_);
  return 0;
}

void ring::probe_opcodes() noexcept {
  ::utsname u{};
  if (::uname(&u) == 0) std::sscanf(u.release, "%d.%d", &features_.kernel_major, &features_.kernel_minor);

  ::io_uring_probe* p = ::io_uring_get_probe_ring(&ring_);
  if (p == nullptr) return;
  auto has = [p](int op) { return op <= p->last_op && (p->ops[op].flags & IO_URING_OP_SUPPORTED); };
  features_.op_async_cancel = has(IORING_OP_ASYNC_CANCEL);
  features_.op_link_timeout = has(IORING_OP_LINK_TIMEOUT);
  features_.op_splice = has(IORING_OP_SPLICE);
  features_.op_msg_ring = has(IORING_OP_MSG_RING);
  features_.op_waitid = has(IPCORO_IORING_OP_WAITID);
  features_.op_futex_wait = has(IPCORO_IORING_OP_FUTEX_WAIT);
  features_.op_futex_wake = has(IPCORO_IORING_OP_FUTEX_WAKE);
  features_.op_futex_waitv = has(IPCORO_IORING_OP_FUTEX_WAITV);
  ::io_uring_free_probe(p);
}

void ring::exit() noexcept {
  if (!initialised_) return;
  ::io_uring_queue_exit(&ring_);
  initialised_ = false;
}

int ring::submit() noexcept {
  int rc = ::io_uring_submit(&ring_);
  return rc == -EINTR ? 0 : rc;
}

int ring::submit_and_wait(unsigned wait_nr) noexcept {
  int rc =
      wait_nr == 0 ? ::io_uring_submit_and_get_events(&ring_) : ::io_uring_submit_and_wait(&ring_, wait_nr);
  return (rc == -EINTR || rc == -ETIME) ? 0 : rc;
}

}  // namespace ipcoro::uring
