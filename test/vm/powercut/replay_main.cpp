// powercut-replay: the replay half of the power-cut test (test/vm/powercut.sh). Walks every crash
// point of a dm-log-writes log (FLUSH, FUA and MARK entries from --from-mark on) and checks the
// pool's file system as a power cut there would have left it:
//   1. replay the log onto the worker's image (incrementally: each entry is applied once);
//   2. a non-persistent dm-snapshot of the image's loop device over a scratch COW device, so that
//      journal recovery and the pool's own recovery write there, not into the image;
//   3. mount it (log/journal recovery), then check.h's CheckPoint: Pool::Open and every
//      acknowledged write and op;
//   4. umount, then fsck the snapshot (xfs_repair -n / e2fsck -fn), then remove it.
// Points whose image equals the next point's (no write between them) are covered by the next,
// stricter one and not replayed separately. Several workers (--worker, one per image) take the
// points round-robin, each replaying the whole log onto its own image, so that the VM's CPUs are
// all busy: everything here runs under QEMU TCG, where one point costs seconds.
//
//   powercut-replay --log LOG --fs xfs|ext4 --journal FILE --ops FILE --volume NAME
//       --from-mark MARK --worker IMAGE:BASEDEV:COWDEV:MOUNTPOINT... [--max-points N]
//       [--stop-on-failure] [--overcommit R] [--chunk-sectors N]
// IMAGE is a regular file of the pool file system's size; BASEDEV a loop device reading it;
// COWDEV a scratch block device; MOUNTPOINT an empty directory.
//
// Output: a line per failing point (with the reasons), progress lines, and a final summary line
// starting "powercut:". Exit 0: every checked point consistent; 1: some point was not; 3: the
// test could not run (log unreadable, device-mapper or replay errors).
#include <fcntl.h>
#include <spawn.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <map>
#include <mutex>
#include <sstream>
#include <thread>

#include <CLI/CLI.hpp>
#include <spdlog/spdlog.h>

#include "test/vm/powercut/check.h"
#include "tools/logwrites/dm_control.h"
#include "tools/logwrites/log_writes.h"

using namespace nbdcsi;
using namespace nbdcsi::logwrites;
using namespace nbdcsi::powercut;

extern char** environ;

namespace {

struct Todo {
  uint64_t index = 0;  // log entry
  std::string label;   // "INDEX:FLAGS:MARK"
  uint64_t round = 0;  // last writer mark before (or at) it
  int64_t op = -1;     // last churn mark before (or at) it
};

struct WorkerSpec {
  std::string image, base, cow, mnt;
};

enum Step { kReplay, kSnapshot, kMount, kCheck, kUmount, kFsck, kRemove, kSteps };
const char* const kStepNames[kSteps] = {"replay", "snapshot", "mount", "check",
                                        "umount", "fsck",     "remove"};

struct Shared {
  const Journals* journals = nullptr;
  std::string log, fs, volume;
  double overcommit = 8;
  unsigned chunk_sectors = 32;
  bool stop_on_failure = false;
  int failure_limit = 3;
  std::vector<Todo> todo;

