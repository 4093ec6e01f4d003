#include "controller/backups.h"

#include <spdlog/spdlog.h>

#include <thread>

#include "common/quantity.h"
#include "controller/csi_status.h"
#include "csi/logging.h"

namespace nbdcsi::controller {

namespace v1 = ::csi::v1;

namespace {

constexpr std::string_view kCsiParamPrefix = "csi.storage.k8s.io/";

std::string SecretValue(const SecretMap& secrets, const char* key) {
  auto it = secrets.find(key);
  return it == secrets.end() ? std::string() : it->second;
}

void SetTime(int64_t unix_ns, v1::Snapshot* out) {
  out->mutable_creation_time()->set_seconds(unix_ns / 1000000000);
  out->mutable_creation_time()->set_nanos(static_cast<int32_t>(unix_ns % 1000000000));
}

std::string Percent(const dpv1::BackupJob& j) {
  if (!j.has_data_total_bytes() || j.data_total_bytes() == 0) return "starting";
  return fmt::format("{:.0f}% of {} bytes of data",
                     100.0 * j.data_done_bytes() / j.data_total_bytes(), j.data_total_bytes());
}

}  // namespace

StatusOr<dpv1::BackupTarget> TargetFromSecrets(const std::string& url, const SecretMap& secrets,
                                               std::string_view which) {
  dpv1::BackupTarget t;
  t.set_url(url);
  t.set_access_key_id(SecretValue(secrets, kSecretAccessKeyId));
  t.set_secret_access_key(SecretValue(secrets, kSecretSecretAccessKey));
  if (t.access_key_id().empty() || t.secret_access_key().empty()) {
    return Err(
        EINVAL,
        "backup target {} needs credentials: the {} secret (csi.storage.k8s.io/{}-secret-name "
        "and -namespace) must hold {} and {}{}",
        url, which, which, kSecretAccessKeyId, kSecretSecretAccessKey,
        secrets.empty() ? "; the call carried no secret" : "");
  }
  t.set_session_token(SecretValue(secrets, kSecretSessionToken));
  t.set_endpoint(SecretValue(secrets, kSecretEndpoint));
  t.set_region(SecretValue(secrets, kSecretRegion));
  t.set_encryption_key(SecretValue(secrets, kSecretEncryptionKey));
  return t;
}

StatusOr<std::optional<BackupClass>> ParseSnapshotClass(
    const google::protobuf::Map<std::string, std::string>& params, const SecretMap& secrets) {
  std::optional<std::string> url;
  std::optional<uint64_t> bandwidth;
  for (const auto& [k, v] : params) {
    if (std::string_view(k).starts_with(kCsiParamPrefix)) continue;
    if (k == kBackupTargetKey) {
      url = v;
    } else if (k == kBackupBandwidthKey) {
      auto q = ParseQuantity(v);
      if (!q.ok() || *q == 0) {
        return Err(EINVAL, "parameter {}: bad value \"{}\": bytes per second, e.g. 50Mi{}",
                   kBackupBandwidthKey, v, q.ok() ? " (0 is not a limit: leave it out)" : "");
      }
      bandwidth = *q;
    } else {
      return Err(EINVAL,
                 "unknown snapshot parameter \"{}\" (VolumeSnapshotClass parameters: {}, {})", k,
                 kBackupTargetKey, kBackupBandwidthKey);
    }
  }
  if (!url) {
    if (bandwidth)
      return Err(EINVAL, "parameter {} needs {}", kBackupBandwidthKey, kBackupTargetKey);
    return std::optional<BackupClass>();
  }
  // The id format checks the URL (and that an id made from it fits CSI's limit).
  if (auto id = csi::FormatBackupSnapshotId(*url, "n"); !id.ok()) {
    return Err(EINVAL, "parameter {}: {}", kBackupTargetKey, id.status().message());
  }
  auto target = TargetFromSecrets(*url, secrets, "snapshotter");
  if (!target.ok()) return target.status();
  return std::optional<BackupClass>(BackupClass{std::move(*target), bandwidth.value_or(0)});
}

StatusOr<std::string> Backups::Reader(const std::string& preferred) {
  if (!preferred.empty() && nodes_.Get(preferred)) return preferred;
  auto live = nodes_.List();
  if (live.empty()) {
    return Err(EAGAIN, "no node's datapath is registered to reach the backup target through");
  }
  return live.front().node_id;
}

StatusOr<dpv1::BackupInfo> Backups::Inspect(const dpv1::BackupTarget& t, const std::string& name) {
  auto reader = Reader("");
  if (!reader.ok()) return reader.status();
  dpv1::GetBackupRequest req;
  *req.mutable_target() = t;
  req.set_name(name);
  auto got = nodes_.On(*reader, [&](NodeDatapath& d) { return d.GetBackup(req); });
  if (!got.ok()) return got.status();
  if (!got->has_backup()) {
    return Err(EALREADY, "backup \"{}\" in {} is still being made on node {}", name, t.url(),
               *reader);
  }
  return got->backup();
}

StatusOr<bool> Backups::Finished(const BackupClass& c, const std::string& name,
                                 const std::string& source_pool_name, const std::string& node,
                                 v1::Snapshot* out) {
  auto reader = Reader(node);
  if (!reader.ok()) return reader.status();
  dpv1::GetBackupRequest req;
  *req.mutable_target() = c.target;
  req.set_name(name);
  auto got = nodes_.On(*reader, [&](NodeDatapath& d) { return d.GetBackup(req); });
  // ENOENT: no backup, or no bucket (the job then fails and says which).
  if (!got.ok() && got.status().code() == ENOENT) return false;
  if (!got.ok()) return got.status();
  if (!got->has_backup()) return false;  // being made: Start finds the job
  const dpv1::BackupInfo& b = got->backup();
  if (b.source_snapshot() != name || b.source_volume() != source_pool_name) {
    return Err(EEXIST,
               "backup \"{}\" already exists in {}, of snapshot \"{}\" of volume \"{}\", not of "
               "volume \"{}\"",
               name, c.target.url(), b.source_snapshot(), b.source_volume(), source_pool_name);
  }
  auto id = csi::FormatBackupSnapshotId(c.target.url(), name);
  if (!id.ok()) return id.status();
  out->set_snapshot_id(*id);
  out->set_size_bytes(static_cast<int64_t>(b.volume_size()));
  SetTime(b.created_unix_ns(), out);
  out->set_ready_to_use(true);
  // The local snapshot served its purpose; where it still is, it goes (a retry after a
  // controller restart between the backup and its removal).
  auto live = nodes_.List();
  FanOut(live, [&](const NodeInfo& n) {
    Status s = nodes_.On(n.node_id, [&](NodeDatapath& d) { return d.DeleteSnapshot(name); });
    if (s.ok()) {
      spdlog::info("[{}] backup {} complete: local snapshot {} on node {} removed",
                   csi::CurrentRequestId(), *id, name, n.node_id);
    }
    return s;
  });
  return true;
}

StatusOr<dpv1::BackupJob> Backups::Wait(const std::string& node, dpv1::BackupJob job) {
  const auto until = std::chrono::steady_clock::now() + opts_.wait;
  while (job.state() == "running" && std::chrono::steady_clock::now() < until) {
    std::this_thread::sleep_for(opts_.poll);
    auto j = nodes_.On(node, [&](NodeDatapath& d) { return d.GetBackupJob(job.id()); });
    if (!j.ok()) return j.status();
    job = std::move(*j);
  }
  return job;
}

Status Backups::JobError(const dpv1::BackupJob& job, std::string_view what) {
  int code = job.error_errno() ? job.error_errno() : EIO;
  if (code == ENOENT) code = EBUSY;  // FAILED_PRECONDITION: the bucket (or a chunk) is missing
  return Err(code, "{} failed: {}", what, job.error());
}

Status Backups::RestoreRunning(const dpv1::BackupJob& job, const std::string& node) {
  return Err(EALREADY,
             "restore of backup \"{}\" into volume \"{}\" is running on node {} ({}); "
             "the volume is ready when it ends",
             job.backup(), job.volume(), node, Percent(job));
}

Status Backups::Start(const BackupClass& c, const std::string& name, const std::string& node,
                      v1::Snapshot* out) {
  auto id = csi::FormatBackupSnapshotId(c.target.url(), name);
  if (!id.ok()) return id.status();
  if (!out->ready_to_use()) {
    // The local snapshot's own copy still runs (no reflink here): the backup starts once it is
    // ready, at one of the snapshotter's next calls.
    out->set_snapshot_id(*id);
    return Status::Ok();
  }
  dpv1::CreateBackupRequest req;
  *req.mutable_target() = c.target;
  req.set_name(name);
  req.set_snapshot(name);
  req.set_bandwidth_bytes_per_s(c.bandwidth_bytes_per_s);
  auto job = nodes_.On(node, [&](NodeDatapath& d) { return d.CreateBackup(req); });
  if (!job.ok()) return job.status();
  auto seen = Wait(node, std::move(*job));
  if (!seen.ok()) return seen.status();
  if (seen->state() == "failed") {
    // The call fails, so no snapshot exists in the CO's eyes, and nothing would ever delete the
    // local one (a content without a handle gets no DeleteSnapshot): it goes now, and a retry
    // cuts a new point in time.
    Status d = nodes_.On(node, [&](NodeDatapath& dp) { return dp.DeleteSnapshot(name); });
    if (!d.ok() && d.code() != ENOENT) {
      spdlog::warn("[{}] backup of {} failed; its local snapshot stays: {}",
                   csi::CurrentRequestId(), name, d.message());
    }
    return JobError(*seen, fmt::format("backup of snapshot \"{}\" to {} (node {}, job {})", name,
                                       c.target.url(), node, seen->id()));
  }
  out->set_snapshot_id(*id);
  if (seen->state() != "succeeded") {
    out->set_ready_to_use(false);
    spdlog::info("[{}] backup {} running on node {} (job {}, {})", csi::CurrentRequestId(), *id,
                 node, seen->id(), Percent(*seen));
    return Status::Ok();
  }
  out->set_ready_to_use(true);
  Status s = nodes_.On(node, [&](NodeDatapath& d) { return d.DeleteSnapshot(name); });
  if (!s.ok() && s.code() != ENOENT) {
    // Harmless: the next DeleteSnapshot of this id removes it too.
    spdlog::warn("[{}] backup {} complete; its local snapshot stays for now: {}",
                 csi::CurrentRequestId(), *id, s.message());
  }
  spdlog::info("[{}] backup {} complete (job {} on node {})", csi::CurrentRequestId(), *id,
               seen->id(), node);
  return Status::Ok();
}

Status Backups::Delete(const csi::BackupRef& ref, const SecretMap& secrets) {
  auto target = TargetFromSecrets(ref.url, secrets, "snapshotter");
  if (!target.ok()) return target.status();
  auto live = nodes_.List();
  if (live.empty()) return Err(EAGAIN, "no node's datapath is registered to delete the backup");
  // A backup still running would write its manifest after the delete: wait for it.
  auto jobs = FanOut(live, [&](const NodeInfo& n) {
    return nodes_.On(n.node_id, [](NodeDatapath& d) { return d.ListBackupJobs(); });
  });
  for (size_t i = 0; i < live.size(); ++i) {
    if (!jobs[i].ok()) return jobs[i].status();
    for (const auto& j : *jobs[i]) {
      if (j.kind() == "backup" && j.state() == "running" && j.backup() == ref.name &&
          j.target() == ref.url) {
        return Err(EALREADY,
                   "backup \"{}\" in {} is still being made on node {} (job {}, {}); "
                   "delete it once it ends",
                   ref.name, ref.url, live[i].node_id, j.id(), Percent(j));
      }
    }
  }
  dpv1::DeleteBackupRequest req;
  *req.mutable_target() = *target;
  req.set_name(ref.name);
  auto gc = nodes_.On(live.front().node_id, [&](NodeDatapath& d) { return d.DeleteBackup(req); });
  if (!gc.ok() && gc.status().code() != ENOENT) return gc.status();
  if (gc.ok()) {
    spdlog::info(
        "[{}] backup \"{}\" in {} deleted; {}", csi::CurrentRequestId(), ref.name, ref.url,
        gc->gc_deferred()
            ? std::string("its chunks wait for the next collection (a backup runs)")
            : fmt::format("{} chunks ({} bytes) freed", gc->chunks_deleted(), gc->bytes_freed()));
  }
  // The local snapshot of a backup that never completed.
  auto local = FanOut(live, [&](const NodeInfo& n) {
    return nodes_.On(n.node_id, [&](NodeDatapath& d) { return d.DeleteSnapshot(ref.name); });
  });
  for (const Status& s : local) {
    if (!s.ok() && s.code() != ENOENT) return s;
  }
  return Status::Ok();
}

StatusOr<std::optional<v1::Snapshot>> Backups::Get(const csi::BackupRef& ref,
                                                   const SecretMap& secrets) {
  auto target = TargetFromSecrets(ref.url, secrets, "snapshotter-list");
  if (!target.ok()) return target.status();
  auto b = Inspect(*target, ref.name);
  if (!b.ok() && (b.status().code() == ENOENT || b.status().code() == EALREADY)) {
    return std::optional<v1::Snapshot>();
  }
  if (!b.ok()) return b.status();
  v1::Snapshot s;
  s.set_snapshot_id(fmt::format("b1:{}#{}", ref.url, ref.name));  // as asked, even if long
  s.set_size_bytes(static_cast<int64_t>(b->volume_size()));
  SetTime(b->created_unix_ns(), &s);
  s.set_ready_to_use(true);
  return std::optional<v1::Snapshot>(std::move(s));
}

StatusOr<std::optional<dpv1::BackupJob>> Backups::JobOf(const std::string& node,
                                                        const std::string& volume,
                                                        std::string_view kind) {
  auto jobs = nodes_.On(node, [](NodeDatapath& d) { return d.ListBackupJobs(); });
  if (!jobs.ok()) return jobs.status();
  std::optional<dpv1::BackupJob> newest;
  for (auto& j : *jobs) {
    if (j.kind() != kind || j.volume() != volume) continue;
    if (!newest || j.started_unix_ns() >= newest->started_unix_ns()) newest = std::move(j);
  }
  return newest;
}

StatusOr<dpv1::BackupJob> Backups::StartRestore(const std::string& node,
                                                const dpv1::BackupTarget& t,
                                                const std::string& name,
                                                const std::string& volume) {
  dpv1::RestoreBackupRequest req;
  *req.mutable_target() = t;
  req.set_name(name);
  req.set_volume(volume);
  auto job = nodes_.On(node, [&](NodeDatapath& d) { return d.RestoreBackup(req); });
  if (!job.ok()) return job.status();
  spdlog::info("[{}] restore of backup \"{}\" from {} into volume {} started on node {} (job {})",
               csi::CurrentRequestId(), name, t.url(), volume, node, job->id());
  return Wait(node, std::move(*job));
}

}  // namespace nbdcsi::controller
