#include "test/controller/fake_datapath.h"

#include <stdexcept>

#include <fmt/format.h>
#include <google/protobuf/util/message_differencer.h>

#include "datapath/api/registry.pb.h"
#include "datapath/api/schedule_proto.h"

namespace nbdcsi::controller::testing {

namespace {

std::string SourceText(const dpv1::VolumeContentSource& s) {
  if (s.has_snapshot()) return "snapshot/" + s.snapshot();
  if (s.has_volume()) return "volume/" + s.volume();
  return "";
}

// The entry `name` of a volume or snapshot map, or ENOENT naming its `kind`.
template <typename M>
StatusOr<typename M::mapped_type> Find(const M& m, const char* kind, const std::string& name) {
  auto it = m.find(name);
  if (it == m.end()) return Error(ENOENT, "{} {} does not exist", kind, name);
  return it->second;
}

template <typename M>
Status Erase(M& m, const char* kind, const std::string& name) {
  if (m.erase(name) == 0) return Error(ENOENT, "{} {} does not exist", kind, name);
  return Status::Ok();
}

}  // namespace

Status FakeDatapath::Enter(const std::string& method, const std::string& what) {
  std::function<void(const std::string&)> hook;
  {
    std::lock_guard lock(mu_);
    calls_.push_back(what.empty() ? method : method + " " + what);
    hook = hook_;
  }
  if (hook) hook(method);
  std::lock_guard lock(mu_);
  if (!down_.ok()) return Error(down_.code(), "node {}: {}: {}", node_, method, down_.message());
  auto it = fail_next_.find(method);
  if (it == fail_next_.end()) return Status::Ok();
  Status s = std::move(it->second);
  fail_next_.erase(it);
  return Error(s.code(), "node {}: {}: {}", node_, method, s.message());
}

std::optional<dpv1::Volume> FakeDatapath::Volume(const std::string& name) const {
  std::lock_guard lock(mu_);
  auto v = Find(volumes_, "volume", name);
  if (!v.ok()) return std::nullopt;
  return *v;
}

size_t FakeDatapath::VolumeCount() const {
  std::lock_guard lock(mu_);
  return volumes_.size();
}

std::vector<std::string> FakeDatapath::Calls() const {
  std::lock_guard lock(mu_);
  return calls_;
}

int FakeDatapath::Count(const std::string& method) const {
  std::lock_guard lock(mu_);
  int n = 0;
  for (const auto& c : calls_) n += c == method || c.rfind(method + " ", 0) == 0;
  return n;
}

uint64_t FakeDatapath::ProvisionedLocked() const {
  uint64_t sum = 0;
  for (const auto& [name, v] : volumes_) sum += v.size_bytes();
  return sum;
}

StatusOr<uint64_t> FakeDatapath::SourceSizeLocked(const dpv1::VolumeContentSource& src) const {
  if (src.has_snapshot()) {
    auto it = snapshots_.find(src.snapshot());
    if (it == snapshots_.end()) return Error(ENOENT, "snapshot {} does not exist", src.snapshot());
    if (!it->second.ready()) return Error(EAGAIN, "snapshot {} is not ready", src.snapshot());
    return it->second.size_bytes();
  }
  auto it = volumes_.find(src.volume());
  if (it == volumes_.end()) return Error(ENOENT, "volume {} does not exist", src.volume());
  return it->second.size_bytes();
}

StatusOr<dpv1::Volume> FakeDatapath::CreateVolume(const dpv1::CreateVolumeRequest& req) {
  if (Status s = Enter("CreateVolume", req.name()); !s.ok()) return s;
  std::lock_guard lock(mu_);
  uint64_t size = req.size_bytes();
  if (req.has_source()) {
    auto src_size = SourceSizeLocked(req.source());
    if (!src_size.ok()) return src_size.status();
    if (size == 0) size = *src_size;
    if (size < *src_size) return Error(EINVAL, "size {} is below the source's {}", size, *src_size);
  }
  if (auto it = volumes_.find(req.name()); it != volumes_.end()) {
    const dpv1::Volume& v = it->second;
    if (v.size_bytes() != size || v.source() != SourceText(req.source()) ||
        !google::protobuf::util::MessageDifferencer::Equals(v.qos(), req.qos()) ||
        !google::protobuf::util::MessageDifferencer::Equals(v.schedule(), req.schedule())) {
      return Error(EEXIST, "volume {} exists with other properties", req.name());
    }
    return v;
  }
  if (ProvisionedLocked() + size > room_) {
    return Error(ENOSPC, "node {}: CreateVolume: pool full: {} bytes do not fit", node_, size);
  }
  dpv1::Volume v;
  v.set_name(req.name());
  v.set_size_bytes(size);
  *v.mutable_qos() = req.qos();
  if (req.has_schedule()) *v.mutable_schedule() = req.schedule();
  v.set_source(SourceText(req.source()));
  v.set_read_only(req.read_only());
  v.set_ready(!(req.has_source() && unfilled_copies_));
  v.set_created_unix_ns(++clock_ns_);
  volumes_[req.name()] = v;
  return v;
}

Status FakeDatapath::DeleteVolume(const std::string& name) {
  if (Status s = Enter("DeleteVolume", name); !s.ok()) return s;
  std::lock_guard lock(mu_);
  return Erase(volumes_, "volume", name);
}

StatusOr<dpv1::Volume> FakeDatapath::ResizeVolume(const std::string& name, uint64_t size_bytes) {
  if (Status s = Enter("ResizeVolume", name); !s.ok()) return s;
  std::lock_guard lock(mu_);
  auto it = volumes_.find(name);
  if (it == volumes_.end()) return Error(ENOENT, "volume {} does not exist", name);
  if (size_bytes < it->second.size_bytes()) return Error(EINVAL, "volume {}: no shrink", name);
  if (ProvisionedLocked() - it->second.size_bytes() + size_bytes > room_) {
    return Error(ENOSPC, "volume {}: pool full", name);
  }
  it->second.set_size_bytes(size_bytes);
  return it->second;
}

StatusOr<dpv1::Volume> FakeDatapath::GetVolume(const std::string& name) {
  if (Status s = Enter("GetVolume", name); !s.ok()) return s;
  StatusOr<dpv1::Volume> answer = [&] {
    std::lock_guard lock(mu_);
    return Find(volumes_, "volume", name);
  }();
  return Answered("GetVolume", std::move(answer));
}

StatusOr<std::vector<dpv1::Volume>> FakeDatapath::ListVolumes() {
  if (Status s = Enter("ListVolumes", ""); !s.ok()) return s;
  std::vector<dpv1::Volume> out;
  {
    std::lock_guard lock(mu_);
    for (const auto& [name, v] : volumes_) out.push_back(v);
  }
  return Answered("ListVolumes", std::move(out));
}

StatusOr<dpv1::Volume> FakeDatapath::SetQos(const std::string& name, const dpv1::QosPatch& p) {
  if (Status s = Enter("SetQos", name); !s.ok()) return s;
  std::lock_guard lock(mu_);
  auto it = volumes_.find(name);
  if (it == volumes_.end()) return Error(ENOENT, "volume {} does not exist", name);
  dpv1::QosLimits* q = it->second.mutable_qos();
  if (p.has_max_iops()) q->set_max_iops(p.max_iops());
  if (p.has_max_read_iops()) q->set_max_read_iops(p.max_read_iops());
  if (p.has_max_write_iops()) q->set_max_write_iops(p.max_write_iops());
  if (p.has_max_bps()) q->set_max_bps(p.max_bps());
  if (p.has_max_read_bps()) q->set_max_read_bps(p.max_read_bps());
  if (p.has_max_write_bps()) q->set_max_write_bps(p.max_write_bps());
  if (p.has_iops_per_gib()) q->set_iops_per_gib(p.iops_per_gib());
  if (p.has_bps_per_gib()) q->set_bps_per_gib(p.bps_per_gib());
  if (p.has_burst_ms()) q->set_burst_ms(p.burst_ms());
  return it->second;
}

StatusOr<dpv1::Volume> FakeDatapath::SetSchedule(const std::string& name,
                                                  const VolumeSchedule& schedule) {
  if (Status s = Enter("SetSchedule", name); !s.ok()) return s;
  if (Status s = ValidateSchedule(schedule); !s.ok()) return s;
  std::lock_guard lock(mu_);
  auto it = volumes_.find(name);
  if (it == volumes_.end()) return Error(ENOENT, "volume {} does not exist", name);
  it->second.clear_schedule();
  if (!schedule.empty()) datapath::ToProto(schedule, it->second.mutable_schedule());
  return it->second;
}

StatusOr<dpv1::Snapshot> FakeDatapath::CreateSnapshot(const std::string& name,
                                                      const std::string& source_volume) {
  if (Status s = Enter("CreateSnapshot", name); !s.ok()) return s;
  std::lock_guard lock(mu_);
  auto src = volumes_.find(source_volume);
  if (src == volumes_.end()) return Error(ENOENT, "volume {} does not exist", source_volume);
  if (auto it = snapshots_.find(name); it != snapshots_.end()) {
    if (it->second.source_volume() != source_volume) {
      return Error(EEXIST, "snapshot {} exists with another source", name);
    }
    return it->second;
  }
  dpv1::Snapshot s;
  s.set_name(name);
  s.set_source_volume(source_volume);
  s.set_size_bytes(src->second.size_bytes());
  s.set_created_unix_ns(++clock_ns_);
  s.set_ready(true);
  snapshots_[name] = s;
  return s;
}

Status FakeDatapath::DeleteSnapshot(const std::string& name) {
  if (Status s = Enter("DeleteSnapshot", name); !s.ok()) return s;
  std::lock_guard lock(mu_);
  return Erase(snapshots_, "snapshot", name);
}

StatusOr<dpv1::Snapshot> FakeDatapath::GetSnapshot(const std::string& name) {
  if (Status s = Enter("GetSnapshot", name); !s.ok()) return s;
  std::lock_guard lock(mu_);
  return Find(snapshots_, "snapshot", name);
}

StatusOr<std::vector<dpv1::Snapshot>> FakeDatapath::ListSnapshots(const std::string& source) {
  if (Status s = Enter("ListSnapshots", source); !s.ok()) return s;
  std::lock_guard lock(mu_);
  std::vector<dpv1::Snapshot> out;
  for (const auto& [name, s] : snapshots_) {
    if (source.empty() || s.source_volume() == source) out.push_back(s);
  }
  return out;
}

void FakeDatapath::ServeTarget(const std::string& volume, std::vector<std::string> in_sync,
                               uint64_t epoch) {
  Locked([&] { targets_[volume] = FakeTarget{std::move(in_sync), epoch, {}}; });
}

void FakeDatapath::CloseTarget(const std::string& volume) {
  Locked([&] { targets_.erase(volume); });
}

int FakeDatapath::Frozen(const std::string& volume) const {
  std::lock_guard lock(mu_);
  auto it = targets_.find(volume);
  return it == targets_.end() ? 0 : static_cast<int>(it->second.freezes.size());
}

void FakeDatapath::LiftFreezes(const std::string& volume) {
  Locked([&] {
    if (auto it = targets_.find(volume); it != targets_.end()) it->second.freezes.clear();
  });
}

std::chrono::milliseconds FakeDatapath::LastLiftAfter() const {
  std::lock_guard lock(mu_);
  return last_lift_after_;
}

StatusOr<dpv1::FreezeTargetResponse> FakeDatapath::FreezeTarget(
    const std::string& volume, std::chrono::milliseconds lift_after) {
  if (Status s = Enter("FreezeTarget", volume); !s.ok()) return s;
  std::lock_guard lock(mu_);
  last_lift_after_ = lift_after;
  auto it = targets_.find(volume);
  if (it == targets_.end())
    return Error(ENOENT, "no target of volume {} is open on node {}", volume, node_);
  dpv1::FreezeTargetResponse r;
  r.set_freeze_id(++last_freeze_id_);
  it->second.freezes.insert(r.freeze_id());
  r.set_epoch(it->second.epoch);
  for (const auto& n : it->second.in_sync) r.add_in_sync(n);
  r.set_lifts_in_ms(static_cast<uint64_t>(lift_after.count()));
  r.set_node(node_);
  return r;
}

StatusOr<bool> FakeDatapath::ThawTarget(const std::string& volume, uint64_t freeze_id) {
  if (Status s = Enter("ThawTarget", volume); !s.ok()) return s;
  std::lock_guard lock(mu_);
  auto it = targets_.find(volume);
  return it != targets_.end() && it->second.freezes.erase(freeze_id) > 0;
}

// ---- FakeCluster ----

FakeCluster::FakeCluster(cluster::ClusterStore* store)
    : now_(std::chrono::steady_clock::time_point{} + std::chrono::hours(1000)),
      registry_(
          [this](const std::string& node, const std::string&) -> std::shared_ptr<NodeDatapath> {
            std::lock_guard lock(mu_);
            return fakes_.at(node);
          },
          kTtl, kInterval, [this] { return Now(); }),
      service_(MakeControllerService(
          registry_, {.cluster = store, .backup = {.wait = std::chrono::milliseconds(0)}})) {}

std::chrono::steady_clock::time_point FakeCluster::Now() {
  std::lock_guard lock(mu_);
  return now_;
}

Status FakeDatapath::CheckCredentials(const dpv1::BackupTarget& t) const {
  if (t.access_key_id() == FakeBucket::kGoodKey) return Status::Ok();
  return Error(EACCES, "node {}: the store refused the credentials for {}", node_, t.url());
}

void FakeDatapath::EndBackupLocked(dpv1::BackupJob& job, const Status& err) {
  const dpv1::BackupTarget& t = job_targets_[job.id()];
  Status s = err;
  if (s.ok() && bucket_->Missing(t.url())) {
    s = Error(ENOENT, "bucket of {} does not exist", t.url());
  }
  job.set_finished_unix_ns(++clock_ns_);
  if (!s.ok()) {
    job.set_state("failed");
    job.set_error(s.message());
    job.set_error_errno(s.code());
    return;
  }
  job.set_state("succeeded");
  if (job.kind() != "backup") return;
  const dpv1::Snapshot& snap = snapshots_[job.snapshot()];
  dpv1::BackupInfo b;
  b.set_name(job.backup());
  b.set_source_volume(snap.source_volume());
  b.set_source_snapshot(snap.name());
  b.set_created_unix_ns(snap.created_unix_ns());
  b.set_volume_size(snap.size_bytes());
  std::lock_guard lock(bucket_->mu);
  bucket_->backups[t.url() + "#" + job.backup()] = b;
}

void FakeDatapath::FinishJobs(Status err) {
  std::lock_guard lock(mu_);
  for (auto& [id, job] : jobs_) {
    if (job.state() != "running") continue;
    EndBackupLocked(job, err);
    if ((job.kind() == "restore" || job.kind() == "copy") && job.state() == "failed") {
      volumes_.erase(job.volume());
    }
  }
}

StatusOr<dpv1::BackupJob> FakeDatapath::CreateBackup(const dpv1::CreateBackupRequest& req) {
  if (Status s = Enter("CreateBackup", req.name()); !s.ok()) return s;
  std::lock_guard lock(mu_);
  for (const auto& [id, j] : jobs_) {
    if (j.kind() == "backup" && j.state() == "running" && j.backup() == req.name() &&
        j.target() == req.target().url()) {
      return j;
    }
  }
  if (snapshots_.count(req.snapshot()) == 0) {
    return Error(ENOENT, "snapshot {} does not exist", req.snapshot());
  }
  dpv1::BackupJob job;
  job.set_id(fmt::format("{}-{}", node_, next_job_++));
  job.set_kind("backup");
  job.set_backup(req.name());
  job.set_target(req.target().url());
  job.set_snapshot(req.snapshot());
  job.set_state("running");
  job.set_started_unix_ns(++clock_ns_);
  job_targets_[job.id()] = req.target();
  // The store refuses bad credentials within the job, as the real one does.
  if (!hold_jobs_) EndBackupLocked(job, CheckCredentials(req.target()));
  jobs_[job.id()] = job;
  return job;
}

StatusOr<dpv1::BackupJob> FakeDatapath::RestoreBackup(const dpv1::RestoreBackupRequest& req) {
  if (Status s = Enter("RestoreBackup", req.volume()); !s.ok()) return s;
  if (Status s = CheckCredentials(req.target()); !s.ok()) return s;
  std::lock_guard lock(mu_);
  if (volumes_.count(req.volume())) return Error(EEXIST, "volume {} exists", req.volume());
  dpv1::BackupInfo b;
  {
    std::lock_guard bl(bucket_->mu);
    auto it = bucket_->backups.find(req.target().url() + "#" + req.name());
    if (it == bucket_->backups.end()) {
      return Error(ENOENT, "backup \"{}\" not found in {}", req.name(), req.target().url());
    }
    b = it->second;
  }
  if (ProvisionedLocked() + b.volume_size() > room_) {
    return Error(ENOSPC, "node {}: RestoreBackup: pool full", node_);
  }
  dpv1::Volume v;
  v.set_name(req.volume());
  v.set_size_bytes(b.volume_size());
  v.set_ready(true);
  v.set_created_unix_ns(++clock_ns_);
  volumes_[v.name()] = v;
  dpv1::BackupJob job;
  job.set_id(fmt::format("{}-{}", node_, next_job_++));
  job.set_kind("restore");
  job.set_backup(req.name());
  job.set_target(req.target().url());
  job.set_volume(req.volume());
  job.set_state("running");
  job.set_started_unix_ns(++clock_ns_);
  job_targets_[job.id()] = req.target();
  if (!hold_jobs_) EndBackupLocked(job, Status::Ok());
  jobs_[job.id()] = job;
  return job;
}

std::optional<dpv1::CopyVolumeRequest> FakeDatapath::LastCopy() const {
  std::lock_guard lock(mu_);
  return last_copy_;
}

StatusOr<dpv1::BackupJob> FakeDatapath::CopyVolume(const dpv1::CopyVolumeRequest& req) {
  if (Status s = Enter("CopyVolume", req.volume()); !s.ok()) return s;
  std::lock_guard lock(mu_);
  last_copy_ = req;
  for (const auto& [id, j] : jobs_) {
    if (j.kind() == "copy" && j.state() == "running" && j.volume() == req.volume()) return j;
  }
  if (volumes_.count(req.volume())) return Error(EEXIST, "volume {} exists", req.volume());
  if (ProvisionedLocked() + req.size_bytes() > room_) {
    return Error(ENOSPC, "node {}: CopyVolume: pool full", node_);
  }
  dpv1::Volume v;
  v.set_name(req.volume());
  v.set_size_bytes(req.size_bytes());
  v.set_ready(true);
  v.set_created_unix_ns(++clock_ns_);
  volumes_[v.name()] = v;
  dpv1::BackupJob job;
  job.set_id(fmt::format("{}-{}", node_, next_job_++));
  job.set_kind("copy");
  job.set_backup(req.export_name());
  job.set_target(req.endpoint());
  job.set_volume(req.volume());
  job.set_state("running");
  job.set_total_bytes(req.size_bytes());
  job.set_started_unix_ns(++clock_ns_);
  if (!hold_jobs_) EndBackupLocked(job, Status::Ok());
  jobs_[job.id()] = job;
  return job;
}

StatusOr<dpv1::BackupJob> FakeDatapath::GetBackupJob(const std::string& id) {
  if (Status s = Enter("GetBackupJob", id); !s.ok()) return s;
  std::lock_guard lock(mu_);
  return Find(jobs_, "job", id);
}

StatusOr<std::vector<dpv1::BackupJob>> FakeDatapath::ListBackupJobs() {
  if (Status s = Enter("ListBackupJobs", ""); !s.ok()) return s;
  std::lock_guard lock(mu_);
  std::vector<dpv1::BackupJob> out;
  for (const auto& [id, j] : jobs_) out.push_back(j);
  return out;
}

StatusOr<dpv1::GetBackupResponse> FakeDatapath::GetBackup(const dpv1::GetBackupRequest& req) {
  if (Status s = Enter("GetBackup", req.name()); !s.ok()) return s;
  if (Status s = CheckCredentials(req.target()); !s.ok()) return s;
  std::lock_guard lock(mu_);
  dpv1::GetBackupResponse r;
  for (const auto& [id, j] : jobs_) {
    if (j.kind() == "backup" && j.state() == "running" && j.backup() == req.name() &&
        j.target() == req.target().url()) {
      *r.mutable_job() = j;
    }
  }
  std::lock_guard bl(bucket_->mu);
  auto it = bucket_->backups.find(req.target().url() + "#" + req.name());
  if (it != bucket_->backups.end()) *r.mutable_backup() = it->second;
  if (!r.has_backup() && !r.has_job()) {
    return Error(ENOENT, "backup \"{}\" not found in {}", req.name(), req.target().url());
  }
  return r;
}

StatusOr<dpv1::DeleteBackupResponse> FakeDatapath::DeleteBackup(
    const dpv1::DeleteBackupRequest& req) {
  if (Status s = Enter("DeleteBackup", req.name()); !s.ok()) return s;
  if (Status s = CheckCredentials(req.target()); !s.ok()) return s;
  std::lock_guard bl(bucket_->mu);
  if (bucket_->backups.erase(req.target().url() + "#" + req.name()) == 0) {
    return Error(ENOENT, "backup \"{}\" not found in {}", req.name(), req.target().url());
  }
  return dpv1::DeleteBackupResponse();
}

FakeDatapath& FakeCluster::Node(const std::string& id) {
  std::lock_guard lock(mu_);
  auto& f = fakes_[id];
  if (!f) {
    f = std::make_shared<FakeDatapath>(id);
    f->SetBucket(bucket_);
  }
  return *f;
}

void FakeCluster::Heartbeat(const std::string& id, uint64_t provisionable,
                            const std::string& nbd_endpoint) {
  Node(id);
  ::nbdcsi::datapath::v1::HeartbeatRequest hb;
  hb.set_node_id(id);
  hb.set_api_address("127.0.0.1:9820");
  hb.set_capacity_bytes(provisionable);
  hb.set_provisionable_bytes(provisionable);
  hb.set_version("test");
  hb.set_nbd_endpoint(nbd_endpoint);
  Status s = registry_.Heartbeat(hb);
  if (!s.ok()) throw std::runtime_error("heartbeat refused: " + s.message());
}

void FakeCluster::Advance(std::chrono::milliseconds d) {
  std::lock_guard lock(mu_);
  now_ += d;
}

}  // namespace nbdcsi::controller::testing
