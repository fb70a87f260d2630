// SPDX-License-Identifier: MIT
// Memory-mapped files: atomic creation through O_TMPFILE, validation on open, msync.
#include "ipcoro/mapped_file.hpp"

#include "ipcoro/error.hpp"
#include "ipcoro/unique_fd.hpp"

#include "liveness.hpp"

#include <fcntl.h>
#include <fmt/core.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdio>
#include <filesystem>
#include <system_error>

namespace ipcoro {

namespace {

std::string absolute_path(const std::string& path) {
  if (path.empty()) {
    throw std::system_error(EINVAL, std::system_category(), "mapped file: the path is empty");
  }
  std::error_code ec;
  std::filesystem::path p = std::filesystem::absolute(path, ec);
  if (ec) throw std::system_error(ec, fmt::format("mapped file {}: making the path absolute", path));
  if (!p.has_filename()) {
    throw std::system_error(EISDIR, std::system_category(),
                            fmt::format("mapped file {}: the path names a directory, not a file", path));
  }
  return p.lexically_normal().string();
}

std::string directory_of(const std::string& abs_path) {
  return std::filesystem::path(abs_path).parent_path().string();
}

detail::region_origin origin_of(const std::string& path) {
  return {fmt::format("mapped file {}", path), directory_of(path), false};
}

[[noreturn]] void throw_path_error(int err, const std::string& path, const char* doing) {
  const std::string dir = directory_of(path);
  switch (err) {
    case ENOENT:
      if (std::string_view(doing) == "creating") {
        throw std::system_error(
            err, std::system_category(),
            fmt::format("mapped file {}: the directory {} does not exist; create it first", path, dir));
      }
      throw std::system_error(
          err, std::system_category(),
          fmt::format("mapped file {}: no such file; create it first (or check the path)", path));
    case EACCES:
    case EPERM: {
      struct stat st {};
      std::string who;
      const std::string& subject = std::string_view(doing) == "creating" ? dir : path;
      if (::stat(subject.c_str(), &st) == 0) {
        who = fmt::format(" ({} is mode {:#o}, owned by uid {})", subject, st.st_mode & 07777, st.st_uid);
      }
      throw std::system_error(
          err, std::system_category(),
          fmt::format("mapped file {}: permission denied {} it as uid {}{}", path, doing, ::geteuid(), who));
    }
    case EISDIR:
      throw std::system_error(err, std::system_category(),
                              fmt::format("mapped file {}: is a directory", path));
    case EROFS:
      throw std::system_error(err, std::system_category(),
                              fmt::format("mapped file {}: the file system is mounted read-only", path));
    case EMFILE:
    case ENFILE:
      throw std::system_error(err, std::system_category(),
                              fmt::format("mapped file {}: out of file descriptors (ulimit -n, or "
                                          "/proc/sys/fs/file-max)",
                                          path));
    default:
      throw_errno(err, fmt::format("mapped file {}: {}", path, doing));
  }
}

void fsync_directory(const std::string& dir) {
  unique_fd d(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (d) (void)::fsync(d.get());  // best effort: some file systems refuse fsync on a directory
}

/// Links the fully built file `fd` (unnamed or under `temp`) at `path`; -errno on failure.
int publish(int fd, const std::string& temp, const std::string& path) {
  if (!temp.empty()) {
    const int rc = ::link(temp.c_str(), path.c_str());
    const int err = errno;
    ::unlink(temp.c_str());
    return rc == 0 ? 0 : -err;
  }
  char proc_path[64];
  std::snprintf(proc_path, sizeof proc_path, "/proc/self/fd/%d", fd);
  if (::linkat(AT_FDCWD, proc_path, AT_FDCWD, path.c_str(), AT_SYMLINK_FOLLOW) == 0) return 0;
  int err = errno;
  if (err == ENOENT && ::access("/proc/self/fd", F_OK) != 0) {
    // No /proc: AT_EMPTY_PATH does the same but needs CAP_DAC_READ_SEARCH.
    if (::linkat(fd, "", AT_FDCWD, path.c_str(), AT_EMPTY_PATH) == 0) return 0;
    err = errno;
  }
  return -err;
}

}  // namespace

bool mapped_file::creator_alive() const noexcept { return detail::process_alive(creator_); }

void mapped_file::sync(std::span<const std::byte> range) const {
  if (range.empty()) return;
  const auto p = payload();
  if (range.data() < p.data() || range.data() > p.data() + p.size() ||
      range.size() > static_cast<std::size_t>(p.data() + p.size() - range.data())) {
    throw std::system_error(EINVAL, std::system_category(),
                            fmt::format("mapped file {}: sync: the range is not inside the payload", path_));
  }
  region_.sync(range);
}

mapped_file mapped_file::create(const std::string& raw_path, const region_layout& layout, unsigned mode,
                                const std::function<void(std::span<std::byte>)>& initialize) {
  const std::string path = absolute_path(raw_path);
  if (mode > 0777) {
    throw std::system_error(EINVAL, std::system_category(),
                            fmt::format("mapped file {}: mode {:#o} has bits beyond 0777", path, mode));
  }
  const std::string dir = directory_of(path);
  std::string temp;
  unique_fd fd(::open(dir.c_str(), O_TMPFILE | O_RDWR | O_CLOEXEC, mode));
  if (!fd && (errno == EOPNOTSUPP || errno == EISDIR || errno == EINVAL)) {
    // A file system without O_TMPFILE: build under a temporary name, then link.
    static std::atomic<unsigned> counter{0};
    temp = fmt::format("{}.ipcoro-creating-{}-{}", path, ::getpid(), counter++);
    fd.reset(::open(temp.c_str(), O_CREAT | O_EXCL | O_RDWR | O_CLOEXEC, mode));
  }
  if (!fd) throw_path_error(errno, path, "creating");
  try {
    if (::fchmod(fd.get(), mode) != 0) throw_errno(errno, fmt::format("mapped file {}: fchmod", path));
    mapped_file f;
    f.region_ = detail::mapped_region::create(fd.get(), layout, origin_of(path));
    if (initialize) initialize(f.region_.payload());
    f.path_ = path;
    f.creator_ = f.region_.header().creator;
    f.created_ = true;
    // The header, the initial payload and the allocation reach the disk before the name.
    f.region_.sync(initialize
                       ? std::span<const std::byte>{}
                       : std::span<const std::byte>(f.region_.whole().first(sizeof(detail::region_header))));
    if (::fsync(fd.get()) != 0) throw_errno(errno, fmt::format("mapped file {}: fsync", path));
    const int rc = publish(fd.get(), temp, path);
    temp.clear();
    if (rc == -EEXIST) {
      throw std::system_error(
          EEXIST, std::system_category(),
          fmt::format("mapped file {}: already exists; open it, or remove it first", path));
    }
    if (rc < 0) throw_path_error(-rc, path, "creating");
    fsync_directory(dir);
    return f;
  } catch (...) {
    if (!temp.empty()) ::unlink(temp.c_str());
    throw;
  }
}

mapped_file mapped_file::open(const std::string& raw_path, const region_layout& expected) {
  const std::string path = absolute_path(raw_path);
  unique_fd fd(::open(path.c_str(), O_RDWR | O_CLOEXEC));
  if (!fd) throw_path_error(errno, path, "opening");
  mapped_file f;
  f.region_ = detail::mapped_region::open(fd.get(), expected, origin_of(path));
  f.path_ = path;
  f.creator_ = f.region_.header().creator;
  return f;
}

mapped_file mapped_file::open_or_create(const std::string& raw_path, const region_layout& layout,
                                        unsigned mode,
                                        const std::function<void(std::span<std::byte>)>& initialize) {
  const std::string path = absolute_path(raw_path);
  // Bounded: each round either opens, creates, or saw the file vanish or appear.
  for (int round = 0; round < 16; ++round) {
    try {
      return open(path, layout);
    } catch (const std::system_error& e) {
      if (e.code() != std::error_code(ENOENT, std::system_category())) throw;
    }
    try {
      return create(path, layout, mode, initialize);
    } catch (const std::system_error& e) {
      if (e.code() != std::error_code(EEXIST, std::system_category())) throw;
    }
  }
  throw std::system_error(EBUSY, std::system_category(),
                          fmt::format("mapped file {}: keeps appearing and disappearing; another process is "
                                      "creating and removing it",
                                      path));
}

mapped_file mapped_file::create_or_reclaim(const std::string& raw_path, const region_layout& layout,
                                           unsigned mode,
                                           const std::function<void(std::span<std::byte>)>& initialize) {
  const std::string path = absolute_path(raw_path);
  // Bounded: each round either creates, fails, or removes a dead creator's file.
  for (int round = 0; round < 16; ++round) {
    unique_fd existing(::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW));
    if (existing) {
      detail::region_header h{};
      if (!detail::mapped_region::peek(existing.get(), h)) {
        throw std::system_error(
            EEXIST, std::system_category(),
            fmt::format("mapped file {}: exists but is not a complete ipcoro file; it is not "
                        "reclaimed: remove it by hand if nothing uses it",
                        path));
      }
      if (h.type_tag != layout.type_tag) {
        throw std::system_error(
            EEXIST, std::system_category(),
            fmt::format("mapped file {}: exists and holds type tag {:#x}, not {:#x}; it is not "
                        "reclaimed: choose another path",
                        path, h.type_tag, layout.type_tag));
      }
      if (detail::process_alive(h.creator)) {
        throw std::system_error(
            EEXIST, std::system_category(),
            fmt::format("mapped file {}: exists and its creator, pid {}, is alive; open it "
                        "instead, or stop that process",
                        path, h.creator.pid));
      }
      // Remove it only if the path still names what was inspected: another survivor may
      // have reclaimed it already.
      struct stat inspected {};
      struct stat current {};
      if (::fstat(existing.get(), &inspected) != 0)
        throw_errno(errno, fmt::format("mapped file {}: fstat", path));
      if (::stat(path.c_str(), &current) == 0 && current.st_dev == inspected.st_dev &&
          current.st_ino == inspected.st_ino && ::unlink(path.c_str()) != 0 && errno != ENOENT) {
        throw_errno(errno, fmt::format("mapped file {}: removing the file its dead creator left", path));
      }
    } else if (errno != ENOENT) {
      throw_path_error(errno, path, "opening");
    }
    try {
      return create(path, layout, mode, initialize);
    } catch (const std::system_error& e) {
      if (e.code() != std::error_code(EEXIST, std::system_category())) throw;
    }
  }
  throw std::system_error(EEXIST, std::system_category(),
                          fmt::format("mapped file {}: keeps reappearing; another process is creating it "
                                      "concurrently",
                                      path));
}

}  // namespace ipcoro
