// Full disk: the pool lives on a small tmpfs that a filler file has filled up. Every metadata
// write then fails with ENOSPC; the operation must report ENOSPC, roll back, and leave a pool
// that reopens with exactly the old state. Needs mount(2) (root or CAP_SYS_ADMIN): skipped
// otherwise.
#include <fcntl.h>
#include <sys/mount.h>
#include <unistd.h>

#include <filesystem>
#include <set>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "datapath/pool/pool.h"

namespace nbdcsi::datapath {
namespace {

namespace fs = std::filesystem;
constexpr uint64_t kMiB = 1 << 20;
constexpr uint64_t kGiB = uint64_t{1} << 30;

class PoolFullDiskTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string tmpl = "/tmp/pool_full.XXXXXX";
    ASSERT_NE(mkdtemp(tmpl.data()), nullptr);
    mnt_ = tmpl;
    if (mount("tmpfs", mnt_.c_str(), "tmpfs", MS_NOSUID | MS_NODEV, "size=4m,mode=0700") != 0) {
      int err = errno;
      fs::remove(mnt_);
      mnt_.clear();
      GTEST_SKIP() << "cannot mount a tmpfs (" << std::strerror(err) << "); needs CAP_SYS_ADMIN";
    }
    opts_.dir = mnt_ + "/pool";
    // Thin volumes far larger than the disk: the capacity override keeps the provisioning
    // check out of the way so that the real ENOSPC comes from the file system.
    opts_.capacity_bytes = 1024 * kGiB;
  }
  void TearDown() override {
    pool_.reset();
    if (!mnt_.empty()) {
      umount2(mnt_.c_str(), MNT_DETACH);
      fs::remove(mnt_);
    }
  }

  void Fill() {
    int fd = open((mnt_ + "/filler").c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    ASSERT_GE(fd, 0);
    std::string chunk(64 * 1024, 'f');
    for (;;) {
      ssize_t n = write(fd, chunk.data(), chunk.size());
      if (n < 0) {
        ASSERT_EQ(errno, ENOSPC);
        break;
      }
    }
    // Squeeze out any partial page left at the end.
    char c = 'f';
    while (write(fd, &c, 1) == 1) {
    }
    close(fd);
  }

  std::set<std::string> Files() {
    std::set<std::string> out;
    for (const auto& e : fs::directory_iterator(opts_.dir + "/volumes")) out.insert(e.path().filename());
    return out;
  }

  std::string mnt_;
  PoolOptions opts_;
  std::unique_ptr<Pool> pool_;
};

TEST_F(PoolFullDiskTest, OperationsFailWithENOSPCAndLoseNothing) {
  auto p = Pool::Open(opts_);
  ASSERT_TRUE(p.ok()) << p.status().message();
  pool_ = std::move(p.value());
  ASSERT_TRUE(pool_->Create("old", 64 * kMiB, {}).ok());
  EXPECT_EQ(pool_->Info().fs_type, "tmpfs");
  ASSERT_NO_FATAL_FAILURE(Fill());

  auto c = pool_->Create("new", 64 * kMiB, {});
  EXPECT_EQ(c.status().code(), ENOSPC) << c.status().message();
  EXPECT_EQ(pool_->Acquire("new"), nullptr);

  auto r = pool_->Resize("old", 128 * kMiB);
  EXPECT_EQ(r.status().code(), ENOSPC) << r.status().message();
  EXPECT_EQ(pool_->Inspect("old")->size, 64 * kMiB);
  EXPECT_EQ(pool_->Acquire("old")->size(), 64 * kMiB);
  EXPECT_EQ(fs::file_size(opts_.dir + "/volumes/old.img"), 64 * kMiB);

  QosLimits qos;
  qos.max_iops = 10;
  Status q = pool_->SetQos("old", qos);
  EXPECT_EQ(q.code(), ENOSPC) << q.message();
  EXPECT_TRUE(pool_->Acquire("old")->throttle().unlimited());

  EXPECT_EQ(Files(), (std::set<std::string>{"old.img", "old.json"}));

  // Reopen while still full: same state, nothing to clean up.
  pool_.reset();
  p = Pool::Open(opts_);
  ASSERT_TRUE(p.ok()) << p.status().message();
  pool_ = std::move(p.value());
  EXPECT_EQ(pool_->Names(), std::vector<std::string>{"old"});
  EXPECT_EQ(pool_->Inspect("old")->size, 64 * kMiB);
  EXPECT_EQ(pool_->Inspect("old")->qos, QosLimits{});
  EXPECT_TRUE(pool_->Info().cleaned_orphans.empty());
  EXPECT_TRUE(pool_->Info().broken_volumes.empty());

  // Once space is back, the same requests succeed.
  fs::remove(mnt_ + "/filler");
  EXPECT_TRUE(pool_->Create("new", 64 * kMiB, {}).ok());
  EXPECT_TRUE(pool_->Resize("old", 128 * kMiB).ok());
  EXPECT_TRUE(pool_->SetQos("old", qos).ok());
  EXPECT_TRUE(pool_->Delete("new").ok());
}

// The free-space reserve: a pool whose capacity x overcommit allows far more (thin volumes)
// stops provisioning when its file system's real free space falls under the reserve, reports 0
// provisionable then, and takes volumes again once space is freed.
TEST_F(PoolFullDiskTest, ReserveRefusesProvisioningWhenTheDiskIsNearlyFull) {
  opts_.overcommit_ratio = 2;
  opts_.free_reserve_ratio = 0.25;  // 1 MiB of the 4 MiB tmpfs
  auto p = Pool::Open(opts_);
  ASSERT_TRUE(p.ok()) << p.status().message();
  pool_ = std::move(p.value());
  PoolInfo info = pool_->Info();
  ASSERT_TRUE(info.reserve_applies);
  EXPECT_EQ(info.free_reserve, 1 * kMiB);
  // Limited by the free space, not by capacity x overcommit (2 TiB): (free - reserve) x 2.
  EXPECT_EQ(info.provisionable(), (info.free - info.free_reserve) * 2);
  const uint64_t room = info.provisionable() / (64 * 1024) * (64 * 1024);
  auto big = pool_->Create("too-big", room + 1024 * kMiB, {});
  ASSERT_FALSE(big.ok());
  EXPECT_EQ(big.status().code(), ENOSPC);
  EXPECT_THAT(big.status().message(), ::testing::HasSubstr("in reserve"));
  ASSERT_TRUE(pool_->Create("fits", 64 * 1024, {}).ok());

  // Other data fills the disk past the reserve: nothing more, and 0 to report.
  int fd = open((mnt_ + "/other").c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(posix_fallocate(fd, 0, pool_->Info().free - 512 * 1024), 0);
  close(fd);
  info = pool_->Info();
  EXPECT_LT(info.free, info.free_reserve);
  EXPECT_EQ(info.provisionable(), 0u);
  auto c = pool_->Create("refused", 64 * 1024, {});
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), ENOSPC);
  EXPECT_THAT(c.status().message(), ::testing::HasSubstr("free space or delete volumes"));
  EXPECT_EQ(pool_->Resize("fits", 128 * 1024).status().code(), ENOSPC);
  // The volume already there keeps working: the reserve limits provisioning, not I/O.
  EXPECT_TRUE(pool_->Inspect("fits").ok());

  fs::remove(mnt_ + "/other");
  EXPECT_GT(pool_->Info().provisionable(), 0u);
  EXPECT_TRUE(pool_->Create("after", 64 * 1024, {}).ok());
}

}  // namespace
}  // namespace nbdcsi::datapath
