// Volumes: the one Create (blank, restore or clone; the filling itself is fill.cpp), Delete,
// Resize, QoS changes, and the read side (Inspect, List, Acquire, Names).
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>
#include <utility>

#include <spdlog/spdlog.h>

#include "common/fault.h"
#include "datapath/pool/pool_impl.h"

namespace nbdcsi::datapath {

namespace {

Status InVolume(const std::string& name, const Status& s) {
  return Error(s.code(), "volume {}: {}", name, s.message());
}

// The rules that need nothing but the request (rules.h); the size a source gives is checked
// once it is known, under the name guard.
Status ValidateCreateSpec(const CreateSpec& spec) {
  if (Status s = ValidateVolumeName(spec.name); !s.ok()) return s;
  const VolumeSource& src = spec.source;
  if (src.kind != VolumeSource::Kind::kBlank) {
    Status s = src.kind == VolumeSource::Kind::kSnapshot ? ValidateSnapshotName(src.name)
                                                         : ValidateVolumeName(src.name);
    if (!s.ok()) return Error(s.code(), "volume {}: source {}", spec.name, s.message());
  }
  if (src.kind == VolumeSource::Kind::kVolume && src.name == spec.name) {
    return Error(EINVAL, "cannot clone volume {} onto itself", spec.name);
  }
  if (src.kind == VolumeSource::Kind::kBlank || spec.size != 0) {
    if (Status s = ValidateVolumeSize(spec.size); !s.ok()) return InVolume(spec.name, s);
  }
  if (Status s = ValidateQos(spec.qos, spec.size); !s.ok()) return InVolume(spec.name, s);
  if (Status s = ValidateSchedule(spec.schedule); !s.ok()) return InVolume(spec.name, s);
  return Status::Ok();
}

std::string DescribeSource(const std::string& label) {
  return label.empty() ? "a blank volume" : "content from " + label;
}

// A create retried onto an existing volume: the same request returns it (CSI idempotency),
// anything else is EEXIST naming the first parameter that differs. `want` is the size the
// request resolves to.
Status SameAsExisting(const VolumeMeta& m, const CreateSpec& spec, const std::string& label,
                      uint64_t want) {
  if (m.source != label) {
    return Error(EEXIST, "volume {} already exists with {} (requested {})", m.name,
                 DescribeSource(m.source), DescribeSource(label));
  }
  if (m.size != want) {
    return Error(EEXIST, "volume {} already exists with size {} (requested {})", m.name, m.size,
                 want);
  }
  if (m.read_only != spec.read_only) {
    return Error(EEXIST, "volume {} already exists with read_only={} (requested {})", m.name,
                 m.read_only, spec.read_only);
  }
  if (!(m.qos == spec.qos)) {
    return Error(EEXIST, "volume {} already exists with different QoS limits", m.name);
  }
  if (!(Normalized(m.schedule) == Normalized(spec.schedule))) {
    return Error(EEXIST, "volume {} already exists with another schedule ({}; requested {})",
                 m.name, DescribeSchedule(m.schedule), DescribeSchedule(spec.schedule));
  }
  return Status::Ok();
}

// The names a create works on: its own, and its source's (whose label is its guard key).
std::vector<std::string> CreateKeys(const CreateSpec& spec) {
  std::vector<std::string> keys{VolKey(spec.name)};
  if (spec.source.kind != VolumeSource::Kind::kBlank) keys.push_back(spec.source.Label());
  return keys;
}

}  // namespace

std::string VolumeSource::Label() const {
  switch (kind) {
    case Kind::kBlank: return "";
    case Kind::kSnapshot: return SnapKey(name);
    case Kind::kVolume: return VolKey(name);
  }
  return "";
}

Volume::~Volume() {
  if (direct_fd_ >= 0 && direct_fd_ != buffered_fd_) close(direct_fd_);
  if (buffered_fd_ >= 0) close(buffered_fd_);
}

// Opens the data file of a committed volume. ENOENT is returned as is so Load can tell a
// missing data file from other failures.
StatusOr<std::shared_ptr<Volume>> Pool::Impl::OpenVolume(const VolumeMeta& m, int buffered_fd) {
  const std::string path = DataPath(m.name);
  if (buffered_fd < 0) {
    buffered_fd = open(path.c_str(), O_RDWR | O_CLOEXEC);
    if (buffered_fd < 0) return Sys(errno, "open " + path);
  }
  auto v = std::make_shared<Volume>();
  v->buffered_fd_ = buffered_fd;  // v's destructor closes it on every error below
  int dfd = open(path.c_str(), O_RDWR | O_DIRECT | O_CLOEXEC);
  if (dfd < 0) {
    if (errno != EINVAL) return Sys(errno, "open " + path + " with O_DIRECT");
    // tmpfs and some FUSE file systems refuse O_DIRECT; the engine then does buffered I/O.
    spdlog::warn("volume {}: {} does not support O_DIRECT; using buffered I/O", m.name, path);
    dfd = buffered_fd;
  }
  v->direct_fd_ = dfd;
  v->name_ = m.name;
  v->size_.store(m.size, std::memory_order_release);
  v->read_only_ = m.read_only;
  v->fence_epoch_.store(m.fence_epoch, std::memory_order_release);
  v->throttle_.SetLimits(m.qos, m.size, MonotonicNowNs());
  return v;
}

VolumeInfo Pool::Impl::MakeInfo(const Entry& e) const {
  VolumeInfo info;
  info.name = e.meta.name;
  info.size = e.meta.size;
  info.created_unix_ns = e.meta.created_unix_ns;
  info.read_only = e.meta.read_only;
  info.qos = e.meta.qos;
  info.path = DataPath(e.meta.name);
  info.source = e.meta.source;
  info.ready = e.meta.state == "ready";
  info.fence_epoch = e.meta.fence_epoch;
  info.schedule = e.meta.schedule;
  struct stat st{};
  if (fstat(e.vol->buffered_fd(), &st) == 0) {
    info.allocated = static_cast<uint64_t>(st.st_blocks) * 512;
  }
  if (auto c = copies.find(VolKey(e.meta.name)); c != copies.end() && c->second->job) {
    info.copy_done = c->second->job->copied_bytes();
    info.copy_total = c->second->job->total_bytes();
    info.copy_data_done = c->second->job->data_copied_bytes();
    if (c->second->job->data_known()) info.copy_data_total = c->second->job->data_total_bytes();
  }
  return info;
}

// Publishes a committed volume.
StatusOr<VolumeInfo> Pool::Impl::InsertVolume(std::shared_ptr<Volume> vol, const VolumeMeta& m) {
  std::lock_guard lock(mu);
  auto [it, inserted] = vols.emplace(m.name, Entry{std::move(vol), m});
  return MakeInfo(it->second);
}

std::optional<uint64_t> Pool::Impl::SourceSizeLocked(const VolumeSource& src) const {
  if (src.kind == VolumeSource::Kind::kSnapshot) {
    if (auto it = snaps.find(src.name); it != snaps.end()) return it->second.size;
  } else if (src.kind == VolumeSource::Kind::kVolume) {
    if (auto it = vols.find(src.name); it != vols.end()) return it->second.meta.size;
  }
  return std::nullopt;
}

// Everything Create decides from the pool's state, in one critical section under the name
// guard: an existing volume (idempotent retry or EEXIST), the source and the resolved size, the
// per-GiB QoS rule at that size, and the capacity reservation.
StatusOr<Pool::Impl::CreatePlan> Pool::Impl::PlanCreateLocked(const CreateSpec& spec,
                                                              const Space& space,
                                                              NameGuard& guard) {
  if (Status s = BrokenTaken("volume", broken, spec.name); !s.ok()) return s;
  const std::string label = spec.source.Label();
  CreatePlan plan;
  if (auto it = vols.find(spec.name); it != vols.end()) {
    // Checked before the source, which may be gone by the time the call is retried.
    const uint64_t want =
        spec.size ? spec.size : SourceSizeLocked(spec.source).value_or(it->second.meta.size);
    if (Status s = SameAsExisting(it->second.meta, spec, label, want); !s.ok()) return s;
    plan.existing = MakeInfo(it->second);
    return plan;
  }
  plan.size = spec.size;
  if (spec.source.kind != VolumeSource::Kind::kBlank) {
    auto src = ResolveSourceLocked(spec, &plan.size);
    if (!src.ok()) return src.status();
    plan.src = std::move(*src);
  }
  if (spec.size == 0) {
    if (Status s = ValidateQos(spec.qos, plan.size); !s.ok()) return InVolume(spec.name, s);
  }
  if (Status s = CheckCapacityLocked(spec.name, plan.size, space); !s.ok()) return s;
  guard.ReserveLocked(plan.size);
  return plan;
}

StatusOr<VolumeInfo> Pool::Create(const CreateSpec& spec) {
  if (Status s = ValidateCreateSpec(spec); !s.ok()) return s;
  Impl& I = *impl_;
  I.ReapJobs();
  Impl::NameGuard guard(I, CreateKeys(spec));
  auto space = I.ReadSpace();
  if (!space.ok()) return space.status();
  auto plan = [&] {
    std::lock_guard lock(I.mu);
    return I.PlanCreateLocked(spec, *space, guard);
  }();
  if (!plan.ok()) return plan.status();
  I.Step("create.resolved");
  if (plan->existing) return *plan->existing;
  if (spec.source.kind == VolumeSource::Kind::kBlank) return I.CreateBlank(spec);
  return I.FillNewVolume(spec, plan->size, std::move(plan->src));
}

// Undoes a create, restore or clone that failed after its first file was made (`what` says which,
// for the log): closes `fd` (if >= 0) and removes every file any of them may have made. Returns s.
Status Pool::Impl::RollBackVolume(const std::string& what, const std::string& name, int fd,
                                  const Status& s) {
  spdlog::error("pool {}: {} failed, rolling back: {}", opts.dir, what, s.message());
  if (fd >= 0) close(fd);
  UndoFiles(vol_dir, {MetaPath(name), TmpPath(name), DataPath(name), DataTmpPath(name)});
  return s;
}

// A blank volume: data file created, sized and fsynced, then metadata committed. Caller holds
// the name guard and has reserved the capacity.
StatusOr<VolumeInfo> Pool::Impl::CreateBlank(const CreateSpec& spec) {
  const std::string& name = spec.name;
  const std::string data = DataPath(name);
  int fd = open(data.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  if (fd < 0) {
    if (errno == EEXIST) {
      // Only possible if something outside the daemon wrote into the pool directory.
      return Error(EEXIST, "cannot create volume {}: {} already exists but is not a volume", name,
                   data);
    }
    return Sys(errno, "create volume " + name + ": " + data);
  }
  auto fail = [&](Status s) {
    return RollBackVolume("create of volume " + name, name, std::exchange(fd, -1), s);
  };
  if (Status s = SizeDurably(fd, spec.size, data, vol_dir); !s.ok()) return fail(s);
  FaultPoint("create.data");
  const VolumeMeta m{name,    spec.size, RealtimeNs(), spec.read_only, spec.qos, "", "ready", "",
                     /*fence_epoch=*/0, Normalized(spec.schedule)};
  // Open the descriptors before the commit, so nothing that can fail comes after it.
  auto vol = OpenVolume(m, fd);
  fd = -1;  // owned by the volume (or closed by its destructor) from here
  if (!vol.ok()) return fail(vol.status());
  bool renamed = false;
  if (Status s = WriteMeta(m, "create.meta_tmp", "create.meta_renamed", &renamed); !s.ok()) {
    vol->reset();
    return fail(s);
  }
  spdlog::info("pool {}: created volume {} of {}", opts.dir, name, Bytes(spec.size));
  return InsertVolume(std::move(*vol), m);
}

// The copies that involve an object (kind "volume" or "snapshot") before it is deleted: the
// source of a running copy cannot go (EBUSY); a copy filling it is cancelled
// and waited for (nothing of value is lost by stopping it).
Status Pool::Impl::StopCopiesOf(const char* kind, const std::string& name) {
  const std::string key = fmt::format("{}/{}", kind, name);
  std::shared_ptr<CopyJob> filling;
  {
    std::lock_guard lock(mu);
    if (const auto* c = CopyFromLocked(key)) {
      return Error(EBUSY, "{} {} is the source of a running copy to {} ({}); delete that or "
                   "wait for it", kind, name, c->target, ProgressLocked(*c));
    }
    if (auto c = copies.find(key); c != copies.end()) filling = c->second->job;
  }
  if (filling) {
    filling->Cancel();
    filling->Wait();
  }
  return Status::Ok();
}

Status Pool::Delete(const std::string& name) {
  if (Status s = ValidateVolumeName(name); !s.ok()) return s;
  Impl& I = *impl_;
  I.ReapJobs();
  Impl::NameGuard guard(I, {VolKey(name)});
  if (Status s = I.StopCopiesOf("volume", name); !s.ok()) return s;
  Impl::Entry entry;
  bool was_broken = false;
  {
    std::lock_guard lock(I.mu);
    auto it = I.vols.find(name);
    if (it == I.vols.end()) {
      if (!I.broken.count(name)) return Error(ENOENT, "volume {} not found", name);
      was_broken = true;
    } else {
      uint64_t conns = it->second.vol->stats().connections();
      if (conns > 0) return Error(EBUSY, "volume {} has {} open NBD connections", name, conns);
      // Out of the map in the same critical section as the check, so no new connection can
      // Acquire it from here on.
      entry = std::move(it->second);
      I.vols.erase(it);
    }
  }
  const std::string meta = I.MetaPath(name);
  if (unlink(meta.c_str()) != 0 && errno != ENOENT) {
    Status s = Sys(errno, "delete volume " + name + ": unlink " + meta);
    std::lock_guard lock(I.mu);
    if (!was_broken) I.vols.emplace(name, std::move(entry));
    return s;
  }
  {
    std::lock_guard lock(I.mu);
    I.broken.erase(name);
  }
  return I.RemoveDataAfterMeta("volume", I.vol_dir, name, I.DataPath(name), "delete.meta");
}

// EAGAIN while a restore or clone fills the volume: its metadata is rewritten when the copy
// ends, and two writers would lose one update.
Status Pool::Impl::CheckNotFillingLocked(const std::string& name, const char* what) const {
  if (auto c = copies.find(VolKey(name)); c != copies.end()) {
    return Error(EAGAIN, "volume {} is being filled from {} ({}); {} when that is done", name,
                 c->second->source, ProgressLocked(*c->second), what);
  }
  return Status::Ok();
}

// Grows the data file and makes that durable; on failure it is truncated back (or, if even
// that fails, the next open truncates it to the committed size).
Status Pool::Impl::GrowData(Volume& vol, uint64_t old_size, uint64_t new_size) {
  const std::string data = DataPath(vol.name());
  const int fd = vol.buffered_fd();
  Status s = Status::Ok();
  if (ftruncate(fd, static_cast<off_t>(new_size)) != 0) {
    s = Sys(errno, "resize volume " + vol.name() + ": grow " + data);
  } else if (fsync(fd) != 0) {
    s = Sys(errno, "resize volume " + vol.name() + ": fsync " + data);
  }
  if (!s.ok()) ShrinkBack(vol, old_size);
  return s;
}

void Pool::Impl::ShrinkBack(Volume& vol, uint64_t old_size) {
  const int fd = vol.buffered_fd();
  if (ftruncate(fd, static_cast<off_t>(old_size)) != 0 || fsync(fd) != 0) {
    spdlog::error("pool {}: resize of {} failed and the data file could not be truncated back "
                  "({}); the next start truncates it to the committed size",
                  opts.dir, vol.name(), std::strerror(errno));
  }
}

StatusOr<VolumeInfo> Pool::Resize(const std::string& name, uint64_t new_size) {
  if (Status s = ValidateVolumeName(name); !s.ok()) return s;
  if (Status s = ValidateVolumeSize(new_size); !s.ok()) return InVolume(name, s);
  Impl& I = *impl_;
  Impl::NameGuard guard(I, {VolKey(name)});
  auto space = I.ReadSpace();
  if (!space.ok()) return space.status();
  VolumeMeta old_meta;
  std::shared_ptr<Volume> vol;
  {
    std::lock_guard lock(I.mu);
    auto it = I.vols.find(name);
    if (it == I.vols.end()) return Impl::NotFound("volume", I.broken, name);
    if (Status s = I.CheckNotFillingLocked(name, "resize it"); !s.ok()) return s;
    if (const auto* c = I.CopyFromLocked(VolKey(name))) {
      return Error(EAGAIN, "a copy from volume {} to {} is running ({}); resize it when that is "
                   "done", name, c->target, I.ProgressLocked(*c));
    }
    old_meta = it->second.meta;
    vol = it->second.vol;
    if (new_size < old_meta.size) {
      return Error(EINVAL, "shrinking volume {} from {} to {} is not supported", name,
                   old_meta.size, new_size);
    }
    if (new_size == old_meta.size) return I.MakeInfo(it->second);
    if (Status s = ValidateQos(old_meta.qos, new_size); !s.ok()) return InVolume(name, s);
    const uint64_t extra = new_size - old_meta.size;
    if (Status s = I.CheckCapacityLocked(name, extra, *space); !s.ok()) return s;
    guard.ReserveLocked(extra);
  }
  if (Status s = I.GrowData(*vol, old_meta.size, new_size); !s.ok()) return s;
  FaultPoint("resize.data");
  VolumeMeta m = old_meta;
  m.size = new_size;
  if (Status s = I.CommitMetaOrRestore(m, old_meta, "resize.meta_tmp", "resize.meta_renamed");
      !s.ok()) {
    I.ShrinkBack(*vol, old_meta.size);
    return Error(s.code(), "resize volume {}: {}", name, s.message());
  }
  std::lock_guard lock(I.mu);
  auto it = I.vols.find(name);  // still there: the name guard excludes Delete
  it->second.meta = m;
  vol->size_.store(new_size, std::memory_order_release);
  vol->throttle_.SetLimits(m.qos, new_size, MonotonicNowNs());
  spdlog::info("pool {}: resized volume {} from {} to {}", I.opts.dir, name, old_meta.size,
               new_size);
  return I.MakeInfo(it->second);
}

template <typename Change, typename Apply>
StatusOr<VolumeInfo> Pool::Impl::ChangeVolumeMeta(const std::string& name, const char* what,
                                                  const char* label, const char* fault_tmp,
                                                  const char* fault_renamed, Change&& change,
                                                  Apply&& apply) {
  NameGuard guard(*this, {VolKey(name)});
  VolumeMeta old_meta;
  {
    std::lock_guard lock(mu);
    auto it = vols.find(name);
    if (it == vols.end()) return NotFound("volume", broken, name);
    if (Status s = CheckNotFillingLocked(name, what); !s.ok()) return s;
    old_meta = it->second.meta;
  }
  VolumeMeta m = old_meta;
  StatusOr<bool> changed = change(m);
  if (!changed.ok()) return changed.status();
  if (*changed) {
    if (Status s = CommitMetaOrRestore(m, old_meta, fault_tmp, fault_renamed); !s.ok()) {
      return Error(s.code(), "{} of volume {}: {}", label, name, s.message());
    }
  }
  std::lock_guard lock(mu);
  auto it = vols.find(name);  // still there: the name guard excludes Delete
  if (*changed) apply(it->second, m);
  return MakeInfo(it->second);
}

StatusOr<VolumeInfo> Pool::UpdateQos(const std::string& name, const QosPatch& patch) {
  if (Status s = ValidateVolumeName(name); !s.ok()) return s;
  return impl_->ChangeVolumeMeta(
      name, "change its QoS", "set QoS", "qos.meta_tmp", "qos.meta_renamed",
      [&](VolumeMeta& m) -> StatusOr<bool> {
        const QosLimits old = m.qos;
        m.qos = patch.ApplyTo(old);
        if (Status s = ValidateQos(m.qos, m.size); !s.ok()) return InVolume(name, s);
        return !(m.qos == old);
      },
      [](Impl::Entry& e, const VolumeMeta& m) {
        e.meta = m;
        e.vol->throttle_.SetLimits(m.qos, m.size, MonotonicNowNs());
      });
}

StatusOr<VolumeInfo> Pool::SetSchedule(const std::string& name, const VolumeSchedule& schedule) {
  if (Status s = ValidateVolumeName(name); !s.ok()) return s;
  if (Status s = ValidateSchedule(schedule); !s.ok()) return InVolume(name, s);
  return impl_->ChangeVolumeMeta(
      name, "change its schedule", "set the schedule", "schedule.meta_tmp",
      "schedule.meta_renamed",
      [&](VolumeMeta& m) -> StatusOr<bool> {
        const VolumeSchedule old = m.schedule;
        m.schedule = Normalized(schedule);
        return !(m.schedule == old);
      },
      [](Impl::Entry& e, const VolumeMeta& m) { e.meta.schedule = m.schedule; });
}

StatusOr<uint64_t> Pool::FenceVolume(const std::string& name, uint64_t epoch) {
  if (Status s = ValidateVolumeName(name); !s.ok()) return s;
  if (Status s = ValidateFenceEpoch(epoch); !s.ok()) return InVolume(name, s);
  Impl& I = *impl_;
  // The guard orders fences of one volume (two new targets racing: the higher wins, the lower
  // gets ESTALE) and keeps snapshots, which also close the gate, out of the pause below.
  Impl::NameGuard guard(I, {VolKey(name)});
  VolumeMeta old_meta;
  std::shared_ptr<Volume> vol;
  {
    std::lock_guard lock(I.mu);
    auto it = I.vols.find(name);
    if (it == I.vols.end()) return Impl::NotFound("volume", I.broken, name);
    if (Status s = I.CheckNotFillingLocked(name, "fence it"); !s.ok()) return s;
    old_meta = it->second.meta;
    vol = it->second.vol;
  }
  const uint64_t held = old_meta.fence_epoch;
  if (epoch < held)
    return Error(ESTALE, "stale epoch {}, volume {} is at {}", epoch, name, held);
  if (epoch == held) return held;
  // Durable first: once any writer of the new epoch is let in, a crash must not bring back a
  // volume that would accept the old one.
  VolumeMeta m = old_meta;
  m.fence_epoch = epoch;
  const auto t0 = std::chrono::steady_clock::now();
  if (Status s = I.CommitMetaOrRestore(m, old_meta, "fence.meta_tmp", "fence.meta_renamed");
      !s.ok()) {
    return Error(s.code(), "fence volume {} to epoch {}: {}", name, epoch, s.message());
  }
  {
    std::lock_guard lock(I.mu);
    I.vols.find(name)->second.meta = m;  // still there: the name guard excludes Delete
  }
  // Then the engine. A write that passed the gate before it closed may still see the old
  // epoch and run: the drain waits for it. Every write after the drain passes the gate after
  // Open, which publishes the new epoch to it (the gate's lock and seq_cst flags), so its
  // epoch check sees `epoch`.
  vol->gate().CloseAndDrain();
  const double drain_ms = MsSince(t0);
  vol->fence_epoch_.store(epoch, std::memory_order_seq_cst);
  vol->gate().Open();
  spdlog::info("pool {}: volume {} fenced at epoch {} (was {}; metadata + drain {:.2f} ms)",
               I.opts.dir, name, epoch, held, drain_ms);
  return epoch;
}

StatusOr<VolumeInfo> Pool::Inspect(const std::string& name) {
  if (Status s = ValidateVolumeName(name); !s.ok()) return s;
  std::lock_guard lock(impl_->mu);
  auto it = impl_->vols.find(name);
  if (it == impl_->vols.end()) return Impl::NotFound("volume", impl_->broken, name);
  if (it->second.vol->data_lost())  // the watcher has not moved it to the broken ones yet
    return Error(EIO, "volume {} is broken: {}", name, impl_->LostReason(name));
  return impl_->MakeInfo(it->second);
}

std::vector<VolumeInfo> Pool::List() {
  std::lock_guard lock(impl_->mu);
  std::vector<VolumeInfo> out;
  out.reserve(impl_->vols.size());
  for (const auto& [n, e] : impl_->vols) out.push_back(impl_->MakeInfo(e));
  return out;
}

std::shared_ptr<Volume> Pool::Acquire(const std::string& name) {
  std::lock_guard lock(impl_->mu);
  auto it = impl_->vols.find(name);
  if (it == impl_->vols.end() || it->second.meta.state != "ready" || it->second.vol->data_lost())
    return nullptr;
  return it->second.vol;
}

std::vector<std::string> Pool::Names() {
  std::lock_guard lock(impl_->mu);
  std::vector<std::string> out;
  out.reserve(impl_->vols.size());
  for (const auto& [n, e] : impl_->vols) out.push_back(n);
  return out;
}

}  // namespace nbdcsi::datapath
