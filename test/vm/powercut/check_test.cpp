// The power-cut test's per-point check (check.h) on real pools in a temp directory: a consistent
// pool passes, and each kind of loss the VM test exists to catch is reported with the volume and
// block: a stale, missing, future or torn block, a missing or unexpected volume or snapshot, a
// wrong size, a broken volume; leftovers of the one op in flight are tolerated, nothing else.
#include "test/vm/powercut/check.h"

#include <fcntl.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <thread>

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <spdlog/spdlog.h>

#include "datapath/pool/pool.h"
#include "test/vm/powercut/stamp.h"

namespace nbdcsi::powercut {
namespace {

namespace fs = std::filesystem;
using datapath::Pool;
using datapath::PoolOptions;
using ::testing::HasSubstr;

constexpr uint64_t kMiB = 1 << 20;

class CheckTest : public ::testing::Test {
 protected:
  void SetUp() override {
    spdlog::set_level(spdlog::level::warn);  // every check opens the pool: its info lines are noise
    const char* base = std::getenv("TMPDIR");
    std::string tmpl = std::string(base ? base : "/tmp") + "/powercut_check_test.XXXXXX";
    ASSERT_NE(mkdtemp(tmpl.data()), nullptr);
    root_ = tmpl;
    dir_ = root_ + "/pool";
    PoolOptions o;
    o.dir = dir_;
    o.overcommit_ratio = 100;
    auto p = Pool::Open(o);
    ASSERT_TRUE(p.ok()) << p.status().message();
    pool_ = std::move(*p);
    ASSERT_TRUE(pool_->Create("w", 4 * kMiB, {}).ok());
    ASSERT_TRUE(pool_->Create("v1", 8 * kMiB, {}).ok());
    ops_ = "0 issue open\n0 ack\n1 issue create w 4194304\n1 ack\n2 issue create v1 8388608\n2 ack\n";
  }
  void TearDown() override {
    pool_.reset();
    fs::remove_all(root_);
  }

  // One journaled write: SEQ (next), BLOCK, ROUND, stored in w's file unless `store` is false.
  uint64_t Write(uint64_t block, uint64_t round, bool store = true) {
    const uint64_t seq = ++seq_;
    journal_ += fmt::format("{} {} {}\n", seq, block, round);
    if (store) Put("volumes/w.img", block, seq, round);
    return seq;
  }
  void Put(const std::string& file, uint64_t block, uint64_t seq, uint64_t round) {
    uint8_t buf[kBlockSize];
    MakeStamp(buf, block, seq, round);
    PutRaw(file, block, buf);
  }
  void PutRaw(const std::string& file, uint64_t block, const uint8_t* buf) {
    int fd = open((dir_ + "/" + file).c_str(), O_WRONLY);
    ASSERT_GE(fd, 0) << file;
    ASSERT_EQ(pwrite(fd, buf, kBlockSize, static_cast<off_t>(block * kBlockSize)),
              static_cast<ssize_t>(kBlockSize));
    close(fd);
  }
  // A snapshot that is ready (the host's file system may need a background copy).
  void Snapshot(const std::string& name, const std::string& vol) {
    ASSERT_TRUE(pool_->CreateSnapshot(name, vol).ok());
    for (int i = 0; i < 500; ++i) {
      auto s = pool_->InspectSnapshot(name);
      ASSERT_TRUE(s.ok());
      if (s->ready) return;
      std::this_thread::sleep_for(std::chrono::milliseconds(10));  // the poll of a bounded wait
    }
    FAIL() << "snapshot " << name << " never ready";
  }

  PointResult Check(uint64_t round, int64_t op) {
    pool_.reset();  // the check opens the pool itself, as after a crash
    std::ofstream(root_ + "/journal") << journal_;
    std::ofstream(root_ + "/ops") << ops_;
    Journals j;
    Status s = j.Load(root_ + "/journal", root_ + "/ops");
    EXPECT_TRUE(s.ok()) << s.message();
    return CheckPoint(j, dir_, "w", round, op, 100);
  }
  static std::string All(const PointResult& r) {
    std::string out;
    for (const auto& f : r.failures) out += f + "\n";
    return out;
  }

