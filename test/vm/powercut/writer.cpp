// powercut-writer: writes self-describing blocks (stamp.h) to a block device in rounds, makes
// each round durable, and only then marks the dm-log-writes log with the round's number, so that
// after a replay to any point the blocks every marked round wrote must be there.
//
//   powercut-writer --dev /dev/nbdN --blocks N --rounds R --per-round K --fua-every F
//                   --journal FILE --state FILE --mark-dev DMNAME [--seed S]
//                   [--pause-ms P] [--stop-file FILE]
//
// Round r (1..R): K random blocks written with O_DIRECT, then fsync of the device (the kernel
// sends NBD_CMD_FLUSH); every F-th round instead writes one block with RWF_DSYNC (NBD FUA) and
// no fsync. When the round is durable, the mark "w<r>" goes into the log (DM_TARGET_MSG).
// Round r+1 starts after that, so its writes complete after the mark and sit behind it in the
// log. The journal gets one line per write, "SEQ BLOCK ROUND", flushed before the mark. The
// state file holds two little-endian u64 that other processes read while we run: the last
// sequence number issued and the last completed (acknowledged by the device). --pause-ms spreads
// the rounds over the time the other half of the workload takes; --stop-file ends the run after
// the round during which that file appeared (or after R rounds).
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <random>
#include <string>
#include <thread>

#include <CLI/CLI.hpp>

#include "test/vm/powercut/stamp.h"
#include "tools/logwrites/log_writes.h"

using namespace nbdcsi;
using namespace nbdcsi::powercut;

namespace {

[[noreturn]] void Die(const std::string& what) {
  std::cerr << "powercut-writer: " << what << "\n";
  std::exit(1);
}
[[noreturn]] void DieErrno(const std::string& what) { Die(what + ": " + std::strerror(errno)); }

void WriteBlock(int fd, uint8_t* buf, uint64_t block, bool fua) {
  const off_t off = static_cast<off_t>(block * kBlockSize);
  iovec iov{buf, kBlockSize};
  ssize_t n = pwritev2(fd, &iov, 1, off, fua ? RWF_DSYNC : 0);
  if (n != static_cast<ssize_t>(kBlockSize)) {
    if (n < 0) DieErrno("write of block " + std::to_string(block));
    Die("short write of block " + std::to_string(block));
  }
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"powercut-writer: stamped, flushed, marked writes for the power-cut test"};
  std::string dev, journal_path, state_path, mark_dev;
  uint64_t blocks = 0, rounds = 0, per_round = 8, fua_every = 5, seed = 1;
  app.add_option("--dev", dev, "Block device to write (O_DIRECT)")->required();
  app.add_option("--blocks", blocks, "Blocks of 4 KiB to spread writes over")->required()
      ->check(CLI::Range(uint64_t{1}, uint64_t{1} << 30));
  app.add_option("--rounds", rounds, "Rounds to run")->required()
      ->check(CLI::Range(uint64_t{1}, uint64_t{1000000}));
  app.add_option("--per-round", per_round, "Blocks written per fsync round")
      ->check(CLI::Range(uint64_t{1}, uint64_t{4096}));
  app.add_option("--fua-every", fua_every, "Every Nth round is one FUA write (0: never)");
  app.add_option("--journal", journal_path, "Journal of writes: SEQ BLOCK ROUND")->required();
  app.add_option("--state", state_path, "Issued/completed sequence numbers (16 bytes)")->required();
  app.add_option("--mark-dev", mark_dev, "dm-log-writes device to mark after each round")
      ->required();
  app.add_option("--seed", seed, "Random seed for block choice");
  uint64_t pause_ms = 0;
  std::string stop_file;
  app.add_option("--pause-ms", pause_ms, "Pause between rounds");
  app.add_option("--stop-file", stop_file, "Stop after the round during which this file appears");
  CLI11_PARSE(app, argc, argv);

  int fd = open(dev.c_str(), O_RDWR | O_DIRECT | O_CLOEXEC);
  if (fd < 0) DieErrno("open " + dev);
  FILE* journal = std::fopen(journal_path.c_str(), "w");
  if (!journal) DieErrno("create " + journal_path);
  int sfd = open(state_path.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (sfd < 0 || ftruncate(sfd, 16) != 0) DieErrno("create " + state_path);
  void* map = mmap(nullptr, 16, PROT_READ | PROT_WRITE, MAP_SHARED, sfd, 0);
  if (map == MAP_FAILED) DieErrno("mmap " + state_path);
  // Aligned 8-byte stores are atomic on x86-64: a reader sees the old or the new value.
  auto* issued = static_cast<std::atomic<uint64_t>*>(map);
  auto* completed = issued + 1;
  issued->store(0);
  completed->store(0);
  void* mem = nullptr;
  if (posix_memalign(&mem, kBlockSize, kBlockSize) != 0) Die("out of memory");
  auto* buf = static_cast<uint8_t*>(mem);

  std::mt19937_64 rng(seed);
  uint64_t seq = 0, fsyncs = 0, fuas = 0, r = 0;
  const auto t0 = std::chrono::steady_clock::now();
  while (r < rounds) {
    ++r;
    const bool last = !stop_file.empty() && access(stop_file.c_str(), F_OK) == 0;
    const bool fua_round = fua_every > 0 && r % fua_every == 0;
    const uint64_t n = fua_round ? 1 : per_round;
    for (uint64_t i = 0; i < n; ++i) {
      const uint64_t block = rng() % blocks;
      ++seq;
      MakeStamp(buf, block, seq, r);
      issued->store(seq);
      WriteBlock(fd, buf, block, fua_round);
      completed->store(seq);
      std::fprintf(journal, "%llu %llu %llu\n", static_cast<unsigned long long>(seq),
                   static_cast<unsigned long long>(block), static_cast<unsigned long long>(r));
    }
    if (fua_round) {
      ++fuas;
    } else {
      if (fsync(fd) != 0) DieErrno("fsync " + dev + " after round " + std::to_string(r));
      ++fsyncs;
    }
    if (std::fflush(journal) != 0) DieErrno("write " + journal_path);
    if (Status s = logwrites::SendMark(mark_dev, "w" + std::to_string(r)); !s.ok()) {
      Die(s.message());
    }
    if (last) break;
    // Pacing, as asked (--pause-ms).
    if (pause_ms) std::this_thread::sleep_for(std::chrono::milliseconds(pause_ms));
  }
  if (std::fclose(journal) != 0) DieErrno("close " + journal_path);
  const double secs =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("powercut-writer: %llu rounds, %llu writes, %llu fsyncs, %llu FUA writes, "
              "%.1f s\n",
              static_cast<unsigned long long>(r), static_cast<unsigned long long>(seq),
              static_cast<unsigned long long>(fsyncs), static_cast<unsigned long long>(fuas), secs);
  return 0;
}
