// Pool behaviour through its public API on a real directory: lifecycle, idempotency, errors,
// capacity, persistence across reopen, the pool lock, orphan and broken-volume handling.
#include "datapath/pool/pool.h"
#include "test/support/pool.h"
#include "test/support/temp_dir.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <thread>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

namespace nbdcsi::datapath {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;
using ::testing::UnorderedElementsAre;

constexpr uint64_t kMiB = 1 << 20;
constexpr uint64_t kGiB = uint64_t{1} << 30;

class PoolTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(tmp_.Create("pool_test")) << tmp_.error();
    root_ = tmp_.path();
    opts_.dir = root_ + "/pool";
  }
  void TearDown() override {
    pool_.reset();
    tmp_.Remove();
  }
  void OpenPool() {
    pool_.reset();
    ASSERT_TRUE(test::OpenPool(opts_, &pool_));
  }
  std::string VolDir() const { return opts_.dir + "/volumes"; }
  std::vector<std::string> Files() const {
    std::vector<std::string> out;
    for (const auto& e : fs::directory_iterator(VolDir())) out.push_back(e.path().filename());
    std::sort(out.begin(), out.end());
    return out;
  }

  test::TempDir tmp_;
  std::string root_;
  PoolOptions opts_;
  std::unique_ptr<Pool> pool_;
};

TEST_F(PoolTest, OpenCreatesLayout) {
  OpenPool();
  EXPECT_TRUE(fs::is_directory(VolDir()));
  EXPECT_TRUE(fs::exists(opts_.dir + "/.pool.lock"));
  EXPECT_TRUE(pool_->List().empty());
  PoolInfo info = pool_->Info();
  EXPECT_EQ(info.dir, opts_.dir);
  EXPECT_GT(info.capacity, 0u);
  EXPECT_FALSE(info.fs_type.empty());
  EXPECT_EQ(info.volumes, 0u);
}

TEST_F(PoolTest, CreateInspectListDelete) {
  OpenPool();
  QosLimits qos;
  qos.max_iops = 1000;
  auto v = pool_->Create("vol-a", 64 * kMiB, qos);
  ASSERT_TRUE(v.ok()) << v.status().message();
  EXPECT_EQ(v->name, "vol-a");
  EXPECT_EQ(v->size, 64 * kMiB);
  EXPECT_EQ(v->qos, qos);
  EXPECT_EQ(v->path, VolDir() + "/vol-a.img");
  EXPECT_GT(v->created_unix_ns, 0);
  EXPECT_EQ(fs::file_size(v->path), 64 * kMiB);
  EXPECT_LT(v->allocated, kMiB) << "a new volume must be thin";
  EXPECT_THAT(Files(), UnorderedElementsAre("vol-a.img", "vol-a.json"));

  ASSERT_TRUE(pool_->Create("vol-b", 4096, {}).ok());
  auto list = pool_->List();
  ASSERT_EQ(list.size(), 2u);
  EXPECT_EQ(list[0].name, "vol-a");
  EXPECT_EQ(list[1].name, "vol-b");
  EXPECT_THAT(pool_->Names(), UnorderedElementsAre("vol-a", "vol-b"));
  EXPECT_EQ(pool_->Info().provisioned, 64 * kMiB + 4096);
  EXPECT_EQ(pool_->Info().volumes, 2u);

  auto vol = pool_->Acquire("vol-a");
  ASSERT_NE(vol, nullptr);
  EXPECT_EQ(vol->size(), 64 * kMiB);
  EXPECT_GE(vol->direct_fd(), 0);
  EXPECT_GE(vol->buffered_fd(), 0);
  EXPECT_EQ(vol->throttle().limits(), qos);
  // Writing through the buffered fd allocates blocks, which Inspect reports.
  std::string block(1 << 16, 'x');
  ASSERT_EQ(pwrite(vol->buffered_fd(), block.data(), block.size(), 0), static_cast<ssize_t>(block.size()));
  ASSERT_EQ(fsync(vol->buffered_fd()), 0);
  auto again = pool_->Inspect("vol-a");
  ASSERT_TRUE(again.ok());
  EXPECT_GE(again->allocated, block.size());

  ASSERT_TRUE(pool_->Delete("vol-a").ok());
  EXPECT_EQ(pool_->Acquire("vol-a"), nullptr);
  EXPECT_EQ(pool_->Inspect("vol-a").status().code(), ENOENT);
  EXPECT_THAT(Files(), UnorderedElementsAre("vol-b.img", "vol-b.json"));
  // A session that still holds the volume keeps working on its descriptors.
  char c = 0;
  EXPECT_EQ(pread(vol->buffered_fd(), &c, 1, 0), 1);
  EXPECT_EQ(c, 'x');
}