  std::string root_, dir_, journal_, ops_;
  std::unique_ptr<Pool> pool_;
  uint64_t seq_ = 0;
};

TEST_F(CheckTest, ConsistentPoolPassesAndCountsWhatItVerified) {
  Write(3, 1);
  Write(7, 1);
  Write(3, 2);  // block 3 rewritten: the newer stamp is what must be there
  PointResult r = Check(2, 2);
  EXPECT_EQ(r.failure_count, 0) << All(r);
  EXPECT_EQ(r.blocks_verified, 2u);
  EXPECT_EQ(r.ops_verified, 3u);
  EXPECT_THAT(r.summary, HasSubstr("ok; 2 volumes, 0 snapshots"));
}

TEST_F(CheckTest, AnOlderWriteThanTheAcknowledgedOneIsLost) {
  Write(3, 1);
  Write(3, 2, /*store=*/false);  // acknowledged by mark w2, but the disk kept round 1's
  PointResult r = Check(2, 2);
  EXPECT_EQ(r.failure_count, 1);
  EXPECT_THAT(All(r), HasSubstr("volume w block 3: holds seq 1 (round 1), older than the "
                                "acknowledged seq 2 (round 2)"));
  // Before mark w2 the old block is a legal state.
  EXPECT_EQ(Check(1, 2).failure_count, 0);
}

TEST_F(CheckTest, AMissingWriteReadsAsZerosEvenInAHole) {
  Write(900, 1, /*store=*/false);  // far from any data: the file has a hole there
  PointResult r = Check(1, 2);
  EXPECT_THAT(All(r), HasSubstr("volume w block 900: reads zeros, but write seq 1 (round 1) was "
                                "acknowledged"));
  EXPECT_EQ(Check(0, 2).failure_count, 0);
}

TEST_F(CheckTest, AWriteFromAfterThePointCannotBeThere) {
  Write(5, 1);
  Write(6, 3);  // round 3 starts after mark w2: impossible at a point before mark w2
  PointResult r = Check(1, 2);
  EXPECT_THAT(All(r), HasSubstr("volume w block 6: holds seq 2 (round 3), written after this point"));
  EXPECT_EQ(Check(2, 2).failure_count, 0);  // round 3 may be in flight after mark w2
}

TEST_F(CheckTest, TornMisplacedAndUnknownBlocksAreReported) {
  Write(1, 1);
  uint8_t buf[kBlockSize];
  MakeStamp(buf, 1, 1, 1);
  buf[100] ^= 1;
  PutRaw("volumes/w.img", 1, buf);
  PutRaw("volumes/w.img", 2, buf);  // block 1's stamp (torn above) ...
  MakeStamp(buf, 1, 1, 1);
  PutRaw("volumes/w.img", 2, buf);  // ... intact, but at block 2
  Put("volumes/w.img", 4, 9, 1);  // a sequence number the journal never wrote
  const std::string all = All(Check(1, 2));
  EXPECT_THAT(all, HasSubstr("volume w block 1: neither zeros nor an intact stamp"));
  EXPECT_THAT(all, HasSubstr("volume w block 2: holds the stamp of block 1"));
  EXPECT_THAT(all, HasSubstr("volume w block 4: seq 9 round 1 is not a write the journal has"));
}

TEST_F(CheckTest, OpsAcknowledgedMustBeVisibleOnlyTheOneInFlightMayDiffer) {
  ops_ += "3 issue create v2 4194304\n3 ack\n";
  EXPECT_THAT(All(Check(0, 3)), HasSubstr("volume v2 (size 4194304) was acknowledged but is missing"));
  EXPECT_EQ(Check(0, 2).failure_count, 0) << "op 3 in flight: v2 may be absent";

  ops_ += "4 issue delete v1\n4 ack\n";
  EXPECT_THAT(All(Check(0, 4)), HasSubstr("volume v1 exists but was never created or its delete "
                                          "was acknowledged"));
}

TEST_F(CheckTest, ResizeInFlightMayShowEitherSize) {
  ASSERT_TRUE(pool_->Resize("v1", 12 * kMiB).ok());
  ops_ += "3 issue resize v1 12582912\n";
  EXPECT_EQ(Check(0, 2).failure_count, 0);
  ops_ += "3 ack\n";
  EXPECT_EQ(Check(0, 3).failure_count, 0);
  // After mark c1, op 2 (create v1 at 8 MiB) is the one in flight: 12 MiB is not what it made.
  EXPECT_THAT(All(Check(0, 1)), HasSubstr("volume v1 (create in flight) has size 12582912"));
  ops_ += "4 issue resize v1 16777216\n4 ack\n";
  EXPECT_THAT(All(Check(0, 4)), HasSubstr("volume v1 has size 12582912, acknowledged 16777216"));
}

TEST_F(CheckTest, BrokenVolumeIsToleratedOnlyForTheOpInFlight) {
  pool_.reset();
  fs::remove(dir_ + "/volumes/v1.img");  // metadata without data: broken on open
  ops_ += "3 issue delete v1\n";
  PointResult r = Check(0, 2);
  EXPECT_EQ(r.failure_count, 0) << All(r);
  EXPECT_EQ(r.tolerated, 1);
  ops_ += "3 ack\n4 issue create v9 4194304\n4 ack\n";
  r = Check(0, 4);  // the delete was acknowledged long ago: v1 has no excuse left
  EXPECT_THAT(All(r), HasSubstr("broken after recovery: v1"));
}

TEST_F(CheckTest, SnapshotsOfTheWriterHoldTheirPointInTime) {
  Write(2, 1);
  Write(3, 1);
  Snapshot("ws1", "w");
  ops_ += "3 issue snap ws1 w 2\n3 ack 2\n";
  Write(2, 2);  // after the snapshot: only the volume has it
  PointResult r = Check(2, 3);
  EXPECT_EQ(r.failure_count, 0) << All(r);
  EXPECT_EQ(r.blocks_verified, 4u);  // two in w, two in ws1

  // The snapshot taken but a block of it lost.
  std::vector<uint8_t> zeros(kBlockSize, 0);
  PutRaw("snapshots/ws1.img", 3, zeros.data());
  EXPECT_THAT(All(Check(2, 3)), HasSubstr("snapshot ws1 block 3: reads zeros, but write seq 2"));
}

TEST_F(CheckTest, SnapshotStateFollowsTheOps) {
  Snapshot("s1", "v1");
  ops_ += "3 issue snap s1 v1 -\n";
  EXPECT_EQ(Check(0, 2).failure_count, 0) << "in flight: may be there, ready";
  ops_ += "3 ack\n4 issue delsnap s1\n4 ack\n";
  EXPECT_EQ(Check(0, 3).failure_count, 0);
  EXPECT_THAT(All(Check(0, 4)), HasSubstr("snapshot s1 exists but was never taken or its delete"));
  ops_ += "5 issue snap s2 v1 -\n5 ack\n";
  EXPECT_THAT(All(Check(0, 5)), HasSubstr("snapshot s2 of v1 was acknowledged ready but is missing"));
}

TEST_F(CheckTest, PoolNotYetCreatedIsFineUntilItsOpenIsAcknowledged) {
  pool_.reset();
  fs::remove_all(dir_);
  EXPECT_EQ(Check(0, -1).failure_count, 0);
  EXPECT_THAT(All(Check(0, 0)), HasSubstr("is gone although the pool was opened"));
}

TEST(Journals, OutOfOrderOrUnknownLinesAreErrors) {
  const char* base = std::getenv("TMPDIR");
  const std::string dir = base ? base : "/tmp";
  const std::string wj = dir + "/powercut_journal_test.w", oj = dir + "/powercut_journal_test.o";
  std::ofstream(oj) << "0 issue open\n0 ack\n";
  std::ofstream(wj) << "1 5 1\n3 6 1\n";
  Journals a;
  EXPECT_THAT(a.Load(wj, oj).message(), HasSubstr("sequence 3 out of order"));
  std::ofstream(wj) << "1 5 1\n";
  std::ofstream(oj) << "0 issue open\n2 issue create x 1\n";
  Journals b;
  EXPECT_THAT(b.Load(wj, oj).message(), HasSubstr("op 2 issued out of order"));
  std::ofstream(oj) << "0 issue format x\n";
  Journals c;
  EXPECT_THAT(c.Load(wj, oj).message(), HasSubstr("unknown op 'format'"));
  std::ofstream(oj) << "0 issue open\n3 ack\n";
  Journals d;
  EXPECT_THAT(d.Load(wj, oj).message(), HasSubstr("ack of op 3 that was never issued"));
  std::remove(wj.c_str());
  std::remove(oj.c_str());
}

}  // namespace
}  // namespace nbdcsi::powercut
