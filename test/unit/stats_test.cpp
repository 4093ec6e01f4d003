// Per-volume counters: latency bucket boundaries, what each op records, snapshots, and that
// concurrent updates are not lost.
#include "datapath/pool/stats.h"

#include <thread>
#include <vector>

#include <gtest/gtest.h>

namespace nbdcsi::datapath {
namespace {

constexpr int Idx(OpKind k) { return static_cast<int>(k); }

TEST(VolumeStats, LatencyBucketBoundaries) {
  struct Case {
    uint64_t ns;
    int bucket;
  };
  const Case cases[] = {
      {0, 0},         {999, 0},       {1000, 1},     {1999, 1},    {2000, 2},
      {3999, 2},      {4000, 3},      {1023999, 10}, {1024000, 11}, {(1ull << 22) * 1000 - 1, 22},
      {(1ull << 22) * 1000, 23},       {UINT64_MAX, kLatencyBuckets - 1},
  };
  for (const auto& c : cases) EXPECT_EQ(VolumeStats::LatencyBucket(c.ns), c.bucket) << c.ns << " ns";
}

TEST(VolumeStats, RecordsOpsBytesErrorsAndLatency) {
  VolumeStats s;
  s.RecordOp(OpKind::kRead, 4096, 1500, false);         // 1.5 us -> bucket 1
  s.RecordOp(OpKind::kRead, 8192, 100000, false);       // 100 us -> bucket 7
  s.RecordOp(OpKind::kRead, 4096, 50, true);            // failed: no bytes
  s.RecordOp(OpKind::kWrite, 65536, 3000000, false);    // 3 ms -> bucket 12
  s.RecordOp(OpKind::kFlush, 0, 10, false);
  s.RecordOp(OpKind::kTrim, 1 << 20, 10, true);
  s.RecordOp(OpKind::kWriteZeroes, 1 << 20, 10, false);
  VolumeStatsSnapshot snap = s.Snapshot();
  EXPECT_EQ(snap.ops[Idx(OpKind::kRead)], 3u);
  EXPECT_EQ(snap.errors[Idx(OpKind::kRead)], 1u);
  EXPECT_EQ(snap.ops[Idx(OpKind::kWrite)], 1u);
  EXPECT_EQ(snap.errors[Idx(OpKind::kWrite)], 0u);
  EXPECT_EQ(snap.ops[Idx(OpKind::kFlush)], 1u);
  EXPECT_EQ(snap.errors[Idx(OpKind::kTrim)], 1u);
  EXPECT_EQ(snap.ops[Idx(OpKind::kWriteZeroes)], 1u);
  EXPECT_EQ(snap.ops[Idx(OpKind::kBlockStatus)], 0u);
  EXPECT_EQ(snap.bytes_read, 4096u + 8192u);
  EXPECT_EQ(snap.bytes_written, 65536u) << "trim/write-zeroes move no data";
  EXPECT_EQ(snap.read_latency_us[0], 1u);
  EXPECT_EQ(snap.read_latency_us[1], 1u);
  EXPECT_EQ(snap.read_latency_us[7], 1u);
  EXPECT_EQ(snap.write_latency_us[12], 1u);
  uint64_t total = 0;
  for (uint64_t v : snap.write_latency_us) total += v;
  EXPECT_EQ(total, 1u) << "only reads and writes have histograms";
}

TEST(VolumeStats, ThrottleAndConnections) {
  VolumeStats s;
  s.RecordThrottle(5000);
  s.RecordThrottle(7000);
  s.ConnectionOpened();
  s.ConnectionOpened();
  s.ConnectionClosed();
  VolumeStatsSnapshot snap = s.Snapshot();
  EXPECT_EQ(snap.throttled_ns, 12000u);
  EXPECT_EQ(snap.throttled_ops, 2u);
  EXPECT_EQ(snap.connections, 1u);
  EXPECT_EQ(s.connections(), 1u);
  // A snapshot is a copy: later updates do not show up in it.
  s.RecordOp(OpKind::kRead, 1, 1, false);
  EXPECT_EQ(snap.ops[Idx(OpKind::kRead)], 0u);
}

TEST(VolumeStats, ConcurrentUpdatesAreNotLost) {
  VolumeStats s;
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < 50000; ++i) {
        s.RecordOp(OpKind::kWrite, 512, 2500, false);
        s.ConnectionOpened();
        s.ConnectionClosed();
      }
    });
  }
  for (auto& th : threads) th.join();
  VolumeStatsSnapshot snap = s.Snapshot();
  EXPECT_EQ(snap.ops[Idx(OpKind::kWrite)], 200000u);
  EXPECT_EQ(snap.bytes_written, 200000u * 512);
  EXPECT_EQ(snap.write_latency_us[2], 200000u);
  EXPECT_EQ(snap.connections, 0u);
}

}  // namespace
}  // namespace nbdcsi::datapath
