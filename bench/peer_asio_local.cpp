// SPDX-License-Identifier: MIT
// Asio as a peer row of ipcoro-bench: local::stream_protocol sockets (a socketpair) driven by
// C++20 coroutines (asio::awaitable, use_awaitable), each message framed by a length prefix.
#include "bench_loops.hpp"
#include "peers.hpp"

#include <ipcoro/unique_fd.hpp>

#include <sys/socket.h>

#include <array>
#include <cstdint>
#include <exception>
#include <stdexcept>
#include <system_error>

namespace ipcoro::bench {

namespace {

using local_socket = asio::local::stream_protocol::socket;

/// One end: a send is one gathered write of the 4-byte length and the payload; a receive
/// reads the length, then exactly that many bytes.
struct asio_local_end {
  local_socket socket;
  std::uint32_t out_length = 0, in_length = 0;  // live until their operation completes

  asio_local_end(asio::io_context& io, int fd) : socket(io, asio::local::stream_protocol(), fd) {}

  auto send(std::span<const std::byte> m) {
    out_length = static_cast<std::uint32_t>(m.size());
    const std::array<asio::const_buffer, 2> parts{asio::buffer(&out_length, sizeof out_length),
                                                  asio::buffer(m.data(), m.size())};
    return asio::async_write(socket, parts, asio::use_awaitable);
  }
  asio::awaitable<std::size_t> receive(std::span<std::byte> m) {
    asio::awaitable<std::size_t> head =
        asio::async_read(socket, asio::buffer(&in_length, sizeof in_length), asio::use_awaitable);
    co_await std::move(head);
    if (in_length > m.size()) throw std::runtime_error("asio-local: message longer than the buffer");
    asio::awaitable<std::size_t> body =
        asio::async_read(socket, asio::buffer(m.data(), in_length), asio::use_awaitable);
    co_return co_await std::move(body);
  }
};

/// Runs one side on a fresh single-threaded io_context; rethrows what it throws.
template <class Make>
void run_side(int fd, Make make) {
  asio::io_context io(1);
  asio_local_end end(io, fd);
  std::exception_ptr error;
  asio::co_spawn(io, make(end), [&](std::exception_ptr e) { error = e; });
  io.run();
  if (error) std::rethrow_exception(error);
}

}  // namespace

pair_result measure_asio_local(const job& j, std::vector<double>* rtt) {
  int fds[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) != 0)
    throw std::system_error(errno, std::system_category(), "socketpair");
  ipcoro::unique_fd ends[2]{ipcoro::unique_fd{fds[0]}, ipcoro::unique_fd{fds[1]}};
  // The peer keeps ends[0] and the measurer ends[1]; each closes the other's, so a side that
  // dies is an end of stream for the other.
  const auto side = [&](bool peer, window& w) {
    ipcoro::unique_fd mine = std::move(ends[peer ? 0 : 1]);
    ends[peer ? 1 : 0] = {};
    run_side(mine.release(), [&](asio_local_end& e) -> asio::awaitable<void> {
      if (j.what == kind::rtt)
        return peer ? asio_echo(e, j.size, j.warmup, j.n, w) : asio_ping(e, j.size, j.warmup, j.n, w, *rtt);
      return peer ? asio_produce(e, j.size, j.warmup, j.n, w) : asio_consume(e, j.size, j.warmup, j.n, w);
    });
  };
  return run_pair(
      j.where, [&](window& w) { side(true, w); }, [&](window& w) { side(false, w); });
}

}  // namespace ipcoro::bench
