// The schedule runner (datapath/schedule/runner.h) over a real pool in a temp dir, with a fake
// clock that the test moves (nothing waits on the wall clock): it fires at the right minute,
// names and prunes its own snapshots only, catches up once after a gap, records a failure and
// retries at the next fire time, keeps its state across a restart; backups against the
// in-memory object store, with pruning and the credential errors. Also the pool's side: the
// schedule persisted with the volume and part of Create's idempotency.
#include "datapath/schedule/runner.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <fstream>

#include "common/cron.h"
#include "common/fs_util.h"
#include "test/support/pool.h"
#include "test/support/temp_dir.h"
#include "test/support/wait.h"
#include "test/unit/backup_memory_store.h"

namespace nbdcsi::datapath::schedule {
namespace {

constexpr uint64_t kMiB = 1 << 20;

int64_t T(int y, int mo, int d, int h, int mi, int s = 0) { return FromCivil(y, mo, d, h, mi) + s; }

class FakeClock final : public Clock {
 public:
  int64_t NowUnixS() override { return now; }
  std::atomic<int64_t> now{0};
};

class SharedStore final : public backup::ObjectStore {
 public:
  explicit SharedStore(backup::MemoryStore& s) : s_(s) {}
  Status Put(const std::string& k, std::string_view d) override { return s_.Put(k, d); }
  StatusOr<std::string> Get(const std::string& k) override { return s_.Get(k); }
  StatusOr<backup::ObjectInfo> Head(const std::string& k) override { return s_.Head(k); }
  StatusOr<std::vector<backup::ObjectInfo>> List(const std::string& p) override {
    return s_.List(p);
  }
  Status Delete(const std::string& k) override { return s_.Delete(k); }

 private:
  backup::MemoryStore& s_;
};

class ScheduleRunnerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(tmp_.Create("schedule_runner"));
    opts_ = test::PoolIn(tmp_.path());
    opts_.disable_reflink = true;  // the background-copy path, whatever the temp file system
    ASSERT_TRUE(test::OpenPool(opts_, &pool_));
    backup::LeaseTimes t;
    t.gc_wait = std::chrono::seconds(0);
    jobs_ = std::make_unique<backup::BackupJobs>(
        *pool_,
        [this](const backup::Target& target) -> StatusOr<std::unique_ptr<backup::ObjectStore>> {
          seen_endpoint_ = target.endpoint;
          if (target.credentials.access_key_id != "key" ||
              target.credentials.secret_access_key != "secret") {
            return Error(EACCES, "S3 LIST: access denied: the credentials were refused");
          }
          return std::unique_ptr<backup::ObjectStore>(new SharedStore(store_));
        },
        t);
    secret_dir_ = tmp_.path() + "/secret";
    clock_.now = T(2026, 12, 7, 5, 50);
  }
  void TearDown() override {
    runner_.reset();
    jobs_.reset();
    pool_.reset();
  }