TEST_F(PoolTest, CreateIsIdempotentAndDetectsConflicts) {
  OpenPool();
  QosLimits qos;
  qos.max_write_bps = 100 * kMiB;
  auto first = pool_->Create("v", kGiB, qos);
  ASSERT_TRUE(first.ok());
  auto second = pool_->Create("v", kGiB, qos);
  ASSERT_TRUE(second.ok()) << second.status().message();
  EXPECT_EQ(second->created_unix_ns, first->created_unix_ns);

  auto other_size = pool_->Create("v", 2 * kGiB, qos);
  EXPECT_EQ(other_size.status().code(), EEXIST);
  EXPECT_THAT(other_size.status().message(), HasSubstr("already exists with size"));
  EXPECT_EQ(pool_->Create("v", kGiB, qos, /*read_only=*/true).status().code(), EEXIST);
  EXPECT_EQ(pool_->Create("v", kGiB, QosLimits{}).status().code(), EEXIST);
  EXPECT_EQ(pool_->Inspect("v")->size, kGiB);
}

TEST_F(PoolTest, RejectsBadSizes) {
  OpenPool();
  for (uint64_t size : {uint64_t{0}, uint64_t{512}, uint64_t{4097}, kGiB + 512}) {
    auto r = pool_->Create("v", size, {});
    EXPECT_EQ(r.status().code(), EINVAL) << size;
  }
  EXPECT_THAT(pool_->Create("v", 4097, {}).status().message(), HasSubstr("multiple of 4096"));
  EXPECT_TRUE(Files().empty());
}

TEST_F(PoolTest, UnknownVolumeIsENOENT) {
  OpenPool();
  EXPECT_EQ(pool_->Delete("nope").code(), ENOENT);
  EXPECT_EQ(pool_->Resize("nope", kGiB).status().code(), ENOENT);
  EXPECT_EQ(pool_->SetQos("nope", {}).code(), ENOENT);
  EXPECT_EQ(pool_->Inspect("nope").status().code(), ENOENT);
  EXPECT_THAT(pool_->Inspect("nope").status().message(), HasSubstr("nope"));
  EXPECT_EQ(pool_->Acquire("nope"), nullptr);
}

TEST_F(PoolTest, DeleteRefusedWhileConnected) {
  OpenPool();
  ASSERT_TRUE(pool_->Create("v", kMiB, {}).ok());
  auto vol = pool_->Acquire("v");
  vol->stats().ConnectionOpened();
  vol->stats().ConnectionOpened();
  Status s = pool_->Delete("v");
  EXPECT_EQ(s.code(), EBUSY);
  EXPECT_EQ(s.message(), "volume v has 2 open NBD connections");
  EXPECT_NE(pool_->Acquire("v"), nullptr);
  EXPECT_THAT(Files(), UnorderedElementsAre("v.img", "v.json"));
  vol->stats().ConnectionClosed();
  vol->stats().ConnectionClosed();
  EXPECT_TRUE(pool_->Delete("v").ok());
  EXPECT_TRUE(Files().empty());
}

