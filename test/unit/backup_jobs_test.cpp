// BackupJobs over a real pool in a temp dir and an in-memory store: backup of a snapshot and of
// a live volume (its temporary snapshot removed), restore into a new volume, the refusals that
// come back from the call itself, a corrupt chunk that makes a restore remove its volume, and
// shutdown cancelling a running backup without leaving a manifest; an encrypted target's key
// refusals coming back from every call.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <random>

#include "datapath/backup/chunk.h"
#include "datapath/backup/jobs.h"
#include "test/support/pool.h"
#include "test/support/temp_dir.h"
#include "test/support/wait.h"
#include "test/unit/backup_memory_store.h"

namespace nbdcsi::datapath::backup {
namespace {

constexpr uint64_t kMiB = 1 << 20;

// Every job's store is a view of the one the test holds.
class SharedStore final : public ObjectStore {
 public:
  explicit SharedStore(MemoryStore& s) : s_(s) {}
  Status Put(const std::string& k, std::string_view d) override { return s_.Put(k, d); }
  StatusOr<std::string> Get(const std::string& k) override { return s_.Get(k); }
  StatusOr<ObjectInfo> Head(const std::string& k) override { return s_.Head(k); }
  StatusOr<std::vector<ObjectInfo>> List(const std::string& p) override { return s_.List(p); }
  Status Delete(const std::string& k) override { return s_.Delete(k); }

 private:
  MemoryStore& s_;
};

class BackupJobsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(tmp_.Create("backup_jobs"));
    auto opts = test::PoolIn(tmp_.path());
    opts.disable_reflink = true;  // the background-copy path: snapshots become ready later
    ASSERT_TRUE(test::OpenPool(opts, &pool_));
    LeaseTimes t;
    t.gc_wait = std::chrono::seconds(0);
    jobs_ = std::make_unique<BackupJobs>(
        *pool_,
        [this](const Target& target) -> StatusOr<std::unique_ptr<ObjectStore>> {
          if (target.credentials.access_key_id != "key") {
            return Error(EACCES, "S3 LIST: access denied: the credentials were refused");
          }
          return std::unique_ptr<ObjectStore>(new SharedStore(store_));
        },
        t);
    target_.url = "s3://bucket/prefix";
    target_.credentials = {"key", "secret", ""};
  }
  void TearDown() override {
    jobs_.reset();
    pool_.reset();
  }

  void WriteVolume(const std::string& name, uint64_t off, const std::string& data) {
    auto v = pool_->Inspect(name);
    ASSERT_TRUE(v.ok());
    int fd = ::open(v->path.c_str(), O_WRONLY);
    ASSERT_GE(fd, 0);
    ASSERT_EQ(::pwrite(fd, data.data(), data.size(), static_cast<off_t>(off)),
              static_cast<ssize_t>(data.size()));
    ::close(fd);
  }
  std::string ReadFile(const std::string& path) {
    int fd = ::open(path.c_str(), O_RDONLY);
    EXPECT_GE(fd, 0);
    std::string s(::lseek(fd, 0, SEEK_END), '\0');
    EXPECT_EQ(::pread(fd, s.data(), s.size(), 0), static_cast<ssize_t>(s.size()));
    ::close(fd);
    return s;
  }
  static std::string Random(uint64_t len, uint32_t seed) {
    std::mt19937 rng(seed);
    std::string s(len, '\0');
    for (auto& c : s) c = static_cast<char>(rng());
    return s;
  }
  JobInfo WaitDone(const std::string& id) {
    JobInfo last;
    EXPECT_TRUE(test::WaitUntil(
        [&] {
          auto j = jobs_->Get(id);
          if (!j.ok()) return false;
          last = *j;
          return last.state != "running";
        },
        std::chrono::seconds(60)));
    return last;
  }
  void Snapshot(const std::string& snap, const std::string& vol) {
    ASSERT_TRUE(pool_->CreateSnapshot(snap, vol).ok());
    ASSERT_TRUE(test::WaitUntil([&] { return pool_->InspectSnapshot(snap)->ready; }));
  }

  test::TempDir tmp_;
  std::unique_ptr<Pool> pool_;
  MemoryStore store_;
  std::unique_ptr<BackupJobs> jobs_;
  Target target_;
};

