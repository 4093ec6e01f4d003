// What the controller asks of one node's nbd-datapathd (datapath/api/datapath.proto,
// TargetFreeze of target.proto, and Backups of backup.proto; gRPC over mutual TLS): one method per
// RPC the controller uses. An interface, as the node plugin's node/datapath_client.h is, so that
// placement, idempotency and error mapping are unit-tested against in-process fakes
// (test/controller/fake_datapath.h); MakeGrpcDatapathFactory makes the real clients, and
// NodeRegistry hands them out per registered node.
//
// Errors are errno-style (common/status.h): the datapath's gRPC code through GrpcCodeToErrno, once
// (NOT_FOUND ENOENT, ALREADY_EXISTS EEXIST, RESOURCE_EXHAUSTED ENOSPC, UNAVAILABLE EAGAIN,
// DEADLINE_EXCEEDED ETIMEDOUT, FAILED_PRECONDITION EBUSY, ABORTED EALREADY, INTERNAL EIO, ...),
// with the datapath's message prefixed by the node and the call.
#pragma once

#include <grpcpp/channel.h>
#include <grpcpp/security/credentials.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "common/status.h"
#include "common/volume_schedule.h"
#include "datapath/api/backup.pb.h"
#include "datapath/api/datapath.pb.h"
#include "datapath/api/target.pb.h"

namespace nbdcsi::controller {

namespace dpv1 = ::nbdcsi::datapath::v1;

class NodeDatapath {
 public:
  virtual ~NodeDatapath() = default;

  // Idempotent on the datapath: the same name, size, source and QoS return the existing volume;
  // anything else is EEXIST. ENOSPC: the pool has no room; ENOENT: the source does not exist.
  virtual StatusOr<dpv1::Volume> CreateVolume(const dpv1::CreateVolumeRequest& req) = 0;
  virtual Status DeleteVolume(const std::string& name) = 0;  // ENOENT when it does not exist
  // Grow only (EINVAL for a shrink); the same size is a no-op.
  virtual StatusOr<dpv1::Volume> ResizeVolume(const std::string& name, uint64_t size_bytes) = 0;
  virtual StatusOr<dpv1::Volume> GetVolume(const std::string& name) = 0;
  virtual StatusOr<std::vector<dpv1::Volume>> ListVolumes() = 0;  // sorted by name
  // The volume with the limits now in force.
  virtual StatusOr<dpv1::Volume> SetQos(const std::string& name, const dpv1::QosPatch& patch) = 0;
  // The whole new schedule (an empty one removes it); EINVAL for a bad one, EAGAIN while a copy
  // fills the volume.
  virtual StatusOr<dpv1::Volume> SetSchedule(const std::string& name,
                                             const VolumeSchedule& schedule) = 0;

  // Idempotent: the same name and source return the existing snapshot; another source is EEXIST.
  virtual StatusOr<dpv1::Snapshot> CreateSnapshot(const std::string& name,
                                                  const std::string& source_volume) = 0;
  virtual Status DeleteSnapshot(const std::string& name) = 0;  // ENOENT when it does not exist
  virtual StatusOr<dpv1::Snapshot> GetSnapshot(const std::string& name) = 0;
  // Only those taken from `source_volume`; "" for all. Sorted by name.
  virtual StatusOr<std::vector<dpv1::Snapshot>> ListSnapshots(const std::string& source_volume) = 0;

  // The TargetFreeze service (datapath/api/target.proto), on the node that serves a replicated
  // volume's target: writes held and drained, the in-sync replicas flushed, until ThawTarget or
  // `lift_after` (then the freeze lifts itself). ENOENT: no target of the volume is open there;
  // ETIMEDOUT: the writes in flight did not finish in time (nothing stays frozen).
  virtual StatusOr<dpv1::FreezeTargetResponse> FreezeTarget(
      const std::string& volume, std::chrono::milliseconds lift_after) = 0;
  // Idempotent: false when freeze `freeze_id` was not held any more (thawed, or lifted itself).
  virtual StatusOr<bool> ThawTarget(const std::string& volume, uint64_t freeze_id) = 0;

