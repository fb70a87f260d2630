// SPDX-License-Identifier: MIT
// codec: how a channel turns values into bytes and back, and how peers recognise a type.
#pragma once

#include "ipcoro/export.hpp"
#include "ipcoro/hash.hpp"

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

namespace ipcoro {

/// Thrown when bytes received from a peer cannot be decoded into the receiver's type.
class IPCORO_API decode_error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

namespace detail {

/// The compiler's spelling of T, taken from the signature of this function.
template <class T>
constexpr std::string_view spelled_type_name() noexcept {
  constexpr std::string_view signature = __PRETTY_FUNCTION__;
  constexpr std::string_view key = "T = ";
  constexpr std::size_t start = signature.find(key) + key.size();
  constexpr std::size_t end = signature.find_first_of(";]", start);
  return signature.substr(start, end - start);
}

IPCORO_API [[noreturn]] void throw_decode_size(std::string_view type, std::size_t expected, std::size_t got);
/// std::memcpy through a call the compiler cannot expand: for a large copy of a size known
/// where it is made, GCC would otherwise inline `rep movsq`, which is several times slower
/// than the C library's copy into a destination that is not 64-byte aligned (a ring record).
IPCORO_API void copy_bytes(void* to, const void* from, std::size_t size) noexcept;
/// Copies one value's bytes: inline when small, through copy_bytes when large.
template <std::size_t Size>
inline void copy_value_bytes(void* to, const void* from) noexcept {
  if constexpr (Size <= 256) {
    std::memcpy(to, from, Size);
  } else {
    copy_bytes(to, from, Size);
  }
}

}  // namespace detail

/// The customization point. A codec<T> specialization provides:
///
///     static std::string type_name();                       // what peers compare at connect
///     static constexpr std::uint32_t version = 1;           // bump when the encoding changes
///     static std::size_t size(const T& value);              // encoded bytes
///     static void encode(const T& value, std::span<std::byte> out);  // out.size() == size(value)
///     static T decode(std::span<const std::byte> in);       // throws decode_error on bad input
///
/// and optionally, for channel_receiver::receive_into:
///
///     static void decode_into(std::span<const std::byte> in, T& into);  // reuses into's storage
///
/// Provided here: trivially copyable types (memcpy), std::string, and std::vector of a
/// trivially copyable type (including std::vector<std::byte> for byte buffers).
template <class T>
struct codec;

template <class T>
requires std::is_trivially_copyable_v<T>
struct codec<T> {
  static std::string type_name() {
    return std::string(detail::spelled_type_name<T>()) + "/" + std::to_string(sizeof(T));
  }
  static constexpr std::uint32_t version = 1;
  /// A value's encoding is its bytes: a transport may put them straight into a value.
  static constexpr bool bytewise = true;
  static constexpr std::size_t size(const T&) noexcept { return sizeof(T); }
  static void encode(const T& value, std::span<std::byte> out) noexcept {
    detail::copy_value_bytes<sizeof(T)>(out.data(), &value);
  }
  static T decode(std::span<const std::byte> in) {
    T value;
    decode_into(in, value);
    return value;
  }
  static void decode_into(std::span<const std::byte> in, T& into) {
    if (in.size() != sizeof(T))
      detail::throw_decode_size(detail::spelled_type_name<T>(), sizeof(T), in.size());
    detail::copy_value_bytes<sizeof(T)>(&into, in.data());
  }
};

template <>
struct codec<std::string> {
  static std::string type_name() { return "std::string"; }
  static constexpr std::uint32_t version = 1;
  static std::size_t size(const std::string& value) noexcept { return value.size(); }
  static void encode(const std::string& value, std::span<std::byte> out) noexcept {
    if (!value.empty()) std::memcpy(out.data(), value.data(), value.size());
  }
  static std::string decode(std::span<const std::byte> in) {
    return std::string(reinterpret_cast<const char*>(in.data()), in.size());
  }
  static void decode_into(std::span<const std::byte> in, std::string& into) {
    into.assign(reinterpret_cast<const char*>(in.data()), in.size());
  }
};

template <class E>
requires std::is_trivially_copyable_v<E>
struct codec<std::vector<E>> {
  static std::string type_name() { return "std::vector<" + codec<E>::type_name() + ">"; }
  static constexpr std::uint32_t version = 1;
  static std::size_t size(const std::vector<E>& value) noexcept { return value.size() * sizeof(E); }
  static void encode(const std::vector<E>& value, std::span<std::byte> out) noexcept {
    if (!value.empty()) std::memcpy(out.data(), value.data(), value.size() * sizeof(E));
  }
  static std::vector<E> decode(std::span<const std::byte> in) {
    std::vector<E> value;
    decode_into(in, value);
    return value;
  }
  static void decode_into(std::span<const std::byte> in, std::vector<E>& into) {
    if (in.size() % sizeof(E) != 0) {
      detail::throw_decode_size(detail::spelled_type_name<std::vector<E>>(),
                                (in.size() / sizeof(E) + 1) * sizeof(E), in.size());
    }
    into.resize(in.size() / sizeof(E));  // keeps the capacity it has
    if (!into.empty()) std::memcpy(into.data(), in.data(), in.size());
  }
};

/// codec<T> is the one above for trivially copyable types: a value's encoding is its bytes.
template <class T>
concept bytewise_codec = requires {
  requires codec<T>::bytewise;
};

/// A type has a codec when codec<T> provides the members listed above.
template <class T>
concept encodable = requires(const T& value, std::span<std::byte> out, std::span<const std::byte> in) {
  { codec<T>::type_name() } -> std::convertible_to<std::string>;
  { codec<T>::version } -> std::convertible_to<std::uint32_t>;
  { codec<T>::size(value) } -> std::convertible_to<std::size_t>;
  codec<T>::encode(value, out);
  { codec<T>::decode(in) } -> std::same_as<T>;
};

/// Decodes `in` into `into`: through codec<T>::decode_into where the codec has it (which
/// reuses what `into` holds), else by assigning codec<T>::decode(in).
template <encodable T>
void decode_into(std::span<const std::byte> in, T& into) {
  if constexpr (requires { codec<T>::decode_into(in, into); }) {
    codec<T>::decode_into(in, into);
  } else {
    into = codec<T>::decode(in);
  }
}

namespace detail {
/// Decodes when converted to T, so that `opt.emplace(decoded_as<T>{in})` builds the value
/// in the optional itself: the decoded T is a prvalue there, and no copy of it is made.
template <class T>
struct decoded_as {
  std::span<const std::byte> in;
  operator T() const { return codec<T>::decode(in); }
};
}  // namespace detail

/// What a sender announces and a receiver checks when they meet: the codec's type name
/// and version, reduced to one number.
struct type_identity {
  std::string name;
  std::uint32_t version = 0;
  std::uint64_t fingerprint = 0;
};

template <encodable T>
type_identity identity_of() {
  type_identity id{codec<T>::type_name(), codec<T>::version, 0};
  id.fingerprint = fnv1a(id.name) ^ (static_cast<std::uint64_t>(id.version) * 0x9e3779b97f4a7c15ull);
  return id;
}

}  // namespace ipcoro
