// SPDX-License-Identifier: MIT
// Fuzzes channel_address::parse: any text is parsed or refused with bad_channel_address.
#include "ipcoro/channel_address.hpp"

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string_view>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  ipcoro::channel_address a;
  try {
    a = ipcoro::channel_address::parse(text);
  } catch (const ipcoro::bad_channel_address&) {
    return 0;
  }
  // An accepted address keeps the text it was given, and parses again to the same result.
  if (a.text != text) std::abort();
  const ipcoro::channel_address again = ipcoro::channel_address::parse(a.text);
  if (again.scheme != a.scheme || again.name != a.name || again.capacity != a.capacity ||
      again.message_size != a.message_size || again.mode != a.mode || again.mpmc != a.mpmc ||
      again.durable != a.durable) {
    std::abort();
  }
  if (a.scheme == "fd") (void)a.fd();
  return 0;
}
