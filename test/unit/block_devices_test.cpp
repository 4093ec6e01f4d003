// The one rule for whole device names and the /dev count built on it (common/block_devices.h),
// shared by the heartbeat, NodeGetInfo and the kernel attach code.
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <optional>
#include <string>

#include <gtest/gtest.h>

#include "common/block_devices.h"
#include "test/support/temp_dir.h"

namespace nbdcsi {
namespace {

TEST(WholeDeviceIndex, DigitsAfterThePrefixAndNothingElse) {
  const struct {
    const char* name;
    std::optional<int> want;
  } cases[] = {
      {"nbd0", 0},       {"nbd12", 12},     {"nbd007", 7},       {"nbd", std::nullopt},
      {"nbd1p1", std::nullopt}, {"nbd-1", std::nullopt},   {"nbd+1", std::nullopt},
      {"nbd 1", std::nullopt},  {"nbdx", std::nullopt},    {"xnbd1", std::nullopt},
      {"nb1", std::nullopt},    {"nbd99999999999", std::nullopt},
  };
  for (const auto& c : cases) EXPECT_EQ(WholeDeviceIndex(c.name, "nbd"), c.want) << c.name;
  EXPECT_EQ(WholeDeviceIndex("loop3", "loop"), 3);
  EXPECT_EQ(WholeDeviceIndex("loop-control", "loop"), std::nullopt);
}

TEST(CountBlockDevices, CountsWholeBlockDevicesOnly) {
  test::TempDir tmp("block_devices");
  ASSERT_TRUE(tmp.ok()) << tmp.error();
  const std::string& dir = tmp.path();
  EXPECT_EQ(CountNbdDevices(dir), 0u);
  std::ofstream(dir + "/nbd0") << "";  // a regular file named like a device
  ASSERT_EQ(mkdir((dir + "/nbd3").c_str(), 0700), 0);
  EXPECT_EQ(CountNbdDevices(dir), 0u);
  // Block device nodes need CAP_MKNOD; without it only the negative half above runs.
  if (mknod((dir + "/nbd1").c_str(), S_IFBLK | 0600, makedev(43, 32)) == 0) {
    ASSERT_EQ(mknod((dir + "/nbd12").c_str(), S_IFBLK | 0600, makedev(43, 384)), 0);
    ASSERT_EQ(mknod((dir + "/nbd1p1").c_str(), S_IFBLK | 0600, makedev(43, 33)), 0);
    ASSERT_EQ(mknod((dir + "/nbdx").c_str(), S_IFBLK | 0600, makedev(43, 64)), 0);
    ASSERT_EQ(mknod((dir + "/loop0").c_str(), S_IFBLK | 0600, makedev(7, 0)), 0);
    ASSERT_EQ(symlink("nbd12", (dir + "/nbd20").c_str()), 0);  // followed, like udev's links
    EXPECT_EQ(CountNbdDevices(dir), 3u);
    EXPECT_EQ(CountBlockDevices(dir, "loop"), 1u);
  }
  EXPECT_EQ(CountNbdDevices(dir + "/missing"), 0u);
}

TEST(CountBlockDevices, MatchesThisHostsDev) {
  unsigned want = 0;
  for (int i = 0; i < 4096; ++i) {
    struct stat st{};
    std::string p = "/dev/loop" + std::to_string(i);
    if (stat(p.c_str(), &st) == 0 && S_ISBLK(st.st_mode)) ++want;
  }
  EXPECT_EQ(CountBlockDevices("/dev", "loop"), want);
}

}  // namespace
}  // namespace nbdcsi