  // The TargetReplicas service (datapath/api/target.proto), on the node that serves a
  // replicated volume's target: its state, a replica added (recorded out of sync, copied in the
  // background) or removed. ENOENT: no target of the volume is open there. Not pure: fakes that
  // do not serve targets answer ENOTSUP.
  virtual StatusOr<dpv1::Target> GetTarget(const std::string& volume) {
    return Error(ENOTSUP, "GetTarget of {}: not served here", volume);
  }
  virtual StatusOr<dpv1::Target> AddTargetReplica(const std::string& volume,
                                                  const std::string& node, uint64_t rate) {
    return Error(ENOTSUP, "AddReplica {} of {} at {} B/s: not served here", node, volume, rate);
  }
  virtual StatusOr<dpv1::Target> RemoveTargetReplica(const std::string& volume,
                                                     const std::string& node) {
    return Error(ENOTSUP, "RemoveReplica {} of {}: not served here", node, volume);
  }

  // The Backups service (datapath/api/backup.proto): jobs that run in the daemon, and backups in
  // object storage that any node can reach. The requests carry credentials: never log them.
  // CreateBackup of a name and source already running returns that job; of a finished backup of
  // the same source, a job that ends at once (succeeded, nothing uploaded).
  virtual StatusOr<dpv1::BackupJob> CreateBackup(const dpv1::CreateBackupRequest& req) = 0;
  // EEXIST when the volume exists; ENOENT when the backup does not.
  virtual StatusOr<dpv1::BackupJob> RestoreBackup(const dpv1::RestoreBackupRequest& req) = 0;
  // A copy of the volume `export_name` of another node (read over NBD at `endpoint`) into a new
  // volume here (restores and clones across nodes). EAGAIN when the peer cannot be reached,
  // ENOENT when it has no such export, EEXIST when the volume exists, ENOSPC: no room.
  virtual StatusOr<dpv1::BackupJob> CopyVolume(const dpv1::CopyVolumeRequest& req) = 0;
  virtual StatusOr<dpv1::BackupJob> GetBackupJob(const std::string& id) = 0;
  virtual StatusOr<std::vector<dpv1::BackupJob>> ListBackupJobs() = 0;
  // ENOENT when neither the backup nor a job making it (in this daemon) exists.
  virtual StatusOr<dpv1::GetBackupResponse> GetBackup(const dpv1::GetBackupRequest& req) = 0;
  virtual StatusOr<dpv1::DeleteBackupResponse> DeleteBackup(
      const dpv1::DeleteBackupRequest& req) = 0;
};

// Makes the client of node `node_id`, whose datapath API listens on `address` (host:port).
// NodeRegistry calls it once per node and address, under its lock: it must not block or call
// back into the registry.
using NodeDatapathFactory = std::function<std::shared_ptr<NodeDatapath>(
    const std::string& node_id, const std::string& address)>;

struct GrpcDatapathOptions {
  // Used for every channel to a datapath (mutual TLS, or insecure for loopback tests), unless
  // creds_for_node is set.
  std::shared_ptr<grpc::ChannelCredentials> creds;
  // The credentials of the channel to one node: with node binding, ones that accept only a
  // certificate naming that node (TlsCredentials::ChannelToNode).
  std::function<std::shared_ptr<grpc::ChannelCredentials>(const std::string& node_id)>
      creds_for_node;
  // The name the datapaths' certificates must carry (a DNS SAN), instead of the host of each
  // advertised address: lets every datapath share one certificate (e.g. SAN
  // "nbd-datapath.nbd-csi.svc") while advertising its own node IP. "": the address's host.
  // Meant with `creds`: a node certificate names its node, not this name.
  std::string tls_server_name;
  // Deadline of each call. A node that does not answer within it fails the call with ETIMEDOUT
  // (DEADLINE_EXCEEDED), or EAGAIN (UNAVAILABLE) when it cannot be reached at all, so the
  // sidecar retries.
  std::chrono::milliseconds timeout = std::chrono::seconds(30);
};

// The real clients: one channel per node and address, each call with opts.timeout.
NodeDatapathFactory MakeGrpcDatapathFactory(GrpcDatapathOptions opts);

// One client over an existing channel (the factory's building block; tests use it in-process).
std::shared_ptr<NodeDatapath> MakeGrpcNodeDatapath(std::string node_id,
                                                   std::shared_ptr<grpc::Channel> channel,
                                                   std::chrono::milliseconds timeout);

}  // namespace nbdcsi::controller
