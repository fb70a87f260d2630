// SPDX-License-Identifier: MIT
// Writes the seed corpus of each harness into <dir>/<harness>/ from what real senders
// produce: make_seeds fuzz/corpus (scripts/fuzz --seeds runs it).
#include "fuzz_support.hpp"

#include "ipcoro/channel.hpp"
#include "ipcoro/mapped_file.hpp"
#include "ipcoro/shm_ring.hpp"
#include "ipcoro/shm_segment.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <optional>
#include <span>
#include <string>
#include <vector>

namespace {

namespace fs = std::filesystem;
using bytes = std::vector<std::uint8_t>;

fs::path out_dir;

void put(const std::string& harness, const std::string& name, const bytes& content) {
  const fs::path dir = out_dir / harness;
  fs::create_directories(dir);
  std::ofstream(dir / name, std::ios::binary)
      .write(reinterpret_cast<const char*>(content.data()), static_cast<std::streamsize>(content.size()));
}

bytes text(std::string_view s) { return bytes(s.begin(), s.end()); }

bytes read_all(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return bytes(std::istreambuf_iterator<char>(in), {});
}

const std::vector<std::string> messages = {"hello", "", std::string(300, 'x'), "last"};

ipcoro::task<void> send_messages(std::string address) {
  ipcoro::channel_sender<std::string> tx = co_await ipcoro::open_sender<std::string>(std::move(address));
  for (const std::string& m : messages) {
    std::string v = m;
    co_await tx.send(std::move(v));
  }
  tx.close();
}

/// What a channel sender writes into a pipe (fd: and pipe: channels).
bytes stream_capture() {
  int fds[2];
  if (::pipe2(fds, O_CLOEXEC) != 0) throw std::runtime_error("pipe2");
  ipcoro::fuzz::run(send_messages("fd:" + std::to_string(fds[1])));  // closes fds[1]
  bytes all;
  std::uint8_t buf[4096];
  for (ssize_t n; (n = ::read(fds[0], buf, sizeof buf)) > 0;) all.insert(all.end(), buf, buf + n);
  ::close(fds[0]);
  return all;
}

/// The messages a channel sender puts into a shm: ring, each as {16-bit length, bytes}.
ipcoro::task<bytes> ring_capture() {
  const std::string name = "/" + ipcoro::fuzz::unique_name("seed");
  ipcoro::shm_segment seg =
      ipcoro::shm_segment::create(name, ipcoro::spsc_ring_layout(64 * 1024),
                                  {0600, [](std::span<std::byte> p) { ipcoro::format_spsc_ring(p); }});
  co_await send_messages("shm:" + name + "?capacity=64k");
  ipcoro::spsc_ring_receiver rx(seg.payload());
  std::vector<std::byte> buf(rx.max_message_size());
  bytes out;
  while (std::optional<std::size_t> n = co_await rx.receive(buf)) {
    out.push_back(static_cast<std::uint8_t>(*n & 0xff));
    out.push_back(static_cast<std::uint8_t>(*n >> 8));
    const auto* p = reinterpret_cast<const std::uint8_t*>(buf.data());
    out.insert(out.end(), p, p + *n);
  }
  co_return out;
}

ipcoro::task<void> send_three(std::span<std::byte> region, bool mpmc) {
  const char m[] = "hello, ring";
  if (mpmc) {
    ipcoro::mpmc_ring_sender tx(region);
    for (int i = 0; i < 3; ++i) co_await tx.send(std::as_bytes(std::span{m}));
    tx.detach();
  } else {
    ipcoro::spsc_ring_sender tx(region);
    for (int i = 0; i < 3; ++i) co_await tx.send(std::as_bytes(std::span{m}));
    tx.detach();
  }
}

bytes with_case(std::uint8_t which, const bytes& b) {
  bytes out{which};
  out.insert(out.end(), b.begin(), b.end());
  return out;
}

void region_seeds() {
  for (const bool mpmc : {false, true}) {
    const ipcoro::region_layout layout =
        mpmc ? ipcoro::mpmc_ring_layout(4, 256) : ipcoro::spsc_ring_layout(4096);
    const auto format = [mpmc](std::span<std::byte> p) {
      if (mpmc)
        ipcoro::format_mpmc_ring(p, 256);
      else
        ipcoro::format_spsc_ring(p);
    };
    const std::uint8_t kind = mpmc ? 4 : 0;
    const std::string suffix = mpmc ? "mpmc" : "spsc";
    {
      const std::string path = "/dev/shm/" + ipcoro::fuzz::unique_name("seed");
      {
        ipcoro::mapped_file f = ipcoro::mapped_file::create(path, layout, 0600, format);
        ipcoro::fuzz::run(send_three(f.payload(), mpmc));
      }
      const bytes file = read_all(path);
      ::unlink(path.c_str());
      put("ring_region", "file-receiver-" + suffix, with_case(0 | kind, file));
      put("ring_region", "file-sender-" + suffix, with_case(8 | kind, file));
    }
    {
      const std::string name = ipcoro::fuzz::unique_name("seed");
      ipcoro::shm_segment s = ipcoro::shm_segment::create("/" + name, layout, {0600, format});
      ipcoro::fuzz::run(send_three(s.payload(), mpmc));
      put("ring_region", "segment-receiver-" + suffix, with_case(1 | kind, read_all("/dev/shm/" + name)));
    }
    {
      std::vector<std::byte> region(ipcoro::ring_header_size + 8192 + 64);
      std::span<std::byte> aligned{
          region.data() + (64 - reinterpret_cast<std::uintptr_t>(region.data()) % 64) % 64,
          ipcoro::ring_header_size + 8192};
      format(aligned);
      ipcoro::fuzz::run(send_three(aligned, mpmc));
      const auto* p = reinterpret_cast<const std::uint8_t*>(aligned.data());
      put("ring_region", "bare-receiver-" + suffix, with_case(2 | kind, bytes(p, p + aligned.size())));
    }
    // Patches over a valid ring: a word of the header zeroed, a word of the data set.
    put("ring_region", "patched-receiver-" + suffix,
        with_case(3 | kind, {0x40, 0x00, 8, 0, 0, 0, 0, 0, 0, 0, 0}));
    put("ring_region", "patched-sender-" + suffix,
        with_case(11 | kind, {0x00, 0x10, 8, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0}));
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: make_seeds <corpus dir>\n");
    return 2;
  }
  out_dir = argv[1];

  int i = 0;
  for (const char* a :
       {"pipe:", "fd:3", "fifo:/tmp/jobs?mode=0640&capacity=64k", "mq:/jobs?capacity=10&message_size=8k",
        "shm:/ring?capacity=1m", "shm:/work?ring=mpmc&capacity=256&message_size=4k",
        "file:/var/tmp/q?durable=1&capacity=64k"}) {
    put("channel_address", "valid-" + std::to_string(i++), text(a));
  }

  const bytes stream = stream_capture();
  put("stream_frames", "four-messages", stream);
  bytes twice = stream;
  twice.insert(twice.end(), stream.begin(), stream.end());
  put("stream_frames", "two-senders", twice);
  put("stream_frames", "cut-mid-frame", bytes(stream.begin(), stream.begin() + stream.size() / 2));

  const bytes ring = ipcoro::fuzz::run(ring_capture());
  put("ring_messages", "spsc-four-messages", with_case(0, ring));
  put("ring_messages", "mpmc-four-messages", with_case(1, ring));

  put("codec", "empty", {});
  put("codec", "eight", text("12345678"));
  put("codec", "record", bytes(24, 0x41));
  put("codec", "text", text("hello, codec"));

  region_seeds();
  return 0;
}