TEST_F(PoolTest, ResizeGrowsOnlyAndRescalesQos) {
  OpenPool();
  QosLimits qos;
  qos.iops_per_gib = 100;
  ASSERT_TRUE(pool_->Create("v", kGiB, qos).ok());
  auto vol = pool_->Acquire("v");
  EXPECT_EQ(vol->throttle().effective().iops, 100u);

  auto shrink = pool_->Resize("v", kGiB / 2);
  EXPECT_EQ(shrink.status().code(), EINVAL);
  EXPECT_EQ(shrink.status().message(),
            fmt::format("shrinking volume v from {} to {} is not supported", kGiB, kGiB / 2));
  EXPECT_EQ(pool_->Resize("v", kGiB + 1).status().code(), EINVAL);

  auto same = pool_->Resize("v", kGiB);
  ASSERT_TRUE(same.ok());
  EXPECT_EQ(same->size, kGiB);

  auto grown = pool_->Resize("v", 3 * kGiB);
  ASSERT_TRUE(grown.ok()) << grown.status().message();
  EXPECT_EQ(grown->size, 3 * kGiB);
  EXPECT_EQ(vol->size(), 3 * kGiB) << "live volume sees the new size";
  EXPECT_EQ(fs::file_size(VolDir() + "/v.img"), 3 * kGiB);
  EXPECT_EQ(vol->throttle().effective().iops, 300u);
}

TEST_F(PoolTest, SetQosPersistsAndAppliesLive) {
  OpenPool();
  ASSERT_TRUE(pool_->Create("v", kGiB, {}).ok());
  auto vol = pool_->Acquire("v");
  EXPECT_TRUE(vol->throttle().unlimited());
  QosLimits qos;
  qos.max_read_iops = 50;
  qos.burst_ms = 1000;
  ASSERT_TRUE(pool_->SetQos("v", qos).ok());
  EXPECT_EQ(vol->throttle().limits(), qos);
  EXPECT_EQ(pool_->Inspect("v")->qos, qos);

  QosLimits bad = qos;
  bad.burst_ms = kMaxBurstMs + 1;
  Status s = pool_->SetQos("v", bad);
  EXPECT_EQ(s.code(), EINVAL);
  EXPECT_THAT(s.message(), HasSubstr("burst_ms"));
  EXPECT_EQ(vol->throttle().limits(), qos) << "a rejected change must not apply";

  OpenPool();
  EXPECT_EQ(pool_->Inspect("v")->qos, qos);
  EXPECT_EQ(pool_->Acquire("v")->throttle().limits(), qos);
}

struct NameCase {
  std::string name;
  bool ok;
  std::string message;  // substring of the error
};

TEST_F(PoolTest, NameValidationTable) {
  const std::vector<NameCase> cases = {
      {"pvc-0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0", true, ""},
      {"a", true, ""},
      {"A.b_c-9", true, ""},
      {std::string(128, 'x'), true, ""},
      {"", false, "volume name must not be empty"},
      {std::string(200, 'x'), false, "volume name is 200 bytes, the limit is 128"},
      {std::string(129, 'x'), false, "is 129 bytes, the limit is 128"},
      {"a/b", false, "volume name must not contain '/'"},
      {"../etc", false, "volume name must not contain '/'"},
      {".hidden", false, "must not start with '.'"},
      {"..", false, "must not start with '.'"},
      {"-rf", false, "must not start with '-'"},
      {std::string("a\0b", 3), false, "volume name contains NUL"},
      {"a b", false, "invalid byte 0x20"},
      {"a*b", false, "invalid character '*'"},
      {"a:b", false, "invalid character ':'"},
      {"caf\xc3\xa9", false, "invalid byte 0xc3"},
      {"a\nb", false, "invalid byte 0x0a"},
  };
  OpenPool();
  for (const auto& c : cases) {
    Status s = ValidateVolumeName(c.name);
    EXPECT_EQ(s.ok(), c.ok) << "name: " << c.name;
    if (!c.ok) {
      EXPECT_EQ(s.code(), EINVAL);
      EXPECT_THAT(s.message(), HasSubstr(c.message)) << "name: " << c.name;
      // Every entry point rejects it before touching the disk.
      EXPECT_EQ(pool_->Create(c.name, kMiB, {}).status().code(), EINVAL);
      EXPECT_EQ(pool_->Delete(c.name).code(), EINVAL);
    }
  }
  EXPECT_TRUE(fs::is_empty(VolDir())) << "a rejected name must leave no file behind";
}

