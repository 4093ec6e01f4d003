// How a snapshot, restore or clone gets its data: reflink (CloneWhole) where the file system has
// it, otherwise a background CopyJob (copy_job.h) registered here, whose end state is committed
// by CopyDone. The design and the crash rules are in pool.h.
#include <fcntl.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <optional>

#include <spdlog/spdlog.h>

#include "common/fault.h"
#include "datapath/pool/pool_impl.h"

namespace nbdcsi::datapath {

namespace {

// Holds a volume's writes paused; always reopens, also on every error path.
class GatePause {
 public:
  explicit GatePause(WriteGate& gate) : gate_(gate) {
    gate_.CloseAndDrain();
    closed_ns_ = RealtimeNs();
    t0_ = std::chrono::steady_clock::now();
  }
  ~GatePause() { Open(); }
  // Reopens (once) and returns how long writes were paused, in milliseconds.
  double Open() {
    if (!open_) {
      gate_.Open();
      open_ = true;
      ms_ = MsSince(t0_);
    }
    return ms_;
  }
  // The instant the snapshot holds: every write acknowledged before it is in, none after.
  int64_t closed_ns() const { return closed_ns_; }
  GatePause(const GatePause&) = delete;
  GatePause& operator=(const GatePause&) = delete;

 private:
  WriteGate& gate_;
  int64_t closed_ns_ = 0;
  std::chrono::steady_clock::time_point t0_;
  bool open_ = false;
  double ms_ = 0;
};

// FICLONERANGE of [offset, offset + length) of src into the same range of dst.
Status CloneRange(int dst_fd, int src_fd, uint64_t offset, uint64_t length,
                  const std::string& what, const std::string& dst_path) {
  file_clone_range r{};
  r.src_fd = src_fd;
  r.src_offset = offset;
  r.src_length = length;
  r.dest_offset = offset;
  if (ioctl(dst_fd, FICLONERANGE, &r) != 0) {
    return Sys(errno,
               fmt::format("FICLONERANGE {} [{}, +{}) into {}", what, offset, length, dst_path));
  }
  return Status::Ok();
}

}  // namespace

// Reflink of a whole source file into dst_fd at one instant. A live source (gate not null) has
// its writes paused and its data flushed: the workers' O_DIRECT writes are already on the device,
// but buffered (unaligned) ones may still be in the page cache, and a clone shares what the file
// maps. `what` names the source in messages. For a live source, *closed_ns is the instant the copy
// holds and *pause_ms how long writes waited; the gate is open again on return.
Status CloneWhole(int dst_fd, const std::string& dst_path, int src_fd, const std::string& what,
                  WriteGate* gate, int64_t* closed_ns, double* pause_ms) {
  if (!gate) {  // an immutable source: one FICLONE, nobody to pause
    if (ioctl(dst_fd, FICLONE, src_fd) != 0) {
      return Sys(errno, "FICLONE " + what + " into " + dst_path);
    }
    return Status::Ok();
  }
  // A live source. FICLONE costs time per extent, and XFS keeps the source's writers out while it
  // runs: one FICLONE of a fragmented volume (10k+ extents) stalls its I/O for most of a second.
  // So the clone is taken while writes flow and fixed up under a short pause:
  //  1. a DirtyTracker is installed on the gate (the pause of one drain);
  //  2. the file is cloned in 16 MiB segments (FICLONERANGE), each keeping writers out only for its
  //     own extents; every write admitted meanwhile marks its chunks in the tracker;
  //  3. fdatasync outside the pause, so the one inside has little left to flush;
  //  4. pause: drain, fdatasync, clone again only the chunks written since step 1, reopen.
  // A chunk nobody wrote since step 1 still holds, at step 4's instant, what step 2 cloned; a
  // written chunk is cloned again inside the pause. The result is the source at step 4's instant.
  constexpr uint64_t kSegment = uint64_t{16} << 20;
  constexpr uint64_t kChunk = uint64_t{1} << 20;
  struct stat st_src {};
  if (fstat(src_fd, &st_src) != 0) return Sys(errno, "stat " + what);
  const uint64_t size = static_cast<uint64_t>(st_src.st_size);
  if (ftruncate(dst_fd, static_cast<off_t>(size)) != 0) return Sys(errno, "size " + dst_path);
  auto tracker = std::make_shared<DirtyTracker>(kChunk);
  {
    GatePause install(*gate);
    gate->SetTracker(tracker);
  }
  struct Untrack {
    WriteGate* g;
    ~Untrack() { g->ClearTracker(); }
  } untrack{gate};
  for (uint64_t off = 0; off < size; off += kSegment) {
    Status s = CloneRange(dst_fd, src_fd, off, std::min(kSegment, size - off), what, dst_path);
    if (!s.ok()) return s;
  }
  if (fdatasync(src_fd) != 0) return Sys(errno, "fdatasync " + what);
  GatePause pause(*gate);
  if (closed_ns) *closed_ns = pause.closed_ns();
  Status st = Status::Ok();
  if (fdatasync(src_fd) != 0) st = Sys(errno, "fdatasync " + what);
  for (const auto& [off, len] : tracker->Ranges(size)) {
    if (!st.ok()) break;
    st = CloneRange(dst_fd, src_fd, off, len, what, dst_path);
  }
  *pause_ms = pause.Open();
  return st;
}

Pool::Impl::~Impl() {
  StopWatch();
  // A cancelled copy leaves its metadata at "copying"; the next open deals with it exactly as
  // with a crash (abandon a snapshot/clone, restart a restore). Waiting for a copy of a
  // whole volume to finish would hold up a daemon restart for minutes.
  std::vector<std::shared_ptr<CopyJob>> jobs;
  {
    std::lock_guard lock(mu);
    for (auto& [t, rec] : copies)
      if (rec->job) jobs.push_back(rec->job);
  }
  for (auto& j : jobs) j->Cancel();
  for (auto& j : jobs) j->Wait();
  jobs.clear();
  ReapJobs();
  if (lock_fd >= 0) close(lock_fd);
}

void Pool::Impl::ReapJobs() {
  std::vector<std::shared_ptr<CopyJob>> done;  // joined outside `mu`, when this returns
  {
    std::lock_guard lock(mu);
    done.swap(finished_jobs);
  }
}

// "NN%" of the copy filling `target`, for messages.
std::string Pool::Impl::ProgressLocked(const CopyRec& r) const {
  if (!r.job || r.job->total_bytes() == 0) return "0%";
  return fmt::format("{}%", r.job->copied_bytes() * 100 / r.job->total_bytes());
}

const Pool::Impl::CopyRec* Pool::Impl::CopyFromLocked(const std::string& source) const {
  for (const auto& [t, r] : copies)
    if (r->source == source) return r.get();
  return nullptr;
}

// Registers and starts a background copy; a live source's gate must be held closed by the
// caller. `mu` is held so the record is in place before on_done can look for it.
void Pool::Impl::StartCopyLocked(const std::shared_ptr<CopyRec>& rec, int src_fd, bool own_src,
                                 int dst_fd, bool own_dst, uint64_t length, WriteGate* gate) {
  rec->id = next_copy_id++;
  rec->src_fd = own_src ? src_fd : -1;
  rec->dst_fd = own_dst ? dst_fd : -1;
  CopyJob::Options o;
  o.src_fd = src_fd;
  o.dst_fd = dst_fd;
  o.length = length;
  o.gate = gate;
  o.on_done = [this, target = rec->target, id = rec->id](const Status& st) {
    CopyDone(target, id, st);
  };
  copies[rec->target] = rec;
  rec->job = CopyJob::Start(std::move(o));
}

// Starts a background copy at one instant. A live source (rec->src_vol) has its writes paused
// and flushed, the copy is installed as its copy-before-write preserver, and writes resume;
// rec->point_in_time_ns is the instant. `what` names the source in messages. On an error
// nothing was started and the caller still owns both descriptors.
Status Pool::Impl::StartCopyAtInstant(const std::shared_ptr<CopyRec>& rec, const std::string& what,
                                      int src_fd, bool own_src, int dst_fd, bool own_dst,
                                      uint64_t length, double* pause_ms) {
  WriteGate* gate = rec->src_vol ? &rec->src_vol->gate() : nullptr;
  std::optional<GatePause> pause;
  if (gate) {
    pause.emplace(*gate);
    rec->point_in_time_ns = pause->closed_ns();
    if (fdatasync(src_fd) != 0) return Sys(errno, "fdatasync " + what);
  }
  {
    std::lock_guard lock(mu);
    StartCopyLocked(rec, src_fd, own_src, dst_fd, own_dst, length, gate);
  }
  if (pause) *pause_ms = pause->Open();
  return Status::Ok();
}

// on_done of every copy, on the job's thread. The data is fsynced by the job; committing
// "ready" is the step that makes it usable. A cancelled copy changes nothing on disk: whoever
// cancelled it (delete, shutdown) decides what happens to it.
void Pool::Impl::CopyDone(const std::string& target, uint64_t id, const Status& st) {
  std::shared_ptr<CopyRec> rec;
  {
    std::lock_guard lock(mu);
    auto it = copies.find(target);
    if (it == copies.end() || it->second->id != id) return;
    rec = it->second;
  }
  const bool is_snap = target.rfind("snapshot/", 0) == 0;
  const bool from_snap = rec->source.rfind("snapshot/", 0) == 0;
  const std::string name = target.substr(target.find('/') + 1);
  if (st.code() != ECANCELED) {
    if (st.ok()) {
      FaultPoint(is_snap     ? "snapshot.copy_done"
                 : from_snap ? "restore.copy_done"
                             : "clone.copy_done");
    }
    if (is_snap) CommitSnapCopy(name, *rec, st);
    else CommitVolumeCopy(name, *rec, st);
  }
  std::lock_guard lock(mu);
  if (rec->src_fd >= 0) close(rec->src_fd);
  if (rec->dst_fd >= 0) close(rec->dst_fd);
  rec->src_fd = rec->dst_fd = -1;
  copies.erase(target);
  if (rec->job) finished_jobs.push_back(std::move(rec->job));
  rec->src_vol.reset();
}

// A failed copy gives its space back but keeps its metadata, so the failure and its reason
// stay visible until the object is deleted.
void Pool::Impl::ReleaseSpace(int fd, uint64_t size) {
  if (ftruncate(fd, 0) != 0 || ftruncate(fd, static_cast<off_t>(size)) != 0 || fsync(fd) != 0) {
    spdlog::error("pool {}: cannot release the space of a failed copy: {}", opts.dir,
                  std::strerror(errno));
  }
}

void Pool::Impl::CommitSnapCopy(const std::string& name, const CopyRec& rec, const Status& st) {
  SnapshotMeta m;
  {
    std::lock_guard lock(mu);
    auto it = snaps.find(name);
    if (it == snaps.end()) return;
    m = it->second;
  }
  m.created_unix_ns = rec.point_in_time_ns;
  if (st.ok()) {
    m.state = "ready";
  } else {
    // A snapshot's size is its source's; its data file is released entirely.
    ReleaseSpace(rec.dst_fd, 0);
    m.state = "failed";
    m.error = st.message();
  }
  CommitCopyState("snapshot", name, m);
  if (m.state == "ready") {
    spdlog::info("pool {}: snapshot {} of volume {} is ready (background copy of {})", opts.dir,
                 name, m.source_volume, Bytes(m.size));
  } else {
    spdlog::error("pool {}: snapshot {} of volume {} failed: {}", opts.dir, name, m.source_volume,
                  m.error);
  }
  std::lock_guard lock(mu);
  if (auto it = snaps.find(name); it != snaps.end()) it->second = m;
}

void Pool::Impl::CommitVolumeCopy(const std::string& name, const CopyRec& rec, const Status& st) {
  VolumeMeta m;
  std::shared_ptr<Volume> vol;
  {
    std::lock_guard lock(mu);
    auto it = vols.find(name);
    if (it == vols.end()) return;
    m = it->second.meta;
    vol = it->second.vol;
  }
  if (st.ok()) {
    m.state = "ready";
    m.error.clear();
  } else {
    ReleaseSpace(vol->buffered_fd(), m.size);
    m.state = "failed";
    m.error = st.message();
  }
  CommitCopyState("volume", name, m);
  if (m.state == "ready") {
    spdlog::info("pool {}: volume {} is ready (background copy from {})", opts.dir, name,
                 rec.source);
  } else {
    spdlog::error("pool {}: volume {} (copy from {}) failed: {}", opts.dir, name, rec.source,
                  m.error);
  }
  std::lock_guard lock(mu);
  if (auto it = vols.find(name); it != vols.end()) it->second.meta = m;
}

}  // namespace nbdcsi::datapath
