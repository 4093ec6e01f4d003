// BackupJobs' copies from a peer (restores and clones across nodes, issue 16), in-process: a
// source pool served by the real NBD engine on a Unix socket (plaintext: the TLS side is the
// replica client's, covered by integration.xnode_restore), a destination pool with BackupJobs.
// A sparse volume copied into a larger new volume (same bytes, holes not written, marker gone,
// progress counted), and the refusals that come back from the call with nothing created.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <random>

#include "datapath/backup/jobs.h"
#include "datapath/engine/frontend.h"
#include "test/support/pool.h"
#include "test/support/temp_dir.h"
#include "test/support/wait.h"

namespace nbdcsi::datapath::backup {
namespace {

constexpr uint64_t kMiB = 1 << 20;

std::string ReadAll(const std::string& path) {
  std::string out;
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return out;
  char buf[1 << 16];
  for (ssize_t n; (n = ::read(fd, buf, sizeof buf)) > 0;) out.append(buf, static_cast<size_t>(n));
  ::close(fd);
  return out;
}

class PeerCopyTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(tmp_.Create("peer_copy")) << tmp_.error();
    ASSERT_TRUE(test::OpenPool(test::PoolIn(tmp_.path() + "/src"), &src_));
    ASSERT_TRUE(test::OpenPool(test::PoolIn(tmp_.path() + "/dst"), &dst_));
    frontend_ = std::make_unique<NbdFrontend>(*src_, FrontendOptions{2, 30});
    sock_ = tmp_.path() + "/nbd.sock";
    Endpoint ep;
    ep.kind = Endpoint::Kind::kUnix;
    ep.path = sock_;
    ASSERT_TRUE(frontend_->Listen(ep).ok());
    ASSERT_TRUE(frontend_->Start().ok());
    jobs_ = std::make_unique<BackupJobs>(*dst_);
  }
  void TearDown() override {
    jobs_.reset();
    frontend_.reset();
    src_.reset();
    dst_.reset();
  }

  // Random bytes at `off` of the source volume's data file, made durable before it is served.
  std::string Fill(const std::string& volume, uint64_t off, size_t len) {
    std::string data(len, '\0');
    std::mt19937_64 rng(off + len);
    for (auto& c : data) c = static_cast<char>(rng());
    auto info = src_->Inspect(volume);
    EXPECT_TRUE(info.ok());
    int fd = ::open(info->path.c_str(), O_WRONLY | O_CLOEXEC);
    EXPECT_GE(fd, 0);
    EXPECT_EQ(::pwrite(fd, data.data(), len, static_cast<off_t>(off)), static_cast<ssize_t>(len));
    EXPECT_EQ(::fsync(fd), 0);
    ::close(fd);
    return data;
  }
  CopyRequest Request(const std::string& volume, uint64_t size, const std::string& from) {
    return {volume, size, "unix://" + sock_, from, ""};
  }
  JobInfo WaitDone(const std::string& id) {
    JobInfo j;
    EXPECT_TRUE(test::WaitUntil([&] {
      auto g = jobs_->Get(id);
      if (g.ok()) j = *g;
      return g.ok() && g->state != "running";
    }));
    return j;
  }

  test::TempDir tmp_;
  std::string sock_;
  std::unique_ptr<Pool> src_, dst_;
  std::unique_ptr<NbdFrontend> frontend_;
  std::unique_ptr<BackupJobs> jobs_;
};