TEST_F(PoolTest, OvercommitLimitIsENOSPC) {
  opts_.capacity_bytes = 10 * kGiB;
  opts_.overcommit_ratio = 1.5;
  OpenPool();
  ASSERT_TRUE(pool_->Create("a", 10 * kGiB, {}).ok());
  ASSERT_TRUE(pool_->Create("b", 5 * kGiB, {}).ok()) << "exactly at the 15 GiB limit";
  auto c = pool_->Create("c", 4096, {});
  EXPECT_EQ(c.status().code(), ENOSPC);
  EXPECT_THAT(c.status().message(), HasSubstr("16106127360 bytes"));  // 15 GiB provisioned
  EXPECT_THAT(c.status().message(), HasSubstr("overcommit 1.5"));
  EXPECT_FALSE(fs::exists(VolDir() + "/c.img"));
  EXPECT_EQ(pool_->Resize("b", 5 * kGiB + 4096).status().code(), ENOSPC);
  EXPECT_EQ(pool_->Inspect("b")->size, 5 * kGiB);
  // Idempotent re-create of an existing volume is not a new provisioning.
  EXPECT_TRUE(pool_->Create("b", 5 * kGiB, {}).ok());

  ASSERT_TRUE(pool_->Delete("a").ok());
  EXPECT_TRUE(pool_->Create("c", 10 * kGiB, {}).ok());
  PoolInfo info = pool_->Info();
  EXPECT_EQ(info.capacity, 10 * kGiB);
  EXPECT_EQ(info.provisioned, 15 * kGiB);
  EXPECT_DOUBLE_EQ(info.overcommit_ratio, 1.5);
}

