// The pool's rules (datapath/pool/rules.h) as tables: each input, the errno it must give and a
// fragment of the message; then that every entry point of the pool applies the same rule with the
// same errno, and that the capacity the pool reports is the capacity it enforces.
#include "datapath/pool/rules.h"

#include <cstdlib>
#include <filesystem>
#include <limits>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "datapath/pool/pool.h"
#include "test/support/pool.h"
#include "test/support/temp_dir.h"

namespace nbdcsi::datapath {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;

constexpr uint64_t kMiB = uint64_t{1} << 20;
constexpr uint64_t kGiB = uint64_t{1} << 30;
constexpr uint64_t kU64Max = std::numeric_limits<uint64_t>::max();

struct Rule {
  std::string what;
  Status got;
  int err;              // 0: the input is valid
  std::string message;  // fragment of the message when err != 0
};

void ExpectRules(const std::vector<Rule>& rules) {
  for (const auto& r : rules) {
    EXPECT_EQ(r.got.code(), r.err) << r.what << ": " << r.got.message();
    if (r.err) {
      EXPECT_THAT(r.got.message(), HasSubstr(r.message)) << r.what;
    }
  }
}

TEST(PoolRules, Sizes) {
  ExpectRules({
      {"4 KiB", ValidateVolumeSize(4096), 0, ""},
      {"1 GiB", ValidateVolumeSize(kGiB), 0, ""},
      {"the largest aligned size", ValidateVolumeSize(kMaxVolumeSize - kMaxVolumeSize % 4096), 0,
       ""},
      {"0", ValidateVolumeSize(0), EINVAL, "size must be greater than 0"},
      {"512", ValidateVolumeSize(512), EINVAL, "size 512 is not a multiple of 4096 bytes"},
      {"GiB + 1", ValidateVolumeSize(kGiB + 1), EINVAL, "not a multiple of 4096"},
      // Too large is EINVAL like every other size rule (an argument no pool state makes valid).
      {"2^63, past off_t", ValidateVolumeSize(kMaxVolumeSize + 1), EINVAL,
       "size 9223372036854775808 is larger than the maximum file size"},
      {"aligned, past off_t", ValidateVolumeSize(kU64Max - 4095), EINVAL,
       "is larger than the maximum file size 9223372036854775807"},
  });
}

TEST(PoolRules, Qos) {
  QosLimits ok;
  ok.max_iops = 1000;
  ok.burst_ms = kMaxBurstMs;
  QosLimits burst;
  burst.burst_ms = kMaxBurstMs + 1;
  QosLimits iops;
  iops.iops_per_gib = kU64Max / 2;
  QosLimits bps;
  bps.bps_per_gib = kU64Max / 3;
  ExpectRules({
      {"limits within range", ValidateQos(ok, kGiB), 0, ""},
      {"burst above the maximum", ValidateQos(burst, kGiB), EINVAL,
       "QoS burst_ms 60001 is above the maximum 60000 ms"},
      {"burst, size unknown", ValidateQos(burst, 0), EINVAL, "burst_ms"},
      // Per-GiB keys resolve against the size rounded up to whole GiB.
      {"iops_per_gib x 1 GiB", ValidateQos(iops, kGiB), 0, ""},
      {"iops_per_gib x 2 GiB", ValidateQos(iops, 2 * kGiB), 0, ""},
      {"iops_per_gib x 3 GiB", ValidateQos(iops, 2 * kGiB + 4096), EINVAL,
       "QoS iops_per_gib 9223372036854775807 times 3 GiB overflows"},
      {"bps_per_gib x 3 GiB", ValidateQos(bps, 3 * kGiB), 0, ""},
      {"bps_per_gib x 4 GiB", ValidateQos(bps, 4 * kGiB), EINVAL,
       "bps_per_gib 6148914691236517205 times 4 GiB overflows"},
      {"size not known yet", ValidateQos(iops, 0), 0, ""},
  });
}

TEST(PoolRules, SnapshotNamesFollowTheVolumeRulesWithTheirOwnWord) {
  ExpectRules({
      {"valid", ValidateSnapshotName("snap-1.a_b"), 0, ""},
      {"empty", ValidateSnapshotName(""), EINVAL, "snapshot name must not be empty"},
      {"slash", ValidateSnapshotName("a/b"), EINVAL, "snapshot name must not contain '/'"},
      {"dot", ValidateSnapshotName(".s"), EINVAL, "snapshot name \".s\" must not start with '.'"},
      {"long", ValidateSnapshotName(std::string(129, 's')), EINVAL,
       "snapshot name is 129 bytes, the limit is 128"},
      {"control byte", ValidateSnapshotName("a\tb"), EINVAL, "invalid byte 0x09"},
  });
}

class PoolEntryPoints : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(tmp_.Create("pool_rules")) << tmp_.error();
    root_ = tmp_.path();
    opts_.dir = root_ + "/pool";
    opts_.capacity_bytes = 100 * kGiB;
    ASSERT_TRUE(test::OpenPool(opts_, &pool_));
  }
  void TearDown() override {
    pool_.reset();
    tmp_.Remove();
  }
  test::TempDir tmp_;
  std::string root_;
  PoolOptions opts_;
  std::unique_ptr<Pool> pool_;
};

