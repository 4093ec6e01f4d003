// CopyJob: sparse-aware background copy with copy-before-write.
//
// Every test runs on the file system of the temp directory (ext4 on the build machine) and,
// when /dev/shm is a tmpfs, again there: SEEK_DATA/SEEK_HOLE, copy_file_range and fsync
// behave differently on the two. The full-disk test mounts its own small tmpfs (root only).
#include "datapath/pool/copy_job.h"

#include <fcntl.h>
#include <linux/magic.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <future>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include <gtest/gtest.h>

#include "test/support/temp_dir.h"
#include "test/support/wait.h"

namespace nbdcsi::datapath {
namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;
using Extents = std::vector<std::pair<uint64_t, uint64_t>>;  // [start, end) data ranges

constexpr uint64_t kKiB = 1024;
constexpr uint64_t kMiB = 1024 * 1024;

std::string FsName(const std::string& dir) {
  struct statfs sfs {};
  if (statfs(dir.c_str(), &sfs) != 0) return "unknown";
  if (sfs.f_type == TMPFS_MAGIC) return "tmpfs";
  if (sfs.f_type == EXT4_SUPER_MAGIC) return "ext4";
  if (sfs.f_type == XFS_SUPER_MAGIC) return "xfs";
  if (sfs.f_type == BTRFS_SUPER_MAGIC) return "btrfs";
  return "other";
}

std::vector<std::string> TestDirs() {
  std::vector<std::string> dirs{fs::temp_directory_path().string()};
  if (FsName("/dev/shm") == "tmpfs" && FsName(dirs[0]) != "tmpfs") dirs.emplace_back("/dev/shm");
  return dirs;
}

uint64_t DataBytes(const Extents& map) {
  uint64_t n = 0;
  for (const auto& [s, e] : map) n += e - s;
  return n;
}

Extents DataMap(int fd, uint64_t len) {
  Extents out;
  uint64_t off = 0;
  while (off < len) {
    off_t d = lseek(fd, static_cast<off_t>(off), SEEK_DATA);
    if (d < 0 || static_cast<uint64_t>(d) >= len) break;
    off_t h = lseek(fd, d, SEEK_HOLE);
    uint64_t end = std::min<uint64_t>(static_cast<uint64_t>(h), len);
    out.emplace_back(static_cast<uint64_t>(d), end);
    off = end;
  }
  return out;
}

std::vector<char> ReadAll(int fd, uint64_t len) {
  std::vector<char> buf(len);
  uint64_t off = 0;
  while (off < len) {
    ssize_t n = pread(fd, buf.data() + off, len - off, static_cast<off_t>(off));
    if (n <= 0) break;  // short: the caller compares sizes
    off += static_cast<uint64_t>(n);
  }
  buf.resize(off);
  return buf;
}

// Finds the first differing byte so that a failure says where, not just "not equal".
::testing::AssertionResult SameBytes(const std::vector<char>& want, const std::vector<char>& got) {
  if (want.size() != got.size()) {
    return ::testing::AssertionFailure() << "size " << got.size() << ", want " << want.size();
  }
  auto [a, b] = std::mismatch(want.begin(), want.end(), got.begin());
  if (a == want.end()) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "first difference at byte " << (a - want.begin());
}

void Fill(std::vector<char>& buf, uint64_t seed) {
  std::mt19937_64 rng(seed);
  for (size_t i = 0; i + 8 <= buf.size(); i += 8) {
    uint64_t v = rng() | 1;  // never an all-zero word, so a lost write cannot hide as a hole
    std::memcpy(buf.data() + i, &v, 8);
  }
  for (size_t i = buf.size() & ~size_t{7}; i < buf.size(); ++i) buf[i] = static_cast<char>(0x5a);
}

void PWriteAll(int fd, const char* p, uint64_t len, uint64_t off) {
  while (len > 0) {
    ssize_t n = pwrite(fd, p, len, static_cast<off_t>(off));
    ASSERT_GT(n, 0) << std::strerror(errno);
    p += n;
    off += static_cast<uint64_t>(n);
    len -= static_cast<uint64_t>(n);
  }
}

// Collects on_done calls so that a test can check "exactly once" and wait for it.
struct DoneRecorder {
  std::mutex mu;
  std::condition_variable cv;
  int calls = 0;
  Status status;
  Clock::time_point at;

