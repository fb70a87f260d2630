// SPDX-License-Identifier: MIT
// Fuzzes every codec in codec.hpp: decode and decode_into of arbitrary bytes either refuse
// with decode_error or give a value that encodes back to the same bytes.
#include "ipcoro/codec.hpp"

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <span>
#include <string>
#include <vector>

namespace {

struct record {
  std::int32_t id;
  double weight;
  char tag[3];
};

template <class T>
void check_round_trip(const T& value, std::span<const std::byte> in) {
  const std::size_t n = ipcoro::codec<T>::size(value);
  if (n != in.size()) std::abort();
  std::vector<std::byte> out(n);
  ipcoro::codec<T>::encode(value, out);
  if (n != 0 && std::memcmp(out.data(), in.data(), n) != 0) std::abort();
}

template <class T>
void fuzz_codec(std::span<const std::byte> in, T reused) {
  try {
    const T value = ipcoro::codec<T>::decode(in);
    check_round_trip(value, in);
  } catch (const ipcoro::decode_error&) {
  }
  // decode_into on a value that already holds something, as receive_into reuses one.
  try {
    ipcoro::decode_into(in, reused);
    check_round_trip(reused, in);
  } catch (const ipcoro::decode_error&) {
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::span<const std::byte> in = std::as_bytes(std::span{data, size});
  fuzz_codec<std::uint8_t>(in, 1);
  fuzz_codec<std::uint64_t>(in, 7);
  fuzz_codec<double>(in, 0.5);
  fuzz_codec<record>(in, record{1, 2.0, {'a', 'b', 'c'}});
  fuzz_codec<std::string>(in, std::string(40, 'x'));
  fuzz_codec<std::vector<std::byte>>(in, std::vector<std::byte>(17));
  fuzz_codec<std::vector<std::uint32_t>>(in, std::vector<std::uint32_t>{1, 2, 3});
  fuzz_codec<std::vector<record>>(in, std::vector<record>(2));
  return 0;
}
