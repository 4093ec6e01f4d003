// The real NodeOs on image files and temp dirs: libblkid probing (blank, file systems, partition
// tables, swap), mkfs through the real tools with their errors surfaced, the mount table, and
// (as root) mounts with options, read-only binds and unmounts; the kubelet-root check on real
// symlinks (openat2 RESOLVE_BENEATH).
#include <fcntl.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "node/os.h"
#include "test/support/temp_dir.h"

namespace nbdcsi::node {
namespace {

using ::testing::HasSubstr;

class LinuxOsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(tmp_.Create("nbdcsi-node-os")) << tmp_.error();
    dir_ = tmp_.path();
    os_ = MakeLinuxOs();
  }
  void TearDown() override {
    for (const auto& m : mounted_) umount2(m.c_str(), MNT_DETACH);
    std::string cmd = "rm -rf '" + dir_ + "'";
    ASSERT_EQ(system(cmd.c_str()), 0);
  }

  // A sparse image of `size` bytes.
  std::string Image(const std::string& name, off_t size) {
    std::string p = dir_ + "/" + name;
    int fd = open(p.c_str(), O_RDWR | O_CREAT | O_TRUNC, 0600);
    EXPECT_GE(fd, 0);
    EXPECT_EQ(ftruncate(fd, size), 0);
    close(fd);
    return p;
  }

  static bool Have(const char* tool) {
    std::string cmd = std::string("command -v ") + tool + " >/dev/null 2>&1 || test -x /usr/sbin/" +
                      tool + " || test -x /sbin/" + tool;
    return system(cmd.c_str()) == 0;
  }

  test::TempDir tmp_;
  std::string dir_;
  std::unique_ptr<NodeOs> os_;
  std::vector<std::string> mounted_;
};

TEST_F(LinuxOsTest, ProbeBlankAndFormatted) {
  std::string img = Image("ext4.img", 64 << 20);
  auto c = os_->Probe(img);
  ASSERT_TRUE(c.ok()) << c.status().message();
  EXPECT_EQ(c->kind, DeviceContent::Kind::kBlank);
  EXPECT_EQ(c->type, "");

  ASSERT_TRUE(os_->MakeFs(img, "ext4").ok());
  c = os_->Probe(img);
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(c->kind, DeviceContent::Kind::kFilesystem);
  EXPECT_EQ(c->type, "ext4");

  if (!Have("mkfs.xfs")) GTEST_SKIP() << "no mkfs.xfs";
  std::string xfs = Image("xfs.img", 320 << 20);  // mkfs.xfs's minimum size is 300 MiB
  Status s = os_->MakeFs(xfs, "xfs");
  ASSERT_TRUE(s.ok()) << s.message();
  c = os_->Probe(xfs);
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(c->kind, DeviceContent::Kind::kFilesystem);
  EXPECT_EQ(c->type, "xfs");
}

TEST_F(LinuxOsTest, ProbeSeesPartitionTableAsNotBlank) {
  std::string img = Image("mbr.img", 16 << 20);
  // An MBR with one Linux partition at sector 2048, 8 MiB long.
  unsigned char mbr[512] = {};
  unsigned char* e = mbr + 446;
  e[4] = 0x83;
  uint32_t start = 2048, sectors = 16384;
  memcpy(e + 8, &start, 4);
  memcpy(e + 12, &sectors, 4);
  mbr[510] = 0x55;
  mbr[511] = 0xaa;
  int fd = open(img.c_str(), O_WRONLY);
  ASSERT_EQ(pwrite(fd, mbr, sizeof mbr, 0), ssize_t(sizeof mbr));
  close(fd);
  auto c = os_->Probe(img);
  ASSERT_TRUE(c.ok()) << c.status().message();
  EXPECT_EQ(c->kind, DeviceContent::Kind::kOther);
  EXPECT_EQ(c->type, "dos");
}

TEST_F(LinuxOsTest, ProbeSeesSwapAsNotBlank) {
  if (!Have("mkswap")) GTEST_SKIP() << "no mkswap";
  std::string img = Image("swap.img", 16 << 20);
  ASSERT_EQ(system(("mkswap '" + img + "' >/dev/null 2>&1").c_str()), 0);
  auto c = os_->Probe(img);
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(c->kind, DeviceContent::Kind::kOther);
  EXPECT_EQ(c->type, "swap");
}

TEST_F(LinuxOsTest, ProbeMissingDevice) {
  auto c = os_->Probe(dir_ + "/nope");
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), ENOENT);
  EXPECT_THAT(c.status().message(), HasSubstr("nope"));
}