  std::function<void(const Status&)> Callback() {
    return [this](const Status& s) {
      std::lock_guard lk(mu);
      ++calls;
      status = s;
      at = Clock::now();
      cv.notify_all();
    };
  }
  bool WaitFor(std::chrono::milliseconds d) {
    std::unique_lock lk(mu);
    return cv.wait_for(lk, d, [&] { return calls > 0; });
  }
};

// A writer's GateWaiter: GateOpened runs under the gate's lock, so it only flips a flag.
struct CvWaiter : GateWaiter {
  std::mutex mu;
  std::condition_variable cv;
  bool woken = false;
  void GateOpened() override {
    std::lock_guard lk(mu);
    woken = true;
    cv.notify_all();
  }
  void Arm() {
    std::lock_guard lk(mu);
    woken = false;
  }
  bool Await(std::chrono::milliseconds d) {
    std::unique_lock lk(mu);
    return cv.wait_for(lk, d, [&] { return woken; });
  }
};

// Starts a job the way the pool does: the volume's writes drained and held while the job is set
// up, let through (each to the gate's rules) once it exists. `o.gate` must be set.
std::shared_ptr<CopyJob> StartBehindGate(CopyJob::Options o) {
  WriteGate* gate = o.gate;
  gate->CloseAndDrain();
  auto job = CopyJob::Start(std::move(o));
  gate->Open();
  return job;
}

class CopyJobTest : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    ASSERT_TRUE(tmp_.Create("copy_job", GetParam())) << tmp_.error();
    dir_ = tmp_.path();
  }
  void TearDown() override {
    for (int fd : fds_) close(fd);
    tmp_.Remove();
  }
  int Open(const std::string& name, uint64_t size) {
    int fd = open((dir_ + "/" + name).c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    EXPECT_GE(fd, 0) << std::strerror(errno);
    if (fd >= 0) {
      fds_.push_back(fd);
      EXPECT_EQ(ftruncate(fd, static_cast<off_t>(size)), 0) << std::strerror(errno);
    }
    return fd;
  }
  // Writes pseudo-random data islands; returns them sorted.
  Extents Islands(int fd, const Extents& where, uint64_t seed) {
    for (const auto& [s, e] : where) {
      std::vector<char> buf(e - s);
      Fill(buf, seed ^ s);
      PWriteAll(fd, buf.data(), buf.size(), s);
    }
    return where;
  }

  test::TempDir tmp_;
  std::string dir_;
  std::vector<int> fds_;
};

TEST_P(CopyJobTest, SparseSourceCopiesIdenticallyAndKeepsHoles) {
  // Not a multiple of the chunk size; islands at the start, across a chunk boundary, alone in
  // a chunk, and at the very end; whole chunks of hole in between.
  const uint64_t len = 16 * kMiB + 12 * kKiB;
  int src = Open("src", len), dst = Open("dst", len);
  Extents islands = Islands(src,
                            {{0, 8 * kKiB},
                             {kMiB - 64 * kKiB, kMiB + 128 * kKiB},
                             {5 * kMiB + 4 * kKiB, 5 * kMiB + 8 * kKiB},
                             {9 * kMiB, 11 * kMiB},
                             {16 * kMiB, 16 * kMiB + 12 * kKiB}},
                            1);
  ASSERT_EQ(DataMap(src, len), islands) << "test premise: the source is sparse as written";

  DoneRecorder done;
  auto job = CopyJob::Start(
      {.src_fd = src, .dst_fd = dst, .length = len, .on_done = done.Callback()});
  job->Wait();
  EXPECT_TRUE(job->finished());
  EXPECT_EQ(done.calls, 1);
  EXPECT_TRUE(done.status.ok()) << done.status.message();
  EXPECT_EQ(job->total_bytes(), len);
  EXPECT_EQ(job->copied_bytes(), len) << "progress counts holes too";
  // Progress in data: the islands' bytes, all of them copied.
  EXPECT_TRUE(job->data_known());
  EXPECT_EQ(job->data_total_bytes(), DataBytes(islands));
  EXPECT_EQ(job->data_copied_bytes(), job->data_total_bytes());

  EXPECT_TRUE(SameBytes(ReadAll(src, len), ReadAll(dst, len)));
  EXPECT_EQ(DataMap(dst, len), islands) << "holes must stay holes in the copy";
  struct stat ss {}, ds {};
  ASSERT_EQ(fstat(src, &ss), 0);
  ASSERT_EQ(fstat(dst, &ds), 0);
  EXPECT_EQ(ds.st_size, static_cast<off_t>(len));
  EXPECT_LE(ds.st_blocks, ss.st_blocks + 64) << "the copy allocated more than the source";
  EXPECT_LT(uint64_t(ds.st_blocks) * 512, len / 2);
}

