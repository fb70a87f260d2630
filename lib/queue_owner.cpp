// queue_owner: the owner record beside a channel receiver's message queue, and its reclaim.
#include "queue_owner.hpp"

#include <fmt/core.h>
#include <limits.h>

#include <cerrno>
#include <cstdint>
#include <string_view>
#include <system_error>

namespace ipcoro::detail {

namespace {

constexpr std::uint32_t owner_record_tag = 0x4f514d49;  // "IMQO"
constexpr std::string_view owner_prefix = "/ipcoro-mq-owner.";

region_layout owner_layout() noexcept { return {owner_record_tag, 1, 64}; }

bool is_eexist(const std::system_error& e) noexcept {
  return e.code() == std::error_code(EEXIST, std::system_category());
}

}  // namespace

std::string queue_owner_record_name(const std::string& name) {
  const std::string_view bare =
      !name.empty() && name.front() == '/' ? std::string_view(name).substr(1) : name;
  std::string record = std::string(owner_prefix) + std::string(bare);
  if (record.size() - 1 > NAME_MAX) {
    // Too long to carry the name: a hash of it (FNV-1a) stands in.
    std::uint64_t h = 14695981039346656037ull;
    for (const char c : bare) h = (h ^ static_cast<unsigned char>(c)) * 1099511628211ull;
    record = fmt::format("{}#{:016x}", owner_prefix, h);
  }
  return record;
}

owned_queue create_owned_queue(const std::string& name, const mq_attributes& attributes, unsigned mode,
                               const std::string& address) {
  const std::string record_name = queue_owner_record_name(name);
  owned_queue q;
  // The record is taken first: whoever holds it is the one receiver of the address. Taking
  // it over from a dead process is what proves that a queue left under the name is that
  // process's and may go.
  bool reclaimed = false;
  try {
    q.record = shm_segment::create(record_name, owner_layout(), shm_segment::options{mode});
  } catch (const std::system_error& e) {
    if (!is_eexist(e)) throw;
    try {
      q.record = shm_segment::create_or_reclaim(record_name, owner_layout(), shm_segment::options{mode});
    } catch (const std::system_error& taken) {
      if (!is_eexist(taken)) throw;
      throw std::system_error(
          EEXIST, std::system_category(),
          fmt::format("channel {}: another receiver owns the queue ({})", address, taken.what()));
    }
    reclaimed = true;
  }
  for (int round = 0; round < 2; ++round) {
    try {
      q.queue = message_queue::create(name, attributes, mq_access::read_write, mode);
      return q;
    } catch (const std::system_error& e) {
      if (!is_eexist(e)) throw;
      if (!reclaimed) {
        throw std::system_error(
            EEXIST, std::system_category(),
            fmt::format("channel {}: the queue {} exists but no channel receiver owns it (it "
                        "has no owner record {}): it was made otherwise, and is left alone; "
                        "remove it (message_queue::unlink) if nothing uses it",
                        address, name, record_name));
      }
      message_queue::unlink(name);  // the dead owner's
    }
  }
  throw std::system_error(
      EEXIST, std::system_category(),
      fmt::format("channel {}: the queue {} keeps reappearing after its dead owner's was removed", address,
                  name));
}

}  // namespace ipcoro::detail
