// Token-bucket QoS with a simulated clock: rates over time, burst depth, independence of the
// read and write buckets, the bandwidth debt model, live changes and per-GiB resolution.
#include "datapath/pool/qos.h"
#include "test/support/wait.h"

#include <thread>
#include <vector>

#include <gtest/gtest.h>

namespace nbdcsi::datapath {
namespace {

constexpr uint64_t kSec = 1000000000;
constexpr uint64_t kMs = 1000000;
constexpr uint64_t kGiB = uint64_t{1} << 30;
constexpr uint64_t kMiB = 1 << 20;
using Dir = Throttle::Dir;

// Issues requests back to back as fast as the throttle allows, following its wait hints,
// until `end_ns`. Returns how many were admitted; `now` ends at or after end_ns.
uint64_t RunFor(Throttle& t, Dir dir, uint64_t bytes, uint64_t& now, uint64_t end_ns) {
  uint64_t admitted = 0;
  while (now < end_ns) {
    uint64_t wait = t.Admit(dir, bytes, now);
    if (wait == 0) {
      ++admitted;
    } else {
      now += wait;
    }
  }
  return admitted;
}

// Requests admitted at one instant (no time passes): the current bucket depth.
uint64_t DrainNow(Throttle& t, Dir dir, uint64_t bytes, uint64_t now) {
  uint64_t n = 0;
  while (t.Admit(dir, bytes, now) == 0) {
    if (++n > 10000000) break;  // an unlimited throttle would spin forever
  }
  return n;
}

TEST(QosResolve, ExplicitLimitsWinOverPerGiB) {
  QosLimits l;
  l.max_iops = 500;
  l.iops_per_gib = 100;
  l.bps_per_gib = 10 * kMiB;
  l.max_read_bps = 7;
  EffectiveQos e = Resolve(l, 10 * kGiB);
  EXPECT_EQ(e.iops, 500u);
  EXPECT_EQ(e.bps, 100 * kMiB);
  EXPECT_EQ(e.read_bps, 7u);
  EXPECT_EQ(e.write_bps, 0u);
  EXPECT_EQ(e.burst_ms, QosLimits::kDefaultBurstMs);
}

TEST(QosResolve, PerGiBRoundsUpToWholeGiBWithAtLeastOne) {
  QosLimits l;
  l.iops_per_gib = 100;
  EXPECT_EQ(Resolve(l, kGiB).iops, 100u);
  EXPECT_EQ(Resolve(l, kGiB + 4096).iops, 200u);
  EXPECT_EQ(Resolve(l, 3 * kGiB / 2).iops, 200u);
  EXPECT_EQ(Resolve(l, 4096).iops, 100u) << "a tiny volume must not resolve to 0 = unlimited";
  EXPECT_EQ(Resolve(l, 0).iops, 100u);
  l.iops_per_gib = UINT64_MAX / 2;
  EXPECT_EQ(Resolve(l, 1000 * kGiB).iops, UINT64_MAX) << "saturates instead of wrapping";
}

TEST(QosResolve, BurstAndUnlimited) {
  QosLimits l;
  EXPECT_TRUE(l.unlimited());
  l.burst_ms = 250;
  EXPECT_TRUE(l.unlimited()) << "burst alone limits nothing";
  EXPECT_EQ(Resolve(l, kGiB).burst_ms, 250u);
  l.bps_per_gib = 1;
  EXPECT_FALSE(l.unlimited());
}

TEST(Throttle, UnlimitedAdmitsEverything) {
  Throttle t;
  t.SetLimits({}, kGiB, 0);
  EXPECT_TRUE(t.unlimited());
  for (int i = 0; i < 100000; ++i) ASSERT_EQ(t.Admit(Dir::kWrite, 1 << 20, 0), 0u);
}

TEST(Throttle, SustainedIopsRateOverTenSeconds) {
  Throttle t;
  QosLimits l;
  l.max_iops = 2000;
  t.SetLimits(l, kGiB, 0);
  uint64_t now = 0;
  // Use up the initial burst (100 ms of rate = 200) so only the sustained rate is measured.
  EXPECT_EQ(DrainNow(t, Dir::kRead, 4096, now), 200u);
  uint64_t admitted = RunFor(t, Dir::kRead, 4096, now, 10 * kSec);
  EXPECT_NEAR(static_cast<double>(admitted), 20000.0, 200.0);
  // Each simulated second on its own is within 1% as well.
  for (int s = 0; s < 3; ++s) {
    uint64_t per_sec = RunFor(t, Dir::kWrite, 4096, now, now + kSec);
    EXPECT_NEAR(static_cast<double>(per_sec), 2000.0, 20.0);
  }
}

TEST(Throttle, WaitHintIsExact) {
  Throttle t;
  QosLimits l;
  l.max_iops = 1000;  // one token per ms
  t.SetLimits(l, kGiB, 0);
  DrainNow(t, Dir::kRead, 512, 0);
  uint64_t wait = t.Admit(Dir::kRead, 512, 0);
  EXPECT_NEAR(static_cast<double>(wait), static_cast<double>(kMs), 1000.0);
  EXPECT_NE(t.Admit(Dir::kRead, 512, wait / 2), 0u) << "half a token is not enough";
  EXPECT_EQ(t.Admit(Dir::kRead, 512, wait), 0u) << "waiting the hint must be enough";
}

TEST(Throttle, BurstCapacityAfterIdle) {
  Throttle t;
  QosLimits l;
  l.max_iops = 2000;
  l.burst_ms = 500;
  t.SetLimits(l, kGiB, 0);
  EXPECT_EQ(DrainNow(t, Dir::kRead, 4096, 0), 1000u) << "buckets start full";
  // A long idle refills to the depth, not beyond it.
  EXPECT_EQ(DrainNow(t, Dir::kRead, 4096, 60 * kSec), 1000u);
  EXPECT_EQ(DrainNow(t, Dir::kRead, 4096, 60 * kSec + 100 * kMs), 200u);
}

TEST(Throttle, TinyRateStillHasOneToken) {
  Throttle t;
  QosLimits l;
  l.max_iops = 5;  // 5 * 100 ms = 0.5 tokens: rounded up to 1 so anything can run
  t.SetLimits(l, kGiB, 0);
  EXPECT_EQ(DrainNow(t, Dir::kRead, 4096, 0), 1u);
  uint64_t now = 0;
  EXPECT_NEAR(static_cast<double>(RunFor(t, Dir::kRead, 4096, now, 10 * kSec)), 50.0, 1.0);
}

TEST(Throttle, ReadAndWriteBucketsAreIndependent) {
  Throttle t;
  QosLimits l;
  l.max_read_iops = 100;
  l.max_write_iops = 1000;
  t.SetLimits(l, kGiB, 0);
  EXPECT_EQ(DrainNow(t, Dir::kRead, 4096, 0), 10u);
  EXPECT_NE(t.Admit(Dir::kRead, 4096, 0), 0u);
  EXPECT_EQ(DrainNow(t, Dir::kWrite, 4096, 0), 100u) << "reads being out of tokens must not block writes";
  EXPECT_EQ(t.Admit(Dir::kOther, 0, 0), 0u) << "flush/trim are never throttled";
  uint64_t now = 0;
  uint64_t reads = RunFor(t, Dir::kRead, 4096, now, 10 * kSec);
  EXPECT_NEAR(static_cast<double>(reads), 1000.0, 10.0);
}

TEST(Throttle, TotalIopsIsSharedByReadsAndWrites) {
  Throttle t;
  QosLimits l;
  l.max_iops = 1000;
  l.burst_ms = 10;  // 10 tokens
  t.SetLimits(l, kGiB, 0);
  for (int i = 0; i < 5; ++i) ASSERT_EQ(t.Admit(Dir::kRead, 4096, 0), 0u);
  for (int i = 0; i < 5; ++i) ASSERT_EQ(t.Admit(Dir::kWrite, 4096, 0), 0u);
  EXPECT_NE(t.Admit(Dir::kWrite, 4096, 0), 0u);
  EXPECT_NE(t.Admit(Dir::kRead, 4096, 0), 0u);
}

TEST(Throttle, WaitingRequestIsNotCharged) {
  Throttle t;
  QosLimits l;
  l.max_iops = 1000;
  l.max_read_iops = 10;  // 1 token
  t.SetLimits(l, kGiB, 0);
  ASSERT_EQ(t.Admit(Dir::kRead, 4096, 0), 0u);
  // Repeated refused reads must not eat the total bucket that writes also need.
  for (int i = 0; i < 1000; ++i) ASSERT_NE(t.Admit(Dir::kRead, 4096, 0), 0u);
  EXPECT_EQ(DrainNow(t, Dir::kWrite, 4096, 0), 99u);
}

TEST(Throttle, BandwidthDebtLetsLargeRequestsThrough) {
  Throttle t;
  QosLimits l;
  l.max_bps = kMiB;  // 1 MiB/s, 1 s burst = 1 MiB bucket
  l.burst_ms = 1000;
  t.SetLimits(l, kGiB, 0);
  // Larger than the whole bucket, yet admitted: the bucket only needs to be positive.
  ASSERT_EQ(t.Admit(Dir::kWrite, 4 * kMiB, 0), 0u);
  // 3 MiB of debt plus one byte at 1 MiB/s.
  uint64_t wait = t.Admit(Dir::kWrite, 4096, 0);
  EXPECT_GE(wait, 3 * kSec);
  EXPECT_LE(wait, 3 * kSec + kMs);
  EXPECT_NE(t.Admit(Dir::kWrite, 4096, 2 * kSec), 0u);
  EXPECT_EQ(t.Admit(Dir::kWrite, 4096, wait), 0u);
}

TEST(Throttle, SustainedBandwidth) {
  Throttle t;
  QosLimits l;
  l.max_write_bps = 10 * kMiB;
  t.SetLimits(l, kGiB, 0);
  uint64_t now = 0;
  uint64_t n = RunFor(t, Dir::kWrite, 64 * 1024, now, 10 * kSec);
  // 100 MiB over 10 s plus the 1 MiB initial bucket plus at most one request of debt.
  double bytes = static_cast<double>(n) * 64 * 1024;
  EXPECT_NEAR(bytes, 101.0 * kMiB, 1.0 * kMiB);
  EXPECT_EQ(DrainNow(t, Dir::kRead, 64 * 1024, now), 10000000u + 1) << "reads are not limited";
}

TEST(Throttle, LiveChangeKeepsBalanceAndNeverGrantsBurst) {
  Throttle t;
  QosLimits l;
  l.max_iops = 2000;
  t.SetLimits(l, kGiB, 0);
  EXPECT_EQ(DrainNow(t, Dir::kRead, 4096, 0), 200u);
  // Raising the limit while empty: the bucket stays empty, only the refill gets faster.
  l.max_iops = 10000;
  t.SetLimits(l, kGiB, 0);
  EXPECT_NE(t.Admit(Dir::kRead, 4096, 0), 0u);
  EXPECT_EQ(DrainNow(t, Dir::kRead, 4096, 10 * kMs), 100u);
  // Lowering it while full: the balance is clamped to the new, smaller depth.
  EXPECT_EQ(DrainNow(t, Dir::kRead, 4096, 10 * kSec), 1000u);
  t.SetLimits(l, kGiB, 20 * kSec);  // refilled to 1000 by now
  l.max_iops = 100;
  t.SetLimits(l, kGiB, 20 * kSec);
  EXPECT_EQ(DrainNow(t, Dir::kRead, 4096, 20 * kSec), 10u);
  EXPECT_EQ(t.limits().max_iops, 100u);
  EXPECT_EQ(t.effective().iops, 100u);
  // Removing every limit admits everything; adding one back starts full.
  t.SetLimits({}, kGiB, 21 * kSec);
  EXPECT_TRUE(t.unlimited());
  EXPECT_EQ(t.Admit(Dir::kRead, 4096, 21 * kSec), 0u);
  l.max_iops = 300;
  t.SetLimits(l, kGiB, 21 * kSec);
  EXPECT_EQ(DrainNow(t, Dir::kRead, 4096, 21 * kSec), 30u);
}

TEST(Throttle, PerGiBScalesWithVolumeSize) {
  Throttle t;
  QosLimits l;
  l.iops_per_gib = 10;
  t.SetLimits(l, 10 * kGiB, 0);
  EXPECT_EQ(t.effective().iops, 100u);
  uint64_t now = 0;
  DrainNow(t, Dir::kRead, 4096, now);
  EXPECT_NEAR(static_cast<double>(RunFor(t, Dir::kRead, 4096, now, 10 * kSec)), 1000.0, 10.0);
  t.SetLimits(l, 20 * kGiB, now);  // what a resize does
  EXPECT_EQ(t.effective().iops, 200u);
  uint64_t start = now;
  EXPECT_NEAR(static_cast<double>(RunFor(t, Dir::kRead, 4096, now, start + 10 * kSec)), 2000.0, 20.0);
}

TEST(Throttle, ClockGoingBackwardsIsHarmless) {
  Throttle t;
  QosLimits l;
  l.max_iops = 1000;
  t.SetLimits(l, kGiB, 5 * kSec);
  DrainNow(t, Dir::kRead, 4096, 5 * kSec);
  EXPECT_NE(t.Admit(Dir::kRead, 4096, 4 * kSec), 0u);
  EXPECT_EQ(DrainNow(t, Dir::kRead, 4096, 5 * kSec + 10 * kMs), 10u);
}

TEST(Throttle, ConcurrentAdmitsRespectTheRate) {
  Throttle t;
  QosLimits l;
  l.max_iops = 1000;
  t.SetLimits(l, kGiB, 0);
  // Four threads share a simulated instant that advances by 1 ms per round: across 1000 rounds
  // (one second) at most 1000 + 100 (burst) requests may get through in total.
  std::atomic<uint64_t> admitted{0};
  std::vector<std::thread> threads;
  for (int i = 0; i < 4; ++i) {
    threads.emplace_back([&] {
      for (uint64_t ms = 0; ms < 1000; ++ms)
        for (int k = 0; k < 5; ++k) admitted += t.Admit(Dir::kWrite, 4096, ms * kMs) == 0;
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_LE(admitted.load(), 1100u);
  EXPECT_GE(admitted.load(), 500u);
}

TEST(Throttle, MonotonicClockAdvances) {
  uint64_t a = MonotonicNowNs();
  // The stimulus: real time passing is what this test measures the clock against.
  std::this_thread::sleep_for(std::chrono::milliseconds(2));
  uint64_t b = MonotonicNowNs();
  EXPECT_GE(b - a, 2 * kMs);
  EXPECT_LT(b - a, 10 * kSec);
}

}  // namespace
}  // namespace nbdcsi::datapath