TEST_P(CopyJobTest, OddChunkSizeAndLengthShorterThanTheSource) {
  // A chunk size that is not a power of two and a length that ends mid-block: the copy must
  // stop exactly at `length` even though the source has data beyond it.
  const uint64_t chunk = 3 * 4096 + 512, len = 5 * chunk + 100;
  int src = Open("src", 2 * len), dst = Open("dst", len);
  std::vector<char> all(2 * len);
  Fill(all, 7);
  PWriteAll(src, all.data(), all.size(), 0);
  // A hole in the middle of chunk 2.
  ASSERT_EQ(fallocate(src, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 2 * 16384, 16384), 0);
  DoneRecorder done;
  auto job = CopyJob::Start({.src_fd = src, .dst_fd = dst, .length = len, .chunk_size = chunk,
                             .on_done = done.Callback()});
  job->Wait();
  ASSERT_TRUE(done.status.ok()) << done.status.message();
  EXPECT_EQ(job->copied_bytes(), len);
  // Only the data before `length` counts, without the punched hole (tmpfs and ext4 both punch
  // whole 4 KiB pages, and 16 KiB at a 32 KiB offset is page-aligned).
  EXPECT_EQ(job->data_total_bytes(), DataBytes(DataMap(src, len)));
  EXPECT_EQ(job->data_total_bytes(), len - 16384);
  EXPECT_EQ(job->data_copied_bytes(), job->data_total_bytes());
  struct stat ds {};
  ASSERT_EQ(fstat(dst, &ds), 0);
  EXPECT_EQ(ds.st_size, static_cast<off_t>(len)) << "wrote past length";
  std::vector<char> want = ReadAll(src, len);
  EXPECT_TRUE(SameBytes(want, ReadAll(dst, len)));
  EXPECT_TRUE(job->Preserved(4)) << "last partial chunk";
  EXPECT_TRUE(job->Preserved(6)) << "chunks past the length need no copy";
  job->Prioritize(100, 200);  // out of range: ignored, no crash
}

TEST_P(CopyJobTest, RestoreOverOldDataLeavesNoStaleBytesInHoles) {
  const uint64_t len = 4 * kMiB;
  int src = Open("src", len), dst = Open("dst", len);
  Extents islands = Islands(src, {{kMiB, kMiB + 64 * kKiB}, {3 * kMiB, 3 * kMiB + 4 * kKiB}}, 3);
  std::vector<char> junk(len);
  Fill(junk, 99);
  PWriteAll(dst, junk.data(), len, 0);
  DoneRecorder done;
  auto job = CopyJob::Start(
      {.src_fd = src, .dst_fd = dst, .length = len, .on_done = done.Callback()});
  job->Wait();
  ASSERT_TRUE(done.status.ok()) << done.status.message();
  EXPECT_TRUE(SameBytes(ReadAll(src, len), ReadAll(dst, len)));
  EXPECT_EQ(DataMap(dst, len), islands) << "old data should have been punched out";
}

TEST_P(CopyJobTest, AllHoleSourceHasNoDataToCopy) {
  const uint64_t len = 64 * kMiB;
  int src = Open("src", len), dst = Open("dst", len);
  DoneRecorder done;
  auto job = CopyJob::Start(
      {.src_fd = src, .dst_fd = dst, .length = len, .on_done = done.Callback()});
  job->Wait();
  ASSERT_TRUE(done.status.ok()) << done.status.message();
  EXPECT_TRUE(job->data_known()) << "a known total of 0, not an unknown one";
  EXPECT_EQ(job->data_total_bytes(), 0u);
  EXPECT_EQ(job->data_copied_bytes(), 0u);
  EXPECT_EQ(job->copied_bytes(), len);
}

TEST_P(CopyJobTest, EmptyLengthFinishesOk) {
  int src = Open("src", 0), dst = Open("dst", 0);
  DoneRecorder done;
  auto job = CopyJob::Start(
      {.src_fd = src, .dst_fd = dst, .length = 0, .on_done = done.Callback()});
  job->Wait();
  EXPECT_EQ(done.calls, 1);
  EXPECT_TRUE(done.status.ok());
  EXPECT_TRUE(job->Preserved(0));
}

