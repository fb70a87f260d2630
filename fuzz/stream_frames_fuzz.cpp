// SPDX-License-Identifier: MIT
// Fuzzes the stream frame decoder behind fd: and pipe: channels: the input is everything a
// peer wrote into the pipe; the receiver must deliver, end or refuse it with channel_error.
#include "fuzz_support.hpp"

#include "ipcoro/channel.hpp"
#include "ipcoro/codec.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <optional>
#include <string>

namespace {

ipcoro::task<void> drain(std::string address) {
  ipcoro::channel_receiver<std::string> rx = co_await ipcoro::open_receiver<std::string>(std::move(address));
  for (;;) {
    std::optional<std::string> v = co_await rx.receive();
    if (!v) break;
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  int fds[2];
  if (::pipe2(fds, O_CLOEXEC) != 0) std::abort();
  // Room for the whole input, so that it is written before the receiver starts.
  const int room = ::fcntl(fds[1], F_SETPIPE_SZ, 1 << 20);
  if (room < 0 || static_cast<std::size_t>(room) < size) {
    ::close(fds[0]);
    ::close(fds[1]);
    return -1;  // too large for one pipe here: not added to the corpus
  }
  for (std::size_t done = 0; done < size;) {
    const ssize_t n = ::write(fds[1], data + done, size - done);
    if (n <= 0) std::abort();
    done += static_cast<std::size_t>(n);
  }
  ::close(fds[1]);
  try {
    ipcoro::fuzz::run(drain("fd:" + std::to_string(fds[0])));  // the receiver closes fds[0]
  } catch (const ipcoro::channel_error&) {
  } catch (const ipcoro::decode_error&) {
  }
  return 0;
}
