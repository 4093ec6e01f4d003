// GetCapacity (from the registry's heartbeat figures: no node is asked) and
// ControllerGetCapabilities.
#include <algorithm>
#include <limits>

#include <spdlog/spdlog.h>

#include "controller/controller_service.h"
#include "controller/csi_request.h"
#include "csi/logging.h"

namespace nbdcsi::controller {

namespace v1 = ::csi::v1;

Status ControllerImpl::GetCapacity(const v1::GetCapacityRequest& req,
                                   v1::GetCapacityResponse* resp) {
  if (auto q = ParseStorageClass(req.parameters()); !q.ok()) return q.status();
  for (const auto& cap : req.volume_capabilities()) {
    std::string why = UnsupportedCapability(cap);
    if (!why.empty()) {
      // Nothing can be provisioned with a capability we refuse.
      spdlog::debug("[{}] GetCapacity: 0 for an unsupported capability: {}",
                    csi::CurrentRequestId(), why);
      resp->set_available_capacity(0);
      resp->mutable_maximum_volume_size()->set_value(0);
      return Status::Ok();
    }
  }
  uint64_t avail = 0;
  if (req.has_accessible_topology() && !req.accessible_topology().segments().empty()) {
    auto node = NodeOfTopology(req.accessible_topology());
    if (!node.ok()) return node.status();
    if (auto info = nodes_.Get(*node)) avail = info->provisionable_bytes;
  } else {
    // No segment: the largest volume one node could take now. A volume never spans nodes, so
    // the sum would promise room that no single CreateVolume can use.
    for (const auto& n : nodes_.List()) avail = std::max(avail, n.provisionable_bytes);
  }
  avail = RoundDownToAlignment(std::min<uint64_t>(avail, std::numeric_limits<int64_t>::max()));
  resp->set_available_capacity(static_cast<int64_t>(avail));
  resp->mutable_maximum_volume_size()->set_value(static_cast<int64_t>(avail));
  return Status::Ok();
}

Status ControllerImpl::GetCapabilities(v1::ControllerGetCapabilitiesResponse* resp) {
  using T = v1::ControllerServiceCapability::RPC;
  for (auto t :
       {T::CREATE_DELETE_VOLUME, T::LIST_VOLUMES, T::GET_CAPACITY, T::CREATE_DELETE_SNAPSHOT,
        T::LIST_SNAPSHOTS, T::CLONE_VOLUME, T::EXPAND_VOLUME, T::VOLUME_CONDITION, T::GET_VOLUME,
        T::SINGLE_NODE_MULTI_WRITER, T::MODIFY_VOLUME}) {
    resp->add_capabilities()->mutable_rpc()->set_type(t);
  }
  return Status::Ok();
}

}  // namespace nbdcsi::controller
