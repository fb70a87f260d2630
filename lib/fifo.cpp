// SPDX-License-Identifier: MIT
// Named pipes: creation and removal, validated opens through the ring, the server's reader,
// atomic message writes, and errors that say what to change.
#include "ipcoro/fifo.hpp"

#include "ipcoro/error.hpp"
#include "ipcoro/when_all.hpp"

#include <fcntl.h>
#include <fmt/core.h>
#include <liburing.h>
#include <poll.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <climits>
#include <cstring>
#include <filesystem>
#include <string_view>
#include <system_error>
#include <utility>

namespace ipcoro {

static_assert(fifo_message_max == PIPE_BUF, "fifo_message_max must be this system's PIPE_BUF");

namespace {

enum class action { create, open_read, open_write, open_server };

std::string describe(action a, const std::string& path) {
  switch (a) {
    case action::create:
      return fmt::format("create FIFO {}", path);
    case action::open_read:
      return fmt::format("open FIFO {} for reading", path);
    case action::open_write:
      return fmt::format("open FIFO {} for writing", path);
    case action::open_server:
      return fmt::format("open FIFO {} as a server (reading, plus a write end of its own)", path);
  }
  return path;
}

const char* type_name(mode_t mode) noexcept {
  switch (mode & S_IFMT) {
    case S_IFREG:
      return "a regular file";
    case S_IFDIR:
      return "a directory";
    case S_IFLNK:
      return "a symbolic link";
    case S_IFSOCK:
      return "a socket";
    case S_IFCHR:
      return "a character device";
    case S_IFBLK:
      return "a block device";
    case S_IFIFO:
      return "a FIFO";
    default:
      return "a file of unknown type";
  }
}

std::string parent_of(const std::string& path) {
  std::string dir = std::filesystem::path(path).parent_path().string();
  return dir.empty() ? std::string(".") : dir;
}

[[noreturn]] void throw_with(int err, action a, const std::string& path, std::string_view why) {
  throw std::system_error(err, std::system_category(), fmt::format("{}: {}", describe(a, path), why));
}

[[noreturn]] void throw_not_a_fifo(action a, const std::string& path, unsigned mode) {
  throw_with(EINVAL, a, path,
             fmt::format("it is {}, not a FIFO; remove it or choose another path",
                         type_name(static_cast<mode_t>(mode))));
}

std::string explain_enoent(action a, const std::string& path) {
  if (path.empty()) return "the path is empty";
  const std::string dir = parent_of(path);
  struct stat st {};
  if (::stat(dir.c_str(), &st) != 0) {
    return fmt::format("directory {} does not exist; create it first, or choose another path", dir);
  }
  if (!S_ISDIR(st.st_mode)) return fmt::format("{} is {}, not a directory", dir, type_name(st.st_mode));
  if (a == action::create) return "a component of the path is a dangling symbolic link";
  return "there is no FIFO there; create it first (ipcoro::fifo or mkfifo), or start the process that does";
}

std::string explain_eacces(action a, const std::string& path) {
  const auto uid = ::geteuid();
  const auto gid = ::getegid();
  struct stat st {};
  if (a != action::create && ::stat(path.c_str(), &st) == 0) {
    const char* wanted = a == action::open_read    ? "read"
                         : a == action::open_write ? "write"
                                                   : "read and write";
    return fmt::format(
        "it has mode {:04o} and belongs to uid {} gid {}, while this process runs as uid {} gid {}; "
        "have it created with a mode that lets this user {} it (fifo_options::mode), or run as its owner",
        st.st_mode & 07777, st.st_uid, st.st_gid, uid, gid, wanted);
  }
  const std::string dir = parent_of(path);
  if (::stat(dir.c_str(), &st) == 0 && a == action::create) {
    return fmt::format(
        "this process (uid {} gid {}) may not create files in directory {} (mode {:04o}, uid {} gid {}); "
        "choose a directory this user can write to",
        uid, gid, dir, st.st_mode & 07777, st.st_uid, st.st_gid);
  }
  return fmt::format("a directory on the way to it cannot be searched by this process (uid {} gid {})", uid,
                     gid);
}

std::string explain_enametoolong(const std::string& path) {
  if (path.size() >= PATH_MAX) {
    return fmt::format(
        "the path is {} bytes, and Linux takes at most {} (PATH_MAX {} with the final NUL); "
        "use a shorter path",
        path.size(), PATH_MAX - 1, PATH_MAX);
  }
  std::string_view longest;
  std::string_view rest = path;
  while (!rest.empty()) {
    const std::size_t slash = rest.find('/');
    const std::string_view part = rest.substr(0, slash);
    if (part.size() > longest.size()) longest = part;
    rest = slash == std::string_view::npos ? std::string_view{} : rest.substr(slash + 1);
  }
  long name_max = ::pathconf(parent_of(path).c_str(), _PC_NAME_MAX);
  if (name_max <= 0) name_max = NAME_MAX;
  return fmt::format(
      "the name \"{}...\" is {} bytes, and this file system takes at most {} (NAME_MAX); "
      "use a shorter name",
      longest.substr(0, 24), longest.size(), name_max);
}

[[noreturn]] void throw_path_error(int err, action a, const std::string& path) {
  switch (err) {
    case ENOENT:
      throw_with(err, a, path, explain_enoent(a, path));
    case EACCES:
    case EPERM:
      throw_with(err, a, path, explain_eacces(a, path));
    case ENAMETOOLONG:
      throw_with(err, a, path, explain_enametoolong(path));
    case ENOTDIR:
      throw_with(err, a, path, "a component of the path is not a directory");
    case ELOOP:
      throw_with(err, a, path, "too many symbolic links (or a loop) on the way");
    case EROFS:
      throw_with(err, a, path, "the file system is mounted read-only; choose another directory");
    case ENOSPC:
    case EDQUOT:
      throw_with(err, a, path, fmt::format("no space or inode quota left in {}", parent_of(path)));
    case EMFILE:
      throw_with(err, a, path, "this process has too many open descriptors (raise RLIMIT_NOFILE, ulimit -n)");
    case ENFILE:
      throw_with(err, a, path, "the system file table is full (/proc/sys/fs/file-max)");
    case EINTR:
      throw_with(err, a, path, "the open was interrupted");
    default:
      throw_with(err, a, path, "failed");
  }
}

/// Rejects what the kernel would misread: an empty path, or one with a NUL inside.
int check_path_text(const std::string& path) noexcept {
  if (path.empty()) return -ENOENT;
  if (path.find('\0') != std::string::npos) return -EINVAL;
  return 0;
}

[[noreturn]] void throw_nul_in_path(action a, const std::string& path) {
  throw_with(EINVAL, a, path.substr(0, path.find('\0')), "the path contains a NUL byte");
}

action open_action(const detail::fifo_open_request& req) noexcept {
  return req.for_writing ? action::open_write : action::open_read;
}

/// True when some process has the FIFO at `path` open for reading: a non-blocking open for
/// writing then succeeds, and fails with ENXIO otherwise.
bool fifo_has_reader(const std::string& path) {
  const int fd = ::open(path.c_str(), O_WRONLY | O_NONBLOCK | O_NOFOLLOW | O_CLOEXEC);
  if (fd >= 0) {
    ::close(fd);
    return true;
  }
  const int err = errno;
  if (err == ENXIO) return false;
  throw_path_error(err, action::open_write, path);
}

void clear_nonblock(int fd, action a, const std::string& path) {
  const int flags = ::fcntl(fd, F_GETFL);
  if (flags < 0 || ::fcntl(fd, F_SETFL, flags & ~O_NONBLOCK) < 0) {
    const int err = errno;
    throw_with(err, a, path, "fcntl(F_SETFL) failed");
  }
}

}  // namespace

// ---- fifo: the owner ----

namespace {

struct file_identity {
  std::uint64_t dev = 0;
  std::uint64_t ino = 0;
  std::int64_t born_ns = 0;
  bool is_fifo = false;
};

/// Who the file at `path` is (without following a final symlink); false if it is not there.
bool identify(const std::string& path, file_identity& out) noexcept {
  struct statx stx {};
  if (::statx(AT_FDCWD, path.c_str(), AT_SYMLINK_NOFOLLOW, STATX_TYPE | STATX_INO | STATX_BTIME | STATX_CTIME,
              &stx) != 0) {
    return false;
  }
  const auto& t = (stx.stx_mask & STATX_BTIME) != 0 ? stx.stx_btime : stx.stx_ctime;
  out.dev = (std::uint64_t{stx.stx_dev_major} << 32) | stx.stx_dev_minor;
  out.ino = stx.stx_ino;
  out.born_ns = std::int64_t{t.tv_sec} * 1'000'000'000 + t.tv_nsec;
  out.is_fifo = S_ISFIFO(stx.stx_mode);
  return true;
}

/// Replaces the stale FIFO at `path` by a fresh one: made under a temporary name in the
/// same directory, then renamed over it, so the two inodes coexist and cannot share a number.
void reclaim_stale_fifo(const std::string& path, mode_t mode) {
  static std::atomic<unsigned> counter{0};
  const std::string aside =
      fmt::format("{}/.ipcoro-fifo-{}-{}", parent_of(path), ::getpid(), counter.fetch_add(1));
  if (::mkfifo(aside.c_str(), mode) != 0) throw_path_error(errno, action::create, aside);
  if (::rename(aside.c_str(), path.c_str()) != 0) {
    const int err = errno;
    ::unlink(aside.c_str());
    throw_path_error(err, action::create, path);
  }
}

}  // namespace

fifo::fifo(std::string path, const fifo_options& opts) {
  if (const int bad = check_path_text(path); bad != 0) {
    if (bad == -EINVAL) throw_nul_in_path(action::create, path);
    throw_with(-bad, action::create, path, "the path is empty");
  }
  if ((opts.mode & ~0777u) != 0) {
    throw_with(EINVAL, action::create, path,
               fmt::format("mode {:04o} has bits beyond the permission bits 0777", opts.mode));
  }
  // absolute() only prefixes the current directory: no file system lookup, no symlinks resolved.
  path = std::filesystem::absolute(std::filesystem::path(path)).string();
  const mode_t mode = static_cast<mode_t>(opts.mode);
  if (::mkfifo(path.c_str(), mode) != 0) {
    const int err = errno;
    if (err != EEXIST) throw_path_error(err, action::create, path);
    struct stat st {};
    if (::lstat(path.c_str(), &st) != 0) throw_path_error(errno, action::create, path);
    if (!S_ISFIFO(st.st_mode)) {
      throw_with(EEXIST, action::create, path,
                 fmt::format("the path already exists and is {}; remove it or choose another path",
                             type_name(st.st_mode)));
    }
    if (!opts.reclaim) {
      throw_with(EEXIST, action::create, path,
                 "a FIFO already exists there; if a process that died left it behind, set "
                 "fifo_options::reclaim to replace it, or remove it (rm)");
    }
    if (fifo_has_reader(path)) {
      throw_with(EBUSY, action::create, path,
                 "the FIFO that exists there is in use: a process has it open for reading "
                 "(is another server running?)");
    }
    reclaim_stale_fifo(path, mode);
  }
  // mkfifo applies the umask; the mode asked for is applied as given.
  struct stat st {};
  if (::lstat(path.c_str(), &st) == 0 && S_ISFIFO(st.st_mode) && (st.st_mode & 07777) != mode &&
      ::chmod(path.c_str(), mode) != 0) {
    const int err = errno;
    ::unlink(path.c_str());
    throw_with(err, action::create, path, fmt::format("chmod to {:04o} failed", opts.mode));
  }
  // Identified after the chmod, which changes the change time.
  file_identity id;
  if (!identify(path, id) || !id.is_fifo) {
    throw_with(EEXIST, action::create, path,
               "the FIFO was replaced by another file right after it was created");
  }
  path_ = std::move(path);
  dev_ = id.dev;
  ino_ = id.ino;
  born_ns_ = id.born_ns;
  owner_pid_ = ::getpid();
}

fifo::fifo(fifo&& other) noexcept
    : path_(std::move(other.path_)),
      dev_(std::exchange(other.dev_, 0)),
      ino_(std::exchange(other.ino_, 0)),
      born_ns_(std::exchange(other.born_ns_, 0)),
      owner_pid_(std::exchange(other.owner_pid_, 0)) {
  other.path_.clear();
}

fifo& fifo::operator=(fifo&& other) noexcept {
  if (this != &other) {
    unlink();
    path_ = std::move(other.path_);
    other.path_.clear();
    dev_ = std::exchange(other.dev_, 0);
    ino_ = std::exchange(other.ino_, 0);
    born_ns_ = std::exchange(other.born_ns_, 0);
    owner_pid_ = std::exchange(other.owner_pid_, 0);
  }
  return *this;
}

fifo::~fifo() { unlink(); }

void fifo::unlink() noexcept {
  if (path_.empty()) return;
  // Only the process that made it: a forked child dropping its copy of the object leaves
  // the parent's FIFO alone. And only our own FIFO: a survivor may have replaced a stale
  // one with a FIFO of its own.
  file_identity id;
  if (owner_pid_ == ::getpid() && identify(path_, id) && id.is_fifo && id.dev == dev_ && id.ino == ino_ &&
      id.born_ns == born_ns_) {
    ::unlink(path_.c_str());
  }
  path_.clear();
}

bool fifo::refers_to(int fd) const noexcept {
  if (path_.empty()) return false;
  struct statx stx {};
  if (::statx(fd, "", AT_EMPTY_PATH, STATX_TYPE | STATX_INO | STATX_BTIME | STATX_CTIME, &stx) != 0)
    return false;
  const auto& t = (stx.stx_mask & STATX_BTIME) != 0 ? stx.stx_btime : stx.stx_ctime;
  const std::uint64_t dev = (std::uint64_t{stx.stx_dev_major} << 32) | stx.stx_dev_minor;
  return S_ISFIFO(stx.stx_mode) && dev == dev_ && stx.stx_ino == ino_ &&
         std::int64_t{t.tv_sec} * 1'000'000'000 + t.tv_nsec == born_ns_;
}

std::string fifo::release() noexcept {
  std::string p = std::move(path_);
  path_.clear();
  return p;
}

// ---- opening ----

namespace detail {

void prep_fifo_open(fifo_open_request& req, ::io_uring_sqe* sqe) noexcept {
  const int flags = (req.for_writing ? O_WRONLY : O_RDONLY) | O_CLOEXEC;
  ::io_uring_prep_openat(sqe, AT_FDCWD, req.path.c_str(), flags, 0);
  // Straight to an io-wq worker, where the open may block. Issued inline, io_uring first
  // tries the open with O_NONBLOCK (Linux 5.6+), and for a FIFO that changes its meaning:
  // a reader opens at once without waiting for a writer, and a writer fails with ENXIO.
  sqe->flags |= IOSQE_ASYNC;
}

int check_fifo_path(fifo_open_request& req) noexcept {
  if (const int bad = check_path_text(req.path); bad != 0) return bad;
  // stat(), not open(): a path that is not a FIFO is refused without opening it (opening a
  // device can have side effects, or block).
  struct stat st {};
  if (::stat(req.path.c_str(), &st) != 0) return -errno;
  if (!S_ISFIFO(st.st_mode)) {
    req.found_mode = st.st_mode;
    return -EINVAL;
  }
  return -EAGAIN;
}

unique_fd finish_fifo_open(const fifo_open_request& req, int res) {
  const action a = open_action(req);
  if (res < 0) {
    if (res == -EINVAL && req.found_mode != 0) throw_not_a_fifo(a, req.path, req.found_mode);
    if (res == -EINVAL && req.path.find('\0') != std::string::npos) throw_nul_in_path(a, req.path);
    throw_path_error(-res, a, req.path);
  }
  unique_fd fd{res};
  // Checked again on the descriptor: the path may have been replaced since the stat.
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0) {
    const int err = errno;
    throw_with(err, a, req.path, "fstat failed");
  }
  if (!S_ISFIFO(st.st_mode)) throw_not_a_fifo(a, req.path, st.st_mode);
  return fd;
}

}  // namespace detail