TEST_F(BackupJobsTest, BackupOfASnapshotRestoresIntoANewVolume) {
  ASSERT_TRUE(pool_->Create("src", 64 * kMiB, {}).ok());
  WriteVolume("src", 3 * kMiB, Random(6 * kMiB, 1));
  Snapshot("s1", "src");
  auto job = jobs_->StartBackup({target_, "b1", "s1", "", 0});
  ASSERT_TRUE(job.ok()) << job.status().message();
  EXPECT_EQ(job->kind, "backup");
  JobInfo done = WaitDone(job->id);
  ASSERT_EQ(done.state, "succeeded") << done.error;
  EXPECT_EQ(done.done_bytes, 64 * kMiB);
  EXPECT_EQ(done.chunks_uploaded, 3u);  // 3..9 MiB touches the chunks at 0, 4 and 8 MiB
  EXPECT_GT(done.finished_unix_ns, 0);

  auto m = jobs_->Inspect(target_, "b1");
  ASSERT_TRUE(m.ok()) << m.status().message();
  EXPECT_EQ(m->source_snapshot, "s1");
  EXPECT_EQ(m->source_volume, "src");
  EXPECT_EQ(m->created_unix_ns, pool_->InspectSnapshot("s1")->created_unix_ns);

  auto r = jobs_->StartRestore({target_, "b1", "r1"});
  ASSERT_TRUE(r.ok()) << r.status().message();
  JobInfo rdone = WaitDone(r->id);
  ASSERT_EQ(rdone.state, "succeeded") << rdone.error;
  EXPECT_EQ(rdone.chunks_restored, 3u);
  EXPECT_EQ(ReadFile(pool_->Inspect("r1")->path), ReadFile(pool_->Inspect("src")->path));
  EXPECT_EQ(pool_->Inspect("r1")->size, 64 * kMiB);

  // Refusals come back from the call, before any job exists.
  EXPECT_EQ(jobs_->StartRestore({target_, "b1", "r1"}).status().code(), EEXIST);
  EXPECT_EQ(jobs_->StartRestore({target_, "nope", "r2"}).status().code(), ENOENT);
  EXPECT_EQ(jobs_->StartBackup({target_, "b2", "nope", "", 0}).status().code(), ENOENT);
  EXPECT_EQ(jobs_->StartBackup({target_, "b2", "s1", "src", 0}).status().code(), EINVAL);
  EXPECT_EQ(jobs_->StartBackup({target_, "bad/name", "s1", "", 0}).status().code(), EINVAL);
  Target bad = target_;
  bad.url = "http://bucket/x";
  EXPECT_EQ(jobs_->StartBackup({bad, "b2", "s1", "", 0}).status().code(), EINVAL);
  bad = target_;
  bad.credentials.access_key_id = "other";
  EXPECT_EQ(jobs_->ListBackups(bad).status().code(), EACCES);
  EXPECT_FALSE(pool_->Inspect("r2").ok());

  auto list = jobs_->ListBackups(target_);
  ASSERT_TRUE(list.ok());
  ASSERT_EQ(list->size(), 1u);
  EXPECT_EQ(jobs_->List().size(), 2u);
}

TEST_F(BackupJobsTest, BackupOfALiveVolumeUsesATemporarySnapshot) {
  ASSERT_TRUE(pool_->Create("live", 16 * kMiB, {}).ok());
  WriteVolume("live", 0, Random(5 * kMiB, 2));
  auto job = jobs_->StartBackup({target_, "b1", "", "live", 0});
  ASSERT_TRUE(job.ok()) << job.status().message();
  JobInfo done = WaitDone(job->id);
  ASSERT_EQ(done.state, "succeeded") << done.error;
  EXPECT_TRUE(pool_->ListSnapshots()->empty());  // backup-b1 is gone
  auto m = jobs_->Inspect(target_, "b1");
  ASSERT_TRUE(m.ok());
  EXPECT_EQ(m->source_volume, "live");
  EXPECT_EQ(m->source_snapshot, "");
  EXPECT_EQ(m->chunks.size(), 2u);
}

TEST_F(BackupJobsTest, FailedRestoreRemovesItsVolume) {
  ASSERT_TRUE(pool_->Create("src", 16 * kMiB, {}).ok());
  WriteVolume("src", 0, Random(8 * kMiB, 3));
  Snapshot("s1", "src");
  auto job = jobs_->StartBackup({target_, "b1", "s1", "", 0});
  ASSERT_TRUE(job.ok());
  ASSERT_EQ(WaitDone(job->id).state, "succeeded");
  auto m = jobs_->Inspect(target_, "b1");
  ASSERT_TRUE(m.ok());
  Repository repo(store_, "prefix");
  store_.Corrupt(repo.ChunkKey(m->chunks[1].sha256), Compress(Random(4 * kMiB, 4)));
  auto r = jobs_->StartRestore({target_, "b1", "r1"});
  ASSERT_TRUE(r.ok()) << r.status().message();
  JobInfo rdone = WaitDone(r->id);
  EXPECT_EQ(rdone.state, "failed");
  EXPECT_NE(rdone.error.find("corrupt"), std::string::npos) << rdone.error;
  EXPECT_EQ(pool_->Inspect("r1").status().code(), ENOENT);
}

