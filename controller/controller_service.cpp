// The edge of the CSI Controller service: the gRPC methods, each a per-id in-flight guard (where
// the spec wants ABORTED for a concurrent call) around ControllerImpl, whose errno Status becomes
// the CSI gRPC status here and nowhere else (ToCsiStatus).
#include "controller/controller_service.h"

#include <string>
#include <utility>

#include "common/name_locks.h"
#include "controller/csi_status.h"

namespace nbdcsi::controller {

namespace v1 = ::csi::v1;

ControllerImpl::ControllerImpl(NodeRegistry& registry, ControllerOptions opts)
    : nodes_(registry),
      opts_(opts),
      replicated_(opts_.cluster, nodes_, ledger_),
      backups_(nodes_, opts_.backup) {}

namespace {

class ControllerService final : public v1::Controller::Service {
 public:
  ControllerService(NodeRegistry& reg, ControllerOptions opts) : impl_(reg, opts) {}

  grpc::Status CreateVolume(grpc::ServerContext*, const v1::CreateVolumeRequest* req,
                            v1::CreateVolumeResponse* resp) override {
    return Locked("volume-name/" + req->name(), req->name(),
                  [&] { return impl_.CreateVolume(*req, resp); });
  }
  grpc::Status DeleteVolume(grpc::ServerContext*, const v1::DeleteVolumeRequest* req,
                            v1::DeleteVolumeResponse*) override {
    return Locked("volume/" + req->volume_id(), req->volume_id(),
                  [&] { return impl_.DeleteVolume(*req); });
  }
  grpc::Status ControllerPublishVolume(grpc::ServerContext*,
                                       const v1::ControllerPublishVolumeRequest*,
                                       v1::ControllerPublishVolumeResponse*) override {
    return ToCsiStatus(
        Err(ENOTSUP, "ControllerPublishVolume is not supported: the node attaches its volumes"));
  }
  grpc::Status ControllerUnpublishVolume(grpc::ServerContext*,
                                         const v1::ControllerUnpublishVolumeRequest*,
                                         v1::ControllerUnpublishVolumeResponse*) override {
    return ToCsiStatus(
        Err(ENOTSUP, "ControllerUnpublishVolume is not supported: the node attaches its volumes"));
  }
  grpc::Status ValidateVolumeCapabilities(grpc::ServerContext*,
                                          const v1::ValidateVolumeCapabilitiesRequest* req,
                                          v1::ValidateVolumeCapabilitiesResponse* resp) override {
    return ToCsiStatus(impl_.ValidateVolumeCapabilities(*req, resp));
  }
  grpc::Status ListVolumes(grpc::ServerContext*, const v1::ListVolumesRequest* req,
                           v1::ListVolumesResponse* resp) override {
    return ToCsiStatus(impl_.ListVolumes(*req, resp));
  }
  grpc::Status GetCapacity(grpc::ServerContext*, const v1::GetCapacityRequest* req,
                           v1::GetCapacityResponse* resp) override {
    return ToCsiStatus(impl_.GetCapacity(*req, resp));
  }
  grpc::Status ControllerGetCapabilities(grpc::ServerContext*,
                                         const v1::ControllerGetCapabilitiesRequest*,
                                         v1::ControllerGetCapabilitiesResponse* resp) override {
    return ToCsiStatus(impl_.GetCapabilities(resp));
  }
  grpc::Status CreateSnapshot(grpc::ServerContext*, const v1::CreateSnapshotRequest* req,
                              v1::CreateSnapshotResponse* resp) override {
    return Locked("snapshot-name/" + req->name(), req->name(),
                  [&] { return impl_.CreateSnapshot(*req, resp); });
  }
  grpc::Status DeleteSnapshot(grpc::ServerContext*, const v1::DeleteSnapshotRequest* req,
                              v1::DeleteSnapshotResponse*) override {
    return Locked("snapshot/" + req->snapshot_id(), req->snapshot_id(),
                  [&] { return impl_.DeleteSnapshot(*req); });
  }
  grpc::Status ListSnapshots(grpc::ServerContext*, const v1::ListSnapshotsRequest* req,
                             v1::ListSnapshotsResponse* resp) override {
    return ToCsiStatus(impl_.ListSnapshots(*req, resp));
  }
  grpc::Status ControllerExpandVolume(grpc::ServerContext*,
                                      const v1::ControllerExpandVolumeRequest* req,
                                      v1::ControllerExpandVolumeResponse* resp) override {
    return Locked("volume/" + req->volume_id(), req->volume_id(),
                  [&] { return impl_.ExpandVolume(*req, resp); });
  }
  grpc::Status ControllerGetVolume(grpc::ServerContext*, const v1::ControllerGetVolumeRequest* req,
                                   v1::ControllerGetVolumeResponse* resp) override {
    return ToCsiStatus(impl_.GetVolume(*req, resp));
  }
  grpc::Status ControllerModifyVolume(grpc::ServerContext*,
                                      const v1::ControllerModifyVolumeRequest* req,
                                      v1::ControllerModifyVolumeResponse*) override {
    return Locked("volume/" + req->volume_id(), req->volume_id(),
                  [&] { return impl_.ModifyVolume(*req); });
  }

 private:
  // A second call on the same id while one is in flight is ABORTED (CSI), never queued: the
  // sidecar retries it with backoff.
  template <typename F>
  grpc::Status Locked(const std::string& key, const std::string& shown, F&& f) {
    auto guard = inflight_.TryAcquire(key);
    if (!guard)
      return ToCsiStatus(Err(EALREADY, "an operation on {} is already in progress", shown));
    return ToCsiStatus(f());
  }

  ControllerImpl impl_;
  NameLocks inflight_;
};

}  // namespace

std::unique_ptr<v1::Controller::Service> MakeControllerService(NodeRegistry& registry,
                                                               ControllerOptions opts) {
  return std::make_unique<ControllerService>(registry, opts);
}

}  // namespace nbdcsi::controller