TEST_F(LinuxOsTest, MakeFsErrorsCarryTheToolsOutput) {
  EXPECT_EQ(os_->MakeFs(dir_ + "/x", "btrfs").code(), ENOTSUP);
  // mkfs.ext4 on a path that does not exist fails; its message is in the error.
  Status s = os_->MakeFs(dir_ + "/missing.img", "ext4");
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.code(), EIO);
  EXPECT_THAT(s.message(), HasSubstr("mkfs.ext4"));
  EXPECT_THAT(s.message(), HasSubstr("exit status"));
  EXPECT_THAT(s.message(), HasSubstr("missing.img"));
  if (!Have("mkfs.xfs")) return;
  // mkfs.xfs runs without -f: it refuses to overwrite an existing file system.
  std::string img = Image("taken.img", 320 << 20);
  ASSERT_TRUE(os_->MakeFs(img, "ext4").ok());
  s = os_->MakeFs(img, "xfs");
  ASSERT_FALSE(s.ok());
  EXPECT_THAT(s.message(), HasSubstr("mkfs.xfs"));
  EXPECT_EQ(os_->Probe(img)->type, "ext4");  // untouched
}

TEST_F(LinuxOsTest, GrowFsErrors) {
  EXPECT_EQ(os_->GrowFs("/dev/x", "/mnt", "vfat").code(), ENOTSUP);
  // resize2fs on an image that is not a file system: the tool's own complaint comes back.
  std::string img = Image("junk.img", 8 << 20);
  Status s = os_->GrowFs(img, "/mnt", "ext4");
  ASSERT_FALSE(s.ok());
  EXPECT_THAT(s.message(), HasSubstr("resize2fs"));
}

TEST_F(LinuxOsTest, DeviceSizeNeedsABlockDevice) {
  std::string img = Image("f.img", 1 << 20);
  auto size = os_->DeviceSize(img);
  ASSERT_FALSE(size.ok());
  EXPECT_THAT(size.status().message(), HasSubstr("BLKGETSIZE64"));
  EXPECT_EQ(os_->DeviceSize(dir_ + "/nope").status().code(), ENOENT);
}

TEST_F(LinuxOsTest, StatKinds) {
  std::string f = Image("f", 0);
  EXPECT_EQ(os_->Stat(dir_)->kind, PathKind::kDirectory);
  EXPECT_EQ(os_->Stat(f)->kind, PathKind::kFile);
  EXPECT_EQ(os_->Stat(dir_ + "/nope")->kind, PathKind::kMissing);
  EXPECT_EQ(os_->Stat("/dev/null")->kind, PathKind::kOther);
  struct stat st {};
  if (stat("/dev/loop0", &st) == 0 && S_ISBLK(st.st_mode)) {
    auto info = os_->Stat("/dev/loop0");
    EXPECT_EQ(info->kind, PathKind::kBlockDevice);
    EXPECT_EQ(info->rdev, st.st_rdev);
  }
}

TEST_F(LinuxOsTest, MakeAndRemovePaths) {
  std::string d = dir_ + "/a/b/c";
  ASSERT_TRUE(os_->MakeDir(d).ok());
  ASSERT_TRUE(os_->MakeDir(d).ok());  // exists: fine
  EXPECT_EQ(os_->Stat(d)->kind, PathKind::kDirectory);
  std::string f = dir_ + "/x/y/dev";
  ASSERT_TRUE(os_->MakeFile(f).ok());
  ASSERT_TRUE(os_->MakeFile(f).ok());
  EXPECT_EQ(os_->Stat(f)->kind, PathKind::kFile);
  EXPECT_EQ(os_->MakeDir(f).code(), ENOTDIR);
  EXPECT_FALSE(os_->MakeFile(d).ok());  // a directory is not a file
  EXPECT_EQ(os_->MakeDir("relative").code(), EINVAL);

  EXPECT_FALSE(os_->RemovePath(dir_ + "/a/b").ok());  // not empty: never removed recursively
  ASSERT_TRUE(os_->RemovePath(d).ok());
  ASSERT_TRUE(os_->RemovePath(d).ok());  // gone: fine
  ASSERT_TRUE(os_->RemovePath(f).ok());
  EXPECT_EQ(os_->Stat(f)->kind, PathKind::kMissing);
}

TEST_F(LinuxOsTest, MountTableLookup) {
  auto m = os_->GetMount("/proc");
  ASSERT_TRUE(m.ok()) << m.status().message();
  ASSERT_TRUE(m->has_value());
  EXPECT_EQ((*m)->fstype, "proc");
  EXPECT_EQ((*m)->target, "/proc");
  auto none = os_->GetMount(dir_);
  ASSERT_TRUE(none.ok());
  EXPECT_FALSE(none->has_value());
  EXPECT_FALSE(os_->GetMount(dir_ + "/nope")->has_value());
}