fifo_server_reader open_fifo_server_reader(const std::string& path) {
  ignore_sigpipe();
  constexpr action a = action::open_server;
  detail::fifo_open_request req{path, false, 0};
  if (const int pre = detail::check_fifo_path(req); pre != -EAGAIN) {
    if (pre == -EINVAL && req.found_mode != 0) throw_not_a_fifo(a, path, req.found_mode);
    if (pre == -EINVAL) throw_nul_in_path(a, path);
    throw_path_error(-pre, a, path);
  }
  // A reader opened with O_NONBLOCK does not wait for a writer.
  unique_fd reader{::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC)};
  if (!reader) throw_path_error(errno, a, path);
  struct stat st {};
  if (::fstat(reader.get(), &st) != 0) {
    const int err = errno;
    throw_with(err, a, path, "fstat failed");
  }
  if (!S_ISFIFO(st.st_mode)) throw_not_a_fifo(a, path, st.st_mode);

  // The write end reopens the very FIFO the reader has (through /proc/self/fd, whatever the
  // path names by now); with a reader present, a non-blocking open for writing succeeds at once.
  const std::string self = fmt::format("/proc/self/fd/{}", reader.get());
  unique_fd writer{::open(self.c_str(), O_WRONLY | O_NONBLOCK | O_CLOEXEC)};
  if (!writer && errno == ENOENT) writer.reset(::open(path.c_str(), O_WRONLY | O_NONBLOCK | O_CLOEXEC));
  if (!writer) throw_path_error(errno, a, path);
  struct stat wst {};
  if (::fstat(writer.get(), &wst) != 0 || wst.st_dev != st.st_dev || wst.st_ino != st.st_ino) {
    throw_with(EAGAIN, a, path, "the FIFO was replaced while it was being opened; try again");
  }
  // Blocking mode from here on, as for every other pipe end; the loop never blocks on it.
  clear_nonblock(reader.get(), a, path);
  clear_nonblock(writer.get(), a, path);
  return fifo_server_reader{pipe_reader{std::move(reader)}, pipe_writer{std::move(writer)}};
}

