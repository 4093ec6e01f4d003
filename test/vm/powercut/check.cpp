#include "test/vm/powercut/check.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <fstream>
#include <optional>
#include <set>
#include <sstream>

#include "datapath/pool/pool.h"
#include "test/vm/powercut/stamp.h"

namespace nbdcsi::powercut {

using datapath::Pool;
using datapath::PoolInfo;
using datapath::PoolOptions;

Status Journals::Load(const std::string& writer_journal, const std::string& ops_journal) {
  std::ifstream wj(writer_journal);
  if (!wj) return Error(ENOENT, "cannot read the writer journal {}", writer_journal);
  Write w;
  while (wj >> w.seq >> w.block >> w.round) {
    if (w.seq != writes.size() + 1) {
      return Error(EINVAL, "writer journal {}: sequence {} out of order", writer_journal, w.seq);
    }
    writes.push_back(w);
    by_block[w.block].push_back(w.seq);
  }
  if (!wj.eof()) return Error(EINVAL, "writer journal {}: unreadable line", writer_journal);

  std::ifstream oj(ops_journal);
  if (!oj) return Error(ENOENT, "cannot read the ops journal {}", ops_journal);
  std::string line;
  while (std::getline(oj, line)) {
    std::istringstream ls(line);
    int64_t idx;
    std::string what;
    if (!(ls >> idx >> what) || idx < 0) return Error(EINVAL, "ops journal: bad line '{}'", line);
    if (what == "issue") {
      if (idx != static_cast<int64_t>(ops.size())) {
        return Error(EINVAL, "ops journal: op {} issued out of order", idx);
      }
      Op op;
      op.index = idx;
      ls >> op.kind;
      std::string lo;
      if (op.kind == "create" || op.kind == "resize") {
        ls >> op.name >> op.bytes;
      } else if (op.kind == "delete" || op.kind == "delsnap") {
        ls >> op.name;
      } else if (op.kind == "snap") {
        ls >> op.name >> op.vol >> lo;
        if (lo != "-") {
          op.has_lo = true;
          op.lo = std::strtoull(lo.c_str(), nullptr, 10);
        }
      } else if (op.kind != "open") {
        return Error(EINVAL, "ops journal: unknown op '{}'", op.kind);
      }
      if (ls.fail()) return Error(EINVAL, "ops journal: bad line '{}'", line);
      ops.push_back(op);
    } else if (what == "ack") {
      if (idx >= static_cast<int64_t>(ops.size())) {
        return Error(EINVAL, "ops journal: ack of op {} that was never issued", idx);
      }
      Op& op = ops[static_cast<size_t>(idx)];
      op.acked = true;
      std::string hi;
      if (ls >> hi && hi != "-") {
        op.has_hi = true;
        op.hi = std::strtoull(hi.c_str(), nullptr, 10);
      }
    } else {
      return Error(EINVAL, "ops journal: bad line '{}'", line);
    }
  }
  return Status::Ok();
}

namespace {

const uint8_t kZeroBlock[kBlockSize] = {};

struct SnapModel {
  std::string vol;
  uint64_t size = 0;
  bool stamped = false;  // taken of the writer's volume: stamped content within [lo, hi]
  uint64_t lo = 0, hi = 0;
};

class PointCheck {
 public:
  PointCheck(const Journals& j, std::string writer_vol) : j_(j), writer_vol_(std::move(writer_vol)) {}

  template <typename... Args>
  void Fail(fmt::format_string<Args...> f, Args&&... args) {
    if (++r_.failure_count <= 25) r_.failures.push_back(fmt::format(f, std::forward<Args>(args)...));
  }

