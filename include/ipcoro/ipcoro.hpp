// The whole public API of ipcoro in one include.
#pragma once

#include "ipcoro/error.hpp"
#include "ipcoro/event.hpp"
#include "ipcoro/fd_io.hpp"
#include "ipcoro/futex.hpp"
#include "ipcoro/io_context.hpp"
#include "ipcoro/io_operation.hpp"
#include "ipcoro/mutex.hpp"
#include "ipcoro/pipe.hpp"
#include "ipcoro/scope.hpp"
#include "ipcoro/semaphore.hpp"
#include "ipcoro/sync_wait.hpp"
#include "ipcoro/task.hpp"
#include "ipcoro/timer.hpp"
#include "ipcoro/unique_fd.hpp"
#include "ipcoro/when_all.hpp"
#include "ipcoro/when_any.hpp"
