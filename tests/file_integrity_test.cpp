// SPDX-License-Identifier: MIT
// file: channels against damage: record checksums (checksum=xxh3) turn an edited record,
// length or close into EBADMSG naming the offset, and a truncated file is an error, not SIGBUS.
#include "ipcoro/channel.hpp"
#include "ipcoro/io_context.hpp"
#include "ipcoro/mapped_file.hpp"
#include "ipcoro/sync_wait.hpp"
#include "ipcoro/transport.hpp"

#include "process.hpp"
#include "ring/layout.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#include <catch2/catch.hpp>

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

namespace {

using namespace std::chrono_literals;
using ipcoro::test::child_process;
using ipcoro::test::contains;
using ipcoro::test::handshake;
using ipcoro::test::unique_name;

/// A file path for a test, removed at the end whatever happened.
struct temp_path {
  explicit temp_path(const std::string& tag) : path("/tmp/" + unique_name(tag)) {}
  temp_path(const temp_path&) = delete;
  temp_path& operator=(const temp_path&) = delete;
  ~temp_path() {
    std::error_code ec;
    std::filesystem::remove(path, ec);
  }
  std::string path;
};

// Where a file: ring lives in its file: the region header, then the ring header, then records.
constexpr std::size_t ring_at = ipcoro::detail::region_payload_offset;
constexpr std::size_t data_at = ring_at + ipcoro::ring_header_size;
constexpr std::size_t tail_at = ring_at + offsetof(ipcoro::detail::ring_header, tail);

/// The file mapped by a process that edits it behind the ring's back.
struct raw_mapping {
  explicit raw_mapping(const std::string& path) {
    const int fd = ::open(path.c_str(), O_RDWR);
    struct stat st {};
    if (fd < 0 || ::fstat(fd, &st) != 0) throw std::system_error(errno, std::system_category(), path);
    size = static_cast<std::size_t>(st.st_size);
    base = static_cast<std::byte*>(::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0));
    ::close(fd);
    if (base == MAP_FAILED) throw std::system_error(errno, std::system_category(), "mmap " + path);
  }
  raw_mapping(const raw_mapping&) = delete;
  raw_mapping& operator=(const raw_mapping&) = delete;
  ~raw_mapping() { ::munmap(base, size); }
  template <class T>
  T get(std::size_t at) const {
    T v;
    std::memcpy(&v, base + at, sizeof v);
    return v;
  }
  template <class T>
  void put(std::size_t at, T v) {
    std::memcpy(base + at, &v, sizeof v);
  }
  /// The ring offset of record `index` of a ring with checksums (16-byte record headers).
  std::uint64_t record_offset(int index) const {
    std::uint64_t at = 0;
    for (int i = 0; i < index; ++i) at += (16 + get<std::uint32_t>(data_at + at) + 15) & ~std::uint64_t{15};
    return at;
  }
  std::byte* base = nullptr;
  std::size_t size = 0;
};

}  // namespace

TEST_CASE("with checksum=xxh3 a record edited by another process is EBADMSG naming its offset",
          "[file][checksum][ipc]") {
  const std::string edit =
      GENERATE("payload byte", "length", "rewound position and close", "close flag of a running sender");
  CAPTURE(edit);
  const temp_path file("ck");
  const std::string address = "file:" + file.path + "?checksum=xxh3";
  ipcoro::io_context ctx;
  auto rx = ipcoro::sync_wait(ctx, ipcoro::open_receiver<int>(address));

  const bool flag_only = edit == "close flag of a running sender";
  const handshake sent, finish;
  child_process sender([&] {
    ipcoro::io_context c;
    auto tx = ipcoro::sync_wait(c, ipcoro::open_sender<int>(address));
    for (int i = 1; i <= 3; ++i) ipcoro::sync_wait(c, tx.send(i));
    if (!flag_only) tx.close();
    sent.signal();
    return finish.wait() ? 0 : 1;
  });
  REQUIRE(sent.wait());

  // Records: 0 the sender's greeting, then 1, 2 and 3. The hostile process damages record 2,
  // or sets the close flag while the sender runs (the end would come after record 3).
  std::uint64_t damaged = 0;
  {
    const raw_mapping view(file.path);
    damaged = view.record_offset(flag_only ? 4 : 2);
  }
  child_process hostile([&] {
    raw_mapping m(file.path);
    const std::size_t record = data_at + m.record_offset(2);
    const auto length = m.get<std::uint32_t>(record);
    if (edit == "payload byte") {
      m.put(record + 16 + length - 1,
            static_cast<std::uint8_t>(m.get<std::uint8_t>(record + 16 + length - 1) ^ 1));
    } else if (edit == "length") {
      m.put<std::uint32_t>(record, length - 4);  // still inside the ring: only the checksum tells
    } else if (edit == "rewound position and close") {
      m.put<std::uint64_t>(tail_at, m.record_offset(2));  // the stream now "ends" after 1
    } else {
      m.put<std::uint32_t>(ring_at + offsetof(ipcoro::detail::ring_header, sender_closed), 1);
    }
    return 0;
  });
  REQUIRE(hostile.wait() == 0);

  std::vector<int> values;
  ipcoro::test::failure f = ipcoro::test::failure_of([&] {
    for (;;) {
      const std::optional<int> v = ipcoro::sync_wait(ctx, rx.receive().with_timeout(10s));
      if (!v) break;
      values.push_back(*v);
    }
  });
  finish.signal();
  CHECK(sender.wait() == 0);
  CAPTURE(f.what);
  CHECK(values == (flag_only ? std::vector<int>{1, 2, 3} : std::vector<int>{1}));
  CHECK(f.code == EBADMSG);
  CHECK(contains(f.what, "at offset " + std::to_string(damaged) + " "));
  CHECK(contains(f.what, "fails its checksum"));
}