  void NewRunner(const std::string& secret_dir = "") {
    runner_.reset();
    RunnerOptions o;
    o.state_dir = opts_.dir;
    o.secret_dir = secret_dir;
    o.clock = &clock_;
    runner_ = std::make_unique<ScheduleRunner>(*pool_, jobs_.get(), o);
    runner_->Load();
  }
  void WriteSecret(const std::string& key, const std::string& value) {
    ASSERT_TRUE(MkdirP(secret_dir_).ok());
    std::ofstream(secret_dir_ + "/" + key) << value;
  }
  // One pass at `t`, then until the copies it started are done: on a pool without reflink a
  // volume takes one copy at a time, and the next fire would find this one still running.
  void At(int64_t t) {
    clock_.now = t;
    runner_->RunDue();
    WaitCopies();
  }
  void WaitCopies() {
    ASSERT_TRUE(test::WaitUntil([&] {
      auto list = pool_->ListSnapshots();
      for (const auto& s : *list) {
        if (!s.ready) return false;
      }
      return true;
    }));
  }
  std::vector<std::string> Snapshots(const std::string& volume = "") {
    auto s = pool_->ListSnapshots(volume);
    EXPECT_TRUE(s.ok());
    std::vector<std::string> names;
    for (const auto& i : *s) names.push_back(i.name);
    std::sort(names.begin(), names.end());
    return names;
  }
  ScheduleRunStatus Run(const std::string& volume, const std::string& kind) {
    for (const auto& r : runner_->Status(volume)) {
      if (r.kind == kind) return r;
    }
    ADD_FAILURE() << "no " << kind << " run for " << volume;
    return {};
  }
  void CreateWithSchedule(const std::string& name, const VolumeSchedule& s) {
    CreateSpec spec = CreateSpec::Blank(name, 8 * kMiB);
    spec.schedule = s;
    auto r = pool_->Create(spec);
    ASSERT_TRUE(r.ok()) << r.status().message();
  }
  static VolumeSchedule SnapSched(const std::string& cron, uint32_t retain) {
    VolumeSchedule s;
    s.snapshot_cron = cron;
    s.snapshot_retain = retain;
    return s;
  }
  // Runs passes until the backup started by the last one has been recorded.
  void FinishBackup(const std::string& volume) {
    ASSERT_TRUE(test::WaitUntil(
        [&] {
          runner_->RunDue();
          return Run(volume, "backup").result != "running";
        },
        std::chrono::seconds(60)));
  }
  std::vector<std::string> Backups() {
    backup::Target t;
    t.url = "s3://bucket/prefix";
    t.credentials = {"key", "secret", ""};
    auto l = jobs_->ListBackups(t);
    EXPECT_TRUE(l.ok()) << l.status().message();
    std::vector<std::string> names;
    for (const auto& m : *l) names.push_back(m.name);
    std::sort(names.begin(), names.end());
    return names;
  }

  test::TempDir tmp_;
  PoolOptions opts_;
  std::unique_ptr<Pool> pool_;
  backup::MemoryStore store_;
  std::unique_ptr<backup::BackupJobs> jobs_;
  std::unique_ptr<ScheduleRunner> runner_;
  FakeClock clock_;
  std::string secret_dir_;
  std::string seen_endpoint_;
};

TEST(ScheduleNames, SortByTimeAndNameTheVolume) {
  const int64_t t = T(2026, 12, 7, 5, 45);
  EXPECT_EQ(AutoName(t, "pvc-1"), "auto-20261207T0545-pvc-1");
  EXPECT_TRUE(IsAutoName("auto-20261207T0545-pvc-1", "pvc-1"));
  EXPECT_LT(AutoName(t, "v"), AutoName(t + 60, "v"));
  EXPECT_LT(AutoName(T(2026, 12, 31, 23, 59), "v"), AutoName(T(2027, 1, 1, 0, 0), "v"));
  EXPECT_FALSE(IsAutoName("auto-20261207T0545-pvc-1", "pvc"));
  EXPECT_FALSE(IsAutoName("auto-20261207T0545-pvc-1", "pvc-12"));
  EXPECT_FALSE(IsAutoName("auto-2026120710545-pvc-1", "pvc-1"));
  EXPECT_FALSE(IsAutoName("manual-20261207T0545-pvc-1", "pvc-1"));
  EXPECT_FALSE(IsAutoName("auto-2026120XT0545-pvc-1", "pvc-1"));
  // Long volume names: a prefix and a hash, so the name and "backup-" + name fit 128 bytes
  // and two names that share the prefix still differ.
  const std::string a(128, 'a');
  std::string b = a;
  b.back() = 'b';
  EXPECT_LE(("backup-" + AutoName(t, a)).size(), 128u);
  EXPECT_NE(AutoName(t, a), AutoName(t, b));
  EXPECT_TRUE(IsAutoName(AutoName(t, a), a));
  EXPECT_FALSE(IsAutoName(AutoName(t, a), b));
  EXPECT_TRUE(ValidateSnapshotName("backup-" + AutoName(t, a)).ok());
}

