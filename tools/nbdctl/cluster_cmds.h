// `nbdctl cluster nodes|volumes|snapshots`: the whole cluster as nbd-csi-controller sees it,
// through its ClusterView service (datapath/api/cluster_view.proto) on the registry listener:
// TCP with mutual TLS (--tls-cert, --tls-key, --tls-ca, the client certificate signed by the CA
// the controller trusts), or --insecure for a plaintext controller on loopback.
#pragma once

#include <memory>

#include "tools/nbdctl/command_tree.h"
#include "tools/nbdctl/connection.h"

namespace nbdcsi::nbdctl {

class ClusterCommands {
 public:
  ClusterCommands(CommandTree& tree, const GlobalOptions& global);
  ~ClusterCommands();
  ClusterCommands(const ClusterCommands&) = delete;
  ClusterCommands& operator=(const ClusterCommands&) = delete;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace nbdcsi::nbdctl
