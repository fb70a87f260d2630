// SPDX-License-Identifier: MIT
// The whole public API of ipcoro in one include.
#pragma once

#include "ipcoro/version.hpp"  // first: below C++20 its #error is the one error shown

#if __cplusplus >= 202002L  // nothing else is read below C++20

#include "ipcoro/channel.hpp"
#include "ipcoro/channel_address.hpp"
#include "ipcoro/codec.hpp"
#include "ipcoro/deadline.hpp"
#include "ipcoro/error.hpp"
#include "ipcoro/event.hpp"
#include "ipcoro/fd_io.hpp"
#include "ipcoro/fifo.hpp"
#include "ipcoro/futex.hpp"
#include "ipcoro/io_context.hpp"
#include "ipcoro/io_operation.hpp"
#include "ipcoro/mapped_file.hpp"
#include "ipcoro/mqueue.hpp"
#include "ipcoro/mutex.hpp"
#include "ipcoro/pipe.hpp"
#include "ipcoro/pipeline.hpp"
#include "ipcoro/process.hpp"
#include "ipcoro/process_mutex.hpp"
#include "ipcoro/scope.hpp"
#include "ipcoro/semaphore.hpp"
#include "ipcoro/shm_ring.hpp"
#include "ipcoro/shm_segment.hpp"
#include "ipcoro/sync_wait.hpp"
#include "ipcoro/task.hpp"
#include "ipcoro/timer.hpp"
#include "ipcoro/transport.hpp"
#include "ipcoro/unique_fd.hpp"
#include "ipcoro/when_all.hpp"
#include "ipcoro/when_any.hpp"

#endif