  // The state after ops 0..last; the one after it is the op that may be in flight.
  bool BuildModel(int64_t last) {
    if (last >= static_cast<int64_t>(j_.ops.size())) {
      Fail("mark c{} names an op the journal never issued", last);
      return false;
    }
    for (int64_t i = 0; i <= last; ++i) {
      const Op& op = j_.ops[static_cast<size_t>(i)];
      if (!op.acked) {
        Fail("op {} ({} {}) is marked but the journal has no ack", i, op.kind, op.name);
        return false;
      }
      if (op.kind == "open") {
        opened_ = true;
      } else if (op.kind == "create" || op.kind == "resize") {
        vols_[op.name] = op.bytes;
      } else if (op.kind == "delete") {
        vols_.erase(op.name);
      } else if (op.kind == "snap") {
        snaps_[op.name] = SnapOf(op);
      } else if (op.kind == "delsnap") {
        snaps_.erase(op.name);
      }
      ++r_.ops_verified;
    }
    if (last + 1 < static_cast<int64_t>(j_.ops.size())) inflight_ = j_.ops[static_cast<size_t>(last + 1)];
    return true;
  }

  void SetWriterBounds(uint64_t round) {
    for (const Write& w : j_.writes) {
      if (w.round <= round) live_lo_ = w.seq;
      if (w.round <= round + 1) live_hi_ = w.seq;
    }
  }

  PointResult Run(const std::string& dir, double overcommit) {
    struct stat st{};
    if (stat(dir.c_str(), &st) != 0) {
      if (opened_) Fail("pool directory {} is gone although the pool was opened", dir);
      return Finish("pool not created yet");
    }
    PoolOptions opts;
    opts.dir = dir;
    opts.overcommit_ratio = overcommit;
    const auto t0 = std::chrono::steady_clock::now();
    auto pool = Pool::Open(opts);
    r_.open_secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (!pool.ok()) {
      Fail("the pool does not open: {}", pool.status().message());
      return Finish("");
    }
    PoolInfo info = (*pool)->Info();
    r_.orphans = info.cleaned_orphans;
    CheckRecovery(info);
    CheckVolumes(**pool);
    CheckSnapshots(**pool);
    return Finish(fmt::format("{} orphans swept, {} tolerated in-flight leftovers",
                              r_.orphans.size(), r_.tolerated));
  }

  PointResult Finish(const std::string& extra) {
    r_.summary = fmt::format("{}; {} volumes, {} snapshots, {} ops and {} acknowledged blocks "
                             "verified{}{}",
                             r_.failure_count ? "FAILED" : "ok", vols_.size(), snaps_.size(),
                             r_.ops_verified, r_.blocks_verified, extra.empty() ? "" : "; ", extra);
    return r_;
  }

 private:
  SnapModel SnapOf(const Op& op) const {
    SnapModel s;
    s.vol = op.vol;
    auto it = vols_.find(op.vol);
    s.size = it == vols_.end() ? 0 : it->second;
    s.stamped = op.vol == writer_vol_ && op.has_lo;
    s.lo = op.lo;
    // Not acknowledged yet: any write issued so far may be in it.
    s.hi = op.has_hi ? op.hi : j_.writes.size();
    return s;
  }

  bool Inflight(std::initializer_list<const char*> kinds, const std::string& name) const {
    if (!inflight_ || inflight_->name != name) return false;
    for (const char* k : kinds) {
      if (inflight_->kind == k) return true;
    }
    return false;
  }

  void CheckRecovery(const PoolInfo& info) {
    for (const std::string& b : info.broken_volumes) {
      std::string name = b.substr(0, b.find(": "));
      const bool snap = name.rfind("snapshot/", 0) == 0;
      if (snap) name = name.substr(9);
      const bool ok = snap ? Inflight({"snap", "delsnap"}, name)
                           : Inflight({"create", "resize", "delete"}, name);
      if (ok) {
        ++r_.tolerated;
      } else {
        Fail("broken after recovery: {}", b);
      }
    }
    for (const std::string& a : info.abandoned_copies) {
      if (a.rfind("snapshot/", 0) == 0 && Inflight({"snap"}, a.substr(9))) {
        ++r_.tolerated;
      } else {
        Fail("{} abandoned as an interrupted copy, but it was acknowledged ready", a);
      }
    }
  }

