// SPDX-License-Identifier: MIT
// shm_channel: the shm: scheme, a ring in a POSIX shared-memory segment.
#include "ipcoro/channel.hpp"
#include "ipcoro/shm_ring.hpp"
#include "ipcoro/shm_segment.hpp"
#include "ipcoro/transport.hpp"

#include "channel_wire.hpp"
#include "ring/protocol.hpp"
#include "ring_channel.hpp"

#include <dirent.h>
#include <fmt/core.h>

#include <optional>
#include <string>
#include <vector>

namespace ipcoro::detail {
namespace {

task<std::unique_ptr<receive_port>> open_shm_receiver(channel_address a) {
  std::shared_ptr<shm_segment> seg;
  try {
    seg = std::make_shared<shm_segment>(shm_segment::create_or_reclaim(
        a.name, ring_layout(a), shm_segment::options{a.mode, ring_formatter(a)}));
  } catch (const std::system_error& e) {
    if (has_errno(e, EEXIST)) rethrow_for(a, e);
    throw;
  }
  const std::span<std::byte> payload = seg->payload();
  co_return make_ring_receiver(a, std::move(seg), payload);
}

task<std::unique_ptr<send_port>> open_shm_sender(channel_address a) {
  std::shared_ptr<shm_segment> seg;
  try {
    seg = std::make_shared<shm_segment>(shm_segment::open(a.name, expected_ring_layout(a)));
  } catch (const std::system_error& e) {
    if (e.code() == std::errc::no_such_file_or_directory) no_channel(a, e);
    throw;
  }
  const std::span<std::byte> payload = seg->payload();
  co_return make_ring_sender(a, std::move(seg), payload);
}

/// The segment is created and its name removed at once: the link needs nobody to open it.
std::unique_ptr<link_ends> make_shm_link(const channel_address& a) {
  auto seg = std::make_shared<shm_segment>(
      shm_segment::create(a.name, ring_layout(a), shm_segment::options{a.mode, ring_formatter(a)}));
  seg->unlink();
  const std::span<std::byte> payload = seg->payload();
  return make_ring_link(a, std::move(seg), payload);
}

/// What a segment that holds a channel's ring (SPSC or MPMC) says about it.
struct ring_facts {
  region_layout layout;
  ring_checksum checksum;
};
std::optional<ring_facts> ring_region(const std::string& name) {
  for (const bool mpmc : {false, true}) {
    channel_address probe;
    probe.name = name;
    probe.mpmc = mpmc;
    try {
      const shm_segment s = shm_segment::open(name, expected_ring_layout(probe));
      return ring_facts{s.layout(), ring_checksum_of(s.payload())};
    } catch (const std::system_error&) {
    }
  }
  return std::nullopt;
}

std::vector<std::string> list_shm() {
  std::vector<std::string> out;
  DIR* d = ::opendir("/dev/shm");
  if (d == nullptr) return out;
  while (const dirent* e = ::readdir(d)) {
    if (e->d_name[0] == '.') continue;
    const std::string name = std::string("/") + e->d_name;
    if (ring_region(name)) out.push_back("shm:" + name);
  }
  ::closedir(d);
  return out;
}

std::string inspect_shm(const channel_address& a) {
  const std::optional<ring_facts> r = ring_region(a.name);
  if (!r) {
    throw std::system_error(ENOENT, std::system_category(),
                            fmt::format("channel {}: no channel's ring in a segment of that name", a.text));
  }
  return fmt::format("{}: shared-memory {} ring, {} bytes of ring, checksum={}", a.text,
                     r->layout.type_tag == spsc_ring_type_tag ? "SPSC" : "MPMC", r->layout.payload_size,
                     r->checksum == ring_checksum::xxh3 ? "xxh3" : "none");
}

}  // namespace

extern const channel_scheme shm_scheme{
    .name = "shm",
    .example = "shm:/jobs",
    .about = "a ring in a POSIX shared-memory segment",
    .name_form = address_name::ipc_name,
    .options = address_option::capacity | address_option::message_size | address_option::mode |
               address_option::ring | address_option::checksum,
    .option_notes = "capacity= is the ring's size in bytes (SPSC) or slots (MPMC)",
    .check = check_ring_address,
    .open_sender = open_shm_sender,
    .open_receiver = open_shm_receiver,
    .make_link = make_shm_link,
    .list = list_shm,
    .inspect = inspect_shm,
};

}  // namespace ipcoro::detail
