// Fencing below the engine: the export-name parser (VOLUME, VOLUME@grow, VOLUME@epoch=N) as a
// table, and the pool's fence epoch: its rules, its persistence across a reopen, what snapshots,
// clones and deletes do with it, and its metadata form. Crash safety of the epoch's write is
// pool_crash_test's "fence" scenario; the engine's side (connections stopped, writes in flight)
// is engine_test's "Fence" tests.
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

#include <gtest/gtest.h>

#include "datapath/engine/export_name.h"
#include "datapath/pool/metadata.h"
#include "datapath/pool/pool.h"
#include "test/support/pool.h"
#include "test/support/temp_dir.h"
#include "test/support/wait.h"

namespace nbdcsi::datapath {
namespace {

namespace fs = std::filesystem;
constexpr uint64_t kMiB = 1 << 20;

// ---- export names ----------------------------------------------------------------------------

TEST(ExportNameTest, GoodNames) {
  struct Case {
    const char* in;
    const char* volume;
    bool growable;
    uint64_t epoch;
  };
  for (const Case& c : std::initializer_list<Case>{
           {"v1", "v1", false, 0},
           {"", "", false, 0},  // the default export: no such volume, but not malformed
           {"pvc-1.a_b", "pvc-1.a_b", false, 0},
           {"v1@grow", "v1", true, 0},
           {"v1@epoch=1", "v1", false, 1},
           {"v1@epoch=42", "v1", false, 42},
           {"v1@epoch=1000000000000", "v1", false, 1000000000000},
           {"v1@epoch=9223372036854775807", "v1", false, 9223372036854775807ull},
       }) {
    auto r = ParseExportName(c.in);
    ASSERT_TRUE(r.ok()) << c.in << ": " << r.status().message();
    EXPECT_EQ(r->volume, c.volume) << c.in;
    EXPECT_EQ(r->growable, c.growable) << c.in;
    EXPECT_EQ(r->epoch, c.epoch) << c.in;
  }
}

TEST(ExportNameTest, BadNamesSayWhatIsWrong) {
  struct Case {
    const char* in;
    const char* says;
  };
  for (const Case& c : std::initializer_list<Case>{
           {"v1@epoch=", "is empty"},
           {"v1@epoch=0", "is 0"},
           {"v1@epoch=00", "is 0"},
           {"v1@epoch=07", "leading zero"},
           {"v1@epoch=+7", "not a decimal number"},
           {"v1@epoch=-7", "not a decimal number"},
           {"v1@epoch= 7", "not a decimal number"},
           {"v1@epoch=7 ", "not a decimal number"},
           {"v1@epoch=1e3", "not a decimal number"},
           {"v1@epoch=0x10", "not a decimal number"},
           {"v1@epoch=9223372036854775808", "too large"},
           {"v1@epoch=18446744073709551616", "too large"},
           {"v1@epoch=99999999999999999999999", "too large"},
           {"v1@epoch=4@grow", "cannot be combined"},
           {"v1@grow@epoch=4", "cannot be combined"},
           {"v1@grow@grow", "unknown suffix"},
           {"v1@Epoch=4", "unknown suffix"},
           {"v1@epoch4", "unknown suffix"},
           {"v1@", "unknown suffix"},
           {"@epoch=4", "no volume"},
           {"@grow", "no volume"},
       }) {
    auto r = ParseExportName(c.in);
    ASSERT_FALSE(r.ok()) << c.in << " was accepted";
    EXPECT_EQ(r.status().code(), EINVAL) << c.in;
    EXPECT_NE(r.status().message().find(c.says), std::string::npos)
        << c.in << ": " << r.status().message();
    EXPECT_NE(r.status().message().find(c.in), std::string::npos)
        << "the message names the export: " << r.status().message();
  }
}

// ---- the pool's fence epoch -------------------------------------------------------------------

class PoolFenceTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(tmp_.Create("fence_test")) << tmp_.error();
    opts_ = test::PoolIn(tmp_.path());
    ASSERT_TRUE(test::OpenPool(opts_, &pool_));
  }
  void Reopen() {
    pool_.reset();
    ASSERT_TRUE(test::OpenPool(opts_, &pool_));
  }
  uint64_t Epoch(const std::string& name) {
    auto r = pool_->Inspect(name);
    EXPECT_TRUE(r.ok()) << r.status().message();
    return r.ok() ? r->fence_epoch : ~0ull;
  }
  std::string MetaText(const std::string& name) {
    std::ifstream f(opts_.dir + "/volumes/" + name + ".json");
    std::stringstream ss;
    ss << f.rdbuf();
    return ss.str();
  }