// Every way in reports a broken rule with the same errno, names the volume, and leaves nothing.
TEST_F(PoolEntryPoints, EveryEntryPointAppliesTheSameRules) {
  ASSERT_TRUE(pool_->Create("v", kGiB, {}).ok());
  ASSERT_TRUE(pool_->CreateSnapshot("s", "v").ok());
  QosLimits burst;
  burst.burst_ms = kMaxBurstMs + 1;
  QosLimits per_gib;
  per_gib.iops_per_gib = kU64Max / 2;
  const uint64_t too_big = kU64Max - 4095;
  ExpectRules({
      {"create: size 0", pool_->Create("n", 0, {}).status(), EINVAL,
       "volume n: size must be greater than 0"},
      {"create: too large", pool_->Create("n", too_big, {}).status(), EINVAL,
       "volume n: size 18446744073709547520 is larger than the maximum file size"},
      {"create: burst", pool_->Create("n", kGiB, burst).status(), EINVAL, "volume n: QoS burst_ms"},
      {"create: per-GiB", pool_->Create("n", 3 * kGiB, per_gib).status(), EINVAL,
       "volume n: QoS iops_per_gib 9223372036854775807 times 3 GiB overflows"},
      {"restore: misaligned", pool_->Create(CreateSpec::Restore("n", "s", 1000)).status(), EINVAL,
       "volume n: size 1000 is not a multiple of 4096 bytes"},
      {"restore: bad source", pool_->Create(CreateSpec::Restore("n", "../s")).status(), EINVAL,
       "volume n: source snapshot name must not contain '/'"},
      {"clone: bad source", pool_->Create(CreateSpec::Clone("n", "")).status(), EINVAL,
       "volume n: source volume name must not be empty"},
      {"clone: too large", pool_->Create(CreateSpec::Clone("n", "v", too_big)).status(), EINVAL,
       "maximum file size"},
      {"resize: too large", pool_->Resize("v", too_big).status(), EINVAL,
       "volume v: size 18446744073709547520 is larger than the maximum file size"},
      {"resize: misaligned", pool_->Resize("v", kGiB + 1).status(), EINVAL,
       "volume v: size 1073741825 is not a multiple of 4096 bytes"},
      {"qos: burst", pool_->SetQos("v", burst), EINVAL, "volume v: QoS burst_ms 60001"},
      {"snapshot: bad name", pool_->CreateSnapshot("a b", "v").status(), EINVAL,
       "snapshot name contains invalid byte 0x20"},
      {"snapshot: bad source", pool_->CreateSnapshot("t", "-v").status(), EINVAL,
       "snapshot t: source volume name \"-v\" must not start with '-'"},
      {"inspect: bad name", pool_->Inspect("a/b").status(), EINVAL, "volume name must not"},
      {"inspect snapshot", pool_->InspectSnapshot("").status(), EINVAL, "snapshot name must not"},
      {"list filter", pool_->ListSnapshots("..").status(), EINVAL,
       "snapshot filter: volume name \"..\" must not start with '.'"},
      {"delete snapshot", pool_->DeleteSnapshot("x\ny"), EINVAL, "invalid byte 0x0a"},
  });
  EXPECT_EQ(pool_->List().size(), 1u) << "a rejected create left a volume";
  EXPECT_EQ(pool_->Inspect("v")->size, kGiB) << "a rejected resize changed the size";
}