TEST_F(ScheduleRunnerTest, FiresAtTheRightMinute) {
  CreateWithSchedule("vol", SnapSched("*/15 * * * *", 3));
  NewRunner();
  At(T(2026, 12, 7, 5, 50));  // first seen: starts from now, nothing for the past
  EXPECT_TRUE(Snapshots().empty());
  EXPECT_EQ(Run("vol", "snapshot").next_fire_unix_ns, T(2026, 12, 7, 6, 0) * 1000000000);
  EXPECT_EQ(Run("vol", "snapshot").result, "");
  At(T(2026, 12, 7, 5, 59, 59));
  EXPECT_TRUE(Snapshots().empty());
  At(T(2026, 12, 7, 6, 0));
  EXPECT_EQ(Snapshots(), std::vector<std::string>{"auto-20261207T0600-vol"});
  ScheduleRunStatus r = Run("vol", "snapshot");
  EXPECT_EQ(r.result, "ok") << r.error;
  EXPECT_EQ(r.made, "auto-20261207T0600-vol");
  EXPECT_EQ(r.last_run_unix_ns, T(2026, 12, 7, 6, 0) * 1000000000);
  EXPECT_EQ(r.next_fire_unix_ns, T(2026, 12, 7, 6, 15) * 1000000000);
  EXPECT_EQ(r.cron, "*/15 * * * *");
  At(T(2026, 12, 7, 6, 0, 30));
  At(T(2026, 12, 7, 6, 14));
  EXPECT_EQ(Snapshots().size(), 1u);
  At(T(2026, 12, 7, 6, 15, 1));
  EXPECT_EQ(Snapshots(),
            (std::vector<std::string>{"auto-20261207T0600-vol", "auto-20261207T0615-vol"}));
  auto snap = pool_->InspectSnapshot("auto-20261207T0615-vol");
  ASSERT_TRUE(snap.ok());
  EXPECT_EQ(snap->source_volume, "vol");
}

TEST_F(ScheduleRunnerTest, PrunesOnlyItsOwnOldestBeyondRetention) {
  CreateWithSchedule("vol", SnapSched("0 * * * *", 3));
  ASSERT_TRUE(pool_->Create("other", 8 * kMiB, {}).ok());
  // Not the schedule's: a manual snapshot of vol, and one of another volume in the same form.
  ASSERT_TRUE(pool_->CreateSnapshot("manual", "vol").ok());
  ASSERT_TRUE(pool_->CreateSnapshot(AutoName(T(2026, 1, 1, 0, 0), "other"), "other").ok());
  WaitCopies();
  NewRunner();
  At(T(2026, 12, 7, 5, 50));
  for (int h = 6; h <= 10; ++h) At(T(2026, 12, 7, h, 0));
  EXPECT_EQ(Snapshots("vol"),
            (std::vector<std::string>{"auto-20261207T0800-vol", "auto-20261207T0900-vol",
                                      "auto-20261207T1000-vol", "manual"}));
  EXPECT_EQ(Snapshots("other"), std::vector<std::string>{"auto-20260101T0000-other"});
  EXPECT_EQ(Run("vol", "snapshot").pruned, 1u);
  EXPECT_EQ(Run("vol", "snapshot").result, "ok");
  // A lower retention prunes the surplus at the next run.
  ASSERT_TRUE(pool_->SetSchedule("vol", SnapSched("0 * * * *", 1)).ok());
  At(T(2026, 12, 7, 11, 0));
  EXPECT_EQ(Snapshots("vol"), (std::vector<std::string>{"auto-20261207T1100-vol", "manual"}));
  EXPECT_EQ(Run("vol", "snapshot").pruned, 3u);
}

