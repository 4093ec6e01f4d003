// The ClusterView service (datapath/api/cluster_view.proto): what `nbdctl cluster` shows
// operators. Read-only, from the registry (every node heard from, live or expired, with its last
// heartbeat's pool figures), the live nodes' datapaths asked at once (FanOut, through the same
// NodeDatapath clients the CSI calls use), and the replicated volumes' catalogue when the
// controller has one. A node that does not answer, or whose heartbeats stopped, is reported in
// the answer's `nodes` with why; it never fails the call, nor does an unreadable catalogue.
#pragma once

#include <chrono>
#include <memory>

#include "common/cluster/cluster_store.h"
#include "controller/nodes.h"
#include "controller/placement.h"
#include "controller/registry.h"
#include "controller/replicated.h"
#include "datapath/api/cluster_view.grpc.pb.h"

namespace nbdcsi::controller {

class ClusterView {
 public:
  // `store`: the replicated volumes' catalogue (--cluster-etcd), or null. Both must outlive it.
  ClusterView(NodeRegistry& registry, cluster::ClusterStore* store);

  // The most a listing waits for the nodes (a node that hangs is reported as not answering
  // within it); the service waits less when the client's deadline is nearer (kClientShare).
  static constexpr std::chrono::milliseconds kMaxWait{20000};
  static constexpr double kClientShare = 0.75;

  void ListNodes(dpv1::ListClusterNodesResponse* out);
  // Every live node is asked at once; the answers that came within `wait` are listed, the others
  // are nodes[].error "no answer within N ms" (their calls end on their own, within the
  // datapath client's deadline, and are then dropped).
  void ListVolumes(dpv1::ListClusterVolumesResponse* out,
                   std::chrono::milliseconds wait = kMaxWait);
  void ListSnapshots(dpv1::ListClusterSnapshotsResponse* out,
                     std::chrono::milliseconds wait = kMaxWait);

 private:
  // Every known node as a NodeAnswer (expired ones with their error), and the live ones.
  std::vector<NodeInfo> Known(google::protobuf::RepeatedPtrField<dpv1::NodeAnswer>* answers);

  NodeRegistry& registry_;
  cluster::ClusterStore* store_;
  Nodes nodes_;
  PlacementLedger ledger_;  // unused by the read-only calls ReplicatedVolumes makes here
  ReplicatedVolumes replicated_;
};

struct ClusterViewServiceOptions {
  // Refuse (PERMISSION_DENIED, logged) a client whose certificate names a node (common/tls.h
  // NodeIdentityUri): the registry listener lets every datapath in, and a datapath's certificate
  // has no business reading the whole cluster. On with node binding (each datapath its own
  // certificate); a certificate shared by every datapath names no node and cannot be told apart.
  bool refuse_node_certificates = false;
};

// The gRPC service over `view` (which must outlive it): OK, or PERMISSION_DENIED as above.
std::unique_ptr<dpv1::ClusterView::Service> MakeClusterViewService(
    ClusterView& view, ClusterViewServiceOptions opts = {});

}  // namespace nbdcsi::controller
