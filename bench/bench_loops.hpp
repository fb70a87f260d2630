// SPDX-License-Identifier: MIT
// The measuring loops every row shares, over any endpoint with send(span) and receive(span):
// blocking ones, and Asio coroutines (when Asio is compared).
#pragma once

#include "bench_support.hpp"

#if IPCORO_BENCH_ASIO
#include <asio.hpp>
#endif

#include <chrono>
#include <cstddef>
#include <stdexcept>
#include <vector>

namespace ipcoro::bench {

inline void expect(bool ok, const char* what) {
  if (!ok) throw std::runtime_error(what);
}
inline void check_received(std::size_t n, std::size_t size) {
  expect(n == size, "short read: end of stream");
}

// ---- blocking endpoints: the peer echoes or produces, the measurer pings or consumes ----

template <class E>
void sync_echo(const E& e, std::size_t size, std::size_t warmup, std::size_t n, window& w) {
  std::vector<std::byte> buf(size);
  for (std::size_t i = 0; i < warmup + n; ++i) {
    if (i == warmup) w.start();
    e.receive(buf);
    e.send(buf);
  }
  w.stop();
}

template <class E>
void sync_ping(const E& e, std::size_t size, std::size_t warmup, std::size_t n, window& w,
               std::vector<double>& rtt) {
  std::vector<std::byte> buf(size);
  for (std::size_t i = 0; i < warmup; ++i) {
    e.send(buf);
    e.receive(buf);
  }
  w.start();
  for (std::size_t i = 0; i < n; ++i) {
    const auto t0 = clock_type::now();
    e.send(buf);
    e.receive(buf);
    rtt.push_back(std::chrono::duration<double, std::micro>(clock_type::now() - t0).count());
  }
  w.stop();
}

template <class E>
void sync_produce(const E& e, std::size_t size, std::size_t warmup, std::size_t n, window& w) {
  std::vector<std::byte> buf(size, std::byte{0x5a});
  for (std::size_t i = 0; i < warmup + n; ++i) {
    if (i == warmup) w.start();
    e.send(buf);
  }
  w.stop();
}

template <class E>
void sync_consume(const E& e, std::size_t size, std::size_t warmup, std::size_t n, window& w) {
  std::vector<std::byte> buf(size);
  for (std::size_t i = 0; i < warmup + n; ++i) {
    if (i == warmup) w.start();
    e.receive(buf);
  }
  w.stop();
}

#if IPCORO_BENCH_ASIO
// ---- the same loops as Asio C++20 coroutines ----

template <class E>
asio::awaitable<void> asio_echo(E& e, std::size_t size, std::size_t warmup, std::size_t n, window& w) {
  std::vector<std::byte> buf(size);
  for (std::size_t i = 0; i < warmup + n; ++i) {
    if (i == warmup) w.start();
    const std::size_t got = co_await e.receive(buf);
    check_received(got, size);
    co_await e.send(buf);
  }
  w.stop();
}

template <class E>
asio::awaitable<void> asio_ping(E& e, std::size_t size, std::size_t warmup, std::size_t n, window& w,
                                std::vector<double>& rtt) {
  std::vector<std::byte> buf(size);
  for (std::size_t i = 0; i < warmup + n; ++i) {
    if (i == warmup) w.start();
    const auto t0 = clock_type::now();
    co_await e.send(buf);
    const std::size_t got = co_await e.receive(buf);
    check_received(got, size);
    if (i >= warmup) rtt.push_back(std::chrono::duration<double, std::micro>(clock_type::now() - t0).count());
  }
  w.stop();
}

template <class E>
asio::awaitable<void> asio_produce(E& e, std::size_t size, std::size_t warmup, std::size_t n, window& w) {
  std::vector<std::byte> buf(size, std::byte{0x5a});
  for (std::size_t i = 0; i < warmup + n; ++i) {
    if (i == warmup) w.start();
    co_await e.send(buf);
  }
  w.stop();
}

template <class E>
asio::awaitable<void> asio_consume(E& e, std::size_t size, std::size_t warmup, std::size_t n, window& w) {
  std::vector<std::byte> buf(size);
  for (std::size_t i = 0; i < warmup + n; ++i) {
    if (i == warmup) w.start();
    const std::size_t got = co_await e.receive(buf);
    check_received(got, size);
  }
  w.stop();
}
#endif

}  // namespace ipcoro::bench
