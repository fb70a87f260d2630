// SPDX-License-Identifier: MIT
// pipeline: word frequencies over a generated corpus, in four processes joined by typed
// channels over the transport you choose; the last stage checks every count.
//
//   generate --text--> tokenize --word ids--> count --counts--> verify
//
// `generate` writes a deterministic corpus (Zipf-like word choice over a fixed vocabulary)
// as text chunks; `tokenize` splits them and sends batches of word hashes; `count` tallies
// them and, at the end of its input, sends the table; `verify` adds the table up,
// regenerates the corpus by itself, and throws unless every count matches. The parent
// prints what each stage did and exits 0 only when the pipeline finished and verified.
//
// Usage: pipeline [--transport pipe|fifo|mq|shm|file|all|T1,T2,T3] [--words N]
// (three comma-separated transports choose each edge: --transport pipe,shm,mq)
#include <ipcoro/ipcoro.hpp>

#include <fmt/core.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace {

using ipcoro::channel_receiver;
using ipcoro::channel_sender;
using ipcoro::task;

constexpr std::size_t vocabulary_size = 5000;

/// One message of text: whole words separated by spaces, at most 4000 bytes.
struct text_chunk {
  std::uint32_t size = 0;
  char text[4000];
};

/// A tally of one word, keyed by the word's hash.
struct word_count {
  std::uint64_t word;
  std::uint64_t count;
};

