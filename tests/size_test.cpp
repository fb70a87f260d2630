// SPDX-License-Identifier: MIT
// Sizes as users write them: parse_size and the channel address options that use it.
#include "ipcoro/size.hpp"
#include "ipcoro/channel_address.hpp"
#include "ipcoro/error.hpp"

#include "process.hpp"

#include <catch2/catch.hpp>

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace {

bool contains(const std::string& text, std::string_view part) { return text.find(part) != std::string::npos; }

}  // namespace

TEST_CASE("parse_size takes digits with K, KiB, M, MiB, G or GiB in any case", "[size]") {
  struct good {
    const char* text;
    std::uint64_t bytes;
  };
  const good cases[] = {
      {"0", 0},
      {"4096", 4096},
      {"64k", 64 << 10},
      {"64K", 64 << 10},
      {"64KiB", 64 << 10},
      {"64kib", 64 << 10},
      {"4m", 4 << 20},
      {"4M", 4 << 20},
      {"4MiB", 4 << 20},
      {"1g", std::uint64_t{1} << 30},
      {"3G", std::uint64_t{3} << 30},
      {"2GiB", std::uint64_t{2} << 30},
      {"18446744073709551615", UINT64_MAX},
      {"17179869183G", (std::uint64_t{17179869183}) << 30},
  };
  for (const good& g : cases) {
    CAPTURE(g.text);
    CHECK(ipcoro::parse_size(g.text) == g.bytes);
  }
}

TEST_CASE("parse_size refuses what is not a size", "[size]") {
  const char* const cases[] = {"",
                               "k",
                               "-1",
                               "+1",
                               " 1",
                               "1 ",
                               "1kb",
                               "1KB",
                               "1.5k",
                               "1t",
                               "1T",
                               "1B",
                               "1kk",
                               "0x10",
                               "1 KiB",
                               "1Ki",
                               "ten",
                               "18446744073709551616",
                               "17179869184G",
                               "16777216T"};
  for (const char* text : cases) {
    CAPTURE(text);
    CHECK(ipcoro::parse_size(text) == std::nullopt);
  }
}

TEST_CASE("channel address sizes take every suffix parse_size takes", "[size][channel]") {
  const ipcoro::channel_address a =
      ipcoro::channel_address::parse("shm:/frames?ring=mpmc&capacity=1k&message_size=2KiB");
  CHECK(a.capacity == 1024);
  CHECK(a.message_size == 2048);
  const ipcoro::channel_address b = ipcoro::channel_address::parse("file:/tmp/log?capacity=1GiB");
  CHECK(b.capacity == std::size_t{1} << 30);
  const ipcoro::channel_address c = ipcoro::channel_address::parse("pipe:?capacity=1MiB");
  CHECK(c.capacity == std::size_t{1} << 20);
  const ipcoro::channel_address d = ipcoro::channel_address::parse("mq:/jobs?capacity=8&message_size=1g");
  CHECK(d.message_size == std::size_t{1} << 30);
}

TEST_CASE("a size option that is not a positive size names what the user wrote and what to write",
          "[size][channel]") {
  struct bad {
    const char* address;
    const char* option;
  };
  const bad cases[] = {
      {"mq:/q?capacity=0", "capacity=0"},
      {"mq:/q?capacity=3x", "capacity=3x"},
      {"shm:/s?capacity=1kb", "capacity=1kb"},
      {"shm:/s?ring=mpmc&message_size=-4", "message_size=-4"},
      {"pipe:?capacity=99999999999999999999", "capacity=99999999999999999999"},
  };
  for (const bad& b : cases) {
    CAPTURE(b.address);
    const std::string error = ipcoro::test::what_of<ipcoro::bad_channel_address>(
        [&] { (void)ipcoro::channel_address::parse(b.address); });
    CHECK(contains(error, b.address));
    CHECK(contains(error, std::string("option ") + b.option + " is not a positive size"));
    CHECK(contains(error, "K, KiB, M, MiB, G or GiB"));
  }
}
