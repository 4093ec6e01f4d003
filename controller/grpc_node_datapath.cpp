// NodeDatapath over the generated Datapath stub: a deadline on every call, and the one place where
// a datapath's gRPC code becomes the controller's errno.
#include <grpcpp/client_context.h>
#include <grpcpp/create_channel.h>
#include <grpcpp/support/channel_arguments.h>

#include <utility>

#include "common/grpc_reconnect.h"
#include "common/grpc_status.h"
#include "controller/node_datapath.h"
#include "datapath/api/backup.grpc.pb.h"
#include "datapath/api/datapath.grpc.pb.h"
#include "datapath/api/schedule_proto.h"
#include "datapath/api/target.grpc.pb.h"

namespace nbdcsi::controller {
namespace {

class GrpcNodeDatapath final : public NodeDatapath {
 public:
  GrpcNodeDatapath(std::string node_id, std::shared_ptr<grpc::Channel> channel,
                   std::chrono::milliseconds timeout)
      : node_(std::move(node_id)),
        stub_(dpv1::Datapath::NewStub(channel)),
        freeze_stub_(dpv1::TargetFreeze::NewStub(channel)),
        replicas_stub_(dpv1::TargetReplicas::NewStub(channel)),
        backup_stub_(dpv1::Backups::NewStub(channel)),
        timeout_(timeout) {}

  StatusOr<dpv1::Volume> CreateVolume(const dpv1::CreateVolumeRequest& req) override {
    dpv1::CreateVolumeResponse resp;
    return Then(Call("CreateVolume", [&](auto* c) { return stub_->CreateVolume(c, req, &resp); }),
                [&] { return resp.volume(); });
  }

  Status DeleteVolume(const std::string& name) override {
    dpv1::DeleteVolumeRequest req;
    req.set_name(name);
    dpv1::DeleteVolumeResponse resp;
    return Call("DeleteVolume", [&](auto* c) { return stub_->DeleteVolume(c, req, &resp); });
  }

  StatusOr<dpv1::Volume> ResizeVolume(const std::string& name, uint64_t size_bytes) override {
    dpv1::ResizeVolumeRequest req;
    req.set_name(name);
    req.set_size_bytes(size_bytes);
    dpv1::ResizeVolumeResponse resp;
    return Then(Call("ResizeVolume", [&](auto* c) { return stub_->ResizeVolume(c, req, &resp); }),
                [&] { return resp.volume(); });
  }

  StatusOr<dpv1::Volume> GetVolume(const std::string& name) override {
    dpv1::GetVolumeRequest req;
    req.set_name(name);
    dpv1::GetVolumeResponse resp;
    return Then(Call("GetVolume", [&](auto* c) { return stub_->GetVolume(c, req, &resp); }),
                [&] { return resp.volume(); });
  }

  StatusOr<std::vector<dpv1::Volume>> ListVolumes() override {
    dpv1::ListVolumesRequest req;
    dpv1::ListVolumesResponse resp;
    return Then(
        Call("ListVolumes", [&](auto* c) { return stub_->ListVolumes(c, req, &resp); }),
        [&] { return std::vector<dpv1::Volume>(resp.volumes().begin(), resp.volumes().end()); });
  }

  StatusOr<dpv1::Volume> SetQos(const std::string& name, const dpv1::QosPatch& patch) override {
    dpv1::SetQosRequest req;
    req.set_name(name);
    *req.mutable_patch() = patch;
    dpv1::SetQosResponse resp;
    return Then(Call("SetQos", [&](auto* c) { return stub_->SetQos(c, req, &resp); }),
                [&] { return resp.volume(); });
  }

  StatusOr<dpv1::Volume> SetSchedule(const std::string& name,
                                     const VolumeSchedule& schedule) override {
    dpv1::SetScheduleRequest req;
    req.set_name(name);
    if (!schedule.empty()) datapath::ToProto(schedule, req.mutable_schedule());
    dpv1::SetScheduleResponse resp;
    return Then(
        Call("SetSchedule", [&](auto* c) { return stub_->SetSchedule(c, req, &resp); }),
        [&] { return resp.volume(); });
  }

