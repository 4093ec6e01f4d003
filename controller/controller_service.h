// The CSI Controller service of nbd-csi-controller.
//
// Two layers, as TopoLVM does it: ControllerImpl does the work and takes no locks of its own (it
// is stateless: the truth about volumes lives in the node pools, reached through the NodeDatapath
// clients the NodeRegistry hands out); the gRPC service returned by MakeControllerService is a
// thin decorator that takes a per-id in-flight guard (common/name_locks.h) and answers a second
// concurrent call on the same volume, snapshot or CSI name with ABORTED, as the CSI spec asks.
// ControllerImpl speaks errno (controller/csi_status.h); the decorator turns it into the CSI gRPC
// code once, on the way out.
//
// Decisions where the spec leaves room (each tested in-process, one test per decision, in
// test/controller/controller_decisions_test.cpp, and end to end in controller_acceptance_test.cpp):
// - Ids are validated before use (csi/ids.h). A malformed id names nothing of ours: DeleteVolume
//   and DeleteSnapshot succeed, lookups are NOT_FOUND, ListSnapshots filters return nothing.
//   A well-formed id on a node that is not registered is UNAVAILABLE (the sidecar retries; the
//   node may be restarting), never "done" or "not found".
// - CreateVolume: default 1 GiB (a restore/clone: its source's size), sizes rounded up to 4 KiB,
//   OUT_OF_RANGE when no aligned size fits the range. Placement: preferred in order, then
//   requisite in order; with no requirement, any node, most room first (room = the last
//   heartbeat's provisionable bytes minus what this controller placed there since). A content
//   source pins the node, unless the allowed topology excludes it or it has no room: then the
//   data is copied over NBD from a temporary clone on the source's node to an allowed node (a
//   "copy" job there; ABORTED with its progress until it ends, a failed copy's error once, the
//   clone removed either way; create_volume.cpp RunCopy). A source node that advertises no NBD
//   endpoint: INVALID_ARGUMENT; one that cannot be reached: UNAVAILABLE. Idempotency
//   asks every live node for the pool name (in parallel); a node that cannot answer
//   fails the call (UNAVAILABLE) rather than risk a second copy. No room anywhere allowed:
//   RESOURCE_EXHAUSTED, unless an allowed node is not registered: UNAVAILABLE.
// - GetCapacity: with a topology segment, that node's provisionable bytes (0 when unknown);
//   without, the largest single node's (a volume never spans nodes, so a sum would promise room
//   no CreateVolume can use). maximum_volume_size = available_capacity.
// - ControllerGetVolume: a volume whose node is gone or cannot serve it is returned with an
//   abnormal condition carrying the cause ("node N unreachable: ..." when the node is silent;
//   size and content source from its last listing when it had one): the health monitor's signal.
//   Only the volume's own node saying it does not exist is NOT_FOUND. An unfilled restore/clone
//   is abnormal until its copy ends.
// - ListVolumes/ListSnapshots: all live nodes, sorted by id; the token is an opaque encoding of
//   the last id returned (stable across deletions); a foreign token is ABORTED. ListVolumes lists
//   the volumes of a node that does not answer (or whose heartbeats stopped) from that node's last
//   listing, abnormal with the cause (controller/last_listings.h); ListSnapshots skips it from a
//   full listing (logged); a listing filtered to it fails.
// - ControllerExpandVolume: grow only (a smaller request is already satisfied);
//   node_expansion_required for mount and block alike (the NBD device size is node state).
// - ControllerModifyVolume: mutable_parameters are a QoS patch (a key set to 0 removes that
//   limit); other keys keep their values.
// - Replicated volumes (StorageClass replicas >= 2, ids "r1:<name>"): controller/replicated.h.
// - Backup snapshots (VolumeSnapshotClass backupTarget, ids "b1:<target>#<name>") and restores
//   from them: controller/backups.h.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>

#include "common/cluster/cluster_store.h"
#include "common/status.h"
#include "controller/backups.h"
#include "controller/last_listings.h"
#include "controller/nodes.h"
#include "controller/placement.h"
#include "controller/registry.h"
#include "controller/replicated.h"
#include "csi/csi.grpc.pb.h"