// Per-GiB limits are checked against the size the volume has after the operation: a resize that
// would make them overflow is refused, and so is a patch that sets such a limit.
TEST_F(PoolEntryPoints, PerGibLimitsFollowTheSize) {
  QosLimits q;
  q.iops_per_gib = kU64Max / 2;
  ASSERT_TRUE(pool_->Create("v", 2 * kGiB, q).ok()) << "x 2 GiB still fits 64 bits";
  auto grown = pool_->Resize("v", 3 * kGiB);
  EXPECT_EQ(grown.status().code(), EINVAL);
  EXPECT_THAT(grown.status().message(), HasSubstr("volume v: QoS iops_per_gib"));
  EXPECT_THAT(grown.status().message(), HasSubstr("times 3 GiB overflows"));
  EXPECT_EQ(pool_->Inspect("v")->size, 2 * kGiB);
  EXPECT_EQ(fs::file_size(opts_.dir + "/volumes/v.img"), 2 * kGiB);

  QosPatch patch;
  patch.bps_per_gib = kU64Max;
  auto r = pool_->UpdateQos("v", patch);
  EXPECT_EQ(r.status().code(), EINVAL);
  EXPECT_THAT(r.status().message(), HasSubstr("bps_per_gib"));
  EXPECT_EQ(pool_->Inspect("v")->qos, q) << "a rejected patch changed the limits";
  // Removing the per-GiB key makes the resize possible; the patch keeps the other limits.
  patch = {};
  patch.iops_per_gib = 0;
  patch.max_write_iops = 7;
  auto changed = pool_->UpdateQos("v", patch);
  ASSERT_TRUE(changed.ok()) << changed.status().message();
  EXPECT_EQ(changed->qos.max_write_iops, 7u);
  EXPECT_EQ(changed->qos.iops_per_gib, 0u);
  EXPECT_TRUE(pool_->Resize("v", 3 * kGiB).ok());
}

// What the pool reports as provisionable is exactly what Create still accepts.
TEST_F(PoolEntryPoints, ProvisionableIsWhatCreateAccepts) {
  ASSERT_TRUE(pool_->Create("a", 60 * kGiB, {}).ok());
  const uint64_t room = pool_->Info().provisionable();
  EXPECT_EQ(room, 40 * kGiB);
  EXPECT_EQ(pool_->Create("b", room + 4096, {}).status().code(), ENOSPC);
  EXPECT_TRUE(pool_->Create("b", room, {}).ok());
  EXPECT_EQ(pool_->Info().provisionable(), 0u);
}

TEST(PoolRules, ProvisionableSaturatesAndNeverWraps) {
  struct Case {
    uint64_t capacity;
    double ratio;
    uint64_t provisioned;
    uint64_t want;
  };
  const Case cases[] = {
      {10 * kGiB, 1.0, 0, 10 * kGiB},
      {10 * kGiB, 2.0, 15 * kGiB, 5 * kGiB},
      {10 * kGiB, 1.0, 15 * kGiB, 0},   // overcommitted beyond the ratio (ratio lowered)
      {kU64Max, 4.0, 0, kU64Max},        // the product does not fit 64 bits
      {kU64Max, 1.0, 0, kU64Max},
      {kU64Max, 1.0, kU64Max, 0},
  };
  for (const auto& c : cases) {
    PoolInfo info;
    info.capacity = c.capacity;
    info.overcommit_ratio = c.ratio;
    info.provisioned = c.provisioned;
    EXPECT_EQ(info.provisionable(), c.want)
        << c.capacity << " x " << c.ratio << " - " << c.provisioned;
  }
}

TEST(PoolRules, ProvisionableIsAlsoBoundByFreeSpaceAboveTheReserve) {
  struct Case {
    uint64_t free, reserve;
    double ratio;
    uint64_t want;
  };
  // capacity 100 GiB, 20 GiB provisioned: capacity x ratio leaves 80 GiB (ratio 1), 180 (ratio 2)
  const Case cases[] = {
      {90 * kGiB, 10 * kGiB, 1.0, 80 * kGiB},  // thin volumes barely written: capacity rules
      {50 * kGiB, 10 * kGiB, 1.0, 40 * kGiB},  // other data on the disk: free space rules
      {50 * kGiB, 10 * kGiB, 2.0, 80 * kGiB},  // overcommit scales what free space allows
      {10 * kGiB, 10 * kGiB, 1.0, 0},          // at the reserve
      {5 * kGiB, 10 * kGiB, 4.0, 0},           // under it: nothing, whatever the ratio
  };
  for (const auto& c : cases) {
    PoolInfo info;
    info.capacity = 100 * kGiB;
    info.provisioned = 20 * kGiB;
    info.overcommit_ratio = c.ratio;
    info.free = c.free;
    info.free_reserve = c.reserve;
    info.reserve_applies = true;
    EXPECT_EQ(info.provisionable(), c.want) << c.free << " free, " << c.reserve << " reserve";
    info.reserve_applies = false;  // no reserve set: capacity x ratio alone
    EXPECT_EQ(info.provisionable(), uint64_t(100 * c.ratio - 20) * kGiB);
  }
}

}  // namespace
}  // namespace nbdcsi::datapath