  void CheckVolumes(Pool& pool) {
    std::set<std::string> seen;
    for (const datapath::VolumeInfo& v : pool.List()) {
      seen.insert(v.name);
      auto it = vols_.find(v.name);
      if (it == vols_.end()) {
        if (!Inflight({"create"}, v.name)) {
          Fail("volume {} exists but was never created or its delete was acknowledged", v.name);
        } else if (v.size != inflight_->bytes) {
          Fail("volume {} (create in flight) has size {}, requested {}", v.name, v.size,
               inflight_->bytes);
        }
        continue;
      }
      const bool size_ok =
          v.size == it->second || (Inflight({"resize"}, v.name) && v.size == inflight_->bytes);
      if (!size_ok) Fail("volume {} has size {}, acknowledged {}", v.name, v.size, it->second);
      if (!v.ready) Fail("volume {} is not ready", v.name);
      if (v.name == writer_vol_) CheckStamped(v.path, v.size, live_lo_, live_hi_, "volume " + v.name);
    }
    for (const auto& [name, size] : vols_) {
      if (!seen.count(name) && !Inflight({"delete"}, name)) {
        Fail("volume {} (size {}) was acknowledged but is missing", name, size);
      }
    }
  }

  void CheckSnapshots(Pool& pool) {
    std::set<std::string> seen;
    auto snaps = pool.ListSnapshots();
    if (!snaps.ok()) {
      Fail("listing snapshots: {}", snaps.status().message());
      return;
    }
    for (const datapath::SnapshotInfo& s : *snaps) {
      seen.insert(s.name);
      SnapModel m;
      if (auto it = snaps_.find(s.name); it != snaps_.end()) {
        m = it->second;
      } else if (Inflight({"snap"}, s.name)) {
        m = SnapOf(*inflight_);  // not acknowledged, but listed: then it must be right
      } else {
        Fail("snapshot {} exists but was never taken or its delete was acknowledged", s.name);
        continue;
      }
      if (!s.ready) {
        // Open abandons a copy that was still running; one listed here must be complete.
        Fail("snapshot {} is listed but not ready ({})", s.name, s.error);
        continue;
      }
      if (s.source_volume != m.vol) {
        Fail("snapshot {} has source {}, taken of {}", s.name, s.source_volume, m.vol);
      }
      if (s.size != m.size) Fail("snapshot {} has size {}, its volume had {}", s.name, s.size, m.size);
      CheckStamped(s.path, s.size, m.stamped ? m.lo : 0, m.stamped ? m.hi : 0, "snapshot " + s.name);
    }
    for (const auto& [name, m] : snaps_) {
      if (!seen.count(name) && !Inflight({"delsnap"}, name)) {
        Fail("snapshot {} of {} was acknowledged ready but is missing", name, m.vol);
      }
    }
  }

