// Crash safety: for every fault point compiled in, a forked child runs the operation with
// NBDCSI_FAULT set and dies there (_exit, as kill -9 would), then the parent reopens the pool
// and checks that it holds the state before or after the operation, never something between.
#include <sys/wait.h>
#include <unistd.h>

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

namespace nbdcsi::datapath {
namespace {

namespace fs = std::filesystem;
constexpr uint64_t kMiB = 1 << 20;

// What a volume looks like from outside; "absent" when the optional is empty.
struct Observed {
  bool present = false;
  uint64_t size = 0;
  QosLimits qos;
  bool operator==(const Observed&) const = default;
};

enum class Outcome { kOld, kNew, kEither };

struct Scenario {
  std::function<void(Pool&)> setup;   // runs in the parent before the crash
  std::function<Status(Pool&)> op;    // runs in the child, which dies inside it
  Observed before, after;             // states of volume "v"
};

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
  } else {
    return std::nullopt;
  }
  return s;
}

// Exact expectations where the ordering makes the outcome certain. The process dies without
// losing the page cache, so a rename counts as done even before its directory fsync.
struct Expectation {
  Outcome outcome;
  std::set<std::string> orphans;
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
  };
  return m;
}

class PoolCrashTest : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    std::string tmpl = "/tmp/pool_crash.XXXXXX";
    ASSERT_NE(mkdtemp(tmpl.data()), nullptr);
    root_ = tmpl;
    opts_.dir = root_ + "/pool";
  }
  void TearDown() override { fs::remove_all(root_); }

  std::unique_ptr<Pool> Open() {
    auto p = Pool::Open(opts_);
    EXPECT_TRUE(p.ok()) << p.status().message();
    return p.ok() ? std::move(p.value()) : nullptr;
  }

  Observed Observe(Pool& pool) {
    auto info = pool.Inspect("v");
    if (!info.ok()) {
      EXPECT_EQ(info.status().code(), ENOENT) << info.status().message();
      return {};
    }
    // The data file must agree with the committed size, and the live volume with both.
    EXPECT_EQ(fs::file_size(opts_.dir + "/volumes/v.img"), info->size);
    EXPECT_EQ(pool.Acquire("v")->size(), info->size);
    EXPECT_EQ(pool.Acquire("v")->throttle().limits(), info->qos);
    return {true, info->size, info->qos};
  }

  std::string root_;
  PoolOptions opts_;
};

TEST_P(PoolCrashTest, CrashLeavesOldOrNewState) {
  const std::string point = GetParam();
  auto scenario = ScenarioFor(point);
  ASSERT_TRUE(scenario) << "no crash scenario for fault point " << point
                        << ": add one to pool_crash_test.cpp";
  {
    auto pool = Open();
    ASSERT_TRUE(pool);
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
    _exit(s.ok() ? 0 : 3);  // reaching here means the point never fired
  }
  int status = 0;
  ASSERT_EQ(waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFEXITED(status)) << "child died by signal " << WTERMSIG(status);
  ASSERT_EQ(WEXITSTATUS(status), kFaultExitCode)
      << "fault point " << point << " never fired (child exit " << WEXITSTATUS(status) << ")";

  auto pool = Open();
  ASSERT_TRUE(pool);
  Observed got = Observe(*pool);
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
  }
  EXPECT_TRUE(info.broken_volumes.empty());

  // Nothing but complete NAME.img + NAME.json pairs may remain.
  std::set<std::string> files;
  for (const auto& ent : fs::directory_iterator(opts_.dir + "/volumes")) files.insert(ent.path().filename());
  std::set<std::string> want = {"bystander.img", "bystander.json"};
  if (got.present) want.insert({"v.img", "v.json"});
  EXPECT_EQ(files, want);
  auto by = pool->Inspect("bystander");
  ASSERT_TRUE(by.ok());
  EXPECT_EQ(by->size, kMiB);

  // The pool stays fully usable: the interrupted operation can simply be retried.
  Status retry = scenario->op(*pool);
  if (point.rfind("delete.", 0) == 0 && is_new) {
    EXPECT_EQ(retry.code(), ENOENT);
  } else {
    EXPECT_TRUE(retry.ok()) << retry.message();
  }
  EXPECT_EQ(Observe(*pool), scenario->after);
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