TEST_F(LinuxOsTest, MountOptionsBindReadOnlyAndUnmount) {
  if (geteuid() != 0) GTEST_SKIP() << "mounting needs root";
  std::string a = dir_ + "/a", b = dir_ + "/b";
  ASSERT_TRUE(os_->MakeDir(a).ok());
  ASSERT_TRUE(os_->MakeDir(b).ok());
  Status s = os_->Mount("nbdcsi-test", a, "tmpfs", {"size=1m", "noexec"});
  if (!s.ok() && s.code() == EPERM) GTEST_SKIP() << "no mount permission here: " << s.message();
  ASSERT_TRUE(s.ok()) << s.message();
  mounted_.push_back(a);
  auto m = os_->GetMount(a);
  ASSERT_TRUE(m.ok() && m->has_value());
  EXPECT_EQ((*m)->fstype, "tmpfs");
  EXPECT_EQ((*m)->source, "nbdcsi-test");
  EXPECT_TRUE(HasMountOption((*m)->vfs_options, "noexec"));
  EXPECT_FALSE((*m)->vfs_read_only);

  // A read-only bind in one call: the bind is read-only, the file system under it is not.
  ASSERT_TRUE(os_->Mount(a, b, "", {"bind", "ro"}).ok());
  mounted_.push_back(b);
  auto mb = os_->GetMount(b);
  ASSERT_TRUE(mb.ok() && mb->has_value());
  EXPECT_TRUE((*mb)->vfs_read_only);
  EXPECT_FALSE((*mb)->super_read_only);
  EXPECT_EQ(open((b + "/file").c_str(), O_WRONLY | O_CREAT, 0600), -1);
  EXPECT_EQ(errno, EROFS);

  ASSERT_TRUE(os_->Unmount(b).ok());
  ASSERT_TRUE(os_->Unmount(a).ok());
  mounted_.clear();
  EXPECT_FALSE(os_->GetMount(a)->has_value());
  EXPECT_EQ(os_->Unmount(a).code(), EINVAL);  // nothing mounted there now

  // A mount that fails says what and why.
  s = os_->Mount(dir_ + "/nope.img", a, "ext4", {});
  ASSERT_FALSE(s.ok());
  EXPECT_THAT(s.message(), HasSubstr("nope.img"));
}

// A root with every kind of symlink a hostile or confused setup could leave in kubelet's tree.
TEST_F(LinuxOsTest, CheckBeneathFollowsSymlinksWithoutLeavingTheRoot) {
  namespace fs = std::filesystem;
  const std::string root = dir_ + "/kubelet", outside = dir_ + "/outside";
  fs::create_directories(root + "/pods/uid/volumes");
  fs::create_directories(root + "/plugins/real");
  fs::create_directories(outside + "/etc");
  fs::create_directory_symlink(outside, root + "/pods/abs-out");              // absolute, out
  fs::create_directory_symlink("../../../outside", root + "/pods/rel-out");   // relative, out
  fs::create_directory_symlink("/", root + "/pods/slash");                    // to /
  fs::create_directory_symlink("../plugins/real", root + "/pods/rel-in");     // relative, in
  fs::create_directory_symlink(root + "/plugins/real", root + "/pods/abs-in"); // absolute, in
  fs::create_symlink(outside + "/etc/x", root + "/pods/uid/volumes/leaf-out");  // dangling, out

  // Parts that do not exist yet are fine: only what exists can lead out.
  for (const std::string& ok : std::vector<std::string>{
           root + "/pods/uid/volumes/kubernetes.io~csi/p/mount", root + "/pods/uid",
           root + "/pods/rel-in/sub/mount", root + "/plugins/real"}) {
    Status s = os_->CheckBeneath(root, ok);
    EXPECT_TRUE(s.ok()) << ok << ": " << s.message();
  }
  for (const std::string& bad : std::vector<std::string>{
           root + "/pods/abs-out/mount", root + "/pods/rel-out/etc/mount", root + "/pods/slash/etc",
           root + "/pods/slash", root + "/pods/uid/volumes/leaf-out",
           // Absolute symlinks are refused even when they point back inside: RESOLVE_BENEATH
           // cannot tell, and kubelet never makes them.
           root + "/pods/abs-in/mount"}) {
    Status s = os_->CheckBeneath(root, bad);
    EXPECT_EQ(s.code(), EINVAL) << bad << ": " << s.message();
    EXPECT_THAT(s.message(), HasSubstr("leaves " + root)) << bad;
  }
  EXPECT_EQ(os_->CheckBeneath(dir_ + "/missing-root", root + "/x").code(), ENOENT);
}

TEST(MountOptionTest, HasMountOption) {
  EXPECT_TRUE(HasMountOption("rw,ro", "ro"));
  EXPECT_TRUE(HasMountOption("ro", "ro"));
  EXPECT_TRUE(HasMountOption("a,ro,b", "ro"));
  EXPECT_FALSE(HasMountOption("rw,errors=remount-ro", "ro"));
  EXPECT_FALSE(HasMountOption("rootcontext=x", "ro"));
  EXPECT_FALSE(HasMountOption("", "ro"));
}

TEST(CountDevicesTest, CountsOnlyNumberedNodes) {
  auto os = MakeLinuxOs();
  EXPECT_EQ(os->CountDevices("no-such-device-prefix"), 0u);
  // /dev/loop-control must not count as a loop device.
  unsigned loops = os->CountDevices("loop");
  unsigned want = 0;
  for (int i = 0; i < 4096; ++i) {
    struct stat st {};
    if (stat(("/dev/loop" + std::to_string(i)).c_str(), &st) == 0) ++want;
  }
  EXPECT_EQ(loops, want);
}

}  // namespace
}  // namespace nbdcsi::node