TEST_P(CopyJobTest, InvalidOptionsFailWithoutTouchingTheGate) {
  WriteGate gate;
  DoneRecorder done;
  auto w = std::make_shared<CvWaiter>();
  auto job = StartBehindGate({.src_fd = -1, .dst_fd = -1, .length = kMiB, .chunk_size = 0,
                              .gate = &gate, .on_done = done.Callback()});
  job->Wait();
  EXPECT_EQ(done.calls, 1);
  EXPECT_EQ(done.status.code(), EINVAL);
  ASSERT_TRUE(gate.TryBegin(0, 4096, w)) << "an invalid job must never park writers";
  gate.End();
}

TEST_P(CopyJobTest, CancelReportsEcanceledOnceAndReleasesParkedWriters) {
  const uint64_t len = 64 * kMiB, chunk = 64 * kKiB;
  int src = Open("src", len), dst = Open("dst", len);
  Islands(src, {{0, len}}, 5);
  WriteGate gate;
  DoneRecorder done;
  auto job = StartBehindGate({.src_fd = src, .dst_fd = dst, .length = len, .chunk_size = chunk,
                              .gate = &gate, .on_done = done.Callback()});
  job->Cancel();
  job->Wait();
  EXPECT_EQ(done.calls, 1);
  EXPECT_EQ(done.status.code(), ECANCELED) << done.status.message();
  EXPECT_LT(job->copied_bytes(), len);
  EXPECT_TRUE(job->finished());
  auto w = std::make_shared<CvWaiter>();
  ASSERT_TRUE(gate.TryBegin(len - 4096, 4096, w)) << "the preserver must be gone after cancel";
  gate.End();
  job->Wait();  // a second Wait is harmless
  job.reset();
  EXPECT_EQ(done.calls, 1);
}

TEST_P(CopyJobTest, DroppingTheLastHandleCancelsAndJoins) {
  const uint64_t len = 64 * kMiB, chunk = 64 * kKiB;
  int src = Open("src", len), dst = Open("dst", len);
  Islands(src, {{0, len}}, 6);
  DoneRecorder done;
  auto job = CopyJob::Start({.src_fd = src, .dst_fd = dst, .length = len, .chunk_size = chunk,
                             .on_done = done.Callback()});
  job.reset();
  // The destructor joined: on_done has already run.
  EXPECT_EQ(done.calls, 1);
  EXPECT_EQ(done.status.code(), ECANCELED) << done.status.message();
}

TEST_P(CopyJobTest, LastReferenceDroppedInsideOnDoneDoesNotSelfJoin) {
  const uint64_t len = 2 * kMiB;
  int src = Open("src", len), dst = Open("dst", len);
  Islands(src, {{0, 64 * kKiB}}, 8);
  auto holder = std::make_shared<std::shared_ptr<CopyJob>>();
  std::promise<Status> p;
  std::mutex mu;
  std::unique_lock lk(mu);  // keeps on_done from running before *holder is set
  *holder = CopyJob::Start({.src_fd = src, .dst_fd = dst, .length = len,
                            .on_done = [holder, &p, &mu](const Status& s) {
                              std::lock_guard g(mu);
                              holder->reset();  // not the last reference yet: Run holds one
                              p.set_value(s);
                            }});
  std::weak_ptr<CopyJob> weak = *holder;
  auto f = p.get_future();
  lk.unlock();
  ASSERT_EQ(f.wait_for(10s), std::future_status::ready);
  EXPECT_TRUE(f.get().ok());
  // The job thread drops the last reference right after on_done; a self-join would abort.
  test::WaitUntil([&] { return weak.expired(); }, 5s);
  EXPECT_TRUE(weak.expired()) << "the job was never destroyed";
}