  std::mutex mu;  // output and the totals below
  std::atomic<bool> stop{false};
  size_t next_report = 25;
  size_t checked = 0;
  int failed_points = 0;
  std::string first_failure;
  uint64_t blocks = 0, ops = 0, orphans = 0;
  std::map<std::string, int> orphan_kinds;  // swept file names with digits as '#', and how often
  int tolerated = 0;
  double step_secs[kSteps] = {};
  double open_secs = 0, read_secs = 0;
  int infra_error = 0;
};

StatusOr<dev_t> BlockDev(const std::string& path) {
  struct stat st{};
  if (stat(path.c_str(), &st) != 0) return Error(errno, "stat {}: {}", path, std::strerror(errno));
  if (!S_ISBLK(st.st_mode)) return Error(ENOTBLK, "{} is not a block device", path);
  return st.st_rdev;
}

StatusOr<uint64_t> Sectors(const std::string& path) {
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return Error(errno, "open {}: {}", path, std::strerror(errno));
  off_t end = lseek(fd, 0, SEEK_END);
  close(fd);
  if (end <= 0) return Error(EINVAL, "{}: no size", path);
  return static_cast<uint64_t>(end) / 512;
}

// Runs argv with stdout+stderr to `out_path`; its exit status (128+signal when killed).
int Spawn(const std::vector<std::string>& argv, const std::string& out_path) {
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_addopen(&fa, 1, out_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  posix_spawn_file_actions_adddup2(&fa, 1, 2);
  posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
  std::vector<char*> args;
  for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  pid_t pid;
  int rc = posix_spawnp(&pid, args[0], &fa, nullptr, args.data(), environ);
  posix_spawn_file_actions_destroy(&fa);
  if (rc != 0) return 127;
  int status = 0;
  while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

std::string Tail(const std::string& path, size_t lines) {
  std::ifstream in(path);
  std::vector<std::string> all;
  for (std::string l; std::getline(in, l);) all.push_back(l);
  std::string out;
  for (size_t i = all.size() > lines ? all.size() - lines : 0; i < all.size(); ++i) {
    out += "    " + all[i] + "\n";
  }
  return out;
}

class Worker {
 public:
  Worker(Shared& sh, WorkerSpec spec, size_t id, size_t count)
      : sh_(sh), spec_(std::move(spec)), id_(id), count_(count) {}

  void Run() {
    if (Status s = Setup(); !s.ok()) return Infra(s);
    for (size_t i = id_; i < sh_.todo.size() && !sh_.stop; i += count_) {
      if (Status s = CheckOne(sh_.todo[i]); !s.ok()) return Infra(s);
    }
  }

 private:
  using Clock = std::chrono::steady_clock;

  Status Setup() {
    auto r = LogReader::Open(sh_.log);
    if (!r.ok()) return r.status();
    reader_ = std::move(*r);
    auto t = ReplayTarget::Open(spec_.image);
    if (!t.ok()) return t.status();
    target_ = std::move(*t);
    auto base = BlockDev(spec_.base);
    if (!base.ok()) return base.status();
    auto cow = BlockDev(spec_.cow);
    if (!cow.ok()) return cow.status();
    auto sectors = Sectors(spec_.base);
    if (!sectors.ok()) return sectors.status();
    table_.length = *sectors;
    table_.type = "snapshot";
    // Non-persistent ("N"): the COW device is scratch, reused by every point. The chunk size
    // trades the bio splitting of reads (dm-snapshot splits at chunk boundaries) against the
    // copies on write (journal recovery, the pool's open).
    table_.params = fmt::format("{}:{} {}:{} N {}", major(*base), minor(*base), major(*cow),
                                minor(*cow), sh_.chunk_sectors);
    dm_name_ = fmt::format("pc-chk{}", id_);
    node_ = spec_.mnt + ".dev";
    return Status::Ok();
  }

  void Lap(Step s) {
    const auto now = Clock::now();
    secs_[s] += std::chrono::duration<double>(now - t_).count();
    t_ = now;
  }

  Status CheckOne(const Todo& p) {
    t_ = Clock::now();
    if (Status s = ReplayThrough(*reader_, *target_, p.index); !s.ok()) return s;
    Lap(kReplay);
    auto dev = DmCreate(dm_name_, table_);
    if (!dev.ok()) return dev.status();
    unlink(node_.c_str());
    if (mknod(node_.c_str(), S_IFBLK | 0600, *dev) != 0) {
      return Error(errno, "mknod {}: {}", node_, std::strerror(errno));
    }
    Lap(kSnapshot);
    std::vector<std::string> why;
    PointResult res;
    // Two snapshots of one file system carry the same UUID: xfs mounts the second only so.
    const char* opts = sh_.fs == "xfs" ? "nouuid" : "";
    if (mount(node_.c_str(), spec_.mnt.c_str(), sh_.fs.c_str(), 0, opts) != 0) {
      why.push_back(fmt::format("the file system does not mount: {}", std::strerror(errno)));
      Lap(kMount);
    } else {
      Lap(kMount);
      res = CheckPoint(*sh_.journals, spec_.mnt + "/pool", sh_.volume, p.round, p.op,
                       sh_.overcommit);
      for (const auto& f : res.failures) why.push_back(f);
      if (res.failure_count > static_cast<int>(res.failures.size())) {
        why.push_back(fmt::format("... {} more", res.failure_count - res.failures.size()));
      }
      Lap(kCheck);
      int rc = 0;
      for (int i = 0; i < 100 && (rc = umount2(spec_.mnt.c_str(), 0)) != 0 && errno == EBUSY; ++i) {
        // Bounded retry: nothing signals the mount is idle.
        std::this_thread::sleep_for(std::chrono::milliseconds(20));
      }
      if (rc != 0) return Error(errno, "umount {}: {}", spec_.mnt, std::strerror(errno));
      Lap(kUmount);
      const std::string out = spec_.mnt + ".fsck";
      const std::vector<std::string> fsck =
          sh_.fs == "xfs"
              // -P and a small buffer hash: the same checks, less memory to set up under TCG.
              ? std::vector<std::string>{"xfs_repair", "-n", "-P", "-o", "bhash=64", node_}
              : std::vector<std::string>{"e2fsck", "-fn", node_};
      if (int code = Spawn(fsck, out); code != 0) {
        why.push_back(fmt::format("{} exited {}:\n{}", fsck[0], code, Tail(out, 15)));
      }
      Lap(kFsck);
    }
    if (Status s = DmRemove(dm_name_); !s.ok()) return s;
    unlink(node_.c_str());
    Lap(kRemove);
    Report(p, res, why);
    return Status::Ok();
  }

  void Report(const Todo& p, const PointResult& res, const std::vector<std::string>& why) {
    std::lock_guard lock(sh_.mu);
    ++sh_.checked;
    sh_.blocks += res.blocks_verified;
    sh_.ops += res.ops_verified;
    sh_.tolerated += res.tolerated;
    sh_.orphans += res.orphans.size();
    sh_.open_secs += res.open_secs;
    sh_.read_secs += res.read_secs;
    for (std::string o : res.orphans) {
      for (char& c : o) {
        if (c >= '0' && c <= '9') c = '#';
      }
      ++sh_.orphan_kinds[o];
    }
    for (int s = 0; s < kSteps; ++s) sh_.step_secs[s] += secs_[s];
    std::fill(std::begin(secs_), std::end(secs_), 0.0);
    if (!why.empty()) {
      ++sh_.failed_points;
      if (sh_.first_failure.empty()) sh_.first_failure = p.label;
      std::printf("FAIL point %s (writer round %llu acknowledged, op %lld acknowledged):\n",
                  p.label.c_str(), static_cast<unsigned long long>(p.round),
                  static_cast<long long>(p.op));
      for (const auto& w : why) std::printf("  %s\n", w.c_str());
      if (sh_.stop_on_failure || sh_.failed_points >= sh_.failure_limit) sh_.stop = true;
    }
    if (sh_.checked >= sh_.next_report) {
      sh_.next_report += 25;
      std::printf("powercut: %zu/%zu points checked; point %s: %s\n", sh_.checked, sh_.todo.size(),
                  p.label.c_str(), res.summary.c_str());
    }
    std::fflush(stdout);
  }

  void Infra(const Status& s) {
    std::lock_guard lock(sh_.mu);
    std::printf("powercut-replay: worker %zu: %s\n", id_, s.message().c_str());
    sh_.infra_error = 1;
    sh_.stop = true;
    (void)umount2(spec_.mnt.c_str(), MNT_DETACH);
    (void)DmRemove(dm_name_);
  }

  Shared& sh_;
  WorkerSpec spec_;
  size_t id_, count_;
  std::unique_ptr<LogReader> reader_;
  std::unique_ptr<ReplayTarget> target_;
  DmTarget table_;
  std::string dm_name_, node_;
  Clock::time_point t_;
  double secs_[kSteps] = {};
};

// "w17" -> 17 into *out; false when `mark` is not PREFIX<digits>.
bool MarkNumber(const std::string& mark, char prefix, int64_t* out) {
  if (mark.size() < 2 || mark[0] != prefix) return false;
  int64_t v = 0;
  for (size_t i = 1; i < mark.size(); ++i) {
    if (mark[i] < '0' || mark[i] > '9') return false;
    v = v * 10 + (mark[i] - '0');
  }
  *out = v;
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"powercut-replay: replay a dm-log-writes log to every crash point and check it"};
  Shared sh;
  std::string journal, ops, from_mark;
  std::vector<std::string> worker_args;
  size_t max_points = 0;
  app.add_option("--log", sh.log, "dm-log-writes log (file)")->required();
  app.add_option("--fs", sh.fs, "Pool file system")->required()->check(CLI::IsMember({"xfs", "ext4"}));
  app.add_option("--journal", journal, "powercut-writer journal")->required();
  app.add_option("--ops", ops, "Ops journal of the churn")->required();
  app.add_option("--volume", sh.volume, "The writer's volume")->required();
  app.add_option("--from-mark", from_mark, "First point: the mark with this text")->required();
  app.add_option("--worker", worker_args, "IMAGE:BASEDEV:COWDEV:MOUNTPOINT (one per worker)")
      ->required();
  app.add_option("--max-points", max_points, "Check at most this many points (0: all)");
  app.add_flag("--stop-on-failure", sh.stop_on_failure, "Stop at the first failing point");
  app.add_option("--overcommit", sh.overcommit, "Overcommit ratio the daemon ran with");
  app.add_option("--chunk-sectors", sh.chunk_sectors, "dm-snapshot chunk size in 512-byte sectors")
      ->check(CLI::IsMember({8u, 16u, 32u, 64u, 128u, 256u, 512u}))
      ->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  spdlog::set_level(spdlog::level::err);  // the pool's own info lines, hundreds of times

  std::vector<WorkerSpec> specs;
  for (const auto& w : worker_args) {
    WorkerSpec s;
    std::istringstream ss(w);
    if (!std::getline(ss, s.image, ':') || !std::getline(ss, s.base, ':') ||
        !std::getline(ss, s.cow, ':') || !std::getline(ss, s.mnt) || s.mnt.empty()) {
      std::fprintf(stderr, "powercut-replay: --worker %s: want IMAGE:BASEDEV:COWDEV:MOUNTPOINT\n",
                   w.c_str());
      return 2;
    }
    specs.push_back(s);
  }

  Journals journals;
  if (Status s = journals.Load(journal, ops); !s.ok()) {
    std::printf("powercut-replay: %s\n", s.message().c_str());
    return 3;
  }
  sh.journals = &journals;
  auto reader = LogReader::Open(sh.log);
  if (!reader.ok()) {
    std::printf("powercut-replay: %s\n", reader.status().message().c_str());
    return 3;
  }
  auto points = CrashPoints(**reader, from_mark);
  if (!points.ok()) {
    std::printf("powercut-replay: %s: %s\n", sh.log.c_str(), points.status().message().c_str());
    return 3;
  }
  int64_t round = 0, op = -1;
  size_t shared_image = 0, considered = 0;
  for (const Point& p : *points) {
    if (max_points && sh.todo.size() >= max_points) break;
    ++considered;
    int64_t v;
    if (MarkNumber(p.entry.mark, 'w', &v)) round = v;
    if (MarkNumber(p.entry.mark, 'c', &v)) op = v;
    if (p.same_as_next) {
      ++shared_image;
      continue;
    }
    sh.todo.push_back(Todo{p.entry.index,
                           fmt::format("{}:{}:{}", p.entry.index, FlagNames(p.entry.flags),
                                       p.entry.mark.empty() ? "-" : PrintableMark(p.entry.mark)),
                           static_cast<uint64_t>(round), op});
  }
  std::printf("powercut: %zu crash points from mark %s (of %zu): %zu to check, %zu share the next "
              "one's image; %zu workers\n",
              considered, from_mark.c_str(), points->size(), sh.todo.size(), shared_image,
              specs.size());
  std::fflush(stdout);

  const auto t0 = std::chrono::steady_clock::now();
  std::vector<std::unique_ptr<Worker>> workers;
  std::vector<std::thread> threads;
  for (size_t i = 0; i < specs.size(); ++i) {
    workers.push_back(std::make_unique<Worker>(sh, specs[i], i, specs.size()));
  }
  for (auto& w : workers) threads.emplace_back([&w] { w->Run(); });
  for (auto& t : threads) t.join();
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();

  auto per_point_ms = [&](double secs) {
    return sh.checked ? secs * 1000 / static_cast<double>(sh.checked) : 0.0;
  };
  std::string steps;
  for (int s = 0; s < kSteps; ++s) {
    steps += fmt::format(" {} {:.0f}", kStepNames[s], per_point_ms(sh.step_secs[s]));
    if (s == kCheck) {
      steps += fmt::format(" (pool open {:.0f}, data {:.0f})", per_point_ms(sh.open_secs),
                           per_point_ms(sh.read_secs));
    }
  }
  std::printf("powercut: %s: %zu crash points (%zu replayed and checked, %zu sharing the next "
              "one's image), writes verified %llu, ops verified %llu, orphans swept %llu, "
              "in-flight leftovers tolerated %d, errors %d; %.0f s (%.2f s per point with %zu "
              "workers; ms per point:%s)\n",
              sh.fs.c_str(), considered, sh.checked, shared_image,
              static_cast<unsigned long long>(sh.blocks), static_cast<unsigned long long>(sh.ops),
              static_cast<unsigned long long>(sh.orphans), sh.tolerated, sh.failed_points, secs,
              sh.checked ? secs / static_cast<double>(sh.checked) : 0.0, specs.size(),
              steps.c_str());
  if (!sh.orphan_kinds.empty()) {
    std::string kinds;
    for (const auto& [k, n] : sh.orphan_kinds) kinds += fmt::format(" {} x{}", k, n);
    std::printf("powercut: orphans swept by Pool::Open, by name:%s\n", kinds.c_str());
  }
  if (sh.failed_points) std::printf("powercut: first failing point %s\n", sh.first_failure.c_str());
  if (sh.infra_error) return 3;
  return sh.failed_points ? 1 : 0;
}
