// SPDX-License-Identifier: MIT
// region_layout: what a shared-memory segment or mapped file holds, checked when it is opened.
#pragma once

#include <cstdint>

namespace ipcoro {

/// What a region holds, checked on open: a user-chosen type tag (say which kind of object
/// lives in the payload), the layout version of that object, and the payload size in bytes.
/// When opening, `payload_size == 0` accepts whatever size the creator chose.
struct region_layout {
  std::uint32_t type_tag = 0;
  std::uint32_t version = 0;
  std::uint64_t payload_size = 0;
};

}  // namespace ipcoro
