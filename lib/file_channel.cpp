// SPDX-License-Identifier: MIT
// file_channel: the file: scheme, a ring in a memory-mapped file, durable on request.
#include "ipcoro/channel.hpp"
#include "ipcoro/mapped_file.hpp"
#include "ipcoro/shm_ring.hpp"
#include "ipcoro/transport.hpp"

#include "channel_wire.hpp"
#include "ring/protocol.hpp"
#include "ring_channel.hpp"
#include "truncation_guard.hpp"

#include <fmt/core.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <string>

namespace ipcoro::detail {
namespace {

/// The guard of a file channel's mapping: a truncated file is an error of the ring
/// operation that touches a page past its end, not a SIGBUS (see truncation_guard).
truncation_guard guard_of(const mapped_file& f) {
  const std::span<std::byte> payload = f.payload();
  return truncation_guard({payload.data() - region_payload_offset, region_payload_offset + payload.size()},
                          f.path());
}

/// A mapped file under its truncation guard (declared after it: unguarded before unmapped).
struct guarded_file {
  explicit guarded_file(mapped_file f) : file(std::move(f)), guard(guard_of(file)) {}
  mapped_file file;
  truncation_guard guard;
};

/// A mapped file that is removed when the receiver that created it goes: only by the
/// creating process (not a forked child's copy), and only while the path still names it.
struct owned_file {
  explicit owned_file(mapped_file f) : file(std::move(f)), guard(guard_of(file)), owner(::getpid()) {
    struct stat st {};
    if (::stat(file.path().c_str(), &st) == 0) {
      dev = st.st_dev;
      ino = st.st_ino;
    }
  }
  owned_file(const owned_file&) = delete;
  owned_file& operator=(const owned_file&) = delete;
  mapped_file file;
  truncation_guard guard;
  pid_t owner;
  dev_t dev = 0;
  ino_t ino = 0;
  ~owned_file() {
    struct stat st {};
    if (file && owner == ::getpid() && ::stat(file.path().c_str(), &st) == 0 && st.st_dev == dev &&
        st.st_ino == ino) {
      ::unlink(file.path().c_str());
    }
  }
};

/// After `e` from opening or creating a file channel: channel_error when the file is
/// that of a channel with the other durability (the ends disagree about durable=1),
/// otherwise `e` named for the channel.
[[noreturn]] void refuse_file(const channel_address& a, const std::system_error& e) {
  channel_address other = a;
  other.durable = !a.durable;
  try {
    (void)mapped_file::open(a.name, expected_ring_layout(other));
  } catch (const std::system_error&) {
    rethrow_for(a, e);
  }
  throw channel_error(
      EPROTO, fmt::format("channel {}: the file is {} durable channel's, but this address {} durable=1; "
                          "write it on both ends or on neither",
                          a.text, a.durable ? "not a" : "a", a.durable ? "says" : "does not say"));
}

/// The file of a durable channel: opened as it is when it exists (whatever its capacity),
/// created otherwise.
mapped_file open_or_create_durable(const channel_address& a) {
  for (int round = 0; round < 16; ++round) {
    try {
      return mapped_file::open(a.name, expected_ring_layout(a));
    } catch (const std::system_error& e) {
      if (!has_errno(e, ENOENT)) refuse_file(a, e);
    }
    try {
      return mapped_file::create(a.name, ring_layout(a), a.mode, ring_formatter(a));
    } catch (const std::system_error& e) {
      if (!has_errno(e, EEXIST)) rethrow_for(a, e);
    }
  }
  throw channel_error(EAGAIN, fmt::format("channel {}: the file keeps appearing and disappearing", a.text));
}

task<std::unique_ptr<receive_port>> open_file_receiver(channel_address a) {
  if (a.durable) {
    auto file = std::make_shared<guarded_file>(open_or_create_durable(a));
    const std::span<std::byte> payload = file->file.payload();
    co_return make_ring_receiver(a, std::move(file), payload);
  }
  std::shared_ptr<owned_file> file;
  try {
    file = std::make_shared<owned_file>(
        mapped_file::create_or_reclaim(a.name, ring_layout(a), a.mode, ring_formatter(a)));
  } catch (const std::system_error& e) {
    // A durable channel's file is never reclaimed by a plain receiver: say why.
    if (has_errno(e, EEXIST)) refuse_file(a, e);
    throw;
  }
  const std::span<std::byte> payload = file->file.payload();
  co_return make_ring_receiver(a, std::move(file), payload);
}

task<std::unique_ptr<send_port>> open_file_sender(channel_address a) {
  std::shared_ptr<guarded_file> file;
  try {
    file = std::make_shared<guarded_file>(mapped_file::open(a.name, expected_ring_layout(a)));
  } catch (const std::system_error& e) {
    if (e.code() == std::errc::no_such_file_or_directory) no_channel(a, e);
    if (has_errno(e, EPROTO)) refuse_file(a, e);
    throw;
  }
  const std::span<std::byte> payload = file->file.payload();
  co_return make_ring_sender(a, std::move(file), payload);
}

/// The file is created and removed at once: the link needs nobody to open it.
std::unique_ptr<link_ends> make_file_link(const channel_address& a) {
  if (a.durable) {
    throw bad_channel_address(
        fmt::format("channel address \"{}\": a link removes its file as soon as both "
                    "ends are open, so it cannot be durable; open a durable channel "
                    "with open_receiver / open_sender",
                    a.text));
  }
  auto file =
      std::make_shared<guarded_file>(mapped_file::create(a.name, ring_layout(a), a.mode, ring_formatter(a)));
  if (::unlink(a.name.c_str()) != 0) throw_errno(errno, fmt::format("channel {}: removing the file", a.text));
  const std::span<std::byte> payload = file->file.payload();
  return make_ring_link(a, std::move(file), payload);
}

void check_file_address(const channel_address& a) {
  check_ring_address(a);
  if (a.durable && a.mpmc) {
    throw bad_channel_address(
        fmt::format("channel address \"{}\": durable=1 applies to an SPSC ring: its one receiver "
                    "acknowledges what it has received",
                    a.text));
  }
}

std::string inspect_file(const channel_address& a) {
  for (const bool durable : {false, true}) {
    for (const bool mpmc : {false, true}) {
      channel_address probe = a;
      probe.durable = durable && !mpmc;
      probe.mpmc = mpmc;
      try {
        const mapped_file file = mapped_file::open(a.name, expected_ring_layout(probe));
        const bool checked = ring_checksum_of(file.payload()) == ring_checksum::xxh3;
        return fmt::format("{}: {}{} ring in a mapped file, {} bytes of ring, checksum={}", a.text,
                           probe.durable ? "durable " : "", mpmc ? "MPMC" : "SPSC",
                           file.layout().payload_size, checked ? "xxh3" : "none");
      } catch (const std::system_error& e) {
        if (has_errno(e, ENOENT)) rethrow_for(a, e);
      }
    }
  }
  throw std::system_error(EPROTO, std::system_category(),
                          fmt::format("channel {}: the file holds no channel's ring", a.text));
}

}  // namespace

extern const channel_scheme file_scheme{
    .name = "file",
    .example = "file:/var/tmp/jobs",
    .about = "a ring in a memory-mapped file (durable=1: a persistent queue)",
    .name_form = address_name::path,
    .options = address_option::capacity | address_option::message_size | address_option::mode |
               address_option::ring | address_option::durable | address_option::checksum,
    .option_notes = "capacity= is the ring's size in bytes (SPSC) or slots (MPMC)",
    .check = check_file_address,
    .open_sender = open_file_sender,
    .open_receiver = open_file_receiver,
    .make_link = make_file_link,
    .list = nullptr,
    .inspect = inspect_file,
};

}  // namespace ipcoro::detail
