#include "controller/nodes.h"

#include <fmt/format.h>

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

std::string Nodes::WhyAbsent() const {
  // The same words whether the registry still holds the expired node or forgot it already.
  return fmt::format("no heartbeat from its datapath within the last {} ms",
                     registry_.ttl().count());
}

}  // namespace nbdcsi::controller