TEST_F(ScheduleRunnerTest, CatchesUpOnceAfterAGap) {
  CreateWithSchedule("vol", SnapSched("*/15 * * * *", 100));
  NewRunner();
  At(T(2026, 12, 7, 5, 50));
  At(T(2026, 12, 7, 6, 0));
  ASSERT_EQ(Snapshots().size(), 1u);
  runner_.reset();  // the daemon is down from 06:00 to 09:07: twelve fire times missed
  clock_.now = T(2026, 12, 7, 9, 7);
  NewRunner();
  runner_->RunDue();
  EXPECT_EQ(Snapshots(),
            (std::vector<std::string>{"auto-20261207T0600-vol", "auto-20261207T0907-vol"}));
  EXPECT_EQ(Run("vol", "snapshot").next_fire_unix_ns, T(2026, 12, 7, 9, 15) * 1000000000);
  At(T(2026, 12, 7, 9, 8));
  At(T(2026, 12, 7, 9, 14));
  EXPECT_EQ(Snapshots().size(), 2u);
  At(T(2026, 12, 7, 9, 15));
  EXPECT_EQ(Snapshots().size(), 3u);
}

TEST_F(ScheduleRunnerTest, FailureIsRecordedAndRetriedAtTheNextFireTime) {
  CreateWithSchedule("vol", SnapSched("*/15 * * * *", 5));
  ASSERT_TRUE(pool_->Create("other", 8 * kMiB, {}).ok());
  // The name the 06:00 run will use is taken by a snapshot of another volume: it fails.
  ASSERT_TRUE(pool_->CreateSnapshot("auto-20261207T0600-vol", "other").ok());
  WaitCopies();
  NewRunner();
  At(T(2026, 12, 7, 5, 50));
  At(T(2026, 12, 7, 6, 0));
  ScheduleRunStatus r = Run("vol", "snapshot");
  EXPECT_EQ(r.result, "error");
  EXPECT_NE(r.error.find("auto-20261207T0600-vol"), std::string::npos) << r.error;
  EXPECT_NE(r.error.find("other"), std::string::npos) << r.error;
  EXPECT_EQ(r.made, "");
  EXPECT_EQ(r.last_run_unix_ns, T(2026, 12, 7, 6, 0) * 1000000000);
  EXPECT_EQ(r.next_fire_unix_ns, T(2026, 12, 7, 6, 15) * 1000000000);
  At(T(2026, 12, 7, 6, 1));  // not retried at once
  At(T(2026, 12, 7, 6, 14));
  EXPECT_EQ(Snapshots("vol"), std::vector<std::string>{});
  At(T(2026, 12, 7, 6, 15));
  r = Run("vol", "snapshot");
  EXPECT_EQ(r.result, "ok") << r.error;
  EXPECT_EQ(r.error, "");
  EXPECT_EQ(Snapshots("vol"), std::vector<std::string>{"auto-20261207T0615-vol"});
  // The other volume's snapshot that happened to have our form is not ours: untouched.
  EXPECT_TRUE(pool_->InspectSnapshot("auto-20261207T0600-vol").ok());
}

TEST_F(ScheduleRunnerTest, StateSurvivesARestart) {
  CreateWithSchedule("vol", SnapSched("0 */2 * * *", 1));
  NewRunner();
  At(T(2026, 12, 7, 5, 50));
  At(T(2026, 12, 7, 6, 0));
  At(T(2026, 12, 7, 8, 0));
  const ScheduleRunStatus before = Run("vol", "snapshot");
  EXPECT_EQ(before.pruned, 1u);
  clock_.now = T(2026, 12, 7, 8, 30);
  NewRunner();  // a new runner reads schedule-state.json
  const ScheduleRunStatus after = Run("vol", "snapshot");
  EXPECT_EQ(after.result, "ok");
  EXPECT_EQ(after.made, "auto-20261207T0800-vol");
  EXPECT_EQ(after.pruned, 1u);
  EXPECT_EQ(after.last_run_unix_ns, before.last_run_unix_ns);
  EXPECT_EQ(after.next_fire_unix_ns, T(2026, 12, 7, 10, 0) * 1000000000);
  runner_->RunDue();  // nothing missed: nothing made
  EXPECT_EQ(Snapshots(), std::vector<std::string>{"auto-20261207T0800-vol"});
  // Removing the schedule forgets its state; the file follows.
  ASSERT_TRUE(pool_->SetSchedule("vol", {}).ok());
  runner_->RunDue();
  EXPECT_TRUE(runner_->Status("vol").empty());
  auto text = ReadSmallFile(opts_.dir + "/" + kStateFile);
  ASSERT_TRUE(text.ok());
  EXPECT_EQ(text->find("\"vol\""), std::string::npos) << *text;
}

