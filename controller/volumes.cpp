// The calls on one existing volume: DeleteVolume, ValidateVolumeCapabilities,
// ControllerExpandVolume, ControllerGetVolume, ControllerModifyVolume. Each is routed by its id
// (v1:<node>:<name>) to that node's datapath, or for a replicated volume (r1:<name>) to
// controller/replicated.h.
#include <spdlog/spdlog.h>

#include "controller/controller_service.h"
#include "controller/csi_request.h"
#include "controller/csi_response.h"
#include "controller/csi_status.h"
#include "csi/logging.h"

namespace nbdcsi::controller {

namespace v1 = ::csi::v1;

Status ControllerImpl::DeleteVolume(const v1::DeleteVolumeRequest& req) {
  if (req.volume_id().empty()) return Err(EINVAL, "volume_id is required");
  if (csi::IsReplicatedVolumeId(req.volume_id())) return replicated_.Delete(req.volume_id());
  auto ref = csi::ParseVolumeId(req.volume_id());
  if (!ref.ok()) {
    // Never one of ours, so it does not exist: deleting it is done (CSI: idempotent).
    spdlog::info("[{}] DeleteVolume of a malformed id \"{}\" succeeds: {}", csi::CurrentRequestId(),
                 req.volume_id(), ref.status().message());
    return Status::Ok();
  }
  if (Status c = replicated_.RefuseCopy(ref->node_id, ref->pool_name, req.volume_id()); !c.ok())
    return c;
  Status s =
      nodes_.On(ref->node_id, [&](NodeDatapath& d) { return d.DeleteVolume(ref->pool_name); });
  if (s.ok() || s.code() == ENOENT) {
    last_listings_.Forget(ref->node_id, ref->pool_name);
    return Status::Ok();
  }
  return s;
}

Status ControllerImpl::ValidateVolumeCapabilities(const v1::ValidateVolumeCapabilitiesRequest& req,
                                                  v1::ValidateVolumeCapabilitiesResponse* resp) {
  if (req.volume_id().empty()) return Err(EINVAL, "volume_id is required");
  if (req.volume_capabilities().empty()) return Err(EINVAL, "volume_capabilities is required");
  if (csi::IsReplicatedVolumeId(req.volume_id())) {
    if (auto v = replicated_.Get(req.volume_id()); !v.ok()) return v.status();
  } else {
    auto ref = NamedVolume(req.volume_id());
    if (!ref.ok()) return ref.status();
    if (auto dv = nodes_.GetVolume(ref->node_id, ref->pool_name); !dv.ok()) return dv.status();
  }
  // What cannot be served is an answer (a message, nothing confirmed), not an error.
  for (const auto& cap : req.volume_capabilities()) {
    std::string why = UnsupportedCapability(cap);
    if (!why.empty()) {
      resp->set_message(why);
      return Status::Ok();
    }
  }
  auto sc = ParseStorageClass(req.parameters());
  auto vac = ParseAttributes(req.mutable_parameters(), "mutable_parameters");
  if (!sc.ok() || !vac.ok()) {
    resp->set_message(!sc.ok() ? sc.status().message() : vac.status().message());
    return Status::Ok();
  }
  auto* c = resp->mutable_confirmed();
  *c->mutable_volume_capabilities() = req.volume_capabilities();
  *c->mutable_volume_context() = req.volume_context();
  *c->mutable_parameters() = req.parameters();
  *c->mutable_mutable_parameters() = req.mutable_parameters();
  return Status::Ok();
}

Status ControllerImpl::ExpandVolume(const v1::ControllerExpandVolumeRequest& req,
                                    v1::ControllerExpandVolumeResponse* resp) {
  if (req.volume_id().empty()) return Err(EINVAL, "volume_id is required");
  if (!req.has_capacity_range()) return Err(EINVAL, "capacity_range is required");
  if (req.has_volume_capability()) {
    std::string why = UnsupportedCapability(req.volume_capability());
    if (!why.empty()) return CallError(EINVAL, why);
  }
  if (csi::IsReplicatedVolumeId(req.volume_id())) {
    if (auto v = replicated_.Get(req.volume_id()); !v.ok()) return v.status();
    if (req.capacity_range().required_bytes() <= 0) {
      return Err(EINVAL, "capacity_range.required_bytes must be positive");
    }
    auto size = VolumeSizeFor(&req.capacity_range(), 0, 0);
    if (!size.ok()) return CallError(size.status().code(), size.status().message());
    auto now = replicated_.Expand(req.volume_id(), *size);
    if (!now.ok()) return now.status();
    resp->set_capacity_bytes(static_cast<int64_t>(*now));
    // The target's node learns the size there (NodeExpandVolume), staged as block or mount.
    resp->set_node_expansion_required(true);
    return Status::Ok();
  }
  auto ref = NamedVolume(req.volume_id());
  if (!ref.ok()) return ref.status();
  auto dv = nodes_.GetVolume(ref->node_id, ref->pool_name);
  if (!dv.ok()) return dv.status();
  if (Status c = replicated_.RefuseCopy(ref->node_id, ref->pool_name, req.volume_id()); !c.ok())
    return c;
  if (req.capacity_range().required_bytes() <= 0) {
    return Err(EINVAL, "capacity_range.required_bytes must be positive");
  }
  auto size = VolumeSizeFor(&req.capacity_range(), 0, 0);
  if (!size.ok()) return CallError(size.status().code(), size.status().message());
  uint64_t now = dv->size_bytes();
  if (*size > now) {
    auto grown = nodes_.On(ref->node_id,
                           [&](NodeDatapath& d) { return d.ResizeVolume(ref->pool_name, *size); });
    if (!grown.ok()) return grown.status();
    now = grown->size_bytes();
  }
  // Volumes never shrink: a smaller request is already satisfied (CSI: idempotent).
  resp->set_capacity_bytes(static_cast<int64_t>(now));
  // The attached NBD device learns its new size on the node (mount or block alike), so the
  // node's NodeExpandVolume must run in both cases.
  resp->set_node_expansion_required(true);
  return Status::Ok();
}

Status ControllerImpl::GetVolume(const v1::ControllerGetVolumeRequest& req,
                                 v1::ControllerGetVolumeResponse* resp) {
  if (req.volume_id().empty()) return Err(EINVAL, "volume_id is required");
  if (csi::IsReplicatedVolumeId(req.volume_id())) {
    auto v = replicated_.Get(req.volume_id());
    if (!v.ok()) return v.status();
    replicated_.Fill(*v, resp->mutable_volume(),
                     resp->mutable_status()->mutable_volume_condition());
    return Status::Ok();
  }
  auto ref = NamedVolume(req.volume_id());
  if (!ref.ok()) return ref.status();
  // Before asking: a volume deleted while the answer is on its way is not put back.
  const LastListings::Ticket ticket = last_listings_.Begin();
  // A node whose heartbeats stopped is not asked: the cause in words that stay the same from one
  // call to the next (the health monitor's events fold when they repeat).
  auto dv = nodes_.Get(ref->node_id)
                ? nodes_.GetVolume(ref->node_id, ref->pool_name)
                : StatusOr<dpv1::Volume>(Error(ENODEV, "{}", nodes_.WhyAbsent()));
  if (!dv.ok() && dv.status().code() == ENOENT) {
    last_listings_.Forget(ref->node_id, ref->pool_name);
    return dv.status();
  }
  auto* cond = resp->mutable_status()->mutable_volume_condition();
  if (!dv.ok()) {
    // The volume's node is gone or its datapath cannot serve it (e.g. a broken volume is
    // INTERNAL): the volume exists as far as we know, and is not usable. That is what the
    // condition is for; the health monitor turns it into an event. Its size and source are
    // those of the node's last listing, when there was one.
    auto* v = resp->mutable_volume();
    if (auto last = last_listings_.Volume(ref->node_id, ref->pool_name)) {
      FillVolume(ref->node_id, *last, v);
    } else {
      v->set_volume_id(req.volume_id());
      SetTopology(ref->node_id, v);
    }
    cond->set_abnormal(true);
    cond->set_message(NodeDownMessage(ref->node_id, dv.status()));
    return Status::Ok();
  }
  last_listings_.PutVolume(ticket, ref->node_id, *dv);
  FillVolume(ref->node_id, *dv, resp->mutable_volume());
  FillCondition(*dv, cond);
  return Status::Ok();
}

Status ControllerImpl::ModifyVolume(const v1::ControllerModifyVolumeRequest& req) {
  if (req.volume_id().empty()) return Err(EINVAL, "volume_id is required");
  auto attrs = ParseAttributes(req.mutable_parameters(), "mutable_parameters");
  if (!attrs.ok()) return attrs.status();
  const csi::QosParameters* q = &attrs->qos;
  if (csi::IsReplicatedVolumeId(req.volume_id())) {
    if (attrs->schedule) {
      return Err(EINVAL, "mutable_parameters: schedules are not supported for replicated volumes "
                 "yet ({})", req.volume_id());
    }
    if (q->empty()) return replicated_.Get(req.volume_id()).status();
    if (Status s = replicated_.SetQos(req.volume_id(), QosPatchOf(*q)); !s.ok()) return s;
    spdlog::info("[{}] volume {}: QoS patch {} on every replica", csi::CurrentRequestId(),
                 req.volume_id(), QosPatchOf(*q).ShortDebugString());
    return Status::Ok();
  }
  auto ref = NamedVolume(req.volume_id());
  if (!ref.ok()) return ref.status();
  // Nothing to change: the answer is only whether the volume exists.
  if (q->empty() && !attrs->schedule) return nodes_.GetVolume(ref->node_id, ref->pool_name).status();
  if (Status c = replicated_.RefuseCopy(ref->node_id, ref->pool_name, req.volume_id()); !c.ok())
    return c;
  if (attrs->schedule) {
    auto set = nodes_.On(ref->node_id, [&](NodeDatapath& d) {
      return d.SetSchedule(ref->pool_name, *attrs->schedule);
    });
    if (!set.ok()) return set.status();
    spdlog::info("[{}] volume {}: schedule now {}", csi::CurrentRequestId(), req.volume_id(),
                 DescribeSchedule(*attrs->schedule));
    if (q->empty()) return Status::Ok();
  }
  auto changed = nodes_.On(
      ref->node_id, [&](NodeDatapath& d) { return d.SetQos(ref->pool_name, QosPatchOf(*q)); });
  if (!changed.ok()) return changed.status();
  spdlog::info("[{}] volume {}: QoS now {}", csi::CurrentRequestId(), req.volume_id(),
               changed->qos().ShortDebugString());
  return Status::Ok();
}

}  // namespace nbdcsi::controller
