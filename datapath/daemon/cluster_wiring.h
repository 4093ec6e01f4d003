// Replicated volumes (issue 16) in nbd-datapathd: the cluster store on etcd, this node's cluster
// agent, and the views of the agent that the rest of the daemon takes: the engine as the agent's
// export host, the agent's targets as the attach module's TargetAccess (it does not link
// datapath/replica) and as the metrics collector's samples.
#pragma once

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "common/cluster/etcd_flags.h"
#include "common/status.h"
#include "datapath/attach/export_server.h"
#include "datapath/engine/frontend.h"
#include "datapath/metrics/collector.h"
#include "datapath/replica/cluster_agent.h"

namespace nbdcsi::datapath::daemon {

class ClusterWiring {
 public:
  // Without `etcd` (no --cluster-etcd): a wiring with no agent; agent() and targets() are null.
  // With it: connects the store and starts the agent, which joins the cluster (registers this
  // node and serves the targets it is given over `frontend`).
  static StatusOr<std::unique_ptr<ClusterWiring>> Start(
      const std::optional<etcd::EtcdOptions>& etcd, const std::string& prefix,
      const replica::ClusterAgentOptions& options, NbdFrontend& frontend);
  // Drops the agent before the store it uses and the host it exports on. The daemon calls the
  // agent's Stop itself, at its place in the shutdown order.
  ~ClusterWiring();

  replica::ClusterAgent* agent() { return agent_.get(); }
  TargetAccess* targets();

 private:
  class FrontendHost;
  class AgentTargets;
  explicit ClusterWiring(NbdFrontend& frontend);

  std::unique_ptr<FrontendHost> host_;
  std::unique_ptr<cluster::ClusterStore> store_;
  std::unique_ptr<replica::ClusterAgent> agent_;
  std::unique_ptr<AgentTargets> targets_;
};

// The cluster agent's targets as the collector's samples.
std::vector<TargetSample> TargetSamples(replica::ClusterAgent& agent);

}  // namespace nbdcsi::datapath::daemon
