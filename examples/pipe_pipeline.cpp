// SPDX-License-Identifier: MIT
// pipe_pipeline: a producer, a transformer and a consumer in three processes joined by
// pipes, each stage running coroutines on its own io_context; the consumer verifies the
// stream end to end and the parent exits 0 only if every stage succeeded.
//
//   producer --pipe--> transformer --pipe--> consumer
//
// Records are framed as {seq, length} + payload. The transformer encodes every payload
// byte (an invertible map) while a second coroutine writes the previous record out, the
// two joined by a two-slot buffer guarded by semaphores. The producer ends the stream
// with a trailer holding the checksum of everything it sent; the consumer decodes, checks
// the sequence numbers, recomputes that checksum and compares.
//
// Usage: pipe_pipeline [--records N] [--max-payload BYTES]
#include <ipcoro/ipcoro.hpp>

#include <fmt/core.h>
#include <unistd.h>

#include <array>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string_view>
#include <vector>

namespace {

using ipcoro::task;

struct record_header {
  std::uint32_t seq;
  std::uint32_t length;
};
constexpr std::uint32_t trailer_seq = 0xffffffff;

struct config {
  std::uint32_t records = 200'000;
  std::uint32_t max_payload = 1024;
};

// Deterministic record contents, so the producer needs no input.
std::uint64_t mix(std::uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}
std::uint32_t payload_length(std::uint32_t seq, const config& cfg) {
  return 1 + static_cast<std::uint32_t>(mix(seq) % cfg.max_payload);
}
void fill_payload(std::uint32_t seq, std::span<std::byte> out) {
  std::uint64_t state = mix(seq ^ 0x5eed);
  for (std::size_t i = 0; i < out.size(); ++i) {
    if (i % 8 == 0) state = mix(state);
    out[i] = static_cast<std::byte>(state >> ((i % 8) * 8));
  }
}

// The transformer's byte map and its inverse.
std::byte encode(std::byte b) {
  return static_cast<std::byte>((std::to_integer<unsigned>(b) + 0x35u) ^ 0x5au);
}
std::byte decode(std::byte b) {
  return static_cast<std::byte>((std::to_integer<unsigned>(b) ^ 0x5au) - 0x35u);
}

std::span<std::byte> bytes_of(record_header& h) { return std::as_writable_bytes(std::span{&h, 1}); }

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// ---- stages ----

task<void> produce(ipcoro::pipe_writer out, config cfg) {
  const auto t0 = std::chrono::steady_clock::now();
  std::vector<std::byte> payload(cfg.max_payload);
  std::uint64_t sum = ipcoro::fnv1a_basis;
  std::uint64_t bytes = 0;
  for (std::uint32_t seq = 0; seq < cfg.records; ++seq) {
    record_header h{seq, payload_length(seq, cfg)};
    auto body = std::span{payload}.first(h.length);
    fill_payload(seq, body);
    sum = ipcoro::fnv1a(body, sum);
    co_await out.write_all(bytes_of(h));
    co_await out.write_all(body);
    bytes += h.length;
  }
  record_header trailer{trailer_seq, sizeof sum};
  co_await out.write_all(bytes_of(trailer));
  co_await out.write_all(std::as_bytes(std::span{&sum, 1}));
  fmt::print("producer:    {} records, {} payload bytes, checksum {:016x} ({:.2f} s)\n", cfg.records, bytes,
             sum, seconds_since(t0));
}

// A record in flight inside the transformer.
struct slot {
  record_header header{};
  std::vector<std::byte> payload;
  bool end_of_stream = false;
};

task<void> transform(ipcoro::pipe_reader in, ipcoro::pipe_writer out, config cfg) {
  const auto t0 = std::chrono::steady_clock::now();
  std::array<slot, 2> slots;
  for (auto& s : slots) s.payload.resize(std::max<std::size_t>(cfg.max_payload, 8));
  ipcoro::semaphore free_slots{slots.size()};
  ipcoro::semaphore full_slots{0};
  std::uint64_t records = 0;

  auto reader = [&]() -> task<void> {
    for (std::size_t i = 0;; i = (i + 1) % slots.size()) {
      co_await free_slots.acquire();
      slot& s = slots[i];
      const std::size_t got = co_await in.read_exact(bytes_of(s.header));
      if (got == 0) {
        s.end_of_stream = true;
        full_slots.release();
        co_return;
      }
      if (got != sizeof s.header || s.header.length > s.payload.size()) {
        throw std::runtime_error("transformer: malformed record header");
      }
      auto body = std::span{s.payload}.first(s.header.length);
      if (co_await in.read_exact(body) != body.size())
        throw std::runtime_error("transformer: truncated record");
      if (s.header.seq != trailer_seq) {
        for (std::byte& b : body) b = encode(b);
      }
      full_slots.release();
    }
  };
  auto writer = [&]() -> task<void> {
    for (std::size_t i = 0;; i = (i + 1) % slots.size()) {
      co_await full_slots.acquire();
      slot& s = slots[i];
      if (s.end_of_stream) co_return;
      co_await out.write_all(bytes_of(s.header));
      co_await out.write_all(std::span{s.payload}.first(s.header.length));
      if (s.header.seq != trailer_seq) ++records;
      free_slots.release();
    }
  };
  co_await ipcoro::when_all(reader(), writer());
  fmt::print("transformer: {} records encoded ({:.2f} s)\n", records, seconds_since(t0));
}

task<bool> consume(ipcoro::pipe_reader in, config cfg) {
  const auto t0 = std::chrono::steady_clock::now();
  std::vector<std::byte> payload(std::max<std::size_t>(cfg.max_payload, 8));
  std::uint64_t sum = ipcoro::fnv1a_basis;
  std::uint64_t bytes = 0;
  std::uint32_t expected_seq = 0;
  for (;;) {
    record_header h{};
    if (co_await in.read_exact(bytes_of(h)) != sizeof h) {
      fmt::print(stderr, "consumer: stream ended without a trailer after {} records\n", expected_seq);
      co_return false;
    }
    if (h.length > payload.size()) {
      fmt::print(stderr, "consumer: record {} claims {} bytes\n", h.seq, h.length);
      co_return false;
    }
    auto body = std::span{payload}.first(h.length);
    if (co_await in.read_exact(body) != body.size()) {
      fmt::print(stderr, "consumer: record {} truncated\n", h.seq);
      co_return false;
    }
    if (h.seq == trailer_seq) {
      std::uint64_t sent = 0;
      std::memcpy(&sent, body.data(), sizeof sent);
      const double s = seconds_since(t0);
      const bool ok = sent == sum && expected_seq == cfg.records;
      fmt::print(
          "consumer:    {} records, {} payload bytes, checksum {:016x} (producer said {:016x}), "
          "{:.1f} MB/s, {:.0f} records/s: {}\n",
          expected_seq, bytes, sum, sent, bytes / s / 1e6, expected_seq / s, ok ? "verified" : "MISMATCH");
      co_return ok;
    }
    if (h.seq != expected_seq) {
      fmt::print(stderr, "consumer: expected record {}, got {}\n", expected_seq, h.seq);
      co_return false;
    }
    for (std::byte& b : body) b = decode(b);
    sum = ipcoro::fnv1a(body, sum);
    bytes += h.length;
    ++expected_seq;
  }
}

// ---- processes ----

std::uint32_t parse_number(std::string_view flag, const char* text) {
  char* end = nullptr;
  const unsigned long v = std::strtoul(text, &end, 10);
  if (end == text || *end != '\0' || v == 0 || v > 0xfffffff0ul) {
    fmt::print(stderr, "{}: expected a positive number, got '{}'\n", flag, text);
    std::exit(2);
  }
  return static_cast<std::uint32_t>(v);
}

}  // namespace

