// SPDX-License-Identifier: MIT
// SQE preparation for io_uring opcodes newer than liburing 2.3 (Debian 12) knows about.
#pragma once

#include <liburing.h>
#include <sys/wait.h>

#include <cstdint>

// Opcode numbers are kernel ABI and never change. liburing 2.3's enum stops at
// IORING_OP_SENDMSG_ZC (48) and has no version macro, so the numbers live under our own
// names; the static_assert notices a header that renumbers what we rely on.
#define IPCORO_IORING_OP_WAITID 50
#define IPCORO_IORING_OP_FUTEX_WAIT 51
#define IPCORO_IORING_OP_FUTEX_WAKE 52
#define IPCORO_IORING_OP_FUTEX_WAITV 53
static_assert(IORING_OP_SEND_ZC == 47 && IORING_OP_SENDMSG_ZC == 48, "unexpected io_uring opcode numbering");

namespace ipcoro::uring {

// futex2 flags (linux/futex.h, 6.7): the size of the futex word and process-private use.
inline constexpr std::uint32_t futex2_size_u32 = 0x02;
inline constexpr std::uint32_t futex2_private = 128;
inline constexpr std::uint64_t futex_bitset_match_any = 0xffffffffu;

/// Waits until the 32-bit word at `addr` no longer holds `expected` and a wake arrives.
/// Completes with 0 on wake, -EAGAIN when the word already differs.
inline void prep_futex_wait(::io_uring_sqe* sqe, std::uint32_t* addr, std::uint64_t expected,
                            std::uint64_t mask, std::uint32_t futex2_flags) noexcept {
  ::io_uring_prep_rw(IPCORO_IORING_OP_FUTEX_WAIT, sqe, static_cast<int>(futex2_flags), addr, 0, expected);
  sqe->addr3 = mask;
}

/// Wakes up to `count` waiters on `addr`; completes with the number woken.
inline void prep_futex_wake(::io_uring_sqe* sqe, std::uint32_t* addr, std::uint64_t count, std::uint64_t mask,
                            std::uint32_t futex2_flags) noexcept {
  ::io_uring_prep_rw(IPCORO_IORING_OP_FUTEX_WAKE, sqe, static_cast<int>(futex2_flags), addr, 0, count);
  sqe->addr3 = mask;
}

/// Waits on several futexes at once (`struct futex_waitv` array of `count` entries);
/// completes with the index of the one that woke.
inline void prep_futex_waitv(::io_uring_sqe* sqe, const void* waitv, unsigned count) noexcept {
  ::io_uring_prep_rw(IPCORO_IORING_OP_FUTEX_WAITV, sqe, 0, waitv, count, 0);
}

/// waitid(2) through the ring: `info` must stay valid until the CQE is reaped.
inline void prep_waitid(::io_uring_sqe* sqe, idtype_t which, id_t id, siginfo_t* info, int options) noexcept {
  ::io_uring_prep_rw(IPCORO_IORING_OP_WAITID, sqe, static_cast<int>(id), nullptr,
                     static_cast<unsigned>(which), 0);
  sqe->file_index = static_cast<std::uint32_t>(options);
  sqe->addr2 = reinterpret_cast<std::uintptr_t>(info);
}

}  // namespace ipcoro::uring