  test::TempDir tmp_;
  PoolOptions opts_;
  std::unique_ptr<Pool> pool_;
};

TEST_F(PoolFenceTest, RulesAndIdempotency) {
  ASSERT_TRUE(pool_->Create("v", kMiB, {}).ok());
  EXPECT_EQ(Epoch("v"), 0u);
  EXPECT_EQ(pool_->Acquire("v")->fence_epoch(), 0u);

  auto r = pool_->FenceVolume("v", 5);
  ASSERT_TRUE(r.ok()) << r.status().message();
  EXPECT_EQ(*r, 5u);
  EXPECT_EQ(Epoch("v"), 5u);
  EXPECT_EQ(pool_->Acquire("v")->fence_epoch(), 5u);

  r = pool_->FenceVolume("v", 5);
  ASSERT_TRUE(r.ok()) << "the same epoch again is a no-op: " << r.status().message();
  EXPECT_EQ(*r, 5u);

  r = pool_->FenceVolume("v", 4);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), ESTALE);
  EXPECT_EQ(r.status().message(), "stale epoch 4, volume v is at 5");
  EXPECT_EQ(Epoch("v"), 5u);

  for (uint64_t bad : {uint64_t{0}, uint64_t{1} << 63, ~uint64_t{0}}) {
    r = pool_->FenceVolume("v", bad);
    ASSERT_FALSE(r.ok()) << bad;
    EXPECT_EQ(r.status().code(), EINVAL) << bad;
    EXPECT_NE(r.status().message().find("epoch"), std::string::npos) << r.status().message();
  }
  r = pool_->FenceVolume("missing", 1);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), ENOENT);
  r = pool_->FenceVolume("../v", 1);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), EINVAL);

  r = pool_->FenceVolume("v", kMaxFenceEpoch);
  ASSERT_TRUE(r.ok()) << r.status().message();
  EXPECT_EQ(Epoch("v"), kMaxFenceEpoch);
}

// The epoch is in the metadata file, survives a reopen (the daemon's restart), and the engine's
// view (Volume::fence_epoch) is loaded with it. Volumes never fenced keep their file as before.
TEST_F(PoolFenceTest, PersistsAcrossReopen) {
  ASSERT_TRUE(pool_->Create("v", kMiB, {}).ok());
  ASSERT_TRUE(pool_->Create("plain", kMiB, {}).ok());
  EXPECT_EQ(MetaText("v").find("fence_epoch"), std::string::npos)
      << "an unfenced volume's metadata is as before fencing existed";
  ASSERT_TRUE(pool_->FenceVolume("v", 4).ok());
  EXPECT_NE(MetaText("v").find("\"fence_epoch\": 4"), std::string::npos) << MetaText("v");
  // Other changes to the volume keep the epoch.
  ASSERT_TRUE(pool_->Resize("v", 2 * kMiB).ok());
  QosLimits q;
  q.max_iops = 100;
  ASSERT_TRUE(pool_->SetQos("v", q).ok());
  EXPECT_EQ(Epoch("v"), 4u);

  Reopen();
  EXPECT_EQ(Epoch("v"), 4u);
  EXPECT_EQ(pool_->Acquire("v")->fence_epoch(), 4u);
  EXPECT_EQ(Epoch("plain"), 0u);
  EXPECT_EQ(pool_->Acquire("plain")->fence_epoch(), 0u);
  auto r = pool_->FenceVolume("v", 3);
  ASSERT_FALSE(r.ok()) << "a restart must not forget the epoch";
  EXPECT_EQ(r.status().code(), ESTALE);
  auto list = pool_->List();
  for (const auto& v : list) EXPECT_EQ(v.fence_epoch, v.name == "v" ? 4u : 0u) << v.name;
}

