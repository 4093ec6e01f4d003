// Unit tests of RegionBitmap (datapath/replica/region_bitmap.h): the file format and its strict
// header check, the durability contract of MarkDurable (the bits are in the file when it
// returns, and no I/O happens when they already were), the torn-page rule, the copy protocol
// (BeginCopy / ClearCopied) and concurrent markers sharing one fdatasync.
#include "datapath/replica/region_bitmap.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <atomic>
#include <fstream>
#include <future>
#include <iterator>
#include <thread>
#include <vector>

#include "test/support/temp_dir.h"
#include "test/support/wait.h"

namespace nbdcsi::replica {
namespace {

using test::TempDir;

constexpr uint64_t kMiB = 1 << 20;

std::vector<uint8_t> ReadFile(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(f), {}};
}

void WriteAt(const std::string& path, off_t off, const std::vector<uint8_t>& bytes) {
  const int fd = open(path.c_str(), O_WRONLY);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(pwrite(fd, bytes.data(), bytes.size(), off), static_cast<ssize_t>(bytes.size()));
  close(fd);
}

// Bit i of the file's bitmap (page 1 onward), as another process would read it after a crash.
bool FileBit(const std::string& path, uint64_t i) {
  const auto f = ReadFile(path);
  return (f.at(RegionBitmap::kPageSize + i / 8) >> (i % 8)) & 1;
}

class RegionBitmapTest : public ::testing::Test {
 protected:
  void SetUp() override { ASSERT_TRUE(dir_.ok()) << dir_.error(); }
  std::string Path(const char* name = "bm") { return dir_.path() + "/" + name; }
  TempDir dir_{"region_bitmap_test"};
};

TEST_F(RegionBitmapTest, CreateRejectsBadGeometryAndExistingFile) {
  EXPECT_EQ(RegionBitmap::Create(Path(), 64 * kMiB, 3 * kMiB).status().code(), EINVAL);
  EXPECT_EQ(RegionBitmap::Create(Path(), 64 * kMiB, 2048).status().code(), EINVAL);
  EXPECT_EQ(RegionBitmap::Create(Path(), 0).status().code(), EINVAL);
  ASSERT_TRUE(RegionBitmap::Create(Path(), 64 * kMiB).ok());
  EXPECT_EQ(RegionBitmap::Create(Path(), 64 * kMiB).status().code(), EEXIST);
  EXPECT_EQ(RegionBitmap::Open(Path("missing")).status().code(), ENOENT);
}

TEST_F(RegionBitmapTest, GeometryAndFileSize) {
  // 100 MiB + 1 byte of 1 MiB regions: 101 regions, the last one partial; one bit page.
  auto bm = RegionBitmap::Create(Path(), 100 * kMiB + 1);
  ASSERT_TRUE(bm.ok()) << bm.status().message();
  EXPECT_EQ((*bm)->regions(), 101u);
  EXPECT_EQ(ReadFile(Path()).size(), 2 * RegionBitmap::kPageSize);
  // 4 KiB regions over 1 GiB: 262144 regions, 8 bit pages.
  auto big = RegionBitmap::Create(Path("big"), 1024 * kMiB, 4096);
  ASSERT_TRUE(big.ok());
  EXPECT_EQ(ReadFile(Path("big")).size(), 9 * RegionBitmap::kPageSize);
}

TEST_F(RegionBitmapTest, MarkRoundsOutToRegionsAndRangesMerge) {
  auto bm = RegionBitmap::Create(Path(), 16 * kMiB + 4096);
  ASSERT_TRUE(bm.ok());
  RegionBitmap& b = **bm;
  ASSERT_TRUE(b.Mark(kMiB - 1, 2).ok());  // straddles regions 0 and 1
  ASSERT_TRUE(b.Mark(3 * kMiB, 1).ok());
  ASSERT_TRUE(b.Mark(16 * kMiB + 10, 5).ok());  // the partial last region
  const std::vector<ByteRange> want = {{0, 2 * kMiB}, {3 * kMiB, kMiB}, {16 * kMiB, 4096}};
  EXPECT_EQ(b.DirtyRanges(), want);
  EXPECT_EQ(b.dirty_bytes(), 3 * kMiB + 4096);
  EXPECT_TRUE(b.IsDirty(kMiB + 5));
  EXPECT_FALSE(b.IsDirty(2 * kMiB));
  EXPECT_EQ(b.Mark(16 * kMiB + 4096, 1).code(), EINVAL);
  EXPECT_EQ(b.Mark(0, 0).code(), EINVAL);
  EXPECT_EQ(b.Mark(16 * kMiB, 8192).code(), EINVAL);
}

TEST_F(RegionBitmapTest, MarkDurableIsInTheFileWhenItReturnsAndSkipsIoWhenAlreadySet) {
  auto bm = RegionBitmap::Create(Path(), 64 * kMiB);
  ASSERT_TRUE(bm.ok());
  RegionBitmap& b = **bm;
  ASSERT_TRUE(b.MarkDurable(5 * kMiB, 100).ok());
  EXPECT_TRUE(FileBit(Path(), 5));
  EXPECT_FALSE(FileBit(Path(), 4));
  EXPECT_EQ(b.syncs(), 1u);
  // Already durable: no write, no fdatasync.
  ASSERT_TRUE(b.MarkDurable(5 * kMiB + 200, 300).ok());
  EXPECT_EQ(b.syncs(), 1u);
  // Mark alone stays in memory until Sync.
  ASSERT_TRUE(b.Mark(7 * kMiB, 1).ok());
  EXPECT_FALSE(FileBit(Path(), 7));
  ASSERT_TRUE(b.Sync().ok());
  EXPECT_TRUE(FileBit(Path(), 7));
  EXPECT_EQ(b.syncs(), 2u);
  ASSERT_TRUE(b.Sync().ok());
  EXPECT_EQ(b.syncs(), 2u);
  // A bit set by Mark but not yet synced is not durable: MarkDurable of it syncs.
  ASSERT_TRUE(b.Mark(9 * kMiB, 1).ok());
  ASSERT_TRUE(b.MarkDurable(9 * kMiB, 1).ok());
  EXPECT_TRUE(FileBit(Path(), 9));
  EXPECT_EQ(b.syncs(), 3u);
}

TEST_F(RegionBitmapTest, ReopenKeepsBits) {
  {
    auto bm = RegionBitmap::Create(Path(), 200 * kMiB, 64 * 1024);
    ASSERT_TRUE(bm.ok());
    ASSERT_TRUE((*bm)->MarkDurable(0, 1).ok());
    ASSERT_TRUE((*bm)->MarkDurable(150 * kMiB, 3 * kMiB).ok());
    ASSERT_TRUE((*bm)->MarkDurable(200 * kMiB - 1, 1).ok());
  }
  auto bm = RegionBitmap::Open(Path(), 200 * kMiB);
  ASSERT_TRUE(bm.ok()) << bm.status().message();
  EXPECT_EQ((*bm)->region_size(), 64u * 1024);
  const std::vector<ByteRange> want = {
      {0, 64 * 1024}, {150 * kMiB, 3 * kMiB}, {200 * kMiB - 64 * 1024, 64 * 1024}};
  EXPECT_EQ((*bm)->DirtyRanges(), want);
  EXPECT_EQ(RegionBitmap::Open(Path(), 100 * kMiB).status().code(), EINVAL);
}

TEST_F(RegionBitmapTest, DamagedHeadersAreRefusedByName) {
  ASSERT_TRUE(RegionBitmap::Create(Path(), 64 * kMiB).ok());
  const auto good = ReadFile(Path());
  struct Case {
    const char* what;
    off_t off;
    std::vector<uint8_t> bytes;
    const char* message;
  };
  const Case cases[] = {
      {"magic", 0, {'X'}, "bad magic"},
      {"version", 8, {2}, "checksum"},  // any header byte changed: the checksum notices first
      {"volume size", 16, {1}, "checksum"},
      {"checksum", 40, {0, 0, 0, 0}, "checksum"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.what);
    WriteAt(Path(), 0, good);
    WriteAt(Path(), c.off, c.bytes);
    auto bm = RegionBitmap::Open(Path());
    ASSERT_FALSE(bm.ok());
    EXPECT_EQ(bm.status().code(), EUCLEAN);
    EXPECT_NE(bm.status().message().find(c.message), std::string::npos) << bm.status().message();
    EXPECT_NE(bm.status().message().find(Path()), std::string::npos);
  }
  // Truncated, extended, and a bit past the last of its 64 regions.
  WriteAt(Path(), 0, good);
  ASSERT_EQ(truncate(Path().c_str(), RegionBitmap::kPageSize), 0);
  EXPECT_EQ(RegionBitmap::Open(Path()).status().code(), EUCLEAN);
  ASSERT_EQ(truncate(Path().c_str(), 3 * RegionBitmap::kPageSize), 0);
  EXPECT_EQ(RegionBitmap::Open(Path()).status().code(), EUCLEAN);
  ASSERT_EQ(truncate(Path().c_str(), 2 * RegionBitmap::kPageSize), 0);
  ASSERT_TRUE(RegionBitmap::Open(Path()).ok());
  WriteAt(Path(), RegionBitmap::kPageSize + 8, {1});  // bit 64
  auto bm = RegionBitmap::Open(Path());
  EXPECT_EQ(bm.status().code(), EUCLEAN);
  EXPECT_NE(bm.status().message().find("past the last region"), std::string::npos);
  // Not a bitmap at all.
  std::ofstream(Path("text")) << "hello";
  EXPECT_EQ(RegionBitmap::Open(Path("text")).status().code(), EUCLEAN);
}

// A torn write of a bit page mixes the old content and the new one. Simulate every split point
// at sector granularity and at byte granularity: each mix must keep every bit that was durable
// before the write and is not being cleared.
TEST_F(RegionBitmapTest, TornPageNeverLosesDurableBits) {
  const uint64_t size = 32768 * kMiB;  // exactly one full bit page of 1 MiB regions
  auto bm = RegionBitmap::Create(Path(), size);
  ASSERT_TRUE(bm.ok());
  for (uint64_t r : {0ull, 777ull, 4096ull, 20000ull, 32767ull}) {
    ASSERT_TRUE((*bm)->MarkDurable(r * kMiB, 1).ok());
  }
  const auto before = ReadFile(Path());
  // A copy of region 777 finished (cleared), and new marks everywhere in the page.
  ASSERT_TRUE((*bm)->BeginCopy(777 * kMiB, kMiB).ok());
  ASSERT_TRUE((*bm)->ClearCopied(777 * kMiB, kMiB).ok());
  for (uint64_t r : {1ull, 5000ull, 30000ull}) ASSERT_TRUE((*bm)->MarkDurable(r * kMiB, 1).ok());
  const auto after = ReadFile(Path());
  bm->reset();
  ASSERT_EQ(before.size(), after.size());
  const size_t page = RegionBitmap::kPageSize;
  for (size_t split = 0; split <= page; split += (split < 64 ? 1 : 512)) {
    for (bool new_first : {true, false}) {
      auto torn = before;
      for (size_t i = 0; i < page; ++i) {
        const bool take_new = new_first ? i < split : i >= split;
        torn[page + i] = take_new ? after[page + i] : before[page + i];
      }
      WriteAt(Path(), 0, torn);
      auto reopened = RegionBitmap::Open(Path());
      ASSERT_TRUE(reopened.ok()) << "split " << split << ": " << reopened.status().message();
      for (uint64_t r : {0ull, 4096ull, 20000ull, 32767ull}) {
        EXPECT_TRUE((*reopened)->IsDirty(r * kMiB)) << "split " << split << " region " << r;
      }
    }
  }
}

TEST_F(RegionBitmapTest, ClearCopiedKeepsRegionsMarkedDuringTheCopy) {
  auto bm = RegionBitmap::Create(Path(), 8 * kMiB);
  ASSERT_TRUE(bm.ok());
  RegionBitmap& b = **bm;
  ASSERT_TRUE(b.MarkDurable(0, 4 * kMiB).ok());
  ASSERT_TRUE(b.BeginCopy(0, 4 * kMiB).ok());
  ASSERT_TRUE(b.MarkDurable(2 * kMiB + 5, 1).ok());  // a write lands while the copy runs
  ASSERT_TRUE(b.ClearCopied(0, 4 * kMiB).ok());
  EXPECT_EQ(b.DirtyRanges(), (std::vector<ByteRange>{{2 * kMiB, kMiB}}));
  EXPECT_TRUE(FileBit(Path(), 2));
  EXPECT_FALSE(FileBit(Path(), 0));
  EXPECT_FALSE(FileBit(Path(), 3));
  // Without BeginCopy nothing is cleared (the copy might predate a write), and nothing synced.
  const uint64_t syncs = b.syncs();
  ASSERT_TRUE(b.ClearCopied(2 * kMiB, kMiB).ok());
  EXPECT_TRUE(b.IsDirty(2 * kMiB));
  EXPECT_EQ(b.syncs(), syncs);
  // The next pass clears it.
  ASSERT_TRUE(b.BeginCopy(2 * kMiB, kMiB).ok());
  ASSERT_TRUE(b.ClearCopied(2 * kMiB, kMiB).ok());
  EXPECT_EQ(b.dirty_bytes(), 0u);
  EXPECT_FALSE(FileBit(Path(), 2));
  EXPECT_EQ(b.ClearCopied(kMiB / 2, kMiB).code(), EINVAL);  // not region-aligned
}

TEST_F(RegionBitmapTest, ConcurrentMarkersShareSyncsAndAllBitsLand) {
  auto bm = RegionBitmap::Create(Path(), 4096 * kMiB);
  ASSERT_TRUE(bm.ok());
  RegionBitmap& b = **bm;
  // Slow fdatasync (as a real disk's): callers arriving meanwhile queue behind one leader.
  b.set_before_sync_hook([] { std::this_thread::sleep_for(std::chrono::milliseconds(5)); });
  constexpr int kThreads = 8, kPerThread = 40;
  std::atomic<int> errors{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int k = 0; k < kPerThread; ++k) {
        const uint64_t region = static_cast<uint64_t>(t * kPerThread + k) * 7 % 4096;
        if (!b.MarkDurable(region * kMiB, 1).ok()) ++errors;
        // The promise: it is in the file now, whoever did the I/O.
        if (!FileBit(Path(), region)) ++errors;
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(errors.load(), 0);
  EXPECT_LT(b.syncs(), static_cast<uint64_t>(kThreads * kPerThread));
  EXPECT_EQ(b.dirty_bytes(), static_cast<uint64_t>(kThreads * kPerThread) * kMiB);
}

TEST_F(RegionBitmapTest, MarkDurableAsyncCallsBackOnceDurableAndNotWhenAlreadyDurable) {
  auto bm = RegionBitmap::Create(Path(), 1024 * kMiB);
  ASSERT_TRUE(bm.ok());
  RegionBitmap& b = **bm;
  // Slow fdatasync: marks arrive while one is running and are answered by the next.
  b.set_before_sync_hook([] { std::this_thread::sleep_for(std::chrono::milliseconds(2)); });
  std::mutex mu;
  std::vector<std::pair<uint64_t, Status>> done;
  std::vector<bool> in_file_at_callback;
  constexpr int kMarks = 200;
  int queued = 0;
  for (int k = 0; k < kMarks; ++k) {
    const uint64_t region = static_cast<uint64_t>(k) * 5 % 1024;
    auto r = b.MarkDurableAsync(region * kMiB, 1, [&, region](const Status& s) {
      // On the sync thread: the bit is in the file before we hear of it.
      const bool in_file = FileBit(Path(), region);
      std::lock_guard lk(mu);
      done.emplace_back(region, s);
      in_file_at_callback.push_back(in_file);
    });
    ASSERT_TRUE(r.ok()) << r.status().message();
    if (!*r) ++queued;
  }
  ASSERT_TRUE(test::WaitUntil([&] {
    std::lock_guard lk(mu);
    return done.size() == static_cast<size_t>(queued);
  }));
  std::lock_guard lk(mu);
  for (size_t i = 0; i < done.size(); ++i) {
    EXPECT_TRUE(done[i].second.ok()) << done[i].second.message();
    EXPECT_TRUE(in_file_at_callback[i]) << "region " << done[i].first;
  }
  EXPECT_GT(queued, 0);
  EXPECT_LT(b.syncs(), static_cast<uint64_t>(queued));  // batched
  // Now durable: the same regions answer at once, no callback, no sync.
  const uint64_t syncs = b.syncs();
  auto again = b.MarkDurableAsync(5 * kMiB, 1, [](const Status&) { ADD_FAILURE(); });
  ASSERT_TRUE(again.ok());
  EXPECT_TRUE(*again);
  EXPECT_EQ(b.syncs(), syncs);
  EXPECT_EQ(
      b.MarkDurableAsync(1024 * kMiB, 1, [](const Status&) { ADD_FAILURE(); }).status().code(),
      EINVAL);
}

TEST_F(RegionBitmapTest, DestroyingTheBitmapRunsEveryOwedCallback) {
  std::atomic<int> calls{0};
  {
    auto bm = RegionBitmap::Create(Path(), 64 * kMiB);
    ASSERT_TRUE(bm.ok());
    // Slow fdatasync: callbacks are still owed when the bitmap is destroyed.
    (*bm)->set_before_sync_hook([] { std::this_thread::sleep_for(std::chrono::milliseconds(20)); });
    for (uint64_t r = 0; r < 64; ++r) {
      auto q = (*bm)->MarkDurableAsync(r * kMiB, 1, [&](const Status& s) {
        EXPECT_TRUE(s.ok());
        ++calls;
      });
      ASSERT_TRUE(q.ok());
    }
  }
  EXPECT_EQ(calls.load(), 64);
  auto bm = RegionBitmap::Open(Path());
  ASSERT_TRUE(bm.ok());
  EXPECT_EQ((*bm)->dirty_bytes(), 64 * kMiB);
}

TEST_F(RegionBitmapTest, AnIoErrorFailsTheBitmapForGood) {
  auto bm = RegionBitmap::Create(Path(), 64 * kMiB);
  ASSERT_TRUE(bm.ok());
  RegionBitmap& b = **bm;
  // The file becomes unwritable under the bitmap: swap its fd for a read-only one.
  const int ro = open(Path().c_str(), O_RDONLY);
  ASSERT_GE(ro, 0);
  b.set_before_sync_hook([] {});
  // dup2 over the bitmap's own descriptor is the least invasive way to make pwrite fail.
  const int victim = [&] {
    for (int fd = 3; fd < 1024; ++fd) {
      char link[64], target[4096];
      snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
      const ssize_t n = readlink(link, target, sizeof target - 1);
      if (n > 0 && fd != ro && std::string(target, n) == Path()) return fd;
    }
    return -1;
  }();
  ASSERT_GE(victim, 0);
  ASSERT_EQ(dup2(ro, victim), victim);
  close(ro);
  // The asynchronous caller hears of it through its callback...
  std::promise<Status> heard;
  auto q = b.MarkDurableAsync(kMiB, 1, [&](const Status& st) { heard.set_value(st); });
  ASSERT_TRUE(q.ok());
  EXPECT_FALSE(*q);
  const Status s = heard.get_future().get();
  EXPECT_EQ(s.code(), EBADF) << s.message();
  EXPECT_NE(s.message().find("full rebuild"), std::string::npos);
  // ...and later ones at once, without a callback.
  EXPECT_EQ(b.MarkDurableAsync(2 * kMiB, 1, [](const Status&) { ADD_FAILURE(); }).status().code(),
            EBADF);
  EXPECT_FALSE(b.MarkDurable(kMiB, 1).ok());  // sticky, even though the bit is set in memory
  EXPECT_FALSE(b.MarkDurable(9 * kMiB, 1).ok());
}

}  // namespace
}  // namespace nbdcsi::replica