  // Every block of the file against the writer journal: the last write with seq <= lo must be
  // there or a later one with seq <= hi; a block no such write touched reads as zeros.
  void CheckStamped(const std::string& path, uint64_t size, uint64_t lo, uint64_t hi,
                    const std::string& what) {
    const auto t0 = std::chrono::steady_clock::now();
    struct Timer {
      const std::chrono::steady_clock::time_point t0;
      double& out;
      ~Timer() { out += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(); }
    } timer{t0, r_.read_secs};
    int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
      Fail("{}: cannot open {}: {}", what, path, std::strerror(errno));
      return;
    }
    struct stat st{};
    if (fstat(fd, &st) != 0 || static_cast<uint64_t>(st.st_size) != size) {
      Fail("{}: data file {} is {} bytes, metadata says {}", what, path, st.st_size, size);
      close(fd);
      return;
    }
    constexpr uint64_t kChunk = 1 << 20;
    std::vector<uint8_t> buf(kChunk);
    int bad = 0;
    for (uint64_t off = 0; off < size && bad < 5; off += kChunk) {
      const uint64_t len = std::min(kChunk, size - off);
      // A chunk with no data at all reads as zeros: only the blocks that must hold a write can
      // be wrong there (scanning 64 MiB of zeros byte by byte costs seconds under TCG).
      const off_t data = lseek(fd, static_cast<off_t>(off), SEEK_DATA);
      if (data < 0 || static_cast<uint64_t>(data) >= off + len) {
        const uint64_t end = (off + len) / kBlockSize;
        for (auto it = j_.by_block.lower_bound(off / kBlockSize);
             it != j_.by_block.end() && it->first < end && bad < 5; ++it) {
          if (!CheckBlock(kZeroBlock, it->first, lo, hi, what)) ++bad;
        }
        continue;
      }
      for (uint64_t done = 0; done < len;) {
        ssize_t n = pread(fd, buf.data() + done, len - done, static_cast<off_t>(off + done));
        if (n <= 0) {
          Fail("{}: read at byte {} of {}: {}", what, off + done, path,
               n < 0 ? std::strerror(errno) : "unexpected end of file");
          close(fd);
          return;
        }
        done += static_cast<uint64_t>(n);
      }
      for (uint64_t b = 0; b < len / kBlockSize && bad < 5; ++b) {
        if (!CheckBlock(buf.data() + b * kBlockSize, off / kBlockSize + b, lo, hi, what)) ++bad;
      }
    }
    close(fd);
  }

  bool CheckBlock(const uint8_t* p, uint64_t block, uint64_t lo, uint64_t hi,
                  const std::string& what) {
    uint64_t need = 0;  // the last acknowledged write to this block (0: none)
    bool allowed = false;
    StampFields f;
    const StampKind kind = ReadStamp(p, &f);
    if (auto it = j_.by_block.find(block); it != j_.by_block.end()) {
      for (uint64_t s : it->second) {
        if (s <= lo) need = s;
        if (s <= hi && kind == StampKind::kValid && s == f.seq) allowed = true;
      }
    }
    if (need) ++r_.blocks_verified;
    switch (kind) {
      case StampKind::kZero:
        if (!need) return true;
        Fail("{} block {}: reads zeros, but write seq {} (round {}) was acknowledged", what, block,
             need, j_.writes[need - 1].round);
        return false;
      case StampKind::kCorrupt:
        Fail("{} block {}: neither zeros nor an intact stamp (torn or foreign data)", what, block);
        return false;
      case StampKind::kValid:
        break;
    }
    if (f.block != block) {
      Fail("{} block {}: holds the stamp of block {} (seq {})", what, block, f.block, f.seq);
      return false;
    }
    if (f.seq == 0 || f.seq > j_.writes.size() || j_.writes[f.seq - 1].block != block ||
        j_.writes[f.seq - 1].round != f.round) {
      Fail("{} block {}: seq {} round {} is not a write the journal has for this block", what,
           block, f.seq, f.round);
      return false;
    }
    if (f.seq < need) {
      Fail("{} block {}: holds seq {} (round {}), older than the acknowledged seq {} (round {})",
           what, block, f.seq, f.round, need, j_.writes[need - 1].round);
      return false;
    }
    if (!allowed) {
      Fail("{} block {}: holds seq {} (round {}), written after this point (bound seq {})", what,
           block, f.seq, f.round, hi);
      return false;
    }
    return true;
  }

  const Journals& j_;
  std::string writer_vol_;
  PointResult r_;
  bool opened_ = false;
  std::map<std::string, uint64_t> vols_;
  std::map<std::string, SnapModel> snaps_;
  std::optional<Op> inflight_;
  uint64_t live_lo_ = 0, live_hi_ = 0;
};

}  // namespace

PointResult CheckPoint(const Journals& j, const std::string& pool_dir, const std::string& writer_vol,
                       uint64_t round, int64_t op, double overcommit) {
  PointCheck c(j, writer_vol);
  if (!c.BuildModel(op)) return c.Finish("");
  c.SetWriterBounds(round);
  return c.Run(pool_dir, overcommit);
}

}  // namespace nbdcsi::powercut