TEST_F(PoolTest, ConcurrentCreatesNeverExceedCapacity) {
  opts_.capacity_bytes = 10 * kMiB;
  OpenPool();
  std::atomic<int> ok{0}, nospc{0}, other{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 6; ++i) {
        auto r = pool_->Create(fmt::format("t{}-{}", t, i), kMiB, {});
        (r.ok() ? ok : r.status().code() == ENOSPC ? nospc : other)++;
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(ok.load(), 10);
  EXPECT_EQ(nospc.load(), 14);
  EXPECT_EQ(other.load(), 0);
  EXPECT_EQ(pool_->Info().provisioned, 10 * kMiB);
  EXPECT_EQ(Files().size(), 20u);
}

TEST_F(PoolTest, ConcurrentSameNameCreatesAgree) {
  OpenPool();
  std::atomic<int> ok{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t)
    threads.emplace_back([&] { ok += pool_->Create("same", kMiB, {}).ok(); });
  for (auto& th : threads) th.join();
  EXPECT_EQ(ok.load(), 4);
  EXPECT_THAT(Files(), UnorderedElementsAre("same.img", "same.json"));
}

TEST_F(PoolTest, ReopenKeepsEverything) {
  OpenPool();
  QosLimits qos;
  qos.max_iops = 7;
  qos.bps_per_gib = 1000;
  qos.burst_ms = 250;
  auto a = pool_->Create("a", 2 * kGiB, qos);
  ASSERT_TRUE(a.ok());
  ASSERT_TRUE(pool_->Create("ro", kMiB, {}, /*read_only=*/true).ok());
  ASSERT_TRUE(pool_->Create("gone", kMiB, {}).ok());
  ASSERT_TRUE(pool_->Resize("a", 4 * kGiB).ok());
  ASSERT_TRUE(pool_->Delete("gone").ok());
  auto vol = pool_->Acquire("a");
  std::string data = "persisted";
  ASSERT_EQ(pwrite(vol->buffered_fd(), data.data(), data.size(), 3 * kGiB), static_cast<ssize_t>(data.size()));
  vol.reset();

  OpenPool();
  auto list = pool_->List();
  ASSERT_EQ(list.size(), 2u);
  EXPECT_EQ(list[0].name, "a");
  EXPECT_EQ(list[0].size, 4 * kGiB);
  EXPECT_EQ(list[0].qos, qos);
  EXPECT_EQ(list[0].created_unix_ns, a->created_unix_ns);
  EXPECT_FALSE(list[0].read_only);
  EXPECT_EQ(list[1].name, "ro");
  EXPECT_TRUE(list[1].read_only);
  EXPECT_TRUE(pool_->Acquire("ro")->read_only());
  EXPECT_TRUE(pool_->Info().cleaned_orphans.empty());
  EXPECT_TRUE(pool_->Info().broken_volumes.empty());
  std::string back(data.size(), '\0');
  ASSERT_EQ(pread(pool_->Acquire("a")->buffered_fd(), back.data(), back.size(), 3 * kGiB),
            static_cast<ssize_t>(back.size()));
  EXPECT_EQ(back, data);
}

TEST_F(PoolTest, SecondOpenInSameProcessIsEBUSY) {
  OpenPool();
  auto second = Pool::Open(opts_);
  ASSERT_FALSE(second.ok());
  EXPECT_EQ(second.status().code(), EBUSY);
  EXPECT_EQ(second.status().message(),
            fmt::format("pool {0} is in use by another nbd-datapathd (lock {0}/.pool.lock held)", opts_.dir));
  pool_.reset();  // releases the lock
  EXPECT_TRUE(Pool::Open(opts_).ok());
}

TEST_F(PoolTest, LockHeldByForkedChild) {
  int to_parent[2], to_child[2];
  ASSERT_EQ(pipe(to_parent), 0);
  ASSERT_EQ(pipe(to_child), 0);
  pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    auto p = Pool::Open(opts_);
    char c = p.ok() ? 'y' : 'n';
    if (write(to_parent[1], &c, 1) != 1) _exit(2);
    if (read(to_child[0], &c, 1) != 1) _exit(3);  // hold the pool until told to go
    _exit(p.ok() ? 0 : 1);
  }
  char c = 0;
  ASSERT_EQ(read(to_parent[0], &c, 1), 1);
  ASSERT_EQ(c, 'y');
  auto busy = Pool::Open(opts_);
  EXPECT_EQ(busy.status().code(), EBUSY);
  ASSERT_EQ(write(to_child[1], "x", 1), 1);
  int status = 0;
  ASSERT_EQ(waitpid(pid, &status, 0), pid);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  // The lock dies with its holder, even though the child never closed anything.
  EXPECT_TRUE(Pool::Open(opts_).ok());
  for (int fd : {to_parent[0], to_parent[1], to_child[0], to_child[1]}) close(fd);
}

void WriteFile(const std::string& path, const std::string& text) {
  std::ofstream(path, std::ios::binary) << text;
}

