// Replica changes of replicated volumes (issue 16: `nbdctl cluster volume move VOL --from A --to
// B` and `nbdctl cluster volume replica add|remove`): the controller's orchestration, served as
// the ClusterReplicas service (datapath/api/cluster_view.proto) on the registry listener.
//
// Why here: the controller is the one party that can create and delete a copy in any node's pool
// (the nodes' datapath APIs admit its certificate), and it already owns the catalogue's replica
// set while no target serves the volume. The target, which holds the claim and the in-sync set,
// does the part that must happen in step with the writes (datapath/replica/target.h AddReplica
// and RemoveReplica, reached over its node's TCP API: TargetReplicas); the catalogue refuses the
// controller's replica-set change while a claim lives (ClusterStore::SetReplicas), so the two
// never race.
//
// Add NODE: the node must be registered here and alive in the cluster state, and hold no replica
// yet. Its blank copy (the volume's size, the QoS of an existing copy) is created in its pool;
// then, when a node serves the volume, that target records it out of sync, connects it and
// copies the whole volume to it in the background (holes skipped, at the given rate); it joins
// the in-sync set when done. With no target, the catalogue lists it out of sync and the next
// target's claim copies it (as for a restored volume's blank replicas). A failure before the
// catalogue lists it deletes the copy again.
// Remove NODE: never the last in-sync replica. Out of the catalogue first (by the target, which
// then stops writing to it; or by the controller with no target), then its copy is deleted
// (a node that does not answer keeps it: reported as copy_left).
// Move = add, wait until the new replica is in sync (progress from the target's resync), remove.
// It needs a target (else FAILED_PRECONDITION: nothing would copy). A copy that fails (the new
// node died) ends the move with UNAVAILABLE: the new replica stays out of sync, the old one
// stays, the volume serves; the target's automatic resync retries when the node is back.
#pragma once

#include <chrono>
#include <functional>
#include <memory>
#include <string>

#include "common/cluster/cluster_store.h"
#include "common/status.h"
#include "controller/nodes.h"
#include "datapath/api/cluster_view.grpc.pb.h"

namespace nbdcsi::controller {

class ReplicaChanges {
 public:
  // `store` null: the controller runs without --cluster-etcd; every call says so.
  ReplicaChanges(cluster::ClusterStore* store, NodeRegistry& registry)
      : store_(store), nodes_(registry) {}

  struct Request {
    std::string volume;  // r1:NAME or NAME
    std::string add, remove;
    uint64_t rate = 0;
    bool wait = false;
    // How often the copy is looked at (and progress reported).
    std::chrono::milliseconds poll{250};
  };
  using Report = std::function<void(const dpv1::ChangeReplicasProgress&)>;
  // See above. `report` gets each step and the copy's progress; the last call has phase "done".
  Status Change(const Request& r, const Report& report);

 private:
  // The request's checks (names, the volume, the nodes, a move needs a target): the volume's
  // state, and its catalogue name in *name.
  StatusOr<cluster::VolumeState> Check(const Request& r, std::string* name);
  Status Add(const std::string& name, const Request& r, const Report& report);
  Status WaitInSync(const std::string& name, const Request& r, const Report& report);
  Status Remove(const std::string& name, const Request& r, std::string* copy_left);
  cluster::ClusterStore* store_;
  Nodes nodes_;
};

struct ReplicaChangesServiceOptions {
  // As ClusterView's: a datapath's node certificate is refused (PERMISSION_DENIED).
  bool refuse_node_certificates = false;
};

std::unique_ptr<dpv1::ClusterReplicas::Service> MakeReplicaChangesService(
    ReplicaChanges& changes, ReplicaChangesServiceOptions opts = {});

}  // namespace nbdcsi::controller