TEST_F(ScheduleRunnerTest, BackupsArePrunedBeyondRetention) {
  WriteSecret("AWS_ACCESS_KEY_ID", "key\n");
  WriteSecret("AWS_SECRET_ACCESS_KEY", "secret");
  WriteSecret("AWS_ENDPOINT_URL", "http://127.0.0.1:9");
  VolumeSchedule s;
  s.backup_cron = "0 * * * *";
  s.backup_retain = 2;
  s.backup_target = "s3://bucket/prefix";
  CreateWithSchedule("vol", s);
  {  // data, so the backups hold chunks
    auto v = pool_->Inspect("vol");
    int fd = ::open(v->path.c_str(), O_WRONLY);
    ASSERT_GE(fd, 0);
    std::string data(kMiB, 'x');
    ASSERT_EQ(::pwrite(fd, data.data(), data.size(), 0), static_cast<ssize_t>(data.size()));
    ::close(fd);
  }
  // A backup of vol the schedule did not make, in the same target: kept.
  backup::Target t;
  t.url = "s3://bucket/prefix";
  t.credentials = {"key", "secret", ""};
  auto manual = jobs_->StartBackup({t, "keep-me", "", "vol", 0});
  ASSERT_TRUE(manual.ok()) << manual.status().message();
  ASSERT_TRUE(test::WaitUntil([&] { return jobs_->Get(manual->id)->state != "running"; },
                              std::chrono::seconds(60)));
  NewRunner(secret_dir_);
  At(T(2026, 12, 7, 5, 50));
  for (int h = 6; h <= 8; ++h) {
    At(T(2026, 12, 7, h, 0));
    ScheduleRunStatus r = Run("vol", "backup");
    ASSERT_TRUE(r.result == "running" || r.result == "ok") << r.result << ": " << r.error;
    FinishBackup("vol");
    r = Run("vol", "backup");
    ASSERT_EQ(r.result, "ok") << r.error;
    EXPECT_EQ(r.made, AutoName(T(2026, 12, 7, h, 0), "vol"));
  }
  EXPECT_EQ(seen_endpoint_, "http://127.0.0.1:9");
  EXPECT_EQ(Backups(), (std::vector<std::string>{"auto-20261207T0700-vol", "auto-20261207T0800-vol",
                                                 "keep-me"}));
  EXPECT_EQ(Run("vol", "backup").pruned, 1u);
  // The jobs' temporary snapshots are gone; no schedule snapshot was made for backups.
  EXPECT_TRUE(Snapshots().empty());
}

// Both kinds due in the same minute on a pool without reflink: the snapshot's copy is running
// when the backup comes due, and the backup job would start with a snapshot of its own (one copy
// per volume at a time): it waits for the copy instead of failing with EAGAIN.
TEST_F(ScheduleRunnerTest, ABackupDueWithTheSnapshotWaitsForItsCopy) {
  WriteSecret("AWS_ACCESS_KEY_ID", "key");
  WriteSecret("AWS_SECRET_ACCESS_KEY", "secret");
  VolumeSchedule s = SnapSched("0 * * * *", 3);
  s.backup_cron = "0 * * * *";
  s.backup_target = "s3://bucket/prefix";
  CreateWithSchedule("vol", s);
  {  // 24 MiB of data: the snapshot's copy takes a moment
    auto v = pool_->Inspect("vol");
    int fd = ::open(v->path.c_str(), O_WRONLY);
    ASSERT_GE(fd, 0);
    std::string data(kMiB, 'y');
    for (uint64_t off = 0; off < 24 * kMiB; off += kMiB) {
      data[0] = static_cast<char>(off >> 20);
      ASSERT_EQ(::pwrite(fd, data.data(), data.size(), static_cast<off_t>(off)),
                static_cast<ssize_t>(data.size()));
    }
    ::close(fd);
  }
  NewRunner(secret_dir_);
  At(T(2026, 12, 7, 5, 50));
  for (int h = 6; h <= 7; ++h) {
    clock_.now = T(2026, 12, 7, h, 0);
    ASSERT_TRUE(test::WaitUntil(
        [&] {
          runner_->RunDue();
          const ScheduleRunStatus r = Run("vol", "backup");
          return r.last_run_unix_ns == clock_.now * 1000000000 &&
                 (r.result == "ok" || r.result == "error");
        },
        std::chrono::seconds(60)));
    ScheduleRunStatus b = Run("vol", "backup");
    EXPECT_EQ(b.result, "ok") << b.error;
    EXPECT_EQ(b.made, AutoName(T(2026, 12, 7, h, 0), "vol"));
    EXPECT_EQ(Run("vol", "snapshot").result, "ok") << Run("vol", "snapshot").error;
    WaitCopies();
  }
  EXPECT_EQ(Snapshots(), (std::vector<std::string>{"auto-20261207T0600-vol",
                                                   "auto-20261207T0700-vol"}));
  EXPECT_EQ(Backups(), (std::vector<std::string>{"auto-20261207T0600-vol",
                                                 "auto-20261207T0700-vol"}));
}