/// The ring a test works on: a file (removed after the test), or a segment (its receiver
/// removes the name when it closes).
std::string ring_address(const std::string& scheme, const temp_path& file, const char* tag) {
  return scheme == "file" ? "file:" + file.path : "shm:/" + ipcoro::test::unique_name(tag);
}

TEST_CASE("a checksummed ring carries a stream of every size through many wrap-arounds",
          "[file][shm][checksum][ipc]") {
  const std::string scheme = GENERATE("file", "shm");
  const temp_path file("ckw");
  const std::string address = ring_address(scheme, file, "ckw") + "?checksum=xxh3&capacity=4096";
  ipcoro::io_context ctx;
  auto rx = ipcoro::sync_wait(ctx, ipcoro::open_receiver<std::string>(address));
  const auto message = [](int i) {
    return std::string(static_cast<std::size_t>(i * 37 % 1500), char('a' + i % 26));
  };
  constexpr int count = 3000;
  child_process sender([&] {
    ipcoro::io_context c;
    auto tx = ipcoro::sync_wait(c, ipcoro::open_sender<std::string>(address));
    for (int i = 0; i < count; ++i) ipcoro::sync_wait(c, tx.send(message(i)));
    tx.close();
    return 0;
  });
  int received = 0;
  bool in_order = true;
  while (const std::optional<std::string> m = ipcoro::sync_wait(ctx, rx.receive().with_timeout(20s))) {
    in_order = in_order && *m == message(received);
    ++received;
  }
  CHECK(in_order);
  CHECK(received == count);
  CHECK(sender.wait() == 0);
}

TEST_CASE("an end whose checksum= differs from the ring's is refused naming both", "[file][shm][checksum]") {
  const std::string scheme = GENERATE("file", "shm");
  const temp_path file("ckm");
  const std::string plain = ring_address(scheme, file, "ckm");
  const std::string checked = plain + "?checksum=xxh3";
  ipcoro::io_context ctx;
  for (const auto& [receiver, sender] : {std::pair{checked, plain}, std::pair{plain, checked}}) {
    CAPTURE(receiver, sender);
    auto rx = ipcoro::sync_wait(ctx, ipcoro::open_receiver<int>(receiver));
    const std::string what = ipcoro::test::what_of<ipcoro::channel_error>(
        [&] { (void)ipcoro::sync_wait(ctx, ipcoro::open_sender<int>(sender)); });
    CHECK(contains(what, "checksum=xxh3"));
    CHECK(contains(what, "checksum=none"));
    CHECK(
        contains(ipcoro::inspect_channel(receiver), receiver == checked ? "checksum=xxh3" : "checksum=none"));
  }
  CHECK_THROWS_WITH(ipcoro::channel_address::parse(plain + "?checksum=xxh3&ring=mpmc"),
                    Catch::Contains("SPSC"));
  CHECK_THROWS_WITH(ipcoro::channel_address::parse(plain + "?checksum=crc"), Catch::Contains("none or xxh3"));
}

TEST_CASE("a file channel's file truncated under both ends is an error of their next operation, not SIGBUS",
          "[file][truncate][ipc]") {
  // 0: every page goes. One page: the headers stay (the first page holds the sender's
  // position) and the records go. (Bytes past the end of a file's last partial page stay
  // mapped, so a truncation is noticed at the first page wholly past the end.)
  const std::size_t keep = GENERATE(std::size_t{0}, static_cast<std::size_t>(::sysconf(_SC_PAGESIZE)));
  CAPTURE(keep);
  const temp_path file("tr");
  const std::string address = "file:" + file.path;
  const handshake receiver_ready, first_received, truncated_r, truncated_s;
  const auto truncation_error = [](const std::system_error& e) {
    if (e.code().value() == EBADMSG && contains(e.what(), "truncated") &&
        contains(e.what(), "while this process"))
      return 0;
    std::fprintf(stderr, "not the truncation error: %s\n", e.what());
    return 2;
  };
  child_process receiver([&] {
    ipcoro::io_context ctx;
    auto rx = ipcoro::sync_wait(ctx, ipcoro::open_receiver<int>(address));
    receiver_ready.signal();
    if (ipcoro::sync_wait(ctx, rx.receive()) != 1) return 4;
    first_received.signal();
    if (!truncated_r.wait()) return 5;
    try {
      (void)ipcoro::sync_wait(ctx, rx.receive().with_timeout(20s));
    } catch (const std::system_error& e) {
      return truncation_error(e);
    }
    return 3;
  });
  REQUIRE(receiver_ready.wait());
  child_process sender([&] {
    ipcoro::io_context ctx;
    auto tx = ipcoro::sync_wait(ctx, ipcoro::open_sender<int>(address));
    ipcoro::sync_wait(ctx, tx.send(1));
    if (!truncated_s.wait()) return 5;
    try {
      for (int i = 2; i < 1000; ++i) ipcoro::sync_wait(ctx, tx.send(i).with_timeout(20s));
    } catch (const std::system_error& e) {
      return truncation_error(e);
    }
    return 3;
  });
  REQUIRE(first_received.wait());
  REQUIRE(::truncate(file.path.c_str(), static_cast<off_t>(keep)) == 0);
  truncated_r.signal();
  truncated_s.signal();
  CHECK(sender.wait() == 0);
  CHECK(receiver.wait() == 0);
}
