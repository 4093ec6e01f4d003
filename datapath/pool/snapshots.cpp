// Snapshots: point-in-time copies of a live volume, by reflink or by background copy (design
// and crash rules in pool.h), and their deletion, listing and inspection.
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <utility>

#include <spdlog/spdlog.h>

#include "common/fault.h"
#include "datapath/pool/pool_impl.h"

namespace nbdcsi::datapath {

SnapshotInfo Pool::Impl::MakeSnapInfo(const SnapshotMeta& m) const {
  SnapshotInfo info;
  info.name = m.name;
  info.source_volume = m.source_volume;
  info.size = m.size;
  info.created_unix_ns = m.created_unix_ns;
  info.method = m.method;
  info.ready = m.state == "ready";
  info.error = m.error;
  info.path = SnapDataPath(m.name);
  struct stat st{};
  if (stat(info.path.c_str(), &st) == 0) {
    info.allocated = static_cast<uint64_t>(st.st_blocks) * 512;
  }
  if (auto c = copies.find(SnapKey(m.name)); c != copies.end()) {
    if (c->second->job) {
      info.copy_done = c->second->job->copied_bytes();
      info.copy_total = c->second->job->total_bytes();
      info.copy_data_done = c->second->job->data_copied_bytes();
      if (c->second->job->data_known()) info.copy_data_total = c->second->job->data_total_bytes();
    }
    if (c->second->point_in_time_ns) info.created_unix_ns = c->second->point_in_time_ns;
  }
  if (info.ready) {
    info.copy_done = info.copy_total = info.copy_data_done = 0;
    info.copy_data_total.reset();
  }
  return info;
}

// A live volume that a snapshot or a clone may copy now: it exists (ENOENT, or EIO when broken),
// is ready (EAGAIN while a restore or clone still fills it) and no other copy reads it (EAGAIN:
// one copy per source at a time).
StatusOr<const Pool::Impl::Entry*> Pool::Impl::LiveSourceLocked(const std::string& volume) const {
  auto it = vols.find(volume);
  if (it == vols.end()) return NotFound("volume", broken, volume);
  const VolumeMeta& vm = it->second.meta;
  if (vm.state != "ready") {
    return Error(EAGAIN, "volume {} is not ready: {}", volume, NotReadyReason(vm.state, vm.error));
  }
  if (const auto* c = CopyFromLocked(VolKey(volume))) {
    return Error(EAGAIN, "a copy from volume {} is running ({})", volume, ProgressLocked(*c));
  }
  return &it->second;
}

// The decisions of CreateSnapshot, under the name guard: an existing snapshot (idempotent retry
// or EEXIST), else the source volume and its size at this moment.
StatusOr<Pool::Impl::SnapshotPlan> Pool::Impl::PlanSnapshotLocked(const std::string& name,
                                                                  const std::string& volume) const {
  if (Status s = BrokenTaken("snapshot", broken_snaps, name); !s.ok()) return s;
  SnapshotPlan plan;
  if (auto it = snaps.find(name); it != snaps.end()) {
    if (it->second.source_volume != volume) {
      return Error(EEXIST, "snapshot {} already exists with source volume {}, not {}", name,
                   it->second.source_volume, volume);
    }
    plan.existing = MakeSnapInfo(it->second);
    return plan;
  }
  auto live = LiveSourceLocked(volume);
  if (!live.ok()) return live.status();
  plan.vol = (*live)->vol;
  plan.size = (*live)->meta.size;
  return plan;
}

StatusOr<SnapshotInfo> Pool::CreateSnapshot(const std::string& name, const std::string& volume) {
  if (Status s = ValidateSnapshotName(name); !s.ok()) return s;
  if (Status s = ValidateVolumeName(volume); !s.ok()) {
    return Error(s.code(), "snapshot {}: source {}", name, s.message());
  }
  Impl& I = *impl_;
  I.ReapJobs();
  Impl::NameGuard guard(I, {SnapKey(name), VolKey(volume)});
  auto plan = [&] {
    std::lock_guard lock(I.mu);
    return I.PlanSnapshotLocked(name, volume);
  }();
  if (!plan.ok()) return plan.status();
  if (plan->existing) return *plan->existing;
  if (I.reflink) return I.SnapshotByReflink(name, volume, plan->vol, plan->size);
  return I.SnapshotByCopy(name, volume, plan->vol, plan->size);
}

// Undoes a snapshot that failed after its first file was made: closes `fd` (if >= 0),
// unpublishes it (the copy path publishes before the copy starts) and removes every file either
// path may have made. Returns `s`.
Status Pool::Impl::RollBackSnapshot(const std::string& name, const std::string& volume, int fd,
                                    const Status& s) {
  spdlog::error("pool {}: snapshot {} of volume {} failed, rolling back: {}", opts.dir, name,
                volume, s.message());
  if (fd >= 0) close(fd);
  {
    std::lock_guard lock(mu);
    snaps.erase(name);  // never an older one: the name guard and the plan exclude that
  }
  UndoFiles(snap_dir,
            {SnapMetaPath(name), SnapTmpPath(name), SnapDataPath(name), SnapDataTmpPath(name)});
  return s;
}

// Reflink: clone the live volume into a temp file at one instant, fsync, rename to NAME.img,
// fsync the directory, commit NAME.json "ready".
StatusOr<SnapshotInfo> Pool::Impl::SnapshotByReflink(const std::string& name,
                                                     const std::string& volume,
                                                     const std::shared_ptr<Volume>& vol,
                                                     uint64_t size) {
  const auto t0 = std::chrono::steady_clock::now();
  const std::string data = SnapDataPath(name), tmp = SnapDataTmpPath(name);
  int fd = open(tmp.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  if (fd < 0) return Sys(errno, "create snapshot " + name + ": " + tmp);
  auto fail = [&](Status s) { return RollBackSnapshot(name, volume, std::exchange(fd, -1), s); };
  int64_t at = 0;
  double pause_ms = 0;
  if (Status s = CloneWhole(fd, tmp, vol->buffered_fd(), "volume " + volume, &vol->gate(), &at,
                            &pause_ms);
      !s.ok()) {
    return fail(s);
  }
  FaultPoint("snapshot.cloned");
  if (fsync(fd) != 0) return fail(Sys(errno, "fsync " + tmp));
  close(fd);
  fd = -1;
  if (rename(tmp.c_str(), data.c_str()) != 0) {
    return fail(Sys(errno, "rename " + tmp + " to " + data));
  }
  if (Status s = FsyncDir(snap_dir); !s.ok()) return fail(s);
  FaultPoint("snapshot.data");
  const SnapshotMeta m{name, volume, size, at, "reflink", "ready", ""};
  bool renamed = false;
  if (Status s = WriteMeta(m, "snapshot.meta_tmp", "snapshot.meta_renamed", &renamed); !s.ok()) {
    return fail(s);
  }
  spdlog::info("pool {}: snapshot {} of volume {} ({}) by reflink: writes paused {:.2f} ms, "
               "total {:.2f} ms",
               opts.dir, name, volume, Bytes(size), pause_ms, MsSince(t0));
  std::lock_guard lock(mu);
  auto [it, inserted] = snaps.emplace(name, m);
  return MakeSnapInfo(it->second);
}

// A copy may have to hold every allocated byte of the source, and a copy that runs out of space
// midway only wastes time, so it is refused up front.
Status Pool::Impl::CheckCopySpace(const std::string& volume, const Volume& vol) const {
  struct stat st{};
  if (fstat(vol.buffered_fd(), &st) != 0) return Sys(errno, "fstat volume " + volume);
  const uint64_t need = static_cast<uint64_t>(st.st_blocks) * 512;
  struct statvfs vfs{};
  if (statvfs(opts.dir.c_str(), &vfs) != 0) return Sys(errno, "statvfs " + opts.dir);
  const uint64_t free_bytes = static_cast<uint64_t>(vfs.f_bavail) * vfs.f_frsize;
  if (free_bytes < need) {
    return Error(ENOSPC, "pool {} has {} free, but a copy snapshot of volume {} needs up to {} "
                 "(the volume's allocated bytes)",
                 opts.dir, Bytes(free_bytes), volume, Bytes(need));
  }
  return Status::Ok();
}

// Copy: NAME.img created sized and NAME.json committed "copying" first (visible, not ready),
// then a CopyJob installed as the volume's copy-before-write preserver at one instant; CopyDone
// commits "ready" or "failed".
StatusOr<SnapshotInfo> Pool::Impl::SnapshotByCopy(const std::string& name,
                                                  const std::string& volume,
                                                  const std::shared_ptr<Volume>& vol,
                                                  uint64_t size) {
  const auto t0 = std::chrono::steady_clock::now();
  if (Status s = CheckCopySpace(volume, *vol); !s.ok()) return s;
  const std::string data = SnapDataPath(name);
  int fd = open(data.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  if (fd < 0) return Sys(errno, "create snapshot " + name + ": " + data);
  auto fail = [&](Status s) { return RollBackSnapshot(name, volume, std::exchange(fd, -1), s); };
  if (Status s = SizeDurably(fd, size, data, snap_dir); !s.ok()) return fail(s);
  FaultPoint("snapshot.copy_data");
  const SnapshotMeta m{name, volume, size, RealtimeNs(), "copy", "copying", ""};
  bool renamed = false;
  if (Status s = WriteMeta(m, "", "", &renamed); !s.ok()) return fail(s);
  {
    std::lock_guard lock(mu);
    snaps.emplace(name, m);
  }
  auto rec = std::make_shared<CopyRec>();
  rec->target = SnapKey(name);
  rec->source = VolKey(volume);
  rec->src_vol = vol;
  double pause_ms = 0;
  if (Status s = StartCopyAtInstant(rec, "volume " + volume, vol->buffered_fd(),
                                    /*own_src=*/false, fd, /*own_dst=*/true, size, &pause_ms);
      !s.ok()) {
    return fail(s);
  }
  fd = -1;  // the copy closes it
  FaultPoint("snapshot.copy_started");
  spdlog::info("pool {}: snapshot {} of volume {} ({}) by background copy: writes paused "
               "{:.2f} ms, setup {:.2f} ms",
               opts.dir, name, volume, Bytes(size), pause_ms, MsSince(t0));
  std::lock_guard lock(mu);
  return MakeSnapInfo(snaps.at(name));
}

Status Pool::DeleteSnapshot(const std::string& name) {
  if (Status s = ValidateSnapshotName(name); !s.ok()) return s;
  Impl& I = *impl_;
  I.ReapJobs();
  Impl::NameGuard guard(I, {SnapKey(name)});
  I.Step("delete_snapshot.guarded");
  {
    std::lock_guard lock(I.mu);
    if (!I.snaps.count(name) && !I.broken_snaps.count(name))
      return Error(ENOENT, "snapshot {} not found", name);
  }
  if (Status s = I.StopCopiesOf("snapshot", name); !s.ok()) return s;
  const std::string meta = I.SnapMetaPath(name), data = I.SnapDataPath(name);
  if (unlink(meta.c_str()) != 0 && errno != ENOENT)
    return Sys(errno, "delete snapshot " + name + ": unlink " + meta);
  {
    std::lock_guard lock(I.mu);
    I.snaps.erase(name);
    I.broken_snaps.erase(name);
  }
  return I.RemoveDataAfterMeta("snapshot", I.snap_dir, name, data, "snapshot.delete_meta");
}

StatusOr<std::vector<SnapshotInfo>> Pool::ListSnapshots(const std::string& volume) {
  if (!volume.empty()) {
    if (Status s = ValidateVolumeName(volume); !s.ok()) {
      return Error(s.code(), "snapshot filter: {}", s.message());
    }
  }
  std::lock_guard lock(impl_->mu);
  std::vector<SnapshotInfo> out;
  for (const auto& [n, m] : impl_->snaps)
    if (volume.empty() || m.source_volume == volume) out.push_back(impl_->MakeSnapInfo(m));
  return out;
}

StatusOr<SnapshotInfo> Pool::InspectSnapshot(const std::string& name) {
  if (Status s = ValidateSnapshotName(name); !s.ok()) return s;
  std::lock_guard lock(impl_->mu);
  auto it = impl_->snaps.find(name);
  if (it == impl_->snaps.end()) return Impl::NotFound("snapshot", impl_->broken_snaps, name);
  return impl_->MakeSnapInfo(it->second);
}

}  // namespace nbdcsi::datapath
