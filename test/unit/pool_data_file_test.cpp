// Data files damaged or removed behind the pool's back: a data file shorter
// than its metadata is fenced at open and left as it is (never zero-extended),
// and a data file removed while the pool runs is noticed (at once by
// CheckDataFile, the engine's check before a FLUSH or FUA reply; within a
// second by the watcher when nobody asks) and the volume reported broken, not
// served.
#include <fcntl.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <thread>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "datapath/pool/pool.h"
#include "test/support/wait.h"

namespace nbdcsi::datapath {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;
using ::testing::IsEmpty;

constexpr uint64_t kMiB = 1 << 20;

class PoolDataFileTest : public ::testing::Test {
protected:
  void SetUp() override {
    const char *base = std::getenv("TMPDIR");
    std::string tmpl =
        std::string(base ? base : "/tmp") + "/pool_data_file_test.XXXXXX";
    ASSERT_NE(mkdtemp(tmpl.data()), nullptr);
    root_ = tmpl;
    opts_.dir = root_ + "/pool";
  }
  void TearDown() override {
    pool_.reset();
    fs::remove_all(root_);
  }
  void OpenPool() {
    pool_.reset();
    auto p = Pool::Open(opts_);
    ASSERT_TRUE(p.ok()) << p.status().message();
    pool_ = std::move(p.value());
  }
  std::string Img(const std::string &v) const {
    return opts_.dir + "/volumes/" + v + ".img";
  }
  // The reason Info gives for `name`, or "" when it is not listed broken.
  std::string BrokenReason(const std::string &name) {
    for (const auto &b : pool_->Info().broken_volumes)
      if (b.rfind(name + ": ", 0) == 0)
        return b.substr(name.size() + 2);
    return "";
  }

  std::string root_;
  PoolOptions opts_;
  std::unique_ptr<Pool> pool_;
};

TEST_F(PoolDataFileTest, ShortDataFileIsFencedAtOpenAndLeftAsItIs) {
  OpenPool();
  ASSERT_TRUE(pool_->Create("short", 2 * kMiB, {}).ok());
  ASSERT_TRUE(pool_->Create("fine", 2 * kMiB, {}).ok());
  pool_.reset();
  fs::resize_file(Img("short"), kMiB / 2);
  OpenPool();
  const std::string why = BrokenReason("short");
  EXPECT_THAT(why, HasSubstr("524288 bytes, shorter than the 2097152 bytes"));
  EXPECT_EQ(fs::file_size(Img("short")), kMiB / 2)
      << "the short data file was changed";
  EXPECT_EQ(pool_->Acquire("short"), nullptr);
  EXPECT_EQ(pool_->Inspect("short").status().code(), EIO);
  EXPECT_EQ(pool_->Create("short", 2 * kMiB, {}).status().code(), EEXIST);
  EXPECT_NE(pool_->Acquire("fine"), nullptr);
  // Still fenced, still untouched, after another open.
  OpenPool();
  EXPECT_THAT(BrokenReason("short"), HasSubstr("shorter than"));
  EXPECT_EQ(fs::file_size(Img("short")), kMiB / 2);
  ASSERT_TRUE(pool_->Delete("short").ok());
  EXPECT_FALSE(fs::exists(Img("short")));
  EXPECT_EQ(BrokenReason("short"), "");
}

TEST_F(PoolDataFileTest, RemovedDataFileIsSeenByTheEngineCheckAtOnce) {
  OpenPool();
  ASSERT_TRUE(pool_->Create("v", kMiB, {}).ok());
  std::shared_ptr<Volume> v = pool_->Acquire("v");
  ASSERT_NE(v, nullptr);
  EXPECT_TRUE(v->CheckDataFile());
  EXPECT_FALSE(v->data_lost());
  ASSERT_EQ(unlink(Img("v").c_str()), 0);
  EXPECT_FALSE(v->CheckDataFile());
  EXPECT_TRUE(v->data_lost());
  // Reported broken as soon as it is flagged, before the watcher has moved it.
  EXPECT_THAT(BrokenReason("v"),
              HasSubstr("was removed while the volume was in use"));
  EXPECT_EQ(pool_->Acquire("v"), nullptr);
  EXPECT_EQ(pool_->Inspect("v").status().code(), EIO);
}

TEST_F(PoolDataFileTest,
       RemovedDataFileOfAnIdleVolumeIsFencedWithinThreeSeconds) {
  OpenPool();
  ASSERT_TRUE(pool_->Create("lost", kMiB, {}).ok());
  ASSERT_TRUE(pool_->Create("other", kMiB, {}).ok());
  std::shared_ptr<Volume> held =
      pool_->Acquire("lost"); // as a connection would
  ASSERT_NE(held, nullptr);
  ASSERT_EQ(unlink(Img("lost").c_str()), 0);
  const auto deadline =
      std::chrono::steady_clock::now() + std::chrono::seconds(3);
  while (BrokenReason("lost").empty() &&
         std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(50));  // the poll of a bounded wait
  EXPECT_THAT(BrokenReason("lost"),
              HasSubstr("lost.img was removed while the volume was in use"));
  EXPECT_TRUE(held->data_lost());
  // Moved to the broken volumes: not listed as live, not served, its name
  // taken. The watcher moves it in the round that flags it; wait for the move
  // itself (bounded) rather than for a fixed time.
  EXPECT_TRUE(test::WaitUntil([&] { return pool_->Info().volumes == 1; },
                              std::chrono::seconds(3), std::chrono::milliseconds(10)));
  for (const auto &info : pool_->List())
    EXPECT_NE(info.name, "lost");
  EXPECT_EQ(pool_->Info().volumes, 1u);
  EXPECT_EQ(pool_->Acquire("lost"), nullptr);
  EXPECT_EQ(pool_->Inspect("lost").status().code(), EIO);
  EXPECT_EQ(pool_->Create("lost", kMiB, {}).status().code(), EEXIST);
  // The neighbour is untouched.
  std::shared_ptr<Volume> other = pool_->Acquire("other");
  ASSERT_NE(other, nullptr);
  EXPECT_TRUE(other->CheckDataFile());
  // Nothing on disk changed: its metadata stays until an explicit delete, which
  // removes it.
  EXPECT_TRUE(fs::exists(opts_.dir + "/volumes/lost.json"));
  ASSERT_TRUE(pool_->Delete("lost").ok());
  EXPECT_FALSE(fs::exists(opts_.dir + "/volumes/lost.json"));
  EXPECT_THAT(pool_->Info().broken_volumes, IsEmpty());
  ASSERT_TRUE(pool_->Create("lost", kMiB, {}).ok());
}

} // namespace
} // namespace nbdcsi::datapath