std::uint64_t mix(std::uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

/// The vocabulary: pronounceable made-up words of 3 to 10 letters, the same in every process.
const std::vector<std::string>& vocabulary() {
  static const std::vector<std::string> words = [] {
    std::vector<std::string> v;
    const char* consonants = "bcdfghklmnprstvz";
    const char* vowels = "aeiou";
    for (std::size_t i = 0; i < vocabulary_size; ++i) {
      std::uint64_t r = mix(i);
      const std::size_t length = 3 + r % 8;
      std::string w;
      for (std::size_t k = 0; k < length; ++k) {
        r = mix(r);
        w += k % 2 == 0 ? consonants[r % 16] : vowels[r % 5];
      }
      w += std::to_string(i % 7);  // keeps all 5000 distinct
      v.push_back(std::move(w));
    }
    return v;
  }();
  return words;
}

/// The i-th word of the corpus: small indices are far more frequent (u³ skew).
const std::string& corpus_word(std::uint64_t i) {
  const double u = static_cast<double>(mix(i ^ 0xc0ffee) >> 11) / static_cast<double>(1ull << 53);
  return vocabulary()[static_cast<std::size_t>(u * u * u * vocabulary_size)];
}

// ---- the four stages ----

task<void> generate(channel_sender<text_chunk>& out, std::uint64_t words) {
  text_chunk chunk;
  for (std::uint64_t i = 0; i < words; ++i) {
    const std::string& w = corpus_word(i);
    if (chunk.size + w.size() + 1 > sizeof chunk.text) {
      co_await out.send(chunk);
      chunk.size = 0;
    }
    std::memcpy(chunk.text + chunk.size, w.data(), w.size());
    chunk.size += static_cast<std::uint32_t>(w.size());
    chunk.text[chunk.size++] = ' ';
  }
  if (chunk.size > 0) co_await out.send(chunk);
}

task<void> tokenize(channel_receiver<text_chunk>& in, channel_sender<std::vector<std::uint64_t>>& out) {
  std::vector<std::uint64_t> batch;
  while (std::optional<text_chunk> chunk = co_await in.receive()) {
    std::string_view text(chunk->text, std::min<std::size_t>(chunk->size, sizeof chunk->text));
    while (!text.empty()) {
      const std::size_t space = text.find(' ');
      const std::string_view w = text.substr(0, space);
      if (!w.empty()) batch.push_back(ipcoro::fnv1a(w));
      text = space == std::string_view::npos ? std::string_view{} : text.substr(space + 1);
      if (batch.size() == 500) {
        co_await out.send(batch);
        batch.clear();
      }
    }
  }
  if (!batch.empty()) co_await out.send(batch);
}

task<void> count(channel_receiver<std::vector<std::uint64_t>>& in,
                 channel_sender<std::vector<word_count>>& out) {
  std::unordered_map<std::uint64_t, std::uint64_t> table;
  while (std::optional<std::vector<std::uint64_t>> batch = co_await in.receive()) {
    for (std::uint64_t w : *batch) ++table[w];
  }
  std::vector<word_count> batch;
  for (const auto& [word, n] : table) {
    batch.push_back(word_count{word, n});
    if (batch.size() == 250) {
      co_await out.send(batch);
      batch.clear();
    }
  }
  if (!batch.empty()) co_await out.send(batch);
}

task<void> verify(channel_receiver<std::vector<word_count>>& in, std::uint64_t words, std::string transport) {
  std::unordered_map<std::uint64_t, std::uint64_t> got;
  while (std::optional<std::vector<word_count>> batch = co_await in.receive()) {
    for (const word_count& c : *batch) {
      if (!got.emplace(c.word, c.count).second) throw std::runtime_error("a word was counted twice");
    }
  }
  // The same corpus, counted here without any IPC.
  std::unordered_map<std::uint64_t, std::uint64_t> expected;
  for (std::uint64_t i = 0; i < words; ++i) ++expected[ipcoro::fnv1a(corpus_word(i))];
  if (got != expected) {
    std::size_t wrong = 0;
    for (const auto& [w, n] : expected) {
      auto it = got.find(w);
      if (it == got.end() || it->second != n) ++wrong;
    }
    throw std::runtime_error(fmt::format("{} of {} word counts are wrong ({} words received)", wrong,
                                         expected.size(), got.size()));
  }
  std::vector<std::pair<std::uint64_t, std::string_view>> top;
  for (const std::string& w : vocabulary()) {
    if (auto it = got.find(ipcoro::fnv1a(w)); it != got.end()) top.emplace_back(it->second, w);
  }
  std::partial_sort(top.begin(), top.begin() + std::min<std::size_t>(5, top.size()), top.end(),
                    [](const auto& a, const auto& b) { return a.first > b.first; });
  std::string shown;
  for (std::size_t i = 0; i < std::min<std::size_t>(5, top.size()); ++i) {
    shown += fmt::format("{}{} {}", i ? ", " : "", top[i].second, top[i].first);
  }
  fmt::print("[{}] verified {} words, {} distinct; most frequent: {}\n", transport, words, got.size(), shown);
  std::fflush(stdout);
}

struct config {
  std::vector<std::string> transports{"shm"};
  std::uint64_t words = 5'000'000;
};

config parse(int argc, char** argv) {
  config cfg;
  for (int i = 1; i < argc; ++i) {
    const std::string_view arg = argv[i];
    if (arg == "--transport" && i + 1 < argc) {
      const std::string_view t = argv[++i];
      if (t == "all") {
        cfg.transports = {"pipe", "fifo", "mq", "shm", "file", "pipe,shm,mq"};
      } else {
        cfg.transports = {std::string(t)};
      }
    } else if (arg == "--words" && i + 1 < argc) {
      cfg.words = std::strtoull(argv[++i], nullptr, 10);
    } else {
      fmt::print(stderr, "usage: pipeline [--transport pipe|fifo|mq|shm|file|all|T1,T2,T3] [--words N]\n");
      std::exit(2);
    }
  }
  return cfg;
}

task<bool> run_one(const std::string& transport, std::uint64_t words) {
  ipcoro::pipeline job =
      ipcoro::pipeline::source<text_chunk>(
          "generate", [words](channel_sender<text_chunk>& out) { return generate(out, words); })
          .then<std::vector<std::uint64_t>>("tokenize", tokenize)
          .then<std::vector<word_count>>("count", count)
          .sink("verify", [words, transport](channel_receiver<std::vector<word_count>>& in) {
            return verify(in, words, transport);
          });
  const auto t0 = std::chrono::steady_clock::now();
  std::vector<ipcoro::stage_report> reports;
  try {
    ipcoro::pipeline_options options;
    if (transport.find(',') == std::string::npos) {
      options.transport = transport;
    } else {
      for (std::size_t start = 0; start <= transport.size();) {
        const std::size_t comma = std::min(transport.find(',', start), transport.size());
        options.edges.push_back(transport.substr(start, comma - start));
        start = comma + 1;
      }
    }
    reports = co_await job.run(options);
  } catch (const ipcoro::pipeline_error& e) {
    fmt::print(stderr, "[{}] pipeline failed: {}\n", transport, e.what());
    co_return false;
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  fmt::print("[{}] {:<9} {:>8} {:>10} {:>10} {:>9} {:>12}\n", transport, "stage", "pid", "received", "sent",
             "seconds", "msgs/s");
  for (const ipcoro::stage_report& r : reports) {
    const std::uint64_t moved = std::max(r.received, r.sent);
    fmt::print("[{}] {:<9} {:>8} {:>10} {:>10} {:>9.3f} {:>12.0f}\n", transport, r.name, r.pid, r.received,
               r.sent, r.seconds, r.seconds > 0 ? static_cast<double>(moved) / r.seconds : 0.0);
  }
  fmt::print("[{}] {} words in {:.3f} s: {:.1f} M words/s end to end\n", transport, words, seconds,
             static_cast<double>(words) / seconds / 1e6);
  co_return true;
}

}  // namespace

int main(int argc, char** argv) try {
  const config cfg = parse(argc, argv);
  ipcoro::io_context ctx;
  bool ok = true;
  for (const std::string& transport : cfg.transports) {
    try {
      ok = ipcoro::sync_wait(ctx, run_one(transport, cfg.words)) && ok;
    } catch (const std::exception& e) {
      fmt::print(stderr, "[{}] {}\n", transport, e.what());
      ok = false;
    }
  }
  return ok ? 0 : 1;
} catch (const std::exception& e) {
  // Whatever nothing above caught (no io_uring, say): the message and status 1, not an abort.
  fmt::print(stderr, "{}: {}\n", argv[0], e.what());
  return 1;
}