  StatusOr<dpv1::Snapshot> CreateSnapshot(const std::string& name,
                                          const std::string& source_volume) override {
    dpv1::CreateSnapshotRequest req;
    req.set_name(name);
    req.set_source_volume(source_volume);
    dpv1::CreateSnapshotResponse resp;
    return Then(
        Call("CreateSnapshot", [&](auto* c) { return stub_->CreateSnapshot(c, req, &resp); }),
        [&] { return resp.snapshot(); });
  }

  Status DeleteSnapshot(const std::string& name) override {
    dpv1::DeleteSnapshotRequest req;
    req.set_name(name);
    dpv1::DeleteSnapshotResponse resp;
    return Call("DeleteSnapshot", [&](auto* c) { return stub_->DeleteSnapshot(c, req, &resp); });
  }

  StatusOr<dpv1::Snapshot> GetSnapshot(const std::string& name) override {
    dpv1::GetSnapshotRequest req;
    req.set_name(name);
    dpv1::GetSnapshotResponse resp;
    return Then(Call("GetSnapshot", [&](auto* c) { return stub_->GetSnapshot(c, req, &resp); }),
                [&] { return resp.snapshot(); });
  }

  StatusOr<std::vector<dpv1::Snapshot>> ListSnapshots(const std::string& source_volume) override {
    dpv1::ListSnapshotsRequest req;
    req.set_source_volume(source_volume);
    dpv1::ListSnapshotsResponse resp;
    return Then(
        Call("ListSnapshots", [&](auto* c) { return stub_->ListSnapshots(c, req, &resp); }), [&] {
          return std::vector<dpv1::Snapshot>(resp.snapshots().begin(), resp.snapshots().end());
        });
  }

  StatusOr<dpv1::FreezeTargetResponse> FreezeTarget(const std::string& volume,
                                                    std::chrono::milliseconds lift_after) override {
    dpv1::FreezeTargetRequest req;
    req.set_volume(volume);
    req.set_lift_after_ms(static_cast<uint32_t>(lift_after.count()));
    dpv1::FreezeTargetResponse resp;
    return Then(
        Call("FreezeTarget", [&](auto* c) { return freeze_stub_->FreezeTarget(c, req, &resp); }),
        [&] { return resp; });
  }

  StatusOr<bool> ThawTarget(const std::string& volume, uint64_t freeze_id) override {
    dpv1::ThawTargetRequest req;
    req.set_volume(volume);
    req.set_freeze_id(freeze_id);
    dpv1::ThawTargetResponse resp;
    return Then(
        Call("ThawTarget", [&](auto* c) { return freeze_stub_->ThawTarget(c, req, &resp); }),
        [&] { return resp.thawed(); });
  }

  StatusOr<dpv1::Target> GetTarget(const std::string& volume) override {
    dpv1::GetTargetRequest req;
    req.set_volume(volume);
    dpv1::TargetResponse resp;
    return Then(
        Call("GetTarget", [&](auto* c) { return replicas_stub_->GetTarget(c, req, &resp); }),
        [&] { return resp.target(); });
  }

  StatusOr<dpv1::Target> AddTargetReplica(const std::string& volume, const std::string& node,
                                          uint64_t rate) override {
    dpv1::AddReplicaRequest req;
    req.set_volume(volume);
    req.set_node(node);
    req.set_rate_bytes_per_second(rate);
    dpv1::TargetResponse resp;
    return Then(
        Call("AddReplica", [&](auto* c) { return replicas_stub_->AddReplica(c, req, &resp); }),
        [&] { return resp.target(); });
  }

  StatusOr<dpv1::Target> RemoveTargetReplica(const std::string& volume,
                                             const std::string& node) override {
    dpv1::RemoveReplicaRequest req;
    req.set_volume(volume);
    req.set_node(node);
    dpv1::TargetResponse resp;
    return Then(Call("RemoveReplica",
                     [&](auto* c) { return replicas_stub_->RemoveReplica(c, req, &resp); }),
                [&] { return resp.target(); });
  }

  StatusOr<dpv1::BackupJob> CreateBackup(const dpv1::CreateBackupRequest& req) override {
    dpv1::BackupJobResponse resp;
    return Then(
        Call("CreateBackup", [&](auto* c) { return backup_stub_->CreateBackup(c, req, &resp); }),
        [&] { return resp.job(); });
  }