// ---- atomic message writes ----

message_write_operation::message_write_operation(int fd, std::span<const std::byte> message) noexcept
    : io_operation(&prep, nullptr, &attempt), data_(message.data()), size_(message.size()), fd_(fd) {
  retry_fd_ = fd;
  retry_poll_events_ = POLLOUT;
}

void message_write_operation::prep(detail::op_base& op, ::io_uring_sqe* sqe) noexcept {
  auto& self = static_cast<message_write_operation&>(op);
  ::io_uring_prep_write(sqe, self.fd_, self.data_, static_cast<unsigned>(self.size_),
                        static_cast<std::uint64_t>(-1));
}

int message_write_operation::attempt(detail::op_base& op) noexcept {
  auto& self = static_cast<message_write_operation&>(op);
  if (self.size_ > fifo_message_max) return -EMSGSIZE;
  // A pipe takes a write of at most PIPE_BUF bytes whole or not at all, so a non-blocking
  // attempt never writes part of the message.
  ::iovec iov{const_cast<std::byte*>(self.data_), self.size_};
  const ssize_t n = ::pwritev2(self.fd_, &iov, 1, -1, RWF_NOWAIT);
  if (n >= 0) return static_cast<int>(n);
  const int err = errno;
  return (err == EAGAIN || err == EOPNOTSUPP || err == EINTR) ? -EAGAIN : -err;
}

