// CreateSnapshot and DeleteSnapshot. A snapshot lives in its source volume's pool (its id names
// that node); its name is unique across the cluster, as a volume's is. A replicated volume's
// snapshot lives in one of its replicas' pools (controller/replicated.h).
#include <spdlog/spdlog.h>

#include "controller/controller_service.h"
#include "controller/csi_request.h"
#include "controller/csi_response.h"
#include "controller/csi_status.h"
#include "csi/ids.h"
#include "csi/logging.h"

namespace nbdcsi::controller {

namespace v1 = ::csi::v1;

namespace {

constexpr char kCsiParamPrefix[] = "csi.storage.k8s.io/";

// VolumeSnapshotClass parameters: none are ours; the snapshotter's own prefixed keys are skipped.
Status CheckSnapshotParameters(const google::protobuf::Map<std::string, std::string>& params) {
  for (const auto& [k, v] : params) {
    if (k.rfind(kCsiParamPrefix, 0) == 0) continue;
    return Err(EINVAL,
               "unknown snapshot parameter \"{}\" (VolumeSnapshotClass parameters: none are "
               "supported)",
               k);
  }
  return Status::Ok();
}

}  // namespace

Status ControllerImpl::CreateSnapshot(const v1::CreateSnapshotRequest& req,
                                      v1::CreateSnapshotResponse* resp) {
  if (req.name().empty()) return Err(EINVAL, "name is required");
  if (req.source_volume_id().empty()) return Err(EINVAL, "source_volume_id is required");
  if (Status s = CheckSnapshotParameters(req.parameters()); !s.ok()) return s;
  const bool replicated = csi::IsReplicatedVolumeId(req.source_volume_id());
  StatusOr<csi::VolumeRef> src = csi::VolumeRef{};
  if (!replicated) src = NamedVolume(req.source_volume_id(), "source volume");
  if (!src.ok()) return src.status();
  if (!replicated) {
    Status c = replicated_.RefuseCopy(src->node_id, src->pool_name, req.source_volume_id());
    if (!c.ok()) return c;
  }
  auto snap_name = csi::PoolNameForCsiName(req.name());
  if (!snap_name.ok()) return Err(EINVAL, "name: {}", snap_name.status().message());
  if (replicated) {
    return replicated_.CreateSnapshot(req.source_volume_id(), *snap_name,
                                      resp->mutable_snapshot());
  }
  // Idempotency by name, as CreateVolume does it: ask every live node at once.
  std::vector<NodeInfo> live = nodes_.List();
  auto found =
      FanOut(live, [&](const NodeInfo& n) { return nodes_.GetSnapshot(n.node_id, *snap_name); });
  auto holder = FirstHolder(found);
  if (!holder.ok()) return holder.status();
  if (*holder) {
    const std::string& node = live[**holder].node_id;
    const dpv1::Snapshot& existing = *found[**holder];
    if (node != src->node_id || existing.source_volume() != src->pool_name) {
      return Err(EEXIST, "snapshot \"{}\" exists with another source volume ({})", req.name(),
                 VolumeIdOf(node, existing.source_volume()));
    }
    FillSnapshot(node, existing, resp->mutable_snapshot());
    return Status::Ok();
  }
  auto made = nodes_.On(
      src->node_id, [&](NodeDatapath& d) { return d.CreateSnapshot(*snap_name, src->pool_name); });
  if (!made.ok()) return made.status();
  FillSnapshot(src->node_id, *made, resp->mutable_snapshot());
  return Status::Ok();
}

Status ControllerImpl::DeleteSnapshot(const v1::DeleteSnapshotRequest& req) {
  if (req.snapshot_id().empty()) return Err(EINVAL, "snapshot_id is required");
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
