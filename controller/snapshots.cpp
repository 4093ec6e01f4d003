// CreateSnapshot and DeleteSnapshot. A snapshot lives in its source volume's pool (its id names
// that node); its name is unique across the cluster, as a volume's is. A replicated volume's
// snapshot lives in one of its replicas' pools (controller/replicated.h). A VolumeSnapshotClass
// with backupTarget makes snapshots that live in object storage (controller/backups.h).
#include <spdlog/spdlog.h>

#include "controller/controller_service.h"
#include "controller/csi_request.h"
#include "controller/csi_response.h"
#include "controller/csi_status.h"
#include "csi/ids.h"
#include "csi/logging.h"

namespace nbdcsi::controller {

namespace v1 = ::csi::v1;

Status ControllerImpl::CreateSnapshot(const v1::CreateSnapshotRequest& req,
                                      v1::CreateSnapshotResponse* resp) {
  if (req.name().empty()) return Err(EINVAL, "name is required");
  if (req.source_volume_id().empty()) return Err(EINVAL, "source_volume_id is required");
  auto backup = ParseSnapshotClass(req.parameters(), req.secrets());
  if (!backup.ok()) return backup.status();
  auto snap_name = csi::PoolNameForCsiName(req.name());
  if (!snap_name.ok()) return Err(EINVAL, "name: {}", snap_name.status().message());
  if (!*backup) return CutSnapshot(req, *snap_name, resp->mutable_snapshot());
  // A backup class: done already (a retry once the backup completed)? Its local snapshot may
  // be gone by then, so this comes first.
  const bool replicated = csi::IsReplicatedVolumeId(req.source_volume_id());
  std::string src_node, src_pool;
  if (replicated) {
    auto name = csi::ParseReplicatedVolumeId(req.source_volume_id());
    if (!name.ok()) return Err(ENOENT, "source volume: {}", name.status().message());
    src_pool = *name;
  } else {
    auto src = NamedVolume(req.source_volume_id(), "source volume");
    if (!src.ok()) return src.status();
    src_node = src->node_id;
    src_pool = src->pool_name;
  }
  auto done = backups_.Finished(**backup, *snap_name, src_pool, src_node, resp->mutable_snapshot());
  if (!done.ok()) return done.status();
  if (*done) {
    resp->mutable_snapshot()->set_source_volume_id(req.source_volume_id());
    return Status::Ok();
  }
  if (Status s = CutSnapshot(req, *snap_name, resp->mutable_snapshot()); !s.ok()) return s;
  auto local = csi::ParseSnapshotId(resp->snapshot().snapshot_id());
  if (!local.ok()) return Err(EIO, "local snapshot id: {}", local.status().message());
  return backups_.Start(**backup, *snap_name, local->node_id, resp->mutable_snapshot());
}

Status ControllerImpl::CutSnapshot(const v1::CreateSnapshotRequest& req,
                                   const std::string& snap_name, v1::Snapshot* out) {
  const bool replicated = csi::IsReplicatedVolumeId(req.source_volume_id());
  StatusOr<csi::VolumeRef> src = csi::VolumeRef{};
  if (!replicated) src = NamedVolume(req.source_volume_id(), "source volume");
  if (!src.ok()) return src.status();
  if (!replicated) {
    Status c = replicated_.RefuseCopy(src->node_id, src->pool_name, req.source_volume_id());
    if (!c.ok()) return c;
  }
  if (replicated) return replicated_.CreateSnapshot(req.source_volume_id(), snap_name, out);
  // Idempotency by name, as CreateVolume does it: ask every live node at once.
  std::vector<NodeInfo> live = nodes_.List();
  auto found =
      FanOut(live, [&](const NodeInfo& n) { return nodes_.GetSnapshot(n.node_id, snap_name); });
  auto holder = FirstHolder(found);
  if (!holder.ok()) return holder.status();
  if (*holder) {
    const std::string& node = live[**holder].node_id;
    const dpv1::Snapshot& existing = *found[**holder];
    if (node != src->node_id || existing.source_volume() != src->pool_name) {
      return Err(EEXIST, "snapshot \"{}\" exists with another source volume ({})", req.name(),
                 VolumeIdOf(node, existing.source_volume()));
    }
    FillSnapshot(node, existing, out);
    return Status::Ok();
  }
  auto made = nodes_.On(
      src->node_id, [&](NodeDatapath& d) { return d.CreateSnapshot(snap_name, src->pool_name); });
  if (!made.ok()) return made.status();
  FillSnapshot(src->node_id, *made, out);
  return Status::Ok();
}

Status ControllerImpl::DeleteSnapshot(const v1::DeleteSnapshotRequest& req) {
  if (req.snapshot_id().empty()) return Err(EINVAL, "snapshot_id is required");
  if (csi::IsBackupSnapshotId(req.snapshot_id())) {
    auto b = csi::ParseBackupSnapshotId(req.snapshot_id());
    if (!b.ok()) {
      spdlog::info("[{}] DeleteSnapshot of a malformed id \"{}\" succeeds: {}",
                   csi::CurrentRequestId(), req.snapshot_id(), b.status().message());
      return Status::Ok();
    }
    return backups_.Delete(*b, req.secrets());
  }
  auto ref = csi::ParseSnapshotId(req.snapshot_id());
  if (!ref.ok()) {
    spdlog::info("[{}] DeleteSnapshot of a malformed id \"{}\" succeeds: {}",
                 csi::CurrentRequestId(), req.snapshot_id(), ref.status().message());
    return Status::Ok();
  }
  Status s =
      nodes_.On(ref->node_id, [&](NodeDatapath& d) { return d.DeleteSnapshot(ref->pool_name); });
  if (s.code() == ENOENT) return Status::Ok();
  return s;
}

}  // namespace nbdcsi::controller