// A snapshot fire while the previous snapshot's copy still runs waits for it (it stays due and
// is taken by a later pass) rather than failing.
TEST_F(ScheduleRunnerTest, ASnapshotDueDuringACopyWaitsForIt) {
  CreateWithSchedule("vol", SnapSched("*/15 * * * *", 5));
  {
    auto v = pool_->Inspect("vol");
    int fd = ::open(v->path.c_str(), O_WRONLY);
    ASSERT_GE(fd, 0);
    std::string data(kMiB, 'z');
    for (uint64_t off = 0; off < 8 * kMiB; off += kMiB) {
      ASSERT_EQ(::pwrite(fd, data.data(), data.size(), static_cast<off_t>(off)),
                static_cast<ssize_t>(data.size()));
    }
    ::close(fd);
  }
  NewRunner();
  At(T(2026, 12, 7, 5, 50));
  clock_.now = T(2026, 12, 7, 6, 0);
  runner_->RunDue();  // the 06:00 copy starts
  clock_.now = T(2026, 12, 7, 6, 15);
  ASSERT_TRUE(test::WaitUntil(
      [&] {
        runner_->RunDue();  // at once: the 06:00 copy may still run
        return Run("vol", "snapshot").last_run_unix_ns == clock_.now * 1000000000;
      },
      std::chrono::seconds(60)));
  ScheduleRunStatus r = Run("vol", "snapshot");
  EXPECT_EQ(r.result, "ok") << r.error;
  EXPECT_EQ(r.made, "auto-20261207T0615-vol");
  WaitCopies();
  EXPECT_EQ(Snapshots(), (std::vector<std::string>{"auto-20261207T0600-vol",
                                                   "auto-20261207T0615-vol"}));
}

TEST_F(ScheduleRunnerTest, BackupWithoutCredentialsFailsClearly) {
  VolumeSchedule s;
  s.backup_cron = "*/30 * * * *";
  s.backup_target = "s3://bucket/prefix";
  CreateWithSchedule("vol", s);
  NewRunner();  // no --backup-secret-dir
  At(T(2026, 12, 7, 5, 50));
  At(T(2026, 12, 7, 6, 0));
  ScheduleRunStatus r = Run("vol", "backup");
  EXPECT_EQ(r.result, "error");
  EXPECT_NE(r.error.find("--backup-secret-dir"), std::string::npos) << r.error;
  // A directory without the secret key: the error names the key, never a value.
  WriteSecret("AWS_ACCESS_KEY_ID", "key");
  NewRunner(secret_dir_);
  At(T(2026, 12, 7, 6, 30));
  r = Run("vol", "backup");
  EXPECT_EQ(r.result, "error");
  EXPECT_NE(r.error.find("AWS_SECRET_ACCESS_KEY"), std::string::npos) << r.error;
  EXPECT_EQ(r.error.find("key\""), std::string::npos) << r.error;
  // Refused credentials: the job fails, recorded.
  WriteSecret("AWS_SECRET_ACCESS_KEY", "wrong");
  At(T(2026, 12, 7, 7, 0));
  FinishBackup("vol");
  r = Run("vol", "backup");
  EXPECT_EQ(r.result, "error");
  EXPECT_NE(r.error.find("access denied"), std::string::npos) << r.error;
  EXPECT_EQ(r.error.find("wrong"), std::string::npos) << r.error;
  // Fixed: the next fire time succeeds.
  WriteSecret("AWS_SECRET_ACCESS_KEY", "secret");
  At(T(2026, 12, 7, 7, 30));
  FinishBackup("vol");
  EXPECT_EQ(Run("vol", "backup").result, "ok") << Run("vol", "backup").error;
}

