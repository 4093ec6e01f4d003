// Crash safety: for every fault point compiled in, a forked child runs the operation with
// NBDCSI_FAULT set and dies there (_exit, as kill -9 would), then the parent reopens the pool
// and checks that it holds the state before or after the operation, never something between.
#include <fcntl.h>
#include <sys/mount.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <thread>

#include <cstdlib>
#include <filesystem>
#include <functional>
#include <map>
#include <optional>
#include <set>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "common/fault.h"
#include "datapath/pool/pool.h"
#include "test/support/temp_dir.h"
#include "test/support/wait.h"

namespace nbdcsi::datapath {
namespace {

namespace fs = std::filesystem;
constexpr uint64_t kMiB = 1 << 20;

// What a volume looks like from outside; "absent" when the optional is empty.
struct Observed {
  bool present = false;
  uint64_t size = 0;
  QosLimits qos;
  uint64_t fence_epoch = 0;
  VolumeSchedule schedule = {};
  bool operator==(const Observed&) const = default;
};

enum class Outcome { kOld, kNew, kEither };

struct Scenario {
  std::function<void(Pool&)> setup;   // runs in the parent before the crash
  std::function<Status(Pool&)> op;    // runs in the child, which dies inside it
  Observed before, after;             // states of volume "v" (or snapshot "s")
  bool snapshot_target = false;       // the operation makes or removes snapshot "s"
  bool needs_reflink = false;         // the point is on the FICLONE path: run on XFS
  bool copy_path = false;             // the point is on the background-copy path
  bool has_src = false;               // volume "src" (content 'S') exists throughout
  bool keeps_snapshot = false;        // snapshot "s" exists throughout (restores)
};

constexpr char kSrcByte = 'S';

// Volume "src" with data in two places, so a copy has something to get wrong.
void MakeSrc(Pool& p) {
  auto v = p.Create("src", 4 * kMiB, {});
  ASSERT_TRUE(v.ok()) << v.status().message();
  int fd = open(v->path.c_str(), O_WRONLY | O_CLOEXEC);
  ASSERT_GE(fd, 0);
  std::string data(64 * 1024, kSrcByte);
  ASSERT_EQ(pwrite(fd, data.data(), data.size(), 0), static_cast<ssize_t>(data.size()));
  ASSERT_EQ(pwrite(fd, data.data(), data.size(), 3 * kMiB), static_cast<ssize_t>(data.size()));
  close(fd);
}

// Neither "v" nor "s" is still being filled by a background copy.
bool CopiesDone(Pool& p) {
  auto v = p.Inspect("v");
  auto s = p.InspectSnapshot("s");
  return (!v.ok() || v->ready) && (!s.ok() || s->ready);
}

// Snapshots and clones made by a background copy are ready a moment after the call.
void WaitReady(Pool& p) {
  if (!test::WaitUntil([&] { return CopiesDone(p); })) ADD_FAILURE() << "copy did not finish";
}

VolumeSchedule NewSchedule() {
  VolumeSchedule s;
  s.snapshot_cron = "*/10 * * * *";
  s.snapshot_retain = 3;
  return s;
}

QosLimits NewQos() {
  QosLimits q;
  q.max_iops = 500;
  q.burst_ms = 200;
  return q;
}

// A scenario per operation, chosen by the fault point's prefix. A new prefix without an
// entry here fails the test, so a new kind of fault point cannot go untested by accident.
std::optional<Scenario> ScenarioFor(const std::string& point) {
  std::string prefix = point.substr(0, point.find('.'));
  Scenario s;
  if (prefix == "create") {
    s.setup = [](Pool&) {};
    s.op = [](Pool& p) { return p.Create("v", 2 * kMiB, NewQos()).status(); };
    s.before = {};
    s.after = {true, 2 * kMiB, NewQos()};
  } else if (prefix == "delete") {
    s.setup = [](Pool& p) { ASSERT_TRUE(p.Create("v", kMiB, {}).ok()); };
    s.op = [](Pool& p) { return p.Delete("v"); };
    s.before = {true, kMiB, {}};
    s.after = {};
  } else if (prefix == "resize") {
    s.setup = [](Pool& p) { ASSERT_TRUE(p.Create("v", kMiB, {}).ok()); };
    s.op = [](Pool& p) { return p.Resize("v", 3 * kMiB).status(); };
    s.before = {true, kMiB, {}};
    s.after = {true, 3 * kMiB, {}};
  } else if (prefix == "qos") {
    s.setup = [](Pool& p) { ASSERT_TRUE(p.Create("v", kMiB, {}).ok()); };
    s.op = [](Pool& p) { return p.SetQos("v", NewQos()); };
    s.before = {true, kMiB, {}};
    s.after = {true, kMiB, NewQos()};
  } else if (prefix == "schedule") {
    s.setup = [](Pool& p) { ASSERT_TRUE(p.Create("v", kMiB, {}).ok()); };
    s.op = [](Pool& p) { return p.SetSchedule("v", NewSchedule()).status(); };
    s.before = {true, kMiB, {}};
    s.after = {true, kMiB, {}, 0, NewSchedule()};
  } else if (prefix == "fence") {
    // The epoch is on disk before any connection of it is let in, or not at all: a crash
    // leaves the volume at epoch 3 or 7, and the engine's view agrees (Observe).
    s.setup = [](Pool& p) {
      ASSERT_TRUE(p.Create("v", kMiB, {}).ok());
      ASSERT_TRUE(p.FenceVolume("v", 3).ok());
    };
    s.op = [](Pool& p) { return p.FenceVolume("v", 7).status(); };
    s.before = {true, kMiB, {}, 3};
    s.after = {true, kMiB, {}, 7};
  } else if (prefix == "snapshot") {
    s.snapshot_target = true;
    s.has_src = true;
    s.copy_path = point.find(".copy_") != std::string::npos;
    if (point == "snapshot.delete_meta") {
      s.setup = [](Pool& p) {
        MakeSrc(p);
        ASSERT_TRUE(p.CreateSnapshot("s", "src").ok());
        WaitReady(p);
      };
      s.op = [](Pool& p) { return p.DeleteSnapshot("s"); };
      s.before = {true, 4 * kMiB, {}};
      s.after = {};
    } else {
      s.needs_reflink = !s.copy_path;
      s.setup = [](Pool& p) { MakeSrc(p); };
      s.op = [](Pool& p) { return p.CreateSnapshot("s", "src").status(); };
      s.before = {};
      s.after = {true, 4 * kMiB, {}};
    }
  } else if (prefix == "restore" || prefix == "clone") {
    s.has_src = true;
    s.copy_path = point.find(".copy_") != std::string::npos;
    s.needs_reflink = !s.copy_path;
    if (prefix == "restore") {
      s.keeps_snapshot = true;
      s.setup = [](Pool& p) {
        MakeSrc(p);
        ASSERT_TRUE(p.CreateSnapshot("s", "src").ok());
        WaitReady(p);
      };
      s.op = [](Pool& p) {
        return p.Create(CreateSpec::Restore("v", "s", 8 * kMiB, NewQos())).status();
      };
    } else {
      s.setup = [](Pool& p) { MakeSrc(p); };
      s.op = [](Pool& p) {
        return p.Create(CreateSpec::Clone("v", "src", 8 * kMiB, NewQos())).status();
      };
    }
    s.before = {};
    s.after = {true, 8 * kMiB, NewQos()};
  } else {
    return std::nullopt;
  }
  return s;
}

// An XFS file system with reflink for the FICLONE-path points, mounted once per process.
std::string XfsMount() {
  static std::string mnt = [] {
    char tmpl[] = "/tmp/pool_crash_xfs.XXXXXX";
    if (!mkdtemp(tmpl)) return std::string();
    std::string root = tmpl, img = root + "/xfs.img", dir = root + "/mnt";
    std::string cmd = "mkdir -p " + dir + " && truncate -s 512M " + img + " && mkfs.xfs -q -f -m reflink=1 " +
                      img + " >/dev/null 2>&1 && mount -o loop " + img + " " + dir + " 2>/dev/null";
    if (std::system(cmd.c_str()) != 0) {
      fs::remove_all(root);
      return std::string();
    }
    static std::string cleanup_root = root;
    std::atexit([] {
      umount2((cleanup_root + "/mnt").c_str(), MNT_DETACH);
      fs::remove_all(cleanup_root);
    });
    return dir;
  }();
  return mnt;
}

// Exact expectations where the ordering makes the outcome certain. The process dies without
// losing the page cache, so a rename counts as done even before its directory fsync.
struct Expectation {
  Outcome outcome;
  std::set<std::string> orphans;
  std::vector<std::string> abandoned = {};
};
const std::map<std::string, Expectation>& Expected() {
  static const std::map<std::string, Expectation> m = {
      {"create.data", {Outcome::kOld, {"volumes/v.img"}}},
      {"create.meta_tmp", {Outcome::kOld, {"volumes/v.img", "volumes/.v.json.tmp"}}},
      {"create.meta_renamed", {Outcome::kNew, {}}},
      {"delete.meta", {Outcome::kNew, {"volumes/v.img"}}},
      {"resize.data", {Outcome::kOld, {}}},
      {"resize.meta_tmp", {Outcome::kOld, {"volumes/.v.json.tmp"}}},
      {"resize.meta_renamed", {Outcome::kNew, {}}},
      {"qos.meta_tmp", {Outcome::kOld, {"volumes/.v.json.tmp"}}},
      {"qos.meta_renamed", {Outcome::kNew, {}}},
      {"schedule.meta_tmp", {Outcome::kOld, {"volumes/.v.json.tmp"}}},
      {"schedule.meta_renamed", {Outcome::kNew, {}}},
      {"fence.meta_tmp", {Outcome::kOld, {"volumes/.v.json.tmp"}}},
      {"fence.meta_renamed", {Outcome::kNew, {}}},
      {"snapshot.cloned", {Outcome::kOld, {"snapshots/.s.img.tmp"}}},
      {"snapshot.data", {Outcome::kOld, {"snapshots/s.img"}}},
      {"snapshot.meta_tmp", {Outcome::kOld, {"snapshots/s.img", "snapshots/.s.json.tmp"}}},
      {"snapshot.meta_renamed", {Outcome::kNew, {}}},
      {"snapshot.copy_data", {Outcome::kOld, {"snapshots/s.img"}}},
      // A copy snapshot cut short lost its point in time: gone, and reported.
      {"snapshot.copy_started", {Outcome::kOld, {}, {"snapshot/s"}}},
      {"snapshot.copy_done", {Outcome::kOld, {}, {"snapshot/s"}}},
      {"snapshot.delete_meta", {Outcome::kNew, {"snapshots/s.img"}}},
      {"restore.cloned", {Outcome::kOld, {"volumes/.v.img.tmp"}}},
      {"restore.data", {Outcome::kOld, {"volumes/v.img"}}},
      {"restore.meta_tmp", {Outcome::kOld, {"volumes/v.img", "volumes/.v.json.tmp"}}},
      {"restore.meta_renamed", {Outcome::kNew, {}}},
      {"restore.copy_data", {Outcome::kOld, {"volumes/v.img"}}},
      // A restore's source never changes: the copy restarts and completes.
      {"restore.copy_started", {Outcome::kNew, {}}},
      {"restore.copy_done", {Outcome::kNew, {}}},
      {"clone.cloned", {Outcome::kOld, {"volumes/.v.img.tmp"}}},
      {"clone.data", {Outcome::kOld, {"volumes/v.img"}}},
      {"clone.meta_tmp", {Outcome::kOld, {"volumes/v.img", "volumes/.v.json.tmp"}}},
      {"clone.meta_renamed", {Outcome::kNew, {}}},
      {"clone.copy_data", {Outcome::kOld, {"volumes/v.img"}}},
      {"clone.copy_started", {Outcome::kOld, {}, {"volume/v"}}},
      {"clone.copy_done", {Outcome::kOld, {}, {"volume/v"}}},
  };
  return m;
}

class PoolCrashTest : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    ASSERT_TRUE(tmp_.Create("pool_crash")) << tmp_.error();
    root_ = tmp_.path();
    opts_.dir = root_ + "/pool";
  }
  void TearDown() override {
    tmp_.Remove();
    if (!root_on_xfs_.empty()) fs::remove_all(root_on_xfs_);
  }