TEST_F(PoolTest, OrphansAreRemovedAndReported) {
  OpenPool();
  ASSERT_TRUE(pool_->Create("keep", kMiB, {}).ok());
  pool_.reset();
  WriteFile(VolDir() + "/lost.img", "data without metadata");
  WriteFile(VolDir() + "/.keep.json.tmp", "{\"half\":");
  WriteFile(VolDir() + "/README", "not ours: left alone");
  OpenPool();
  PoolInfo info = pool_->Info();
  EXPECT_THAT(info.cleaned_orphans, UnorderedElementsAre("volumes/lost.img", "volumes/.keep.json.tmp"));
  EXPECT_THAT(Files(), UnorderedElementsAre("README", "keep.img", "keep.json"));
  EXPECT_EQ(pool_->Names(), std::vector<std::string>{"keep"});
  OpenPool();
  EXPECT_TRUE(pool_->Info().cleaned_orphans.empty()) << "reported once, for the open that cleaned";
}

TEST_F(PoolTest, BrokenVolumesAreKeptAndReported) {
  OpenPool();
  ASSERT_TRUE(pool_->Create("nodata", kMiB, {}).ok());
  ASSERT_TRUE(pool_->Create("garbled", kMiB, {}).ok());
  ASSERT_TRUE(pool_->Create("future", kMiB, {}).ok());
  ASSERT_TRUE(pool_->Create("fine", kMiB, {}).ok());
  pool_.reset();
  fs::remove(VolDir() + "/nodata.img");
  WriteFile(VolDir() + "/garbled.json", "{not json");
  WriteFile(VolDir() + "/future.json",
            R"({"version": 2, "name": "future", "size": 1048576})");
  OpenPool();
  PoolInfo info = pool_->Info();
  EXPECT_EQ(info.volumes, 1u);
  ASSERT_EQ(info.broken_volumes.size(), 3u);
  EXPECT_THAT(info.broken_volumes[0], HasSubstr("future: "));
  EXPECT_THAT(info.broken_volumes[0], HasSubstr("version 2 is not supported"));
  EXPECT_THAT(info.broken_volumes[1], HasSubstr("not valid JSON"));
  EXPECT_THAT(info.broken_volumes[2], HasSubstr("nodata.img is missing"));
  // Their data is not treated as orphaned: nothing is deleted behind the operator's back.
  EXPECT_TRUE(fs::exists(VolDir() + "/garbled.img"));
  EXPECT_TRUE(info.cleaned_orphans.empty());
  EXPECT_EQ(pool_->Create("garbled", kMiB, {}).status().code(), EEXIST);
  EXPECT_EQ(pool_->Inspect("garbled").status().code(), EIO);
  EXPECT_EQ(pool_->Acquire("garbled"), nullptr);
  // An explicit delete clears a broken volume, after which the name is free.
  ASSERT_TRUE(pool_->Delete("garbled").ok());
  EXPECT_FALSE(fs::exists(VolDir() + "/garbled.img"));
  EXPECT_TRUE(pool_->Create("garbled", kMiB, {}).ok());
  ASSERT_TRUE(pool_->Delete("nodata").ok());
  EXPECT_EQ(pool_->Info().broken_volumes.size(), 1u);
}

TEST_F(PoolTest, UncommittedResizeIsRolledBackOnOpen) {
  OpenPool();
  ASSERT_TRUE(pool_->Create("v", kMiB, {}).ok());
  pool_.reset();
  fs::resize_file(VolDir() + "/v.img", 8 * kMiB);
  OpenPool();
  EXPECT_EQ(fs::file_size(VolDir() + "/v.img"), kMiB);
  EXPECT_EQ(pool_->Acquire("v")->size(), kMiB);
}

TEST_F(PoolTest, RejectsBadOptions) {
  opts_.overcommit_ratio = 0;
  EXPECT_EQ(Pool::Open(opts_).status().code(), EINVAL);
  opts_.overcommit_ratio = 1;
  opts_.dir = "";
  EXPECT_EQ(Pool::Open(opts_).status().code(), EINVAL);
  WriteFile(root_ + "/file", "x");
  opts_.dir = root_ + "/file";
  EXPECT_EQ(Pool::Open(opts_).status().code(), ENOTDIR);
}

}  // namespace
}  // namespace nbdcsi::datapath
