// SPDX-License-Identifier: MIT
// channel_schemes: the table of address schemes. A new transport adds its row here.
#include "ipcoro/transport.hpp"

#include <array>

namespace ipcoro {

namespace detail {
extern const channel_scheme pipe_scheme;  // pipe_channel.cpp
extern const channel_scheme fifo_scheme;  // fifo_channel.cpp
extern const channel_scheme mq_scheme;    // mq_channel.cpp
extern const channel_scheme shm_scheme;   // shm_channel.cpp
extern const channel_scheme file_scheme;  // file_channel.cpp
extern const channel_scheme fd_scheme;    // pipe_channel.cpp
}  // namespace detail

namespace {
constexpr std::array<const channel_scheme*, 6> table{
    &detail::pipe_scheme, &detail::fifo_scheme, &detail::mq_scheme,
    &detail::shm_scheme,  &detail::file_scheme, &detail::fd_scheme,
};
}  // namespace

std::span<const channel_scheme* const> channel_schemes() noexcept { return table; }

const channel_scheme* find_channel_scheme(std::string_view name) noexcept {
  for (const channel_scheme* s : table) {
    if (s->name == name) return s;
  }
  return nullptr;
}

}  // namespace ipcoro
