// common/fs_util: errors name the path and step, content round-trips, WriteFileAtomic never
// leaves its temp file behind on failure and crashes at its fault points leave old-or-new.
#include "common/fs_util.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "common/fault.h"
#include "test/support/temp_dir.h"

namespace nbdcsi {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;

class FsUtilTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(tmp_.Create("fs_util_test")) << tmp_.error();
    root_ = tmp_.path();
  }
  void TearDown() override { tmp_.Remove(); }

  static std::string Slurp(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    std::ostringstream ss;
    ss << in.rdbuf();
    return ss.str();
  }
  static void Put(const std::string& path, const std::string& content) {
    std::ofstream(path, std::ios::binary) << content;
  }
  std::vector<std::string> Entries() const {
    std::vector<std::string> out;
    for (const auto& e : fs::directory_iterator(root_)) out.push_back(e.path().filename());
    std::sort(out.begin(), out.end());
    return out;
  }

  test::TempDir tmp_;
  std::string root_;
};

TEST_F(FsUtilTest, FsyncDirSucceedsOnADirectory) { EXPECT_TRUE(FsyncDir(root_).ok()); }

TEST_F(FsUtilTest, FsyncDirNamesTheMissingDirectory) {
  Status s = FsyncDir(root_ + "/nope");
  EXPECT_EQ(s.code(), ENOENT);
  EXPECT_THAT(s.message(), HasSubstr("open directory " + root_ + "/nope for fsync"));
}

TEST_F(FsUtilTest, FsyncDirRefusesARegularFile) {
  Put(root_ + "/f", "x");
  EXPECT_EQ(FsyncDir(root_ + "/f").code(), ENOTDIR);
}

