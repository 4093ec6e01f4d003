// Snapshots, restores and clones through the pool's public API, on real file systems: an XFS
// pool with reflink, an ext4 pool (background copy) and the XFS pool with reflink disabled
// (the copy path next to a reflink-capable file system). Each is a loop-mounted image; without
// the privilege to mount, the tests skip.
#include <fcntl.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <map>
#include <mutex>
#include <thread>

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <spdlog/sinks/ringbuffer_sink.h>
#include <spdlog/spdlog.h>

#include "datapath/pool/pool.h"
#include "test/support/wait.h"

namespace nbdcsi::datapath {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;
constexpr uint64_t kMiB = 1 << 20;

struct FsKind {
  std::string name;
  std::string mkfs;  // command, the image path is appended
  bool disable_reflink;
  bool expect_reflink;
};

const std::vector<FsKind>& Kinds() {
  static const std::vector<FsKind> k = {
      {"xfs", "mkfs.xfs -q -f -m reflink=1", false, true},
      {"ext4", "mkfs.ext4 -q -F", false, false},
      {"xfs_copy", "", true, false},  // reuses the xfs mount
  };
  return k;
}

// One mounted image per file system for the whole run; every test gets a fresh directory.
class Mounts : public ::testing::Environment {
 public:
  void SetUp() override {
    char tmpl[] = "/tmp/pool_snapshot.XXXXXX";
    if (!mkdtemp(tmpl)) return;
    root_ = tmpl;
    for (const auto& k : Kinds()) {
      if (k.mkfs.empty()) continue;
      std::string img = root_ + "/" + k.name + ".img", mnt = root_ + "/" + k.name;
      fs::create_directories(mnt);
      std::string cmd = "truncate -s 512M " + img + " && " + k.mkfs + " " + img +
                        " >/dev/null 2>&1 && mount -o loop " + img + " " + mnt + " 2>/dev/null";
      if (std::system(cmd.c_str()) == 0) {
        mounted_[k.name] = mnt;
      } else {
        why_ = "cannot mount a loop image (" + cmd + "): needs root and loop devices";
      }
    }
  }
  void TearDown() override {
    for (const auto& [n, m] : mounted_) umount2(m.c_str(), MNT_DETACH);
    if (!root_.empty()) fs::remove_all(root_);
  }
  std::string MountFor(const FsKind& k) const {
    auto it = mounted_.find(k.mkfs.empty() ? "xfs" : k.name);
    return it == mounted_.end() ? "" : it->second;
  }
  std::string why_;