// A snapshot, a restore and a clone are new volumes: they start at 0. Delete removes the epoch
// with the volume, so a volume created again under the name starts at 0 too.
TEST_F(PoolFenceTest, NotInheritedAndDeletedWithTheVolume) {
  ASSERT_TRUE(pool_->Create("v", kMiB, {}).ok());
  ASSERT_TRUE(pool_->FenceVolume("v", 9).ok());
  // Without reflink (tmpfs) each copy runs in the background: one at a time from a source.
  auto ready = [&](auto inspect) {
    ASSERT_TRUE(test::WaitUntil([&] {
      auto r = inspect();
      return r.ok() && r->ready;
    })) << "copy did not finish";
  };
  ASSERT_TRUE(pool_->CreateSnapshot("s", "v").ok());
  ready([&] { return pool_->InspectSnapshot("s"); });
  auto clone = pool_->Create(CreateSpec::Clone("c", "v"));
  ASSERT_TRUE(clone.ok()) << clone.status().message();
  ready([&] { return pool_->Inspect("c"); });
  auto restore = pool_->Create(CreateSpec::Restore("r", "s"));
  ASSERT_TRUE(restore.ok()) << restore.status().message();
  ready([&] { return pool_->Inspect("r"); });
  EXPECT_EQ(clone->fence_epoch, 0u);
  EXPECT_EQ(restore->fence_epoch, 0u);
  Reopen();
  EXPECT_EQ(Epoch("c"), 0u);
  EXPECT_EQ(Epoch("r"), 0u);
  EXPECT_EQ(Epoch("v"), 9u);

  ASSERT_TRUE(pool_->Delete("v").ok());
  ASSERT_TRUE(pool_->Create("v", kMiB, {}).ok());
  EXPECT_EQ(Epoch("v"), 0u);
  Reopen();
  EXPECT_EQ(Epoch("v"), 0u);
}

// The metadata field: read back as written, absent means 0, and a value the pool would never
// write is refused like any other broken field.
TEST(FenceMetadataTest, RoundTripAndBadValues) {
  VolumeMeta m;
  m.name = "v";
  m.size = kMiB;
  m.fence_epoch = 12;
  auto back = ParseVolumeMetadata(ToJson(m), "v");
  ASSERT_TRUE(back.ok()) << back.status().message();
  EXPECT_EQ(back->fence_epoch, 12u);

  m.fence_epoch = 0;
  const std::string plain = ToJson(m);
  EXPECT_EQ(plain.find("fence_epoch"), std::string::npos);
  back = ParseVolumeMetadata(plain, "v");
  ASSERT_TRUE(back.ok());
  EXPECT_EQ(back->fence_epoch, 0u);

  const std::string base = R"({"version": 1, "name": "v", "size": 1048576, "fence_epoch": )";
  for (const char* bad : {"-1", "\"3\"", "1.5", "9223372036854775808", "true"}) {
    auto r = ParseVolumeMetadata(base + bad + "}", "v");
    ASSERT_FALSE(r.ok()) << bad;
    EXPECT_EQ(r.status().code(), EINVAL);
    EXPECT_NE(r.status().message().find("fence_epoch"), std::string::npos)
        << bad << ": " << r.status().message();
  }
}

}  // namespace
}  // namespace nbdcsi::datapath