TEST_P(CopyJobTest, WriterToAnUncopiedChunkIsServedFirst) {
  // 128 chunks of real data: a writer to the last chunk, arriving right after Start, must not
  // wait for the sequential cursor to get there.
  const uint64_t len = 128 * kMiB;
  int src = Open("src", len), dst = Open("dst", len);
  Islands(src, {{0, len}}, 9);
  WriteGate gate;
  DoneRecorder done;
  auto job = StartBehindGate(
      {.src_fd = src, .dst_fd = dst, .length = len, .gate = &gate, .on_done = done.Callback()});
  auto w = std::make_shared<CvWaiter>();
  auto t0 = Clock::now();
  uint64_t copied_at_admission = 0;
  int parks = 0;
  for (;;) {
    w->Arm();
    if (gate.TryBegin(len - 4096, 4096, w)) {
      copied_at_admission = job->copied_bytes();
      break;
    }
    ++parks;
    ASSERT_TRUE(w->Await(10s)) << "parked writer never woken";
  }
  auto waited = Clock::now() - t0;
  EXPECT_TRUE(job->Preserved(127));
  gate.End();
  job->Wait();
  ASSERT_TRUE(done.status.ok()) << done.status.message();
  auto total = done.at - t0;
  std::printf("[ info ] parked %d time(s), waited %.2f ms; whole copy %.2f ms; copied %llu MiB "
              "before the writer went\n",
              parks, std::chrono::duration<double, std::milli>(waited).count(),
              std::chrono::duration<double, std::milli>(total).count(),
              static_cast<unsigned long long>(copied_at_admission / kMiB));
  EXPECT_GE(parks, 1) << "the last chunk cannot have been copied already";
  EXPECT_LE(copied_at_admission, len / 4) << "the chunk was not prioritized";
}

// Writers own disjoint 64 KiB regions (region % kWriters == writer) so that the final source
// content does not depend on how their writes interleave.
constexpr int kWriters = 4;
constexpr uint64_t kRegion = 64 * kKiB;

struct WriteRec {
  uint64_t off, len, seed;
};

TEST_P(CopyJobTest, PointInTimeUnderConcurrentWrites) {
  // 256 MiB sparse with ~48 MiB of data islands: big enough that writers land on uncopied
  // chunks all the time and the urgent queue interleaves with the sequential cursor.
  const uint64_t len = 256 * kMiB;
  int src = Open("src", len), dst = Open("dst", len);
  Extents where;
  std::mt19937_64 rng(11);
  for (uint64_t off = 0; off < len;) {
    uint64_t gap = (rng() % 128) * 4 * kKiB;
    uint64_t size = (1 + rng() % 128) * 4 * kKiB;
    if (off + gap >= len) break;
    uint64_t s = off + gap, e = std::min(s + size, len);
    if (!where.empty() && where.back().second == s) where.back().second = e;
    else where.emplace_back(s, e);
    off = e + 4 * kKiB;  // keep islands apart so the map is predictable
  }
  Islands(src, where, 12);
  std::vector<char> image = ReadAll(src, len);  // the point-in-time content
  ASSERT_EQ(image.size(), len);
  Extents map_before = DataMap(src, len);

  WriteGate gate;
  DoneRecorder done;
  std::atomic<bool> job_done{false};
  gate.CloseAndDrain();
  auto t0 = Clock::now();
  auto job = CopyJob::Start({.src_fd = src, .dst_fd = dst, .length = len, .gate = &gate,
                             .on_done = [&](const Status& s) {
                               done.Callback()(s);
                               job_done = true;
                             }});
  gate.Open();

  std::vector<std::vector<WriteRec>> logs(kWriters);
  std::vector<double> max_wait_ms(kWriters, 0);
  std::vector<int> parked(kWriters, 0);
  std::vector<std::thread> writers;
  for (int t = 0; t < kWriters; ++t) {
    writers.emplace_back([&, t] {
      std::mt19937_64 r(100 + t);
      auto w = std::make_shared<CvWaiter>();
      std::vector<char> buf;
      // Keep writing while the copy runs, then a few more with no preserver installed.
      for (int n = 0; !job_done || n < 50; ++n) {
        if (n > 5000) break;
        uint64_t region = (r() % (len / kRegion / kWriters)) * kWriters + t;
        uint64_t in = (r() % (kRegion / 4096)) * 4096;
        uint64_t l = std::min<uint64_t>((1 + r() % 8) * 4096, kRegion - in);
        uint64_t off = region * kRegion + in;
        WriteRec rec{off, l, (uint64_t(t) << 32) | uint64_t(n)};
        auto first_refusal = Clock::time_point{};
        for (;;) {
          w->Arm();
          if (gate.TryBegin(off, l, w)) break;
          if (first_refusal == Clock::time_point{}) first_refusal = Clock::now();
          if (!w->Await(10s)) {
            ADD_FAILURE() << "writer " << t << " parked for 10 s";
            return;
          }
        }
        if (first_refusal != Clock::time_point{}) {
          ++parked[t];
          std::chrono::duration<double, std::milli> ms = Clock::now() - first_refusal;
          max_wait_ms[t] = std::max(max_wait_ms[t], ms.count());
        }
        buf.resize(l);
        Fill(buf, rec.seed);
        PWriteAll(src, buf.data(), l, off);
        gate.End();
        logs[t].push_back(rec);
      }
    });
  }
  for (auto& th : writers) th.join();
  job->Wait();
  ASSERT_EQ(done.calls, 1);
  ASSERT_TRUE(done.status.ok()) << done.status.message();
  double total_ms = std::chrono::duration<double, std::milli>(done.at - t0).count();

  EXPECT_TRUE(SameBytes(image, ReadAll(dst, len))) << "the copy is not the source at Start";
  EXPECT_EQ(DataMap(dst, len), map_before);
  // The writers allocated more of the source while the copy ran; the progress still counts the
  // data of the instant and ends at exactly 100 % of it.
  EXPECT_EQ(job->data_total_bytes(), DataBytes(map_before));
  EXPECT_EQ(job->data_copied_bytes(), DataBytes(map_before));

  size_t writes = 0;
  for (const auto& log : logs) {
    for (const auto& rec : log) {
      std::vector<char> buf(rec.len);
      Fill(buf, rec.seed);
      std::memcpy(image.data() + rec.off, buf.data(), rec.len);
    }
    writes += log.size();
  }
  EXPECT_TRUE(SameBytes(image, ReadAll(src, len))) << "a write to the source was lost";

  double worst = *std::max_element(max_wait_ms.begin(), max_wait_ms.end());
  int parks = 0;
  for (int p : parked) parks += p;
  std::printf("[ info ] %zu writes, %d parked; worst park %.2f ms; whole copy %.2f ms\n", writes,
              parks, worst, total_ms);
  EXPECT_GT(parks, 0) << "no writer ever met an uncopied chunk: the test proves nothing";
  EXPECT_LT(worst, total_ms / 2) << "a parked writer waited for most of the copy";
}