 private:
  std::string root_;
  std::map<std::string, std::string> mounted_;
};
Mounts* g_mounts = nullptr;

std::string Pattern(char c, size_t n) { return std::string(n, c); }

void PWrite(const std::string& path, uint64_t off, const std::string& data) {
  int fd = open(path.c_str(), O_WRONLY | O_CLOEXEC);
  ASSERT_GE(fd, 0) << path << ": " << std::strerror(errno);
  ASSERT_EQ(pwrite(fd, data.data(), data.size(), static_cast<off_t>(off)),
            static_cast<ssize_t>(data.size()));
  close(fd);
}

std::string PRead(const std::string& path, uint64_t off, size_t n) {
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  EXPECT_GE(fd, 0) << path << ": " << std::strerror(errno);
  std::string out(n, '\0');
  ssize_t got = pread(fd, out.data(), n, static_cast<off_t>(off));
  EXPECT_EQ(got, static_cast<ssize_t>(n)) << path;
  close(fd);
  return out;
}

// Writes the way the NBD workers do: through the volume's gate, parking while it is closed or
// while a copy-before-write has not preserved the range yet.
class CvWaiter : public GateWaiter {
 public:
  void GateOpened() override {
    std::lock_guard lock(mu);
    woken = true;
    cv.notify_all();
  }
  std::mutex mu;
  std::condition_variable cv;
  bool woken = false;
};

void GatedWrite(Volume& vol, uint64_t off, const std::string& data) {
  auto waiter = std::make_shared<CvWaiter>();
  for (;;) {
    {
      std::lock_guard lock(waiter->mu);
      waiter->woken = false;
    }
    if (vol.gate().TryBegin(off, data.size(), waiter)) break;
    std::unique_lock lock(waiter->mu);
    waiter->cv.wait_for(lock, std::chrono::milliseconds(50), [&] { return waiter->woken; });
  }
  ssize_t n = pwrite(vol.buffered_fd(), data.data(), data.size(), static_cast<off_t>(off));
  vol.gate().End();
  ASSERT_EQ(n, static_cast<ssize_t>(data.size()));
}

// Three islands of data (one straddling a MiB boundary) in an otherwise sparse volume.
struct Island {
  uint64_t off;
  size_t len;
};
const std::vector<Island> kIslands = {{0, 4096}, {kMiB - 4096, 3 * 4096}, {7 * kMiB, 64 * 1024}};

void WriteIslands(const std::string& path, char c) {
  for (const auto& i : kIslands) PWrite(path, i.off, Pattern(c, i.len));
}
void GatedIslands(Volume& vol, char c) {
  for (const auto& i : kIslands) GatedWrite(vol, i.off, Pattern(c, i.len));
}
void ExpectIslands(const std::string& path, char c) {
  for (const auto& i : kIslands) {
    std::string got = PRead(path, i.off, i.len);
    size_t bad = 0;
    for (char x : got) bad += x != c;
    EXPECT_EQ(bad, 0u) << path << " @" << i.off << ": bytes that are not '" << c << "' (first byte " << int(got[0]) << ")";
  }
  // A hole between the islands reads as zeros.
  EXPECT_EQ(PRead(path, 4 * kMiB, 4096), Pattern('\0', 4096)) << path;
}

class SnapshotTest : public ::testing::TestWithParam<FsKind> {
 protected:
  void SetUp() override {
    std::string mnt = g_mounts->MountFor(GetParam());
    if (mnt.empty()) GTEST_SKIP() << g_mounts->why_;
    root_ = mnt + "/t" + std::to_string(counter_++);
    opts_.dir = root_;
    opts_.disable_reflink = GetParam().disable_reflink;
    OpenPool();
  }
  void TearDown() override {
    pool_.reset();
    if (!root_.empty()) fs::remove_all(root_);
  }
  void OpenPool() {
    pool_.reset();
    auto p = Pool::Open(opts_);
    ASSERT_TRUE(p.ok()) << p.status().message();
    pool_ = std::move(p.value());
  }
  bool Reflink() const { return GetParam().expect_reflink; }

  SnapshotInfo WaitSnapshot(const std::string& name) {
    SnapshotInfo last;
    test::WaitUntil([&] {
      auto s = pool_->InspectSnapshot(name);
      EXPECT_TRUE(s.ok()) << s.status().message();
      last = s.ok() ? *s : SnapshotInfo{};
      return !s.ok() || s->ready || !s->error.empty();
    });
    return last;
  }
  VolumeInfo WaitVolume(const std::string& name) {
    VolumeInfo last;
    test::WaitUntil([&] {
      auto v = pool_->Inspect(name);
      EXPECT_TRUE(v.ok()) << v.status().message();
      last = v.ok() ? *v : VolumeInfo{};
      if (!v.ok()) return true;
      if (!v->ready && pool_->Acquire(name) != nullptr) {
        // The fill may have ended between Inspect and Acquire (readiness only goes from false
        // to true): a volume that is still not ready after Acquire handed it out was exported
        // while being filled.
        auto after = pool_->Inspect(name);
        EXPECT_TRUE(after.ok() && after->ready) << "a volume being filled is exported";
      }
      return v->ready;
    });
    return last;
  }