// The daemon's thread: a pass at once when it starts (the catch-up), then it waits for the next
// minute boundary, and Stop() does not wait for that.
TEST_F(ScheduleRunnerTest, TheThreadRunsAPassAtStartAndStopsPromptly) {
  CreateWithSchedule("vol", SnapSched("*/15 * * * *", 3));
  NewRunner();
  At(T(2026, 12, 7, 5, 50));
  clock_.now = T(2026, 12, 7, 6, 0);
  runner_->Start();
  ASSERT_TRUE(test::WaitUntil([&] { return Run("vol", "snapshot").result == "ok"; },
                              std::chrono::seconds(20)));
  EXPECT_EQ(Snapshots(), std::vector<std::string>{"auto-20261207T0600-vol"});
  const auto t0 = std::chrono::steady_clock::now();
  runner_->Stop();
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(2));
  runner_->Stop();  // idempotent
}

TEST_F(ScheduleRunnerTest, PoolKeepsTheScheduleAndComparesItOnCreate) {
  VolumeSchedule s = SnapSched("@daily", 3);
  CreateWithSchedule("vol", s);
  // The same create again is the same volume; another schedule is EEXIST naming both.
  CreateSpec again = CreateSpec::Blank("vol", 8 * kMiB);
  again.schedule = s;
  EXPECT_TRUE(pool_->Create(again).ok());
  again.schedule.snapshot_retain = 4;
  auto r = pool_->Create(again);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), EEXIST);
  EXPECT_NE(r.status().message().find("another schedule"), std::string::npos)
      << r.status().message();
  // "No schedule" has one spelling: retains without a cron expression mean nothing and are not
  // kept, so a retried create without them is the same volume.
  CreateSpec none = CreateSpec::Blank("none", 8 * kMiB);
  none.schedule.snapshot_retain = 5;
  ASSERT_TRUE(pool_->Create(none).ok());
  EXPECT_EQ(pool_->Inspect("none")->schedule, VolumeSchedule{});
  EXPECT_TRUE(pool_->Create(CreateSpec::Blank("none", 8 * kMiB)).ok());
  // Invalid schedules are refused before anything is made.
  CreateSpec bad = CreateSpec::Blank("bad", 8 * kMiB);
  bad.schedule.backup_cron = "@daily";  // no target
  EXPECT_EQ(pool_->Create(bad).status().code(), EINVAL);
  EXPECT_EQ(pool_->SetSchedule("vol", bad.schedule).status().code(), EINVAL);
  EXPECT_EQ(pool_->SetSchedule("missing", s).status().code(), ENOENT);
  // Persisted: a reopened pool has it; clearing it is persisted too.
  jobs_.reset();  // it holds the pool
  pool_.reset();
  ASSERT_TRUE(test::OpenPool(opts_, &pool_));
  auto v = pool_->Inspect("vol");
  ASSERT_TRUE(v.ok());
  EXPECT_EQ(v->schedule, s);
  ASSERT_TRUE(pool_->SetSchedule("vol", {}).ok());
  pool_.reset();
  ASSERT_TRUE(test::OpenPool(opts_, &pool_));
  EXPECT_TRUE(pool_->Inspect("vol")->schedule.empty());
}

}  // namespace
}  // namespace nbdcsi::datapath::schedule