TEST_F(FsUtilTest, MkdirPCreatesEveryLevelAndIsIdempotent) {
  const std::string deep = root_ + "/a/b/c";
  ASSERT_TRUE(MkdirP(deep).ok());
  EXPECT_TRUE(fs::is_directory(deep));
  struct stat st{};
  ASSERT_EQ(stat(deep.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0700u);
  EXPECT_TRUE(MkdirP(deep).ok());
  EXPECT_TRUE(MkdirP(root_).ok());
}

TEST_F(FsUtilTest, MkdirPRejectsEmptyAndFileComponents) {
  EXPECT_EQ(MkdirP("").code(), EINVAL);
  Put(root_ + "/f", "x");
  Status s = MkdirP(root_ + "/f");
  EXPECT_EQ(s.code(), ENOTDIR);
  EXPECT_THAT(s.message(), HasSubstr(root_ + "/f exists and is not a directory"));
  // Below a file: stat of the child fails with ENOTDIR, not a confusing ENOENT from mkdir.
  s = MkdirP(root_ + "/f/g");
  EXPECT_EQ(s.code(), ENOTDIR);
  EXPECT_THAT(s.message(), HasSubstr(root_ + "/f/g"));
}

TEST_F(FsUtilTest, WriteAllWritesEverythingAndNamesThePathOnError) {
  const std::string path = root_ + "/big";
  std::string data(3 * 1024 * 1024 + 17, '\0');
  for (size_t i = 0; i < data.size(); ++i) data[i] = static_cast<char>(i * 31 + 7);
  int fd = open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  ASSERT_GE(fd, 0);
  ASSERT_TRUE(WriteAll(fd, data, path).ok());
  close(fd);
  EXPECT_EQ(Slurp(path), data);

  fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  ASSERT_GE(fd, 0);
  Status s = WriteAll(fd, "x", path);
  close(fd);
  EXPECT_EQ(s.code(), EBADF);
  EXPECT_THAT(s.message(), HasSubstr("write " + path));
}

TEST_F(FsUtilTest, ReadSmallFileReadsUpToTheLimit) {
  const std::string path = root_ + "/m.json";
  std::string data(20000, 'j');
  Put(path, data);
  auto r = ReadSmallFile(path);
  ASSERT_TRUE(r.ok()) << r.status().message();
  EXPECT_EQ(*r, data);
  auto exact = ReadSmallFile(path, data.size());
  ASSERT_TRUE(exact.ok());
  EXPECT_EQ(*exact, data);
  Put(root_ + "/empty", "");
  auto empty = ReadSmallFile(root_ + "/empty");
  ASSERT_TRUE(empty.ok());
  EXPECT_EQ(*empty, "");
}

TEST_F(FsUtilTest, ReadSmallFileErrors) {
  const std::string path = root_ + "/m.json";
  Put(path, std::string(20000, 'j'));
  auto big = ReadSmallFile(path, 19999);
  EXPECT_EQ(big.status().code(), EFBIG);
  EXPECT_THAT(big.status().message(), HasSubstr(path));
  EXPECT_THAT(big.status().message(), HasSubstr("19999"));

  auto missing = ReadSmallFile(root_ + "/nope");
  EXPECT_EQ(missing.status().code(), ENOENT);
  EXPECT_THAT(missing.status().message(), HasSubstr("open " + root_ + "/nope"));

  auto dir = ReadSmallFile(root_);
  EXPECT_EQ(dir.status().code(), EISDIR);
  EXPECT_THAT(dir.status().message(), HasSubstr("read " + root_));
}

TEST_F(FsUtilTest, TempPathIsHiddenWithTmpSuffix) {
  // The pool's open-time orphan sweep (datapath/pool/load.cpp) and the crash tests rely on this
  // exact name.
  EXPECT_EQ(AtomicTempPath("/p/volumes", "v.json"), "/p/volumes/.v.json.tmp");
}

TEST_F(FsUtilTest, WriteFileAtomicCreatesAndReplaces) {
  bool renamed = false;
  ASSERT_TRUE(WriteFileAtomic(root_, "a.json", "first\n", "", "", &renamed).ok());
  EXPECT_TRUE(renamed);
  EXPECT_EQ(Slurp(root_ + "/a.json"), "first\n");
  struct stat st{};
  ASSERT_EQ(stat((root_ + "/a.json").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);

  // A longer old file: the new one must not keep its tail.
  ASSERT_TRUE(WriteFileAtomic(root_, "a.json", std::string(10000, 'o')).ok());
  ASSERT_TRUE(WriteFileAtomic(root_, "a.json", "second").ok());
  EXPECT_EQ(Slurp(root_ + "/a.json"), "second");
  EXPECT_EQ(Entries(), std::vector<std::string>{"a.json"});
}

TEST_F(FsUtilTest, WriteFileAtomicReplacesAStaleTempFile) {
  Put(root_ + "/.a.json.tmp", std::string(5000, 's'));
  ASSERT_TRUE(WriteFileAtomic(root_, "a.json", "new").ok());
  EXPECT_EQ(Slurp(root_ + "/a.json"), "new");
  EXPECT_EQ(Entries(), std::vector<std::string>{"a.json"});
}

TEST_F(FsUtilTest, WriteFileAtomicMissingDirectory) {
  bool renamed = true;
  Status s = WriteFileAtomic(root_ + "/nope", "a.json", "x", "", "", &renamed);
  EXPECT_EQ(s.code(), ENOENT);
  EXPECT_FALSE(renamed);
  EXPECT_THAT(s.message(), HasSubstr("create " + root_ + "/nope/.a.json.tmp"));
}

TEST_F(FsUtilTest, WriteFileAtomicFailedRenameKeepsOldAndRemovesTemp) {
  // The target is a non-empty directory: rename(2) of a file over it fails (EISDIR).
  ASSERT_TRUE(fs::create_directory(root_ + "/a.json"));
  Put(root_ + "/a.json/keep", "old");
  bool renamed = true;
  Status s = WriteFileAtomic(root_, "a.json", "new", "", "", &renamed);
  EXPECT_FALSE(s.ok());
  EXPECT_FALSE(renamed);
  EXPECT_THAT(s.message(), HasSubstr("rename " + root_ + "/.a.json.tmp to " + root_ + "/a.json"));
  EXPECT_EQ(Slurp(root_ + "/a.json/keep"), "old");
  EXPECT_EQ(Entries(), std::vector<std::string>{"a.json"});
}

TEST_F(FsUtilTest, WriteFileAtomicUncreatableTempLeavesTargetAlone) {
  Put(root_ + "/a.json", "old");
  ASSERT_TRUE(fs::create_directory(root_ + "/.a.json.tmp"));
  Status s = WriteFileAtomic(root_, "a.json", "new");
  EXPECT_EQ(s.code(), EISDIR);
  EXPECT_EQ(Slurp(root_ + "/a.json"), "old");
}

// A crash at each fault point leaves the old content (before the rename) or the new one (after),
// never a torn file; the temp file that a crash before the rename leaves is complete.
TEST_F(FsUtilTest, WriteFileAtomicFaultPointsLeaveOldOrNew) {
  struct Case {
    const char* point;
    std::string final_content;
    bool temp_left;
  };
  for (const Case& c : {Case{"create.meta_tmp", "old", true}, Case{"create.meta_renamed", "new", false}}) {
    SCOPED_TRACE(c.point);
    Put(root_ + "/a.json", "old");
    pid_t pid = fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
      setenv("NBDCSI_FAULT", c.point, 1);
      WriteFileAtomic(root_, "a.json", "new", "create.meta_tmp", "create.meta_renamed");
      _exit(0);  // the fault point did not fire
    }
    int status = 0;
    ASSERT_EQ(waitpid(pid, &status, 0), pid);
    ASSERT_TRUE(WIFEXITED(status));
    EXPECT_EQ(WEXITSTATUS(status), kFaultExitCode);
    EXPECT_EQ(Slurp(root_ + "/a.json"), c.final_content);
    EXPECT_EQ(fs::exists(root_ + "/.a.json.tmp"), c.temp_left);
    if (c.temp_left) {
      EXPECT_EQ(Slurp(root_ + "/.a.json.tmp"), "new");
    }
    fs::remove(root_ + "/.a.json.tmp");
  }
}

}  // namespace
}  // namespace nbdcsi