int main(int argc, char** argv) try {
  config cfg;
  for (int i = 1; i < argc; ++i) {
    const std::string_view arg = argv[i];
    if ((arg == "--records" || arg == "--max-payload") && i + 1 < argc) {
      (arg == "--records" ? cfg.records : cfg.max_payload) = parse_number(arg, argv[++i]);
    } else {
      fmt::print(stderr, "usage: {} [--records N] [--max-payload BYTES]\n", argv[0]);
      return 2;
    }
  }

  // 1 MiB pipes where allowed: fewer wake-ups per megabyte.
  const ipcoro::pipe_options opts{.capacity = std::min<std::size_t>(1 << 20, ipcoro::pipe_max_size())};
  auto [a_in, a_out] = ipcoro::make_pipe(opts);  // producer -> transformer
  auto [b_in, b_out] = ipcoro::make_pipe(opts);  // transformer -> consumer
  const auto t0 = std::chrono::steady_clock::now();

  // Each child keeps only its own ends (a forgotten write end would hide end of stream) and
  // runs a loop of its own.
  std::array<ipcoro::process, 3> stages;
  stages[0] = ipcoro::process::fork(
      [&] {
        a_in.close(), b_in.close(), b_out.close();
        ipcoro::io_context ctx;
        ipcoro::sync_wait(ctx, produce(std::move(a_out), cfg));
        return 0;
      },
      {.name = "producer"});
  stages[1] = ipcoro::process::fork(
      [&] {
        a_out.close(), b_in.close();
        ipcoro::io_context ctx;
        ipcoro::sync_wait(ctx, transform(std::move(a_in), std::move(b_out), cfg));
        return 0;
      },
      {.name = "transformer"});
  stages[2] = ipcoro::process::fork(
      [&] {
        a_in.close(), a_out.close(), b_out.close();
        ipcoro::io_context ctx;
        return ipcoro::sync_wait(ctx, consume(std::move(b_in), cfg)) ? 0 : 1;
      },
      {.name = "consumer"});
  a_in.close(), a_out.close(), b_in.close(), b_out.close();

  ipcoro::io_context ctx;
  bool ok = true;
  for (ipcoro::process& stage : stages) {
    if (!ipcoro::sync_wait(ctx, stage.wait()).success()) {
      ok = false;
      fmt::print(stderr, "{}\n", stage.describe());
    }
  }
  fmt::print("pipeline:    {} in {:.2f} s\n", ok ? "all three stages succeeded" : "FAILED",
             seconds_since(t0));
  return ok ? 0 : 1;
} catch (const std::exception& e) {
  // Whatever nothing above caught (no io_uring, say): the message and status 1, not an abort.
  fmt::print(stderr, "{}: {}\n", argv[0], e.what());
  return 1;
}
