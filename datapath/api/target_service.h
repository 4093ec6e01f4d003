// The gRPC Targets service (datapath/api/target.proto) over the ClusterAgent. Registered on the
// same server as the Datapath service when the daemon runs in a cluster (--cluster-etcd).
#pragma once

#include <grpcpp/impl/codegen/service_type.h>

#include <memory>

#include "datapath/attach/attachments.h"
#include "datapath/replica/cluster_agent.h"

namespace nbdcsi::datapath {

// `agent` may be null (no --cluster-etcd): every call is then FAILED_PRECONDITION saying so.
// It must outlive the service. Open and close block for the replica handshakes (bounded by
// their timeouts).
// `attachments` (may be null: no check) refuses CloseTarget while a device is attached to the
// target (FAILED_PRECONDITION naming it; AttachmentManager::CloseTargetUnlessAttached). An NBD
// client connected to VOLUME@target without an attachment (nbdsh, fio, qemu) is not tracked and
// does not hold the close back: its connection ends, as when any NBD server goes away.
std::unique_ptr<grpc::Service> MakeTargetService(replica::ClusterAgent* agent,
                                                 AttachmentManager* attachments = nullptr);

// The TargetFreeze service (snapshots of replicated volumes), for the unix and the TCP API alike:
// a gRPC service object serves one server, so the daemon makes one per server. `agent` as above.
std::unique_ptr<grpc::Service> MakeTargetFreezeService(replica::ClusterAgent* agent);

// The TargetReplicas service (the controller's replica changes: GetTarget, AddReplica,
// RemoveReplica), for the unix and the TCP API alike, one object per server. `agent` as above.
std::unique_ptr<grpc::Service> MakeTargetReplicasService(replica::ClusterAgent* agent);

}  // namespace nbdcsi::datapath
