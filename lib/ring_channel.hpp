// SPDX-License-Identifier: MIT
// ring_channel: channels over shared-memory rings, for every scheme whose memory holds a ring.
#pragma once

#include "ipcoro/channel_address.hpp"
#include "ipcoro/detail/region.hpp"
#include "ipcoro/transport.hpp"
#include "ipcoro/unique_fd.hpp"

#include <cstdint>
#include <functional>
#include <memory>
#include <span>

namespace ipcoro::detail {

/// The region type tag of a durable file channel: another tag than a plain SPSC ring's,
/// so that an end that disagrees about durable=1 is refused instead of removing the file
/// (a receiver's reclaim) or taking a restart for a death (a sender).
constexpr std::uint32_t durable_ring_type_tag = 0x4c425244;  // "DRBL"

/// The region a receiver creates for the ring `a` asks for.
region_layout ring_layout(const channel_address& a);
/// Writes that ring into a fresh region.
std::function<void(std::span<std::byte>)> ring_formatter(const channel_address& a);
/// What a sender expects to find (any size: the creator chose it).
region_layout expected_ring_layout(const channel_address& a);
/// The address checks of a ring scheme: sizes within what a ring holds, message_size only
/// for MPMC.
void check_ring_address(const channel_address& a);

/// The ends of a channel over the ring in `payload`, which `region` keeps mapped.
/// `peer_claim`: for a link's end, the read end of the other end's claim pipe (link_claims).
std::unique_ptr<send_port> make_ring_sender(const channel_address& a, std::shared_ptr<void> region,
                                            std::span<std::byte> payload, unique_fd peer_claim = {});
std::unique_ptr<receive_port> make_ring_receiver(const channel_address& a, std::shared_ptr<void> region,
                                                 std::span<std::byte> payload, unique_fd peer_claim = {});

/// Both ends of a link over a ring in memory that `region` keeps mapped (its name already
/// removed).
std::unique_ptr<link_ends> make_ring_link(const channel_address& a, std::shared_ptr<void> region,
                                          std::span<std::byte> payload);

}  // namespace ipcoro::detail
