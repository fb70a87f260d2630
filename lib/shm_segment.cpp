// SPDX-License-Identifier: MIT
// Shared memory segments: unnamed creation then atomic naming, validation, reclaim, removal.
#include "ipcoro/shm_segment.hpp"

#include "ipcoro/error.hpp"
#include "ipcoro/unique_fd.hpp"

#include "liveness.hpp"

#include <fcntl.h>
#include <fmt/core.h>
#include <limits.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <utility>

namespace ipcoro {

namespace {

// glibc's shm_open maps "/name" to this directory (fixed since glibc 2.34; tmpfs).
constexpr const char* shm_dir = "/dev/shm";

std::string normalise_name(const std::string& name) {
  const std::string bare = !name.empty() && name[0] == '/' ? name.substr(1) : name;
  if (bare.empty() || bare == "." || bare == "..") {
    throw std::system_error(
        EINVAL, std::system_category(),
        fmt::format("shm segment name \"{}\": give a name such as \"frames\" or \"/frames\"", name));
  }
  if (bare.find('/') != std::string::npos) {
    throw std::system_error(
        EINVAL, std::system_category(),
        fmt::format("shm segment name \"{}\": only a leading '/' is allowed (segments live "
                    "directly in {})",
                    name, shm_dir));
  }
  if (bare.size() > NAME_MAX) {
    throw std::system_error(ENAMETOOLONG, std::system_category(),
                            fmt::format("shm segment name \"{:.40}...\": {} bytes, at most NAME_MAX ({})",
                                        bare, bare.size(), NAME_MAX));
  }
  return "/" + bare;
}

std::string path_of(const std::string& name) { return std::string(shm_dir) + name; }

detail::region_origin origin_of(const std::string& name) {
  return {fmt::format("shm segment {} ({})", name, path_of(name)), shm_dir, true};
}

void check_mode(const std::string& name, unsigned mode) {
  if (mode > 0777) {
    throw std::system_error(EINVAL, std::system_category(),
                            fmt::format("shm segment {}: mode {:#o} has bits beyond 0777", name, mode));
  }
}

/// Who created the segment in `fd`, for messages: "pid 123, alive".
std::string describe_existing(int fd) {
  detail::region_header h{};
  if (!detail::mapped_region::peek(fd, h)) return "it is not a complete ipcoro segment";
  return fmt::format("created by pid {}, which is {}", h.creator.pid,
                     detail::process_alive(h.creator) ? "alive" : "dead");
}

[[noreturn]] void throw_open_error(int err, const std::string& name) {
  const std::string path = path_of(name);
  if (err == ENOENT) {
    throw std::system_error(
        err, std::system_category(),
        fmt::format("shm segment {}: there is no {}; create it first (or check the name)", name, path));
  }
  if (err == EACCES || err == EPERM) {
    struct stat st {};
    std::string who;
    if (::stat(path.c_str(), &st) == 0) {
      who = fmt::format(" ({} is mode {:#o}, owned by uid {})", path, st.st_mode & 07777, st.st_uid);
    }
    throw std::system_error(err, std::system_category(),
                            fmt::format("shm segment {}: permission denied for uid {}{}; run as its owner or "
                                        "create it with a wider options::mode",
                                        name, ::geteuid(), who));
  }
  if (err == EMFILE || err == ENFILE) {
    throw std::system_error(err, std::system_category(),
                            fmt::format("shm segment {}: out of file descriptors (ulimit -n, or "
                                        "/proc/sys/fs/file-max)",
                                        name));
  }
  throw_errno(err, fmt::format("shm segment {}: opening {}", name, path));
}

/// An unnamed file in /dev/shm with `mode`, ready to be filled and then named.
unique_fd make_unnamed(const std::string& name, unsigned mode) {
  unique_fd fd(::open(shm_dir, O_TMPFILE | O_RDWR | O_CLOEXEC, mode));
  if (!fd) {
    const int err = errno;
    if (err == ENOENT) {
      throw std::system_error(
          err, std::system_category(),
          fmt::format("shm segment {}: {} does not exist; mount a tmpfs there", name, shm_dir));
    }
    if (err == EACCES || err == EPERM) {
      throw std::system_error(
          err, std::system_category(),
          fmt::format("shm segment {}: uid {} may not create files in {}", name, ::geteuid(), shm_dir));
    }
    if (err == EOPNOTSUPP || err == EISDIR || err == EINVAL) {
      throw std::system_error(err, std::system_category(),
                              fmt::format("shm segment {}: {} does not support O_TMPFILE (needs a tmpfs and "
                                          "Linux 3.11 or later)",
                                          name, shm_dir));
    }
    throw_open_error(err, name);
  }
  // The umask narrowed the mode given to open; the caller asked for exactly this one.
  if (::fchmod(fd.get(), mode) != 0) throw_errno(errno, fmt::format("shm segment {}: fchmod", name));
  return fd;
}

/// Gives the unnamed file `fd` its name; -EEXIST when the name is taken.
int publish(int fd, const std::string& name) {
  char proc_path[64];
  std::snprintf(proc_path, sizeof proc_path, "/proc/self/fd/%d", fd);
  const std::string path = path_of(name);
  if (::linkat(AT_FDCWD, proc_path, AT_FDCWD, path.c_str(), AT_SYMLINK_FOLLOW) == 0) return 0;
  int err = errno;
  if (err == ENOENT) {
    // No /proc: AT_EMPTY_PATH does the same but needs CAP_DAC_READ_SEARCH.
    if (::linkat(fd, "", AT_FDCWD, path.c_str(), AT_EMPTY_PATH) == 0) return 0;
    err = errno;
  }
  return -err;
}

bool same_file(const struct stat& a, dev_t dev, ino_t ino) noexcept {
  return a.st_dev == dev && a.st_ino == ino;
}

}  // namespace

shm_segment::shm_segment(shm_segment&& other) noexcept
    : region_(std::move(other.region_)),
      name_(std::move(other.name_)),
      creator_(other.creator_),
      dev_(other.dev_),
      ino_(other.ino_),
      owner_pid_(other.owner_pid_),
      owns_name_(std::exchange(other.owns_name_, false)) {}

shm_segment& shm_segment::operator=(shm_segment&& other) noexcept {
  if (this != &other) {
    if (owns_name_ && owner_pid_ == ::getpid()) {
      try {
        unlink();
      } catch (...) {
      }
    }
    region_ = std::move(other.region_);
    name_ = std::move(other.name_);
    creator_ = other.creator_;
    dev_ = other.dev_;
    ino_ = other.ino_;
    owner_pid_ = other.owner_pid_;
    owns_name_ = std::exchange(other.owns_name_, false);
  }
  return *this;
}

shm_segment::~shm_segment() {
  // A forked child holds a copy of the creator's object: only the creator removes the name.
  if (owns_name_ && owner_pid_ == ::getpid()) {
    try {
      unlink();
    } catch (...) {
    }
  }
}

bool shm_segment::creator_alive() const noexcept { return detail::process_alive(creator_); }

void shm_segment::unlink() {
  owns_name_ = false;
  if (name_.empty()) return;
  struct stat st {};
  if (::stat(path_of(name_).c_str(), &st) != 0) {
    if (errno == ENOENT) return;
    throw_errno(errno, fmt::format("shm segment {}: stat before removing it", name_));
  }
  if (!same_file(st, dev_, ino_)) return;  // the name was given to another segment since
  if (::shm_unlink(name_.c_str()) != 0 && errno != ENOENT) {
    throw_errno(errno, fmt::format("shm segment {}: shm_unlink", name_));
  }
}

bool shm_segment::unlink(const std::string& name) {
  const std::string n = normalise_name(name);
  if (::shm_unlink(n.c_str()) == 0) return true;
  if (errno == ENOENT) return false;
  throw_errno(errno, fmt::format("shm segment {}: shm_unlink", n));
}

shm_segment shm_segment::create(const std::string& name, const region_layout& layout, const options& opts) {
  return create_impl(name, layout, opts, false);
}

shm_segment shm_segment::create_or_reclaim(const std::string& name, const region_layout& layout,
                                           const options& opts) {
  return create_impl(name, layout, opts, true);
}

void shm_segment::adopt(int fd, const std::string& name) {
  name_ = name;
  creator_ = region_.header().creator;
  // The file's identity, so that unlink() removes the name only while it is still ours.
  struct stat st {};
  if (::fstat(fd, &st) != 0) throw_errno(errno, fmt::format("shm segment {}: fstat", name));
  dev_ = st.st_dev;
  ino_ = st.st_ino;
  owner_pid_ = ::getpid();
}

shm_segment shm_segment::create_impl(const std::string& raw_name, const region_layout& layout,
                                     const options& opts, bool reclaim) {
  const std::string name = normalise_name(raw_name);
  check_mode(name, opts.mode);
  unique_fd fd = make_unnamed(name, opts.mode);
  shm_segment seg;
  seg.region_ = detail::mapped_region::create(fd.get(), layout, origin_of(name));
  if (opts.initialize) opts.initialize(seg.region_.payload());
  seg.adopt(fd.get(), name);

  const std::string path = path_of(name);
  // Bounded: each round either names our segment, fails, or removes a dead creator's.
  for (int round = 0; round < 16; ++round) {
    const int rc = publish(fd.get(), name);
    if (rc == 0) {
      seg.owns_name_ = true;
      return seg;
    }
    if (rc != -EEXIST) {
      if (rc == -EACCES || rc == -EPERM) throw_open_error(-rc, name);
      throw_errno(-rc, fmt::format("shm segment {}: naming it {}", name, path));
    }
    unique_fd existing(::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW));
    if (!existing) {
      if (errno == ENOENT) continue;  // removed in between: try again
      throw std::system_error(EEXIST, std::system_category(),
                              fmt::format("shm segment {}: {} already exists and cannot be inspected ({})",
                                          name, path, std::generic_category().message(errno)));
    }
    if (!reclaim) {
      throw std::system_error(
          EEXIST, std::system_category(),
          fmt::format("shm segment {}: {} already exists ({}); open it, remove it, or use "
                      "create_or_reclaim",
                      name, path, describe_existing(existing.get())));
    }
    detail::region_header h{};
    if (!detail::mapped_region::peek(existing.get(), h)) {
      throw std::system_error(
          EEXIST, std::system_category(),
          fmt::format("shm segment {}: {} exists but is not a complete ipcoro segment; it is "
                      "not reclaimed: remove it by hand if nothing uses it",
                      name, path));
    }
    if (h.type_tag != layout.type_tag) {
      throw std::system_error(
          EEXIST, std::system_category(),
          fmt::format("shm segment {}: {} exists and holds type tag {:#x}, not {:#x}; it is "
                      "not reclaimed: choose another name",
                      name, path, h.type_tag, layout.type_tag));
    }
    if (detail::process_alive(h.creator)) {
      throw std::system_error(
          EEXIST, std::system_category(),
          fmt::format("shm segment {}: {} exists and its creator, pid {}, is alive; open it "
                      "instead, or stop that process",
                      name, path, h.creator.pid));
    }
    // Remove the dead creator's segment only if the name still refers to what was
    // inspected: another survivor may have reclaimed it already.
    struct stat inspected {};
    struct stat current {};
    if (::fstat(existing.get(), &inspected) != 0)
      throw_errno(errno, fmt::format("shm segment {}: fstat", name));
    if (::stat(path.c_str(), &current) == 0 && same_file(current, inspected.st_dev, inspected.st_ino)) {
      if (::shm_unlink(name.c_str()) != 0 && errno != ENOENT) {
        throw_errno(errno, fmt::format("shm segment {}: removing the dead creator's {}", name, path));
      }
    }
  }
  throw std::system_error(EEXIST, std::system_category(),
                          fmt::format("shm segment {}: {} keeps reappearing; another process is creating it "
                                      "concurrently",
                                      name, path));
}

shm_segment shm_segment::open(const std::string& raw_name, const region_layout& expected) {
  const std::string name = normalise_name(raw_name);
  unique_fd fd(::shm_open(name.c_str(), O_RDWR | O_CLOEXEC, 0));
  if (!fd) throw_open_error(errno, name);
  shm_segment seg;
  seg.region_ = detail::mapped_region::open(fd.get(), expected, origin_of(name));
  seg.adopt(fd.get(), name);
  return seg;
}

}  // namespace ipcoro