  static inline int counter_ = 0;
  std::string root_;
  PoolOptions opts_;
  std::unique_ptr<Pool> pool_;
};

TEST_P(SnapshotTest, SnapshotHoldsThePointInTime) {
  EXPECT_EQ(pool_->Info().reflink, Reflink());
  auto v = pool_->Create("v", 8 * kMiB, {});
  ASSERT_TRUE(v.ok()) << v.status().message();
  WriteIslands(v->path, 'A');
  int64_t before = std::chrono::duration_cast<std::chrono::nanoseconds>(
                       std::chrono::system_clock::now().time_since_epoch()).count();
  auto s = pool_->CreateSnapshot("s1", "v");
  ASSERT_TRUE(s.ok()) << s.status().message();
  EXPECT_EQ(s->method, Reflink() ? "reflink" : "copy");
  EXPECT_EQ(s->source_volume, "v");
  EXPECT_EQ(s->size, 8 * kMiB);
  EXPECT_GE(s->created_unix_ns, before);
  if (Reflink()) { EXPECT_TRUE(s->ready); }
  if (!s->ready) { EXPECT_EQ(s->copy_total, 8 * kMiB); }
  GatedIslands(*pool_->Acquire("v"), 'B');  // during the copy, if any: copy-before-write keeps A
  SnapshotInfo done = WaitSnapshot("s1");
  ASSERT_TRUE(done.ready) << done.error;
  EXPECT_EQ(done.created_unix_ns, s->created_unix_ns);
  EXPECT_EQ(fs::file_size(done.path), 8 * kMiB);
  ExpectIslands(done.path, 'A');
  ExpectIslands(v->path, 'B');
  PoolInfo info = pool_->Info();
  EXPECT_EQ(info.snapshots, 1u);
  EXPECT_GE(info.allocated, 2 * (4096 + 3 * 4096 + 64 * 1024u));
  ASSERT_EQ(pool_->ListSnapshots()->size(), 1u);
  EXPECT_EQ(pool_->ListSnapshots("v")->size(), 1u);
  EXPECT_TRUE(pool_->ListSnapshots("other")->empty());
}

TEST_P(SnapshotTest, SnapshotOutlivesItsSourceAndRestores) {
  auto v = pool_->Create("v", 8 * kMiB, {});
  ASSERT_TRUE(v.ok());
  WriteIslands(v->path, 'A');
  ASSERT_TRUE(pool_->CreateSnapshot("s", "v").ok());
  ASSERT_TRUE(WaitSnapshot("s").ready);
  ASSERT_TRUE(pool_->Delete("v").ok());
  auto snap = pool_->InspectSnapshot("s");
  ASSERT_TRUE(snap.ok());
  ExpectIslands(snap->path, 'A');

  QosLimits qos;
  qos.max_iops = 100;
  auto r = pool_->Create(CreateSpec::Restore("r", "s", 0, qos));
  ASSERT_TRUE(r.ok()) << r.status().message();
  EXPECT_EQ(r->size, 8 * kMiB);
  EXPECT_EQ(r->source, "snapshot/s");
  EXPECT_EQ(r->qos, qos);
  VolumeInfo rr = WaitVolume("r");
  ASSERT_TRUE(rr.ready);
  ASSERT_NE(pool_->Acquire("r"), nullptr);
  ExpectIslands(rr.path, 'A');

  auto big = pool_->Create(CreateSpec::Restore("big", "s", 16 * kMiB, {}));
  ASSERT_TRUE(big.ok()) << big.status().message();
  VolumeInfo bb = WaitVolume("big");
  ASSERT_TRUE(bb.ready);
  EXPECT_EQ(fs::file_size(bb.path), 16 * kMiB);
  EXPECT_EQ(pool_->Acquire("big")->size(), 16 * kMiB);
  ExpectIslands(bb.path, 'A');
  EXPECT_EQ(PRead(bb.path, 12 * kMiB, 4096), Pattern('\0', 4096));

  auto small = pool_->Create(CreateSpec::Restore("small", "s", 4 * kMiB, {}));
  EXPECT_EQ(small.status().code(), EINVAL);
  EXPECT_THAT(small.status().message(), HasSubstr("smaller than snapshot s"));
  EXPECT_FALSE(fs::exists(root_ + "/volumes/small.img"));

  // The restored volume is independent of the snapshot.
  PWrite(rr.path, 0, Pattern('R', 4096));
  ExpectIslands(snap->path, 'A');
  ASSERT_TRUE(pool_->DeleteSnapshot("s").ok());
  EXPECT_EQ(PRead(rr.path, 0, 4096), Pattern('R', 4096));
  ExpectIslands(bb.path, 'A');
  EXPECT_FALSE(fs::exists(snap->path));
  EXPECT_EQ(pool_->InspectSnapshot("s").status().code(), ENOENT);
}

TEST_P(SnapshotTest, CloneIsAPointInTimeCopyOfALiveVolume) {
  auto v = pool_->Create("v", 8 * kMiB, {});
  ASSERT_TRUE(v.ok());
  WriteIslands(v->path, 'A');
  auto c = pool_->Create(CreateSpec::Clone("c", "v", 0, {}));
  ASSERT_TRUE(c.ok()) << c.status().message();
  EXPECT_EQ(c->source, "volume/v");
  GatedIslands(*pool_->Acquire("v"), 'B');
  VolumeInfo cc = WaitVolume("c");
  ASSERT_TRUE(cc.ready);
  ExpectIslands(cc.path, 'A');
  ExpectIslands(v->path, 'B');
  // Clone-of-clone and larger clones work; smaller is refused.
  auto c2 = pool_->Create(CreateSpec::Clone("c2", "c", 12 * kMiB, {}));
  ASSERT_TRUE(c2.ok()) << c2.status().message();
  ASSERT_TRUE(WaitVolume("c2").ready);
  ExpectIslands(c2->path, 'A');
  EXPECT_EQ(pool_->Create(CreateSpec::Clone("c3", "v", 4 * kMiB, {})).status().code(), EINVAL);
  EXPECT_EQ(pool_->Create(CreateSpec::Clone("v", "v", 0, {})).status().code(), EINVAL);
  EXPECT_EQ(pool_->Create(CreateSpec::Clone("c4", "nope", 0, {})).status().code(), ENOENT);
  // Idempotent; a different request under the same name is EEXIST.
  EXPECT_TRUE(pool_->Create(CreateSpec::Clone("c", "v", 0, {})).ok());
  EXPECT_EQ(pool_->Create(CreateSpec::Clone("c", "v", 16 * kMiB, {})).status().code(), EEXIST);
  EXPECT_EQ(pool_->Create("c", 8 * kMiB, {}).status().code(), EEXIST);
}

TEST_P(SnapshotTest, IdempotencyAndErrors) {
  ASSERT_TRUE(pool_->Create("a", 4 * kMiB, {}).ok());
  ASSERT_TRUE(pool_->Create("b", 4 * kMiB, {}).ok());
  auto s1 = pool_->CreateSnapshot("s", "a");
  ASSERT_TRUE(s1.ok());
  WaitSnapshot("s");
  auto s2 = pool_->CreateSnapshot("s", "a");
  ASSERT_TRUE(s2.ok());
  EXPECT_EQ(s2->created_unix_ns, s1->created_unix_ns) << "a retry must not take a new snapshot";
  auto other = pool_->CreateSnapshot("s", "b");
  EXPECT_EQ(other.status().code(), EEXIST);
  EXPECT_EQ(other.status().message(), "snapshot s already exists with source volume a, not b");
  EXPECT_EQ(pool_->CreateSnapshot("t", "missing").status().code(), ENOENT);
  EXPECT_EQ(pool_->CreateSnapshot("../x", "a").status().code(), EINVAL);
  EXPECT_THAT(pool_->CreateSnapshot("", "a").status().message(), HasSubstr("snapshot name"));
  EXPECT_EQ(pool_->DeleteSnapshot("missing").code(), ENOENT);
  EXPECT_EQ(pool_->InspectSnapshot("missing").status().code(), ENOENT);
  EXPECT_EQ(pool_->Create(CreateSpec::Restore("r", "missing", 0, {})).status().code(), ENOENT);
  EXPECT_EQ(pool_->Create(CreateSpec::Restore("r", "s", 4 * kMiB + 1, {})).status().code(), EINVAL);
  ASSERT_TRUE(pool_->Create(CreateSpec::Restore("r", "s", 0, {})).ok());
  ASSERT_TRUE(WaitVolume("r").ready);
  EXPECT_TRUE(pool_->Create(CreateSpec::Restore("r", "s", 0, {})).ok());
  EXPECT_TRUE(pool_->Create(CreateSpec::Restore("r", "s", 4 * kMiB, {})).ok());
  EXPECT_EQ(pool_->Create(CreateSpec::Restore("r", "s", 8 * kMiB, {})).status().code(), EEXIST);
  EXPECT_EQ(pool_->Create(CreateSpec::Restore("a", "s", 0, {})).status().code(), EEXIST);
  // Snapshots are their own namespace: a snapshot may share a volume's name.
  EXPECT_TRUE(pool_->CreateSnapshot("a", "a").ok());
  WaitSnapshot("a");
  // Nothing half-made was left by the failures.
  for (const auto& e : fs::directory_iterator(root_ + "/snapshots"))
    EXPECT_NE(e.path().filename().string()[0], '.') << e.path();
  for (const auto& e : fs::directory_iterator(root_ + "/volumes"))
    EXPECT_NE(e.path().filename().string()[0], '.') << e.path();
}

TEST_P(SnapshotTest, CapacityIsChecked) {
  // Restores and clones provision like Create.
  opts_.capacity_bytes = 24 * kMiB;
  OpenPool();
  ASSERT_TRUE(pool_->Create("v", 16 * kMiB, {}).ok());
  ASSERT_TRUE(pool_->CreateSnapshot("s", "v").ok());
  ASSERT_TRUE(WaitSnapshot("s").ready);
  auto r = pool_->Create(CreateSpec::Restore("r", "s", 0, {}));
  EXPECT_EQ(r.status().code(), ENOSPC) << r.status().message();
  EXPECT_EQ(pool_->Create(CreateSpec::Clone("c", "v", 0, {})).status().code(), ENOSPC);
  EXPECT_FALSE(fs::exists(root_ + "/volumes/r.img"));

  // A copy snapshot needs the source's allocated bytes free on the file system.
  opts_.capacity_bytes = 0;
  OpenPool();
  auto big = pool_->Create("big", 400 * kMiB, {});
  ASSERT_TRUE(big.ok());
  int fd = open(big->path.c_str(), O_RDWR | O_CLOEXEC);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(posix_fallocate(fd, 0, 300 * kMiB), 0);
  close(fd);
  auto s = pool_->CreateSnapshot("bigsnap", "big");
  if (Reflink()) {
    EXPECT_TRUE(s.ok()) << "reflink shares extents, it needs no free space: " << s.status().message();
  } else {
    EXPECT_EQ(s.status().code(), ENOSPC);
    EXPECT_THAT(s.status().message(), HasSubstr("needs up to"));
    EXPECT_FALSE(fs::exists(root_ + "/snapshots/bigsnap.img"));
    EXPECT_FALSE(fs::exists(root_ + "/snapshots/bigsnap.json"));
  }
}

TEST_P(SnapshotTest, CopyProgressReadyFlagAndBusyRules) {
  if (Reflink()) GTEST_SKIP() << "reflink snapshots are ready at once";
  auto v = pool_->Create("v", 96 * kMiB, {});
  ASSERT_TRUE(v.ok());
  PWrite(v->path, 0, Pattern('D', 96 * kMiB));
  auto s = pool_->CreateSnapshot("s", "v");
  ASSERT_TRUE(s.ok()) << s.status().message();
  EXPECT_EQ(s->method, "copy");
  bool saw_running = !s->ready;
  if (!s->ready) {
    EXPECT_EQ(s->copy_total, 96 * kMiB);
    EXPECT_LE(s->copy_done, s->copy_total);
    // While it runs: one copy per source, the source stays, the snapshot cannot be restored.
    auto again = pool_->CreateSnapshot("s2", "v");
    auto del = pool_->Delete("v");
    auto res = pool_->Create(CreateSpec::Restore("r", "s", 0, {}));
    auto rsz = pool_->Resize("v", 128 * kMiB);
    if (!pool_->InspectSnapshot("s")->ready) {  // none of the above may have raced the end
      EXPECT_EQ(again.status().code(), EAGAIN);
      EXPECT_THAT(again.status().message(), HasSubstr("a copy from volume v is running ("));
      EXPECT_EQ(del.code(), EBUSY);
      EXPECT_THAT(del.message(), HasSubstr("snapshot/s"));
      EXPECT_EQ(res.status().code(), EAGAIN);
      EXPECT_EQ(rsz.status().code(), EAGAIN);
    }
  }
  SnapshotInfo done = WaitSnapshot("s");
  ASSERT_TRUE(done.ready) << done.error;
  EXPECT_EQ(done.copy_done, 0u);
  EXPECT_EQ(PRead(done.path, 50 * kMiB, 4096), Pattern('D', 4096));
  RecordProperty("saw_running_copy", saw_running ? "yes" : "no");

  // Restore by copy: not exported until it is complete.
  auto r = pool_->Create(CreateSpec::Restore("r", "s", 0, {}));
  ASSERT_TRUE(r.ok()) << r.status().message();
  if (!r->ready) {
    EXPECT_EQ(pool_->Acquire("r"), nullptr);
    EXPECT_EQ(r->copy_total, 96 * kMiB);
    auto d = pool_->DeleteSnapshot("s");
    if (!pool_->Inspect("r")->ready) { EXPECT_EQ(d.code(), EBUSY) << d.message(); }
  }
  ASSERT_TRUE(WaitVolume("r").ready);
  EXPECT_NE(pool_->Acquire("r"), nullptr);
  EXPECT_EQ(PRead(r->path, 95 * kMiB, 4096), Pattern('D', 4096));
}

TEST_P(SnapshotTest, DeleteWhileCopying) {
  auto v = pool_->Create("v", 64 * kMiB, {});
  ASSERT_TRUE(v.ok());
  PWrite(v->path, 0, Pattern('D', 64 * kMiB));
  for (int i = 0; i < 3; ++i) {
    std::string name = "s" + std::to_string(i);
    ASSERT_TRUE(pool_->CreateSnapshot(name, "v").ok());
    ASSERT_TRUE(pool_->DeleteSnapshot(name).ok());
    EXPECT_FALSE(fs::exists(root_ + "/snapshots/" + name + ".img"));
    EXPECT_FALSE(fs::exists(root_ + "/snapshots/" + name + ".json"));
  }
  EXPECT_EQ(pool_->Info().snapshots, 0u);
  // The volume is free again: no copy holds it.
  EXPECT_TRUE(pool_->Resize("v", 72 * kMiB).ok());
  ASSERT_TRUE(pool_->Create(CreateSpec::Clone("c", "v", 0, {})).ok());
  ASSERT_TRUE(pool_->Delete("c").ok());  // cancels a running fill
  EXPECT_FALSE(fs::exists(root_ + "/volumes/c.img"));
  EXPECT_TRUE(pool_->Delete("v").ok());
}

// A writer speaking the gate protocol; the snapshot must hold exactly a prefix of its
// acknowledged writes.

TEST_P(SnapshotTest, PointInTimeUnderConcurrentWrites) {
  constexpr uint64_t kBlocks = 2048, kBlock = 4096;  // 8 MiB
  auto v = pool_->Create("v", kBlocks * kBlock, {});
  ASSERT_TRUE(v.ok());
  auto vol = pool_->Acquire("v");
  ASSERT_TRUE(vol);
  std::atomic<uint64_t> acked{0};
  std::atomic<bool> stop{false};
  std::atomic<uint64_t> parked{0};
  auto waiter = std::make_shared<CvWaiter>();
  std::thread writer([&] {
    std::string buf(kBlock, '\0');
    for (uint64_t i = 1; !stop.load(); ++i) {
      uint64_t block = (i * 7919) % kBlocks;  // a spread-out order, every block over time
      for (;;) {
        {
          std::lock_guard lock(waiter->mu);
          waiter->woken = false;
        }
        if (vol->gate().TryBegin(block * kBlock, kBlock, waiter)) break;
        parked.fetch_add(1);
        std::unique_lock lock(waiter->mu);
        waiter->cv.wait_for(lock, std::chrono::milliseconds(50), [&] { return waiter->woken; });
      }
      for (size_t k = 0; k < kBlock; k += 8) std::memcpy(&buf[k], &i, 8);
      ssize_t n = pwrite(vol->buffered_fd(), buf.data(), kBlock, static_cast<off_t>(block * kBlock));
      vol->gate().End();
      if (n != static_cast<ssize_t>(kBlock)) return;
      acked.store(i);
    }
  });
  while (acked.load() < 3000) std::this_thread::yield();
  auto s = pool_->CreateSnapshot("s", "v");
  uint64_t acked_after = acked.load();
  ASSERT_TRUE(s.ok()) << s.status().message();
  // Let the writer run on past the snapshot (into the copy, if there is one).
  while (acked.load() < acked_after + 3000) std::this_thread::yield();
  SnapshotInfo done = WaitSnapshot("s");
  stop = true;
  writer.join();
  ASSERT_TRUE(done.ready) << done.error;

  // Which write index each block holds in the snapshot; the cut is the newest of them.
  std::string img = PRead(done.path, 0, kBlocks * kBlock);
  std::vector<uint64_t> got(kBlocks);
  uint64_t cut = 0;
  for (uint64_t b = 0; b < kBlocks; ++b) {
    std::memcpy(&got[b], &img[b * kBlock], 8);
    for (size_t k = 8; k < kBlock; k += 8) {
      uint64_t x;
      std::memcpy(&x, &img[b * kBlock + k], 8);
      ASSERT_EQ(x, got[b]) << "torn block " << b;
    }
    cut = std::max(cut, got[b]);
  }
  EXPECT_GE(cut, 3000u);
  EXPECT_LE(cut, acked_after) << "the snapshot holds a write acknowledged after it returned";
  // Exactly the state after writes 1..cut: every block holds its last write <= cut.
  std::vector<uint64_t> want(kBlocks, 0);
  for (uint64_t i = 1; i <= cut; ++i) want[(i * 7919) % kBlocks] = i;
  uint64_t mismatches = 0;
  for (uint64_t b = 0; b < kBlocks; ++b) mismatches += got[b] != want[b];
  EXPECT_EQ(mismatches, 0u) << "snapshot is not a prefix of the acknowledged writes (cut " << cut << ")";
  // And the volume moved on.
  EXPECT_TRUE(PRead(v->path, 0, kBlocks * kBlock) != img);
}

TEST_P(SnapshotTest, ReopenKeepsEverything) {
  auto v = pool_->Create("v", 8 * kMiB, {});
  ASSERT_TRUE(v.ok());
  WriteIslands(v->path, 'A');
  ASSERT_TRUE(pool_->CreateSnapshot("s", "v").ok());
  SnapshotInfo s = WaitSnapshot("s");
  ASSERT_TRUE(s.ready);
  ASSERT_TRUE(pool_->Create(CreateSpec::Restore("r", "s", 0, {})).ok());
  ASSERT_TRUE(WaitVolume("r").ready);
  ASSERT_TRUE(pool_->Create(CreateSpec::Clone("c", "v", 0, {})).ok());
  ASSERT_TRUE(WaitVolume("c").ready);
  OpenPool();
  PoolInfo info = pool_->Info();
  EXPECT_EQ(info.snapshots, 1u);
  EXPECT_EQ(info.volumes, 3u);
  EXPECT_TRUE(info.abandoned_copies.empty());
  EXPECT_TRUE(info.cleaned_orphans.empty());
  EXPECT_TRUE(info.broken_volumes.empty());
  auto s2 = pool_->InspectSnapshot("s");
  ASSERT_TRUE(s2.ok());
  EXPECT_TRUE(s2->ready);
  EXPECT_EQ(s2->created_unix_ns, s.created_unix_ns);
  EXPECT_EQ(s2->method, s.method);
  EXPECT_EQ(s2->source_volume, "v");
  auto r = pool_->Inspect("r");
  ASSERT_TRUE(r.ok());
  EXPECT_TRUE(r->ready);
  EXPECT_EQ(r->source, "snapshot/s");
  EXPECT_EQ(pool_->Inspect("c")->source, "volume/v");
  ExpectIslands(s2->path, 'A');
  ExpectIslands(r->path, 'A');
  ExpectIslands(pool_->Inspect("c")->path, 'A');
}

TEST_P(SnapshotTest, PauseDurationIsLogged) {
  auto sink = std::make_shared<spdlog::sinks::ringbuffer_sink_mt>(64);
  auto old = spdlog::default_logger();
  spdlog::set_default_logger(std::make_shared<spdlog::logger>("capture", sink));
  auto v = pool_->Create("v", 8 * kMiB, {});
  auto s = pool_->CreateSnapshot("s", "v");
  WaitSnapshot("s");  // one copy per source at a time
  auto c = pool_->Create(CreateSpec::Clone("c", "v", 0, {}));
  WaitVolume("c");
  spdlog::set_default_logger(old);
  ASSERT_TRUE(v.ok() && s.ok() && c.ok());
  int paused = 0;
  for (const auto& line : sink->last_formatted()) {
    if (line.find("writes paused") != std::string::npos &&
        (line.find("snapshot s of volume v") != std::string::npos ||
         line.find("clone volume c") != std::string::npos)) {
      ++paused;
      EXPECT_THAT(line, HasSubstr("[info]"));
    }
  }
  EXPECT_EQ(paused, 2);
}

// Issue 3's target on a reflink pool: a big, partly written volume snapshots in milliseconds.
TEST_P(SnapshotTest, ReflinkSnapshotOfALargeVolumeIsQuick) {
  if (!Reflink()) GTEST_SKIP() << "reflink only";
  opts_.overcommit_ratio = 100;
  OpenPool();
  auto v = pool_->Create("v", 10ull << 30, {});
  ASSERT_TRUE(v.ok()) << v.status().message();
  std::string chunk = Pattern('x', 4 * kMiB);
  for (int i = 0; i < 32; ++i) PWrite(v->path, static_cast<uint64_t>(i) * (256 * kMiB), chunk);
  auto t0 = std::chrono::steady_clock::now();
  auto s = pool_->CreateSnapshot("s", "v");
  double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  ASSERT_TRUE(s.ok()) << s.status().message();
  RecordProperty("snapshot_ms", std::to_string(ms));
  // The goal is < 50 ms; a loaded CI machine with 2 cores gets slack, not a pass for O(size).
  EXPECT_LT(ms, 1000.0);
  EXPECT_EQ(PRead(s->path, 31 * 256 * kMiB, 4096), Pattern('x', 4096));
}

void PrintTo(const FsKind& k, std::ostream* os) { *os << k.name; }

INSTANTIATE_TEST_SUITE_P(Fs, SnapshotTest, ::testing::ValuesIn(Kinds()),
                         [](const auto& info) { return info.param.name; });

}  // namespace
}  // namespace nbdcsi::datapath

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  nbdcsi::datapath::g_mounts = new nbdcsi::datapath::Mounts();
  ::testing::AddGlobalTestEnvironment(nbdcsi::datapath::g_mounts);
  return RUN_ALL_TESTS();
}