INSTANTIATE_TEST_SUITE_P(Fs, CopyJobTest, ::testing::ValuesIn(TestDirs()),
                         [](const ::testing::TestParamInfo<std::string>& i) {
                           return FsName(i.param) + std::to_string(i.index);
                         });

// The destination's file system fills up mid-copy: the job reports ENOSPC and removes itself
// from the gate so that no writer stays parked.
TEST(CopyJobFullDisk, EnospcStopsTheJobAndClearsThePreserver) {
  test::TempDir tmp("copy_job_full");
  ASSERT_TRUE(tmp.ok()) << tmp.error();
  std::string base = tmp.path(), mnt = base + "/mnt";
  ASSERT_TRUE(fs::create_directory(mnt));
  if (mount("tmpfs", mnt.c_str(), "tmpfs", MS_NOSUID | MS_NODEV, "size=4m,mode=0700") != 0) {
    int err = errno;
    GTEST_SKIP() << "cannot mount a tmpfs (" << std::strerror(err) << "); needs CAP_SYS_ADMIN";
  }
  const uint64_t len = 16 * kMiB;
  int src = open((base + "/src").c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
  int dst = open((mnt + "/dst").c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
  ASSERT_GE(src, 0);
  ASSERT_GE(dst, 0);
  ASSERT_EQ(ftruncate(dst, len), 0);
  std::vector<char> data(len);
  Fill(data, 13);
  PWriteAll(src, data.data(), len, 0);

  WriteGate gate;
  DoneRecorder done;
  auto job = StartBehindGate(
      {.src_fd = src, .dst_fd = dst, .length = len, .gate = &gate, .on_done = done.Callback()});
  // A writer parked on a chunk the job will never reach must be released by the failure.
  auto w = std::make_shared<CvWaiter>();
  w->Arm();
  bool admitted = gate.TryBegin(len - 4096, 4096, w);
  if (admitted) gate.End();
  job->Wait();
  EXPECT_EQ(done.calls, 1);
  EXPECT_EQ(done.status.code(), ENOSPC) << done.status.message();
  EXPECT_NE(done.status.message().find("destination"), std::string::npos)
      << "the message should say which side failed: " << done.status.message();
  EXPECT_LT(job->copied_bytes(), len);
  if (!admitted) {
    EXPECT_TRUE(w->Await(1s)) << "parked writer not woken after the failure";
  }
  ASSERT_TRUE(gate.TryBegin(len - 4096, 4096, w)) << "the preserver must be gone";
  gate.End();

  job.reset();
  close(src);
  close(dst);
  umount2(mnt.c_str(), MNT_DETACH);
}

}  // namespace
}  // namespace nbdcsi::datapath
