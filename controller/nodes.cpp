#include "controller/nodes.h"

#include "controller/csi_status.h"

namespace nbdcsi::controller {

StatusOr<std::shared_ptr<NodeDatapath>> Nodes::Datapath(const std::string& node) {
  auto dp = registry_.Datapath(node);
  if (!dp.ok()) {
    // The registry says ENODEV; for the CSI caller the node is only unavailable for now.
    return Err(EAGAIN, "node \"{}\" is not registered with the controller: {}", node,
               dp.status().message());
  }
  return dp;
}

}  // namespace nbdcsi::controller
