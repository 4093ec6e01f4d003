// Unit tests of Resync (datapath/replica/resync.h) over in-memory fake replicas behind the
// BlockChannel seam: what is copied (only dirty regions; data extents and not holes), what is
// reported done (only what a FLUSH covered), how a failure or a cancel ends the job (its errno
// and range, bits of uncopied regions kept), writes racing a copy, bounded parallelism, and the
// rate limiter on a fake clock. The integration test (test/integration/resync_it.sh) runs the
// same jobs between two nbd-datapathd processes.
#include "datapath/replica/resync.h"

#include <gtest/gtest.h>

#include <atomic>
#include <condition_variable>
#include <deque>
#include <map>
#include <random>
#include <thread>

#include "datapath/nbd/proto.h"
#include "test/support/temp_dir.h"
#include "test/support/wait.h"

namespace nbdcsi::replica {
namespace {

using namespace std::chrono_literals;
using test::TempDir;

constexpr uint64_t kKiB = 1024, kMiB = 1024 * 1024;

// A replica in memory. Callbacks run on its own thread, in order, as a network peer's would.
// `data` is what reads see; `durable` is what a FLUSH made durable (a crash would keep that).
class FakeDisk : public BlockChannel {
 public:
  explicit FakeDisk(uint64_t size, bool base_allocation = true) : data(size), durable(size) {
    props_.size = size;
    props_.flags =
        nbd::kFlagHasFlags | nbd::kFlagSendFlush | nbd::kFlagSendFua | nbd::kFlagSendWriteZeroes;
    props_.min_block = 512;
    props_.max_block = 32 * 1024 * 1024;
    props_.base_allocation = base_allocation;
    allocated.assign(size / 4096, false);
    thread_ = std::thread([this] { Loop(); });
  }
  ~FakeDisk() override {
    {
      std::lock_guard lk(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    thread_.join();
  }

  const ExportProperties& props() const override { return props_; }

  Status Read(uint64_t off, std::span<uint8_t> buf, Callback cb) override {
    return Queue(std::move(cb), [this, off, buf]() -> Status {
      if (read_hook) read_hook(off, buf.size());
      if (fail_read_at && off <= *fail_read_at && *fail_read_at < off + buf.size()) {
        return Status(EIO, "injected read error");
      }
      std::copy_n(data.begin() + off, buf.size(), buf.begin());
      ++reads;
      return Status::Ok();
    });
  }
  Status Write(uint64_t off, std::span<const uint8_t> d, Callback cb) override {
    return Queue(std::move(cb), [this, off, d]() -> Status {
      std::copy(d.begin(), d.end(), data.begin() + off);
      Allocate(off, d.size(), true);
      bytes_written += d.size();
      write_log.push_back({off, d.size()});
      return Status::Ok();
    });
  }
  Status WriteZeroes(uint64_t off, uint32_t len, Callback cb) override {
    return Queue(std::move(cb), [this, off, len]() -> Status {
      std::fill_n(data.begin() + off, len, 0);
      Allocate(off, len, false);
      bytes_zeroed += len;
      return Status::Ok();
    });
  }
  Status Flush(Callback cb) override {
    return Queue(std::move(cb), [this]() -> Status {
      if (fail_flush) return Status(EIO, "injected flush error");
      durable = data;
      ++flushes;
      return Status::Ok();
    });
  }
  Status BlockStatus(uint64_t off, uint32_t len, BlockStatusCallback cb) override {
    if (!props_.base_allocation) return Status(ENOTSUP, "no base:allocation");
    auto ext = std::make_shared<std::vector<BlockExtent>>();
    return Queue([cb = std::move(cb),
                  ext](const Status& s) { cb(s, s.ok() ? *ext : std::vector<BlockExtent>{}); },
                 [this, off, len, ext]() -> Status {
                   ++status_calls;
                   // Reported in 4 KiB blocks, merged, and at most `status_max_extents` of them (a
                   // short answer the job must ask again after).
                   for (uint64_t at = off; at < off + len && ext->size() < status_max_extents;) {
                     const bool a = allocated[at / 4096];
                     uint64_t end = at;
                     while (end < off + len && allocated[end / 4096] == a) end += 4096;
                     ext->push_back({static_cast<uint32_t>(end - at),
                                     a ? 0u : nbd::kStateHole | nbd::kStateZero});
                     at = end;
                   }
                   return Status::Ok();
                 });
  }

  void Allocate(uint64_t off, uint64_t len, bool on) {
    for (uint64_t b = off / 4096; b < (off + len + 4095) / 4096; ++b) allocated[b] = on;
  }
  void Fill(uint64_t off, uint64_t len, uint32_t seed) {
    std::mt19937 rng(seed);
    for (uint64_t i = 0; i < len; ++i) data[off + i] = static_cast<uint8_t>(rng());
    Allocate(off, len, true);
    durable = data;
  }

  // The fake's state is touched by its thread only while a test's job runs; tests read it after.
  std::vector<uint8_t> data, durable;
  std::vector<bool> allocated;
  std::optional<uint64_t> fail_read_at;
  bool fail_flush = false;
  size_t status_max_extents = 1000;
  std::chrono::microseconds delay{0};
  std::function<void(uint64_t, uint64_t)> read_hook;
  std::atomic<uint64_t> bytes_written{0}, bytes_zeroed{0}, reads{0}, flushes{0}, status_calls{0};
  std::vector<ByteRange> write_log;
  std::atomic<int> max_outstanding{0};

 private:
  struct Op {
    Callback cb;
    std::function<Status()> run;
  };
  Status Queue(Callback cb, std::function<Status()> run) {
    std::lock_guard lk(mu_);
    ops_.push_back({std::move(cb), std::move(run)});
    max_outstanding = std::max<int>(max_outstanding, static_cast<int>(ops_.size()) + running_);
    cv_.notify_one();
    return Status::Ok();
  }
  void Loop() {
    std::unique_lock lk(mu_);
    for (;;) {
      cv_.wait(lk, [&] { return stop_ || !ops_.empty(); });
      if (ops_.empty()) return;
      Op op = std::move(ops_.front());
      ops_.pop_front();
      running_ = 1;
      lk.unlock();
      // The stimulus: the op's configured delay.
      if (delay.count() > 0) std::this_thread::sleep_for(delay);
      Status s = op.run();
      lk.lock();
      running_ = 0;  // done once its callback starts: the callback may issue the next op
      lk.unlock();
      op.cb(s);
      lk.lock();
    }
  }
  ExportProperties props_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Op> ops_;
  int running_ = 0;
  bool stop_ = false;
  std::thread thread_;
};

bool SameBytes(const std::vector<uint8_t>& a, const std::vector<uint8_t>& b, uint64_t off,
               uint64_t len) {
  return std::equal(a.begin() + off, a.begin() + off + len, b.begin() + off);
}

class ResyncTest : public ::testing::Test {
 protected:
  void SetUp() override { ASSERT_TRUE(dir_.ok()) << dir_.error(); }
  std::unique_ptr<RegionBitmap> Bitmap(uint64_t size, uint64_t region) {
    auto bm = RegionBitmap::Create(dir_.path() + "/bm", size, region);
    EXPECT_TRUE(bm.ok()) << bm.status().message();
    return bm.ok() ? std::move(bm).value() : nullptr;
  }
  TempDir dir_{"resync_test"};
};

TEST_F(ResyncTest, DirtyCopiesOnlyTheDirtyRegionsAndClearsThem) {
  const uint64_t size = 16 * kMiB, region = 64 * kKiB;
  FakeDisk src(size), dst(size);
  src.Fill(0, size, 1);  // the source differs from the destination everywhere
  auto bm = Bitmap(size, region);
  // Scattered regions, two adjacent (one run), one at the very end.
  for (uint64_t r : {3, 4, 17, 100, 255}) ASSERT_TRUE(bm->MarkDurable(r * region + 7, 1).ok());
  ResyncOptions o;
  o.chunk_bytes = 32 * kKiB;  // several chunks per region
  o.max_in_flight = 4;
  Resync job(src, dst, o);
  Status s = job.RunDirty(*bm);
  ASSERT_TRUE(s.ok()) << s.message();
  for (uint64_t r = 0; r < size / region; ++r) {
    const bool dirty = r == 3 || r == 4 || r == 17 || r == 100 || r == 255;
    EXPECT_EQ(SameBytes(src.data, dst.durable, r * region, region), dirty) << "region " << r;
  }
  EXPECT_EQ(dst.bytes_written.load(), 5 * region);
  const ResyncProgress p = job.progress();
  EXPECT_EQ(p.total_bytes, 5 * region);
  EXPECT_EQ(p.copied_bytes, 5 * region);
  EXPECT_EQ(p.skipped_bytes, 0u);
  EXPECT_TRUE(p.finished);
  EXPECT_DOUBLE_EQ(p.percent(), 100.0);
  EXPECT_EQ(bm->dirty_bytes(), 0u);
  // Cleared on disk too: a reopened bitmap is clean.
  bm.reset();
  auto again = RegionBitmap::Open(dir_.path() + "/bm");
  ASSERT_TRUE(again.ok());
  EXPECT_EQ((*again)->dirty_bytes(), 0u);
}

TEST_F(ResyncTest, ProgressNeverCountsBytesAFlushDidNotCover) {
  const uint64_t size = 8 * kMiB, region = 64 * kKiB;
  FakeDisk src(size), dst(size);
  src.Fill(0, size, 2);
  auto bm = Bitmap(size, region);
  ASSERT_TRUE(bm->MarkAllDurable().ok());
  ResyncOptions o;
  o.chunk_bytes = 64 * kKiB;
  o.unit_bytes = 256 * kKiB;
  o.flush_every_bytes = 1 * kMiB;  // several flushes
  int reports = 0;
  std::string bad;
  o.on_progress = [&](const ResyncProgress& p) {
    ++reports;
    // Everything reported copied must already be on the destination's durable image, and the
    // bitmap clear of it must not run ahead of it either.
    uint64_t durable_equal = 0;
    for (uint64_t r = 0; r < size / region; ++r) {
      if (SameBytes(src.data, dst.durable, r * region, region)) durable_equal += region;
      if (!bm->IsDirty(r * region) && !SameBytes(src.data, dst.durable, r * region, region)) {
        bad = "region " + std::to_string(r) + " cleared before it was flushed";
      }
    }
    if (p.copied_bytes > durable_equal) bad = "copied_bytes ahead of the flushed bytes";
  };
  Resync job(src, dst, o);
  ASSERT_TRUE(job.RunDirty(*bm).ok());
  EXPECT_TRUE(bad.empty()) << bad;
  EXPECT_GE(dst.flushes.load(), 4u);
  EXPECT_GE(reports, 4);
  EXPECT_EQ(job.progress().copied_bytes, size);
  EXPECT_EQ(src.data, dst.durable);
}

TEST_F(ResyncTest, FullRebuildSkipsHolesOfAFreshDestination) {
  const uint64_t size = 32 * kMiB;
  FakeDisk src(size), dst(size);
  // Data at scattered places, some not 64 KiB aligned; the rest was never written.
  const std::vector<ByteRange> data = {
      {0, 4096}, {1 * kMiB, 300 * kKiB}, {9 * kMiB + 8192, 8192}, {size - 64 * kKiB, 64 * kKiB}};
  uint64_t data_bytes = 0;
  for (size_t i = 0; i < data.size(); ++i) {
    src.Fill(data[i].offset, data[i].length, 10 + static_cast<uint32_t>(i));
    data_bytes += data[i].length;
  }
  src.status_max_extents = 3;  // short answers: the job must ask again where they end
  ResyncOptions o;
  o.block_status_bytes = 4 * kMiB;
  Resync job(src, dst, o);
  Status s = job.RunFull();
  ASSERT_TRUE(s.ok()) << s.message();
  EXPECT_EQ(src.data, dst.durable);
  EXPECT_EQ(dst.bytes_written.load(), data_bytes);
  EXPECT_EQ(dst.bytes_zeroed.load(), 0u);
  const ResyncProgress p = job.progress();
  EXPECT_EQ(p.total_bytes, size);
  EXPECT_EQ(p.copied_bytes, data_bytes);
  EXPECT_EQ(p.skipped_bytes, size - data_bytes);
  EXPECT_GT(src.status_calls.load(), 8u);
}

TEST_F(ResyncTest, FullRebuildWritesZeroesOverAStaleDestination) {
  const uint64_t size = 8 * kMiB;
  FakeDisk src(size), dst(size);
  src.Fill(2 * kMiB, kMiB, 5);
  dst.Fill(0, size, 6);  // stale data everywhere
  ResyncOptions o;
  o.holes = HolePolicy::kWriteZeroes;
  Resync job(src, dst, o);
  ASSERT_TRUE(job.RunFull().ok());
  EXPECT_EQ(src.data, dst.durable);
  EXPECT_EQ(job.progress().copied_bytes, kMiB);
  EXPECT_EQ(job.progress().zeroed_bytes, size - kMiB);
  EXPECT_EQ(dst.bytes_zeroed.load(), size - kMiB);
}

TEST_F(ResyncTest, ASourceWithoutBlockStatusIsCopiedWhole) {
  const uint64_t size = 4 * kMiB;
  FakeDisk src(size, /*base_allocation=*/false), dst(size);
  src.Fill(kMiB, 4096, 7);
  Resync job(src, dst);
  ASSERT_TRUE(job.RunFull().ok());
  EXPECT_EQ(src.data, dst.durable);
  EXPECT_EQ(dst.bytes_written.load(), size);
  EXPECT_EQ(job.progress().copied_bytes, size);
}

TEST_F(ResyncTest, AReadErrorStopsTheJobWithItsRangeAndKeepsUncopiedBits) {
  const uint64_t size = 16 * kMiB, region = 256 * kKiB;
  FakeDisk src(size), dst(size);
  src.Fill(0, size, 8);
  auto bm = Bitmap(size, region);
  ASSERT_TRUE(bm->MarkAllDurable().ok());
  src.fail_read_at = 10 * kMiB + 5;
  ResyncOptions o;
  o.chunk_bytes = 256 * kKiB;
  o.unit_bytes = 256 * kKiB;
  o.flush_every_bytes = 1 * kMiB;
  o.max_in_flight = 2;
  Resync job(src, dst, o);
  Status s = job.RunDirty(*bm);
  ASSERT_EQ(s.code(), EIO) << s.message();
  EXPECT_NE(s.message().find("READ from the source [10485760, +262144)"), std::string::npos)
      << s.message();
  const ResyncProgress p = job.progress();
  ASSERT_TRUE(p.failed.has_value());
  EXPECT_EQ(*p.failed, (ByteRange{10 * kMiB, 256 * kKiB}));
  EXPECT_TRUE(p.finished);
  // The failed region and everything after it is still dirty; whatever was cleared is on the
  // destination's durable image; nothing after the failure was issued.
  EXPECT_TRUE(bm->IsDirty(10 * kMiB));
  for (uint64_t r = 0; r < size / region; ++r) {
    if (!bm->IsDirty(r * region)) {
      EXPECT_TRUE(SameBytes(src.data, dst.durable, r * region, region)) << "region " << r;
    }
  }
  EXPECT_EQ(bm->dirty_bytes() + p.copied_bytes, size);
  EXPECT_LE(src.reads.load(), 10 * kMiB / region + 2);
}

TEST_F(ResyncTest, AFlushErrorReportsNothingDone) {
  const uint64_t size = 4 * kMiB;
  FakeDisk src(size), dst(size);
  src.Fill(0, size, 9);
  auto bm = Bitmap(size, 1 * kMiB);
  ASSERT_TRUE(bm->MarkAllDurable().ok());
  dst.fail_flush = true;
  Resync job(src, dst);
  Status s = job.RunDirty(*bm);
  EXPECT_EQ(s.code(), EIO);
  EXPECT_NE(s.message().find("FLUSH of the destination"), std::string::npos) << s.message();
  EXPECT_EQ(job.progress().copied_bytes, 0u);
  EXPECT_EQ(bm->dirty_bytes(), size);
}

TEST_F(ResyncTest, AWriteDuringTheCopyKeepsItsRegionForTheNextPass) {
  const uint64_t size = 4 * kMiB, region = 1 * kMiB;
  FakeDisk src(size), dst(size);
  src.Fill(0, size, 11);
  auto bm = Bitmap(size, region);
  ASSERT_TRUE(bm->MarkAllDurable().ok());
  // The target writes region 2 while the job reads it: the target marks it (the bit is set
  // already, the mark still counts), and its data changes after the read.
  bool raced = false;
  src.read_hook = [&](uint64_t off, uint64_t) {
    if (!raced && off >= 2 * region && off < 3 * region) {
      raced = true;
      EXPECT_TRUE(bm->MarkDurable(2 * region + 100, 10).ok());
    }
  };
  ResyncOptions o;
  o.unit_bytes = region;
  Resync job(src, dst, o);
  ASSERT_TRUE(job.RunDirty(*bm).ok());
  EXPECT_TRUE(raced);
  EXPECT_EQ(bm->DirtyRanges(), (std::vector<ByteRange>{{2 * region, region}}));
  // The next pass takes only that region.
  src.read_hook = nullptr;
  const uint64_t before = dst.bytes_written.load();
  ASSERT_TRUE(job.RunDirty(*bm).ok());
  EXPECT_EQ(dst.bytes_written.load() - before, region);
  EXPECT_EQ(bm->dirty_bytes(), 0u);
}

TEST_F(ResyncTest, ParallelismIsBounded) {
  const uint64_t size = 8 * kMiB;
  FakeDisk src(size), dst(size);
  src.Fill(0, size, 12);
  src.delay = 200us;
  auto bm = Bitmap(size, kMiB);  // RunDirty: no BLOCK_STATUS beside the reads
  ASSERT_TRUE(bm->MarkAllDurable().ok());
  ResyncOptions o;
  o.chunk_bytes = 64 * kKiB;
  o.max_in_flight = 3;
  Resync job(src, dst, o);
  ASSERT_TRUE(job.RunDirty(*bm).ok());
  EXPECT_EQ(src.data, dst.durable);
  EXPECT_LE(src.max_outstanding.load(), 3);
  EXPECT_GE(src.max_outstanding.load(), 2);      // it does overlap
  EXPECT_LE(dst.max_outstanding.load(), 3 + 1);  // the chunks' writes and one flush
}

TEST_F(ResyncTest, CancelStopsTheJobAndKeepsTheRest) {
  const uint64_t size = 64 * kMiB, region = 1 * kMiB;
  FakeDisk src(size), dst(size);
  src.Fill(0, size, 13);
  src.delay = 2ms;
  auto bm = Bitmap(size, region);
  ASSERT_TRUE(bm->MarkAllDurable().ok());
  ResyncOptions o;
  o.chunk_bytes = 256 * kKiB;
  o.max_in_flight = 2;
  Resync job(src, dst, o);
  // Cancelled once 8 reads are done: the fake runs one op at a time, so the 9th read starting
  // says so.
  test::Event eight_read;
  std::atomic<int> reads_started{0};
  src.read_hook = [&](uint64_t, uint64_t) {
    if (++reads_started == 9) eight_read.Notify();
  };
  std::thread canceller([&] {
    EXPECT_TRUE(eight_read.Wait(10s)) << "the job did not get to its 9th read";
    job.Cancel();
  });
  Status s = job.RunDirty(*bm);
  canceller.join();
  EXPECT_EQ(s.code(), ECANCELED) << s.message();
  EXPECT_FALSE(job.progress().failed.has_value());  // a cancel is no failing range
  EXPECT_GT(bm->dirty_bytes(), size / 2);
  EXPECT_EQ(bm->dirty_bytes() + job.progress().copied_bytes, size);
}

TEST_F(ResyncTest, ABlockStatusWithNoExtentFailsInsteadOfLooping) {
  FakeDisk src(4 * kMiB), dst(4 * kMiB);
  src.status_max_extents = 0;
  Resync job(src, dst);
  Status s = job.RunFull();
  EXPECT_EQ(s.code(), EPROTO) << s.message();
  EXPECT_NE(s.message().find("answered no extent"), std::string::npos) << s.message();
  EXPECT_EQ(dst.bytes_written.load(), 0u);
}

TEST_F(ResyncTest, RefusesPeersOfDifferentSizesAndAForeignBitmap) {
  FakeDisk a(4 * kMiB), b(8 * kMiB), c(4 * kMiB);
  Resync bad(a, b);
  EXPECT_EQ(bad.RunFull().code(), EINVAL);
  auto bm = Bitmap(8 * kMiB, kMiB);
  Resync job(a, c);
  EXPECT_EQ(job.RunDirty(*bm).code(), EINVAL);
}

// The volume was expanded while the replica was out: its bitmap has the old size, the copies the
// new one, and the target never wrote past the old end (it grows only with every replica in
// sync). The dirty regions are copied; nothing past the bitmap is touched.
TEST_F(ResyncTest, ABitmapOfTheSizeBeforeAnExpansionStillResyncs) {
  FakeDisk src(8 * kMiB), dst(8 * kMiB);
  src.Fill(0, 8 * kMiB, 1);
  auto bm = Bitmap(4 * kMiB, kMiB);
  ASSERT_TRUE(bm->MarkDurable(kMiB + 5, 1).ok());
  Resync job(src, dst);
  Status s = job.RunDirty(*bm);
  ASSERT_TRUE(s.ok()) << s.message();
  EXPECT_TRUE(SameBytes(src.data, dst.durable, kMiB, kMiB));
  EXPECT_FALSE(SameBytes(src.data, dst.durable, 4 * kMiB, kMiB)) << "past the bitmap: untouched";
  EXPECT_EQ(dst.bytes_written.load(), kMiB);
  EXPECT_EQ(bm->dirty_bytes(), 0u);
}

TEST_F(ResyncTest, TheRateLimitHoldsTheCopyBack) {
  const uint64_t size = 2 * kMiB;
  FakeDisk src(size), dst(size);
  src.Fill(0, size, 14);
  ResyncOptions o;
  o.chunk_bytes = 128 * kKiB;
  o.rate_bytes_per_second = 4 * kMiB;
  Resync job(src, dst, o);
  const auto t0 = std::chrono::steady_clock::now();
  ASSERT_TRUE(job.RunFull().ok());
  const auto took = std::chrono::steady_clock::now() - t0;
  // 2 MiB at 4 MiB/s: the last chunk may start at (2 MiB - 128 KiB) / rate = 469 ms.
  EXPECT_GE(took, 450ms);
  EXPECT_EQ(src.data, dst.durable);
}

TEST(RateLimiter, PacesToTheRateOnAFakeClock) {
  using Clock = std::chrono::steady_clock;
  const Clock::time_point t0{};  // the fake clock: the test decides every instant
  RateLimiter l(1000 * 1000);    // 1 MB/s
  EXPECT_EQ(l.Acquire(500'000, t0), Clock::duration::zero());
  EXPECT_EQ(l.Acquire(500'000, t0), std::chrono::milliseconds(500));
  EXPECT_EQ(l.Acquire(100'000, t0 + 100ms), std::chrono::milliseconds(900));
  // Idle time earns no burst: after a long pause the next goes now, the one after paced.
  EXPECT_EQ(l.Acquire(1'000'000, t0 + 10s), Clock::duration::zero());
  EXPECT_EQ(l.Acquire(1, t0 + 10s), std::chrono::seconds(1));
  RateLimiter unlimited(0);
  EXPECT_EQ(unlimited.Acquire(1 << 30, t0), Clock::duration::zero());
}

TEST(ResyncProgress, PercentAndEta) {
  ResyncProgress p;
  p.total_bytes = 1000;
  EXPECT_FALSE(p.eta().has_value());
  p.copied_bytes = 200;
  p.skipped_bytes = 50;
  p.elapsed = std::chrono::seconds(10);
  EXPECT_DOUBLE_EQ(p.percent(), 25.0);
  ASSERT_TRUE(p.eta().has_value());
  EXPECT_EQ(*p.eta(), std::chrono::seconds(30));
  p.copied_bytes = 950;
  EXPECT_EQ(*p.eta(), std::chrono::seconds(0));
}

}  // namespace
}  // namespace nbdcsi::replica
