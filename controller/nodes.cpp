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

std::string Nodes::WhyAbsent(const std::string& node) const {
  std::chrono::steady_clock::time_point now;
  for (const auto& n : registry_.ListKnown(&now)) {
    if (n.node_id == node) {
      return fmt::format("its datapath sent no heartbeat within {} ms", registry_.ttl().count());
    }
  }
  return "its datapath is not registered with the controller any more";
}

}  // namespace nbdcsi::controller
