// The per-point check of the power-cut test (test/vm/powercut.sh): the pool's file system has
// been replayed to a crash point and mounted (through a throwaway dm-snapshot, so what opening
// the pool writes is discarded). CheckPoint opens the pool with the daemon's own code
// (Pool::Open: orphan sweep, broken-volume detection, recovery of interrupted copies) and
// compares it with what had been acknowledged before the point.
//
// Writer (powercut-writer's journal, "SEQ BLOCK ROUND" per write): with W the last writer mark
// ("w<W>") before the point, every write of rounds 1..W was flushed before its mark, so each
// block must hold its last write of those rounds or a later one; writes of round W+2 and on
// cannot be there at all (they started after mark W+1, which the log puts after the point).
//
// Ops (the churn's journal): every op is written "N issue KIND ARGS" before it is issued and
// "N ack [HI]" once nbdctl acknowledged it, then the log gets the mark "c<N>". With C the last
// such mark before the point, ops 0..C must all be visible; op C+1 may be in flight, and only its
// name may be absent or present, broken or abandoned (an interrupted copy).
//   open | create NAME BYTES | resize NAME BYTES | delete NAME | snap SNAP VOL LO|- | delsnap SNAP
// A snapshot of the writer's volume records LO, the writer's last completed sequence number
// before the request, and HI (on the ack line), the last one issued after it: per block it must
// hold the last write with seq <= LO or a later one with seq <= HI. Snapshots of other volumes
// (never written) read as zeros.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "common/status.h"

namespace nbdcsi::powercut {

struct Write {
  uint64_t seq = 0, block = 0, round = 0;
};

struct Op {
  int64_t index = -1;
  std::string kind, name, vol;
  uint64_t bytes = 0;
  bool has_lo = false, acked = false, has_hi = false;
  uint64_t lo = 0, hi = 0;
};

// What the workload recorded, loaded once and shared (read-only) by every point.
struct Journals {
  std::vector<Write> writes;                             // writes[seq - 1]
  std::map<uint64_t, std::vector<uint64_t>> by_block;    // block -> its seqs, ascending
  std::vector<Op> ops;                                   // ops[index]

  Status Load(const std::string& writer_journal, const std::string& ops_journal);
};

struct PointResult {
  std::vector<std::string> failures;  // the first 25 messages
  int failure_count = 0;
  uint64_t ops_verified = 0;     // acknowledged ops whose effect was checked
  uint64_t blocks_verified = 0;  // blocks that had to hold an acknowledged write, and did or not
  int tolerated = 0;             // broken/abandoned leftovers of the one op in flight
  std::vector<std::string> orphans;  // files the pool's open swept (allowed at any point)
  double open_secs = 0;          // Pool::Open and its recovery
  double read_secs = 0;          // reading and verifying volume and snapshot data
  std::string summary;           // one line
};

// `round`: last writer mark before the point (0: none); `op`: last churn mark (-1: none).
PointResult CheckPoint(const Journals& j, const std::string& pool_dir, const std::string& writer_vol,
                       uint64_t round, int64_t op, double overcommit);

}  // namespace nbdcsi::powercut