TEST_F(BackupJobsTest, ShutdownCancelsARunningBackupWithoutAManifest) {
  ASSERT_TRUE(pool_->Create("src", 64 * kMiB, {}).ok());
  WriteVolume("src", 0, Random(40 * kMiB, 5));
  Snapshot("s1", "src");
  // 1 MiB/s: the 10 chunks would take half a minute.
  auto job = jobs_->StartBackup({target_, "b1", "s1", "", kMiB});
  ASSERT_TRUE(job.ok());
  ASSERT_TRUE(test::WaitUntil([&] { return jobs_->Get(job->id)->chunks_uploaded >= 1; }));
  EXPECT_TRUE(jobs_->RunningBackup(target_.url, "b1").ok());
  const auto t0 = std::chrono::steady_clock::now();
  jobs_.reset();
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(15));
  Repository repo(store_, "prefix");
  EXPECT_TRUE(repo.ListNames()->empty());
}

TEST_F(BackupJobsTest, ARestoreTheDaemonDiedInIsRemovedAtTheNextStart) {
  ASSERT_TRUE(pool_->Create("src", 16 * kMiB, {}).ok());
  WriteVolume("src", 0, Random(8 * kMiB, 6));
  Snapshot("s1", "src");
  auto job = jobs_->StartBackup({target_, "b1", "s1", "", 0});
  ASSERT_TRUE(job.ok());
  ASSERT_EQ(WaitDone(job->id).state, "succeeded");
  auto r = jobs_->StartRestore({target_, "b1", "r1"});
  ASSERT_TRUE(r.ok());
  ASSERT_EQ(WaitDone(r->id).state, "succeeded");
  const std::string markers = pool_->Info().dir + "/backup-restores";
  EXPECT_NE(::access((markers + "/r1").c_str(), F_OK), 0);  // gone once the restore succeeded

  // What a daemon killed mid-restore leaves: the volume and its marker.
  ASSERT_TRUE(pool_->Create("half", 16 * kMiB, {}).ok());
  int fd = ::open((markers + "/half").c_str(), O_WRONLY | O_CREAT, 0600);
  ASSERT_GE(fd, 0);
  ::close(fd);
  jobs_ = std::make_unique<BackupJobs>(*pool_, BackupJobs::S3Factory);
  EXPECT_EQ(pool_->Inspect("half").status().code(), ENOENT);
  EXPECT_NE(::access((markers + "/half").c_str(), F_OK), 0);
  EXPECT_TRUE(pool_->Inspect("r1").ok());  // a finished restore is left alone
}

TEST_F(BackupJobsTest, EncryptedTargetNeedsItsKeyInEveryCall) {
  ASSERT_TRUE(pool_->Create("src", 16 * kMiB, {}).ok());
  WriteVolume("src", kMiB, Random(6 * kMiB, 7));
  Snapshot("s1", "src");
  Target enc = target_;
  enc.encryption_key = "jobs test passphrase";
  auto job = jobs_->StartBackup({enc, "b1", "s1", "", 0});
  ASSERT_TRUE(job.ok()) << job.status().message();
  ASSERT_EQ(WaitDone(job->id).state, "succeeded");
  auto list = jobs_->ListBackups(enc);
  ASSERT_TRUE(list.ok()) << list.status().message();
  ASSERT_EQ(list->size(), 1u);
  EXPECT_TRUE(list->front().encrypted);

  // Refusals come back from the calls themselves; no job starts, nothing is written.
  const auto before = store_.All();
  Target wrong = enc;
  wrong.encryption_key = "another passphrase";
  Target none = target_;
  auto backup = jobs_->StartBackup({wrong, "b2", "s1", "", 0});
  EXPECT_EQ(backup.status().code(), EACCES);
  EXPECT_NE(backup.status().message().find("wrong encryption key for s3://bucket/prefix"),
            std::string::npos)
      << backup.status().message();
  EXPECT_EQ(jobs_->StartBackup({none, "b2", "s1", "", 0}).status().code(), EINVAL);
  EXPECT_EQ(jobs_->StartRestore({wrong, "b1", "r1"}).status().code(), EACCES);
  EXPECT_EQ(jobs_->StartRestore({none, "b1", "r1"}).status().code(), EINVAL);
  EXPECT_EQ(jobs_->ListBackups(wrong).status().code(), EACCES);
  EXPECT_EQ(jobs_->Inspect(none, "b1").status().code(), EINVAL);
  EXPECT_EQ(jobs_->Delete(wrong, "b1").status().code(), EACCES);
  EXPECT_EQ(jobs_->List().size(), 1u);
  EXPECT_FALSE(pool_->Inspect("r1").ok());
  EXPECT_EQ(store_.All(), before);

  auto r = jobs_->StartRestore({enc, "b1", "r1"});
  ASSERT_TRUE(r.ok()) << r.status().message();
  ASSERT_EQ(WaitDone(r->id).state, "succeeded");
  EXPECT_EQ(ReadFile(pool_->Inspect("r1")->path), ReadFile(pool_->Inspect("src")->path));
  auto gc = jobs_->Delete(enc, "b1");
  ASSERT_TRUE(gc.ok()) << gc.status().message();
  EXPECT_EQ(gc->chunks_deleted, 2u);
}

}  // namespace
}  // namespace nbdcsi::datapath::backup