  StatusOr<dpv1::BackupJob> RestoreBackup(const dpv1::RestoreBackupRequest& req) override {
    dpv1::BackupJobResponse resp;
    return Then(
        Call("RestoreBackup", [&](auto* c) { return backup_stub_->RestoreBackup(c, req, &resp); }),
        [&] { return resp.job(); });
  }

  StatusOr<dpv1::BackupJob> CopyVolume(const dpv1::CopyVolumeRequest& req) override {
    dpv1::BackupJobResponse resp;
    return Then(
        Call("CopyVolume", [&](auto* c) { return backup_stub_->CopyVolume(c, req, &resp); }),
        [&] { return resp.job(); });
  }

  StatusOr<dpv1::BackupJob> GetBackupJob(const std::string& id) override {
    dpv1::GetBackupJobRequest req;
    req.set_id(id);
    dpv1::BackupJobResponse resp;
    return Then(
        Call("GetBackupJob", [&](auto* c) { return backup_stub_->GetBackupJob(c, req, &resp); }),
        [&] { return resp.job(); });
  }

  StatusOr<std::vector<dpv1::BackupJob>> ListBackupJobs() override {
    dpv1::ListBackupJobsRequest req;
    dpv1::ListBackupJobsResponse resp;
    return Then(
        Call("ListBackupJobs",
             [&](auto* c) { return backup_stub_->ListBackupJobs(c, req, &resp); }),
        [&] { return std::vector<dpv1::BackupJob>(resp.jobs().begin(), resp.jobs().end()); });
  }

  StatusOr<dpv1::GetBackupResponse> GetBackup(const dpv1::GetBackupRequest& req) override {
    dpv1::GetBackupResponse resp;
    return Then(Call("GetBackup", [&](auto* c) { return backup_stub_->GetBackup(c, req, &resp); }),
                [&] { return resp; });
  }

  StatusOr<dpv1::DeleteBackupResponse> DeleteBackup(const dpv1::DeleteBackupRequest& req) override {
    dpv1::DeleteBackupResponse resp;
    return Then(
        Call("DeleteBackup", [&](auto* c) { return backup_stub_->DeleteBackup(c, req, &resp); }),
        [&] { return resp; });
  }

 private:
  // The value `get` reads from the response once the call succeeded.
  template <typename G>
  static auto Then(Status s, G get) -> StatusOr<decltype(get())> {
    if (!s.ok()) return s;
    return get();
  }

  // One unary call with the deadline. The datapath's message names the object and the cause;
  // the prefix says which node and call, which the CSI caller cannot otherwise tell.
  template <typename F>
  Status Call(const char* method, F&& rpc) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + timeout_);
    grpc::Status st = rpc(&ctx);
    if (st.ok()) return Status::Ok();
    return Error(GrpcCodeToErrno(st.error_code()), "node {}: {}: {}", node_, method,
                 st.error_message());
  }

  const std::string node_;
  const std::unique_ptr<dpv1::Datapath::Stub> stub_;
  const std::unique_ptr<dpv1::TargetFreeze::Stub> freeze_stub_;
  const std::unique_ptr<dpv1::TargetReplicas::Stub> replicas_stub_;
  const std::unique_ptr<dpv1::Backups::Stub> backup_stub_;
  const std::chrono::milliseconds timeout_;
};

}  // namespace

std::shared_ptr<NodeDatapath> MakeGrpcNodeDatapath(std::string node_id,
                                                   std::shared_ptr<grpc::Channel> channel,
                                                   std::chrono::milliseconds timeout) {
  return std::make_shared<GrpcNodeDatapath>(std::move(node_id), std::move(channel), timeout);
}

NodeDatapathFactory MakeGrpcDatapathFactory(GrpcDatapathOptions opts) {
  return [opts = std::move(opts)](const std::string& node_id, const std::string& address) {
    // TLS checks the datapath's certificate against the node (creds_for_node), or its SANs
    // against the address's host or the override.
    grpc::ChannelArguments args;
    SetPromptReconnect(args);  // a restarted datapath is dialled again within a second
    if (!opts.tls_server_name.empty()) args.SetSslTargetNameOverride(opts.tls_server_name);
    auto creds = opts.creds_for_node ? opts.creds_for_node(node_id) : opts.creds;
    return MakeGrpcNodeDatapath(node_id, grpc::CreateCustomChannel(address, creds, args),
                                opts.timeout);
  };
}

}  // namespace nbdcsi::controller