namespace nbdcsi::controller {

struct ControllerOptions {
  // CreateVolume without a capacity_range (or with required_bytes 0 and no limit).
  uint64_t default_volume_bytes = uint64_t{1} << 30;
  // (The deadline of each call to a datapath is GrpcDatapathOptions::timeout.)
  // Told each time CreateVolume finds no node for a volume: kNoRoom (RESOURCE_EXHAUSTED) or
  // kNodeMissing (an allowed node is not registered: UNAVAILABLE). For /metrics; may be empty.
  enum class Refusal { kNoRoom, kNodeMissing };
  std::function<void(Refusal)> on_placement_refused = {};
  // The cluster state of replicated volumes (--cluster-etcd), or null: CreateVolume with
  // replicas >= 2 is then INVALID_ARGUMENT. Must outlive the ControllerImpl.
  cluster::ClusterStore* cluster = nullptr;
  // Backup snapshots and restores (controller/backups.h): how long a call waits for its job.
  BackupOptions backup = {};
};

// One method per CSI Controller RPC (where each lives: docs/design.md, "controller/").
class ControllerImpl {
 public:
  ControllerImpl(NodeRegistry& registry, ControllerOptions opts);

  Status CreateVolume(const ::csi::v1::CreateVolumeRequest& req,
                      ::csi::v1::CreateVolumeResponse* resp);
  Status DeleteVolume(const ::csi::v1::DeleteVolumeRequest& req);
  Status ValidateVolumeCapabilities(const ::csi::v1::ValidateVolumeCapabilitiesRequest& req,
                                    ::csi::v1::ValidateVolumeCapabilitiesResponse* resp);
  Status ListVolumes(const ::csi::v1::ListVolumesRequest& req,
                     ::csi::v1::ListVolumesResponse* resp);
  Status GetCapacity(const ::csi::v1::GetCapacityRequest& req,
                     ::csi::v1::GetCapacityResponse* resp);
  Status GetCapabilities(::csi::v1::ControllerGetCapabilitiesResponse* resp);
  Status CreateSnapshot(const ::csi::v1::CreateSnapshotRequest& req,
                        ::csi::v1::CreateSnapshotResponse* resp);
  Status DeleteSnapshot(const ::csi::v1::DeleteSnapshotRequest& req);
  Status ListSnapshots(const ::csi::v1::ListSnapshotsRequest& req,
                       ::csi::v1::ListSnapshotsResponse* resp);
  Status ExpandVolume(const ::csi::v1::ControllerExpandVolumeRequest& req,
                      ::csi::v1::ControllerExpandVolumeResponse* resp);
  Status GetVolume(const ::csi::v1::ControllerGetVolumeRequest& req,
                   ::csi::v1::ControllerGetVolumeResponse* resp);
  Status ModifyVolume(const ::csi::v1::ControllerModifyVolumeRequest& req);

 private:
  Nodes nodes_;
  ControllerOptions opts_;
  PlacementLedger ledger_;
  ReplicatedVolumes replicated_;  // r1 ids and replicas >= 2
  LastListings last_listings_;    // what each node listed last (ListVolumes of a silent node)
  Backups backups_;               // b1 snapshots: VolumeSnapshotClass backupTarget, restores

  // CreateSnapshot's local part: the snapshot cut on the source's node (or a replica's).
  Status CutSnapshot(const ::csi::v1::CreateSnapshotRequest& req, const std::string& snap_name,
                     ::csi::v1::Snapshot* out);
};

// The gRPC Controller service: per-id ABORTED guards around a ControllerImpl over `registry`
// (which must outlive it), and the errno -> CSI code mapping (ToCsiStatus). ControllerPublishVolume
// and ControllerUnpublishVolume are UNIMPLEMENTED (the PUBLISH_UNPUBLISH_VOLUME capability is not
// advertised: the node attaches its own volumes).
std::unique_ptr<::csi::v1::Controller::Service> MakeControllerService(NodeRegistry& registry,
                                                                      ControllerOptions opts = {});

}  // namespace nbdcsi::controller
