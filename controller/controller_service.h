// The CSI Controller service of nbd-csi-controller.
//
// Two layers, as TopoLVM does it: ControllerImpl does the work and takes no locks of its own (it
// is stateless: the truth about volumes lives in the node pools, reached through the
// NodeRegistry's Datapath stubs); the gRPC service returned by MakeControllerService is a thin
// decorator that takes a per-id in-flight guard (common/name_locks.h) and answers a second concurrent
// call on the same volume, snapshot or CSI name with ABORTED, as the CSI spec asks.
//
// Decisions where the spec leaves room (tested in test/controller/):
// - Ids are validated before use (csi/ids.h). A malformed id names nothing of ours: DeleteVolume
//   and DeleteSnapshot succeed, lookups are NOT_FOUND, ListSnapshots filters return nothing.
//   A well-formed id on a node that is not registered is UNAVAILABLE (the sidecar retries; the
//   node may be restarting), never "done" or "not found".
// - CreateVolume: default 1 GiB (a restore/clone: its source's size), sizes rounded up to 4 KiB,
//   OUT_OF_RANGE when no aligned size fits the range. Placement: preferred in order, then
//   requisite in order; with no requirement, any node, most room first (room = the last
//   heartbeat's provisionable bytes minus what this controller placed there since). A content
//   source pins the node; a source outside the allowed topology is INVALID_ARGUMENT. Idempotency
//   asks every live node for the pool name (in parallel); a node that cannot answer
//   fails the call (UNAVAILABLE) rather than risk a second copy. No room anywhere allowed:
//   RESOURCE_EXHAUSTED, unless an allowed node is not registered: UNAVAILABLE.
// - GetCapacity: with a topology segment, that node's provisionable bytes (0 when unknown);
//   without, the largest single node's (a volume never spans nodes, so a sum would promise room
//   no CreateVolume can use). maximum_volume_size = available_capacity.
// - ControllerGetVolume: a volume whose node is gone or cannot serve it is returned with an
//   abnormal condition carrying the cause (the health monitor's signal); an unfilled
//   restore/clone is abnormal until its copy ends.
// - ListVolumes/ListSnapshots: all live nodes, sorted by id; the token is an opaque encoding of
//   the last id returned (stable across deletions); a foreign token is ABORTED. A node that does
//   not answer is skipped from a full listing (logged) but fails a listing filtered to it.
// - ControllerExpandVolume: grow only (a smaller request is already satisfied);
//   node_expansion_required for mount and block alike (the NBD device size is node state).
// - ControllerModifyVolume: mutable_parameters are a QoS patch (a key set to 0 removes that
//   limit); other keys keep their values.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>

#include <grpcpp/support/status.h>

#include "common/status.h"
#include "common/volume_rules.h"
#include "controller/registry.h"
#include "csi/csi.grpc.pb.h"

namespace nbdcsi::controller {

struct ControllerOptions {
  // Deadline of each call to a node's datapath. A node that does not answer within it makes the
  // CSI call UNAVAILABLE (or DEADLINE_EXCEEDED), so the sidecar retries.
  std::chrono::milliseconds datapath_timeout = std::chrono::seconds(30);
  // CreateVolume without a capacity_range (or with required_bytes 0 and no limit).
  uint64_t default_volume_bytes = uint64_t{1} << 30;
};


class ControllerImpl {
 public:
  ControllerImpl(NodeRegistry& registry, ControllerOptions opts);
  ~ControllerImpl();

  ::grpc::Status CreateVolume(const ::csi::v1::CreateVolumeRequest& req,
                              ::csi::v1::CreateVolumeResponse* resp);
  ::grpc::Status DeleteVolume(const ::csi::v1::DeleteVolumeRequest& req);
  ::grpc::Status ValidateVolumeCapabilities(const ::csi::v1::ValidateVolumeCapabilitiesRequest& req,
                                            ::csi::v1::ValidateVolumeCapabilitiesResponse* resp);
  ::grpc::Status ListVolumes(const ::csi::v1::ListVolumesRequest& req,
                             ::csi::v1::ListVolumesResponse* resp);
  ::grpc::Status GetCapacity(const ::csi::v1::GetCapacityRequest& req,
                             ::csi::v1::GetCapacityResponse* resp);
  ::grpc::Status GetCapabilities(::csi::v1::ControllerGetCapabilitiesResponse* resp);
  ::grpc::Status CreateSnapshot(const ::csi::v1::CreateSnapshotRequest& req,
                                ::csi::v1::CreateSnapshotResponse* resp);
  ::grpc::Status DeleteSnapshot(const ::csi::v1::DeleteSnapshotRequest& req);
  ::grpc::Status ListSnapshots(const ::csi::v1::ListSnapshotsRequest& req,
                               ::csi::v1::ListSnapshotsResponse* resp);
  ::grpc::Status ExpandVolume(const ::csi::v1::ControllerExpandVolumeRequest& req,
                              ::csi::v1::ControllerExpandVolumeResponse* resp);
  ::grpc::Status GetVolume(const ::csi::v1::ControllerGetVolumeRequest& req,
                           ::csi::v1::ControllerGetVolumeResponse* resp);
  ::grpc::Status ModifyVolume(const ::csi::v1::ControllerModifyVolumeRequest& req);

 private:
  NodeRegistry& registry_;
  ControllerOptions opts_;
  // Bytes placed on each node since its last heartbeat: a burst of CreateVolume calls between
  // two heartbeats spreads over the nodes instead of piling onto the one that looked roomiest.
  // Soft state with its own small mutex (placement hints only; the datapath checks capacity).
  class PlacementLedger;
  std::unique_ptr<PlacementLedger> ledger_;
};

// The gRPC Controller service: per-id ABORTED guards around a ControllerImpl over `registry`
// (which must outlive it). ControllerPublishVolume/UnpublishVolume are UNIMPLEMENTED (the
// PUBLISH_UNPUBLISH_VOLUME capability is not advertised: the node attaches its own volumes).
std::unique_ptr<::csi::v1::Controller::Service> MakeControllerService(NodeRegistry& registry,
                                                                      ControllerOptions opts = {});

// The size CreateVolume provisions for `range` (null: none given): required_bytes rounded up to
// kVolumeSizeAlignment, or `dflt` when nothing is required, never below `min_size` (a content
// source's size), within limit_bytes (rounding down to it when only the default overshoots).
// EINVAL: negative bytes or limit < required; ERANGE (OUT_OF_RANGE): no aligned size fits.
StatusOr<uint64_t> VolumeSizeFor(const ::csi::v1::CapacityRange* range, uint64_t dflt,
                                 uint64_t min_size);

// Pagination tokens of ListVolumes/ListSnapshots: an opaque encoding of the last id returned.
// Exposed for the unit tests; nullopt when `token` was not made by EncodePageToken.
std::string EncodePageToken(const std::string& last_id);
std::optional<std::string> DecodePageToken(const std::string& token);

}  // namespace nbdcsi::controller