TEST_F(PeerCopyTest, ASparseVolumeIsCopiedIntoALargerNewVolumeHolesStayHoles) {
  ASSERT_TRUE(src_->Create("xfer-pvc", 64 * kMiB, {}, false).ok());
  std::string a = Fill("xfer-pvc", 4 * kMiB, 3 * kMiB);
  std::string b = Fill("xfer-pvc", 63 * kMiB, kMiB);
  auto started = jobs_->StartCopy(Request("pvc", 96 * kMiB, "xfer-pvc"));
  ASSERT_TRUE(started.ok()) << started.status().message();
  EXPECT_EQ(started->kind, "copy");
  EXPECT_EQ(started->volume, "pvc");
  EXPECT_EQ(started->backup, "xfer-pvc");
  JobInfo j = WaitDone(started->id);
  ASSERT_EQ(j.state, "succeeded") << j.error;
  EXPECT_EQ(j.total_bytes, 64 * kMiB);
  EXPECT_EQ(j.done_bytes, 64 * kMiB);
  EXPECT_EQ(j.transferred_bytes, 4 * kMiB);  // the data, not the holes

  auto info = dst_->Inspect("pvc");
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->size, 96 * kMiB);
  std::string want(96 * kMiB, '\0');
  want.replace(4 * kMiB, a.size(), a);
  want.replace(63 * kMiB, b.size(), b);
  EXPECT_TRUE(ReadAll(info->path) == want) << "the copy differs from its source";
  struct stat st {};
  ASSERT_EQ(::stat(info->path.c_str(), &st), 0);
  EXPECT_LE(static_cast<uint64_t>(st.st_blocks) * 512, 8 * kMiB) << "holes were written";
  std::string markers = dst_->Info().dir + "/backup-restores/pvc";
  EXPECT_NE(::access(markers.c_str(), F_OK), 0) << "the copy's marker stays";
  // A finished copy's volume exists: another copy into it is refused.
  auto again = jobs_->StartCopy(Request("pvc", 96 * kMiB, "xfer-pvc"));
  EXPECT_EQ(again.status().code(), EEXIST);
}

TEST_F(PeerCopyTest, RefusalsComeBackFromTheCallAndCreateNothing) {
  ASSERT_TRUE(src_->Create("xfer-pvc", 8 * kMiB, {}, false).ok());
  // No such export on the peer.
  EXPECT_EQ(jobs_->StartCopy(Request("pvc", 8 * kMiB, "nope")).status().code(), ENOENT);
  // Smaller than the source.
  auto small = jobs_->StartCopy(Request("pvc", 4 * kMiB, "xfer-pvc"));
  EXPECT_EQ(small.status().code(), EINVAL) << small.status().message();
  // A peer that refuses the connection: UNAVAILABLE, a retry may find it.
  CopyRequest refused = Request("pvc", 8 * kMiB, "xfer-pvc");
  refused.endpoint = "tcp://127.0.0.1:1";
  auto r = jobs_->StartCopy(refused);
  EXPECT_EQ(r.status().code(), EAGAIN) << r.status().message();
  // Bad names and endpoints.
  EXPECT_EQ(jobs_->StartCopy(Request("../pvc", 8 * kMiB, "xfer-pvc")).status().code(), EINVAL);
  CopyRequest bad = Request("pvc", 8 * kMiB, "xfer-pvc");
  bad.endpoint = "http://x";
  EXPECT_EQ(jobs_->StartCopy(bad).status().code(), EINVAL);
  // The volume exists already.
  ASSERT_TRUE(dst_->Create("taken", 8 * kMiB, {}, false).ok());
  EXPECT_EQ(jobs_->StartCopy(Request("taken", 8 * kMiB, "xfer-pvc")).status().code(), EEXIST);
  EXPECT_EQ(dst_->Inspect("pvc").status().code(), ENOENT);
  EXPECT_TRUE(jobs_->List().empty());
}

TEST_F(PeerCopyTest, ACopyLeftByADeadDaemonIsDeletedAtTheNextStart) {
  ASSERT_TRUE(src_->Create("xfer-pvc", 8 * kMiB, {}, false).ok());
  Fill("xfer-pvc", 0, kMiB);
  auto started = jobs_->StartCopy(Request("pvc", 8 * kMiB, "xfer-pvc"));
  ASSERT_TRUE(started.ok()) << started.status().message();
  ASSERT_EQ(WaitDone(started->id).state, "succeeded");
  // What a daemon that died mid-copy leaves: the volume and its marker.
  ASSERT_TRUE(dst_->Create("half", 8 * kMiB, {}, false).ok());
  const std::string dir = dst_->Info().dir + "/backup-restores";
  ASSERT_EQ(::mkdir(dir.c_str(), 0700) == 0 || errno == EEXIST, true);
  int fd = ::open((dir + "/half").c_str(), O_WRONLY | O_CREAT | O_CLOEXEC, 0600);
  ASSERT_GE(fd, 0);
  ::close(fd);
  jobs_ = std::make_unique<BackupJobs>(*dst_);
  EXPECT_EQ(dst_->Inspect("half").status().code(), ENOENT);
  EXPECT_TRUE(dst_->Inspect("pvc").ok()) << "a finished copy was deleted";
  EXPECT_NE(::access((dir + "/half").c_str(), F_OK), 0);
}

}  // namespace
}  // namespace nbdcsi::datapath::backup