void message_write_operation::finish(int res) const {
  if (res == -EMSGSIZE && size_ > fifo_message_max) {
    throw std::system_error(
        EMSGSIZE, std::system_category(),
        fmt::format("write_message: a message of {} bytes is larger than PIPE_BUF ({} bytes), the largest "
                    "write a pipe or FIFO takes atomically; a larger one could be interleaved with other "
                    "writers' messages, so nothing was written. Split it into messages of at most {} bytes "
                    "(each able to stand alone), or give this writer a FIFO of its own and use write_all",
                    size_, fifo_message_max, fifo_message_max));
  }
  if (res == -EPIPE) throw_errno(EPIPE, "write_message: no process has the pipe or FIFO open for reading");
  if (res < 0) throw_errno(-res, "write_message");
  if (static_cast<std::size_t>(res) != size_) {
    throw_errno(EIO, fmt::format("write_message: only {} of {} bytes were written, so the message was torn "
                                 "(is the descriptor a pipe or FIFO?)",
                                 res, size_));
  }
}

// ---- full duplex over two FIFOs ----

namespace {
template <class End>
task<End> open_within(std::string path, std::chrono::milliseconds timeout) {
  if (timeout > std::chrono::milliseconds::zero()) {
    co_return co_await fifo_open_operation<End>{std::move(path)}.with_timeout(timeout);
  }
  co_return co_await fifo_open_operation<End>{std::move(path)};
}
}  // namespace

task<duplex_pipe> open_fifo_duplex(std::string read_path, std::string write_path,
                                   std::chrono::milliseconds timeout) {
  auto [in, out] = co_await when_all(open_within<pipe_reader>(std::move(read_path), timeout),
                                     open_within<pipe_writer>(std::move(write_path), timeout));
  co_return duplex_pipe{std::move(in), std::move(out)};
}

}  // namespace ipcoro
