// SPDX-License-Identifier: MIT
// The table of address schemes: every row parses its own example, options follow the row,
// and what exists can be listed and inspected through the rows.
#include "ipcoro/channel.hpp"
#include "ipcoro/io_context.hpp"
#include "ipcoro/sync_wait.hpp"
#include "ipcoro/transport.hpp"

#include "channel_support.hpp"
#include "process.hpp"

#include <catch2/catch.hpp>

#include <algorithm>
#include <string>
#include <vector>

namespace {
using ipcoro::test::fresh_address;
using ipcoro::test::nothing_left_behind;

bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }
}  // namespace

TEST_CASE("every scheme in the table parses its own example and is found by name", "[scheme]") {
  const auto schemes = ipcoro::channel_schemes();
  REQUIRE(schemes.size() >= 6);
  for (const ipcoro::channel_scheme* s : schemes) {
    CAPTURE(s->name);
    CHECK(ipcoro::find_channel_scheme(s->name) == s);
    const ipcoro::channel_address a = ipcoro::channel_address::parse(s->example);
    CHECK(a.scheme == s->name);
    CHECK(s->open_sender != nullptr);
    CHECK(s->open_receiver != nullptr);
    CHECK(s->make_link != nullptr);
  }
  CHECK(ipcoro::find_channel_scheme("tcp") == nullptr);
}

TEST_CASE("an option a row does not take is refused naming the options it takes", "[scheme]") {
  for (const ipcoro::channel_scheme* s : ipcoro::channel_schemes()) {
    if ((s->options & ipcoro::address_option::durable) != 0) continue;
    const std::string address = std::string(s->example) + "?durable=1";
    CAPTURE(address);
    std::string error;
    try {
      (void)ipcoro::channel_address::parse(address);
    } catch (const ipcoro::bad_channel_address& e) {
      error = e.what();
    }
    CHECK(contains(error, "does not apply to " + std::string(s->name)));
    CHECK(contains(error, address));
  }
}

TEST_CASE("list_channels and inspect_channel see a receiver's queue and segment, and not after",
          "[scheme][ipc]") {
  const std::string transport = GENERATE("mq", "shm");
  const std::string address = fresh_address(transport);
  const std::string plain = address.substr(0, address.find('?'));
  ipcoro::io_context ctx;
  {
    auto rx = ipcoro::sync_wait(ctx, ipcoro::open_receiver<int>(address));
    const std::vector<std::string> all = ipcoro::list_channels();
    CHECK(std::find(all.begin(), all.end(), plain) != all.end());
    const std::string line = ipcoro::inspect_channel(plain);
    CAPTURE(line);
    CHECK(contains(line, plain));
    CHECK(contains(line, transport == "mq" ? "message queue" : "ring"));
  }
  const std::vector<std::string> after = ipcoro::list_channels();
  CHECK(std::find(after.begin(), after.end(), plain) == after.end());
  CHECK_THROWS_AS(ipcoro::inspect_channel(plain), std::system_error);
  CHECK(nothing_left_behind());
}