  std::unique_ptr<Pool> Open() {
    auto p = Pool::Open(opts_);
    EXPECT_TRUE(p.ok()) << p.status().message();
    return p.ok() ? std::move(p.value()) : nullptr;
  }

  // Reads 64 KiB at `off` of a data file and checks it is all `c`.
  static void ExpectContent(const std::string& path, uint64_t off, char c) {
    int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
    ASSERT_GE(fd, 0) << path;
    std::string buf(64 * 1024, '\0');
    ASSERT_EQ(pread(fd, buf.data(), buf.size(), static_cast<off_t>(off)), static_cast<ssize_t>(buf.size()));
    close(fd);
    EXPECT_EQ(buf, std::string(buf.size(), c)) << path << " @" << off;
  }

  Observed Observe(Pool& pool, const Scenario& sc) {
    WaitReady(pool);
    if (sc.snapshot_target) {
      auto snap = pool.InspectSnapshot("s");
      if (!snap.ok()) {
        EXPECT_EQ(snap.status().code(), ENOENT) << snap.status().message();
        return {};
      }
      EXPECT_TRUE(snap->ready) << snap->error;
      EXPECT_EQ(fs::file_size(snap->path), snap->size);
      ExpectContent(snap->path, 3 * kMiB, kSrcByte);
      return {true, snap->size, {}};
    }
    auto info = pool.Inspect("v");
    if (!info.ok()) {
      EXPECT_EQ(info.status().code(), ENOENT) << info.status().message();
      return {};
    }
    // The data file must agree with the committed size, and the live volume with both.
    EXPECT_EQ(fs::file_size(opts_.dir + "/volumes/v.img"), info->size);
    EXPECT_TRUE(info->ready);
    auto live = pool.Acquire("v");
    if (!live) {
      ADD_FAILURE() << "volume v is not exported";
      return {};
    }
    EXPECT_EQ(live->size(), info->size);
    EXPECT_EQ(live->throttle().limits(), info->qos);
    EXPECT_EQ(live->fence_epoch(), info->fence_epoch);
    if (sc.has_src) {
      ExpectContent(info->path, 0, kSrcByte);
      ExpectContent(info->path, 3 * kMiB, kSrcByte);
      ExpectContent(info->path, 6 * kMiB, '\0');  // grown past the source: zeros
    }
    return {true, info->size, info->qos, info->fence_epoch, info->schedule};
  }

  test::TempDir tmp_;
  std::string root_;
  std::string root_on_xfs_;
  PoolOptions opts_;
};

TEST_P(PoolCrashTest, CrashLeavesOldOrNewState) {
  const std::string point = GetParam();
  auto scenario = ScenarioFor(point);
  ASSERT_TRUE(scenario) << "no crash scenario for fault point " << point
                        << ": add one to pool_crash_test.cpp";
  if (scenario->needs_reflink) {
    std::string mnt = XfsMount();
    if (mnt.empty()) GTEST_SKIP() << "the FICLONE path needs an XFS loop mount (root and loop devices)";
    root_on_xfs_ = mnt + "/" + fs::path(root_).filename().string();
    opts_.dir = root_on_xfs_ + "/pool";
  }
  opts_.disable_reflink = scenario->copy_path;
  {
    auto pool = Open();
    ASSERT_TRUE(pool);
    if (scenario->needs_reflink) {
      ASSERT_TRUE(pool->Info().reflink) << "XFS without reflink?";
    }
    // A bystander volume must survive every crash untouched.
    ASSERT_TRUE(pool->Create("bystander", kMiB, {}).ok());
    scenario->setup(*pool);
    if (HasFatalFailure()) return;
  }  // the child needs the pool lock

  pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    // Set after fork, in the child only: the parent has already evaluated fault points.
    setenv("NBDCSI_FAULT", point.c_str(), 1);
    auto p = Pool::Open(opts_);
    if (!p.ok()) _exit(2);
    Status s = scenario->op(*p.value());
    // Points inside a background copy fire on the copy's thread: give it time to get there.
    if (s.ok()) test::WaitUntil([&] { return CopiesDone(*p.value()); });
    _exit(s.ok() ? 0 : 3);  // reaching here means the point never fired
  }
  int status = 0;
  ASSERT_EQ(waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFEXITED(status)) << "child died by signal " << WTERMSIG(status);
  ASSERT_EQ(WEXITSTATUS(status), kFaultExitCode)
      << "fault point " << point << " never fired (child exit " << WEXITSTATUS(status) << ")";

  auto pool = Open();
  ASSERT_TRUE(pool);
  Observed got = Observe(*pool, *scenario);
  bool is_old = got == scenario->before, is_new = got == scenario->after;
  EXPECT_TRUE(is_old || is_new) << "half-done state after crash at " << point << ": present="
                                << got.present << " size=" << got.size;
  PoolInfo info = pool->Info();
  std::set<std::string> orphans(info.cleaned_orphans.begin(), info.cleaned_orphans.end());
  if (auto e = Expected().find(point); e != Expected().end()) {
    if (e->second.outcome == Outcome::kOld) {
      EXPECT_TRUE(is_old) << point;
    } else if (e->second.outcome == Outcome::kNew) {
      EXPECT_TRUE(is_new) << point;
    }
    EXPECT_EQ(orphans, e->second.orphans) << point;
    EXPECT_EQ(info.abandoned_copies, e->second.abandoned) << point;
  } else {
    ADD_FAILURE() << "no expected outcome for fault point " << point;
  }
  EXPECT_TRUE(info.broken_volumes.empty());

  // Nothing but complete NAME.img + NAME.json pairs may remain.
  std::set<std::string> files;
  for (const auto& ent : fs::directory_iterator(opts_.dir + "/volumes")) files.insert(ent.path().filename());
  std::set<std::string> want = {"bystander.img", "bystander.json"};
  if (got.present && !scenario->snapshot_target) want.insert({"v.img", "v.json"});
  if (scenario->has_src) want.insert({"src.img", "src.json"});
  EXPECT_EQ(files, want);
  std::set<std::string> snap_files, want_snaps;
  for (const auto& ent : fs::directory_iterator(opts_.dir + "/snapshots")) snap_files.insert(ent.path().filename());
  if ((got.present && scenario->snapshot_target) || scenario->keeps_snapshot) want_snaps = {"s.img", "s.json"};
  EXPECT_EQ(snap_files, want_snaps);
  auto by = pool->Inspect("bystander");
  ASSERT_TRUE(by.ok());
  EXPECT_EQ(by->size, kMiB);

  // The pool stays fully usable: the interrupted operation can simply be retried.
  Status retry = scenario->op(*pool);
  if ((point.rfind("delete.", 0) == 0 || point == "snapshot.delete_meta") && is_new) {
    EXPECT_EQ(retry.code(), ENOENT);
  } else {
    EXPECT_TRUE(retry.ok()) << retry.message();
  }
  EXPECT_EQ(Observe(*pool, *scenario), scenario->after);
}

INSTANTIATE_TEST_SUITE_P(EveryFaultPoint, PoolCrashTest, ::testing::ValuesIn(KnownFaultPoints()),
                         [](const auto& info) {
                           std::string n = info.param;
                           for (char& c : n)
                             if (c == '.') c = '_';
                           return n;
                         });

TEST(FaultPointTest, UnarmedPointsDoNothingAndListIsUnique) {
  for (const auto& p : KnownFaultPoints()) FaultPoint(p.c_str());  // must return
  std::set<std::string> unique(KnownFaultPoints().begin(), KnownFaultPoints().end());
  EXPECT_EQ(unique.size(), KnownFaultPoints().size());
  EXPECT_FALSE(KnownFaultPoints().empty());
}

TEST(FaultPointTest, ArmedPointExitsOnlyAtItsName) {
  pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    setenv("NBDCSI_FAULT", "resize.data", 1);
    FaultPoint("create.data");  // a different point: keeps going
    FaultPoint("resize.data");
    _exit(0);
  }
  int status = 0;
  ASSERT_EQ(waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), kFaultExitCode);
}

}  // namespace
}  // namespace nbdcsi::datapath
