// Snapshots kept in object storage (issue 18): the Kubernetes face of the datapaths' Backups
// service (datapath/api/backup.proto).
//
// - A VolumeSnapshotClass with `backupTarget: s3://BUCKET/PREFIX` makes backup snapshots:
//   CreateSnapshot cuts the local snapshot as for any class, then the node that holds it backs it
//   up (a job in its nbd-datapathd); the answer is ready_to_use=false until the backup's manifest
//   is written, and the external-snapshotter calls again until it is ready. Once ready, the local
//   snapshot is removed: the snapshot lives off the node. The id is "b1:<target>#<name>"
//   (csi/ids.h): it names no node, so another cluster can use it in a pre-provisioned
//   VolumeSnapshotContent.
// - CreateVolume from a b1 snapshot restores the backup into a new volume on a node with room
//   (create_volume.cpp), answering ABORTED ("restore running, retry") until the job has ended.
// - DeleteSnapshot of a b1 id deletes the backup (and the chunks no other backup references).
// - Endpoint, region and credentials come with each call's secrets (the snapshotter's and the
//   provisioner's, keys below); they are passed to the datapath and never logged or stored.
#pragma once

#include <chrono>
#include <optional>
#include <string>
#include <string_view>

#include <google/protobuf/map.h>

#include "common/status.h"
#include "controller/nodes.h"
#include "csi/csi.pb.h"
#include "csi/ids.h"
#include "datapath/api/backup.pb.h"

namespace nbdcsi::controller {

// Secret keys: the names of the environment variables nbdctl backup reads.
inline constexpr char kSecretAccessKeyId[] = "AWS_ACCESS_KEY_ID";
inline constexpr char kSecretSecretAccessKey[] = "AWS_SECRET_ACCESS_KEY";
inline constexpr char kSecretSessionToken[] = "AWS_SESSION_TOKEN";  // optional
inline constexpr char kSecretEndpoint[] = "AWS_ENDPOINT_URL";       // optional: AWS itself
inline constexpr char kSecretRegion[] = "AWS_REGION";               // optional: us-east-1
// Optional: client-side encryption (datapath/backup/crypto.h); a target is encrypted or not
// from its first backup on, and then every call needs the key.
inline constexpr char kSecretEncryptionKey[] = "NBDCSI_BACKUP_ENCRYPTION_KEY";

// VolumeSnapshotClass parameters.
inline constexpr char kBackupTargetKey[] = "backupTarget";        // s3://BUCKET[/PREFIX]
inline constexpr char kBackupBandwidthKey[] = "backupBandwidth";  // bytes/s, a quantity ("50Mi")

using SecretMap = google::protobuf::Map<std::string, std::string>;

struct BackupClass {
  dpv1::BackupTarget target;  // with endpoint, region and credentials from the secrets
  uint64_t bandwidth_bytes_per_s = 0;
};

// A VolumeSnapshotClass's parameters: nullopt without backupTarget (a local snapshot class).
// EINVAL: an unknown key (the snapshotter's "csi.storage.k8s.io/" keys are skipped), a bad
// target or bandwidth, backupBandwidth without backupTarget, secrets without credentials.
StatusOr<std::optional<BackupClass>> ParseSnapshotClass(
    const google::protobuf::Map<std::string, std::string>& params, const SecretMap& secrets);

// The target `url` with the secrets of a call. EINVAL names the missing key and which secret
// (`which`: "snapshotter", "provisioner", ...) should carry it.
StatusOr<dpv1::BackupTarget> TargetFromSecrets(const std::string& url, const SecretMap& secrets,
                                               std::string_view which);

struct BackupOptions {
  // How long a call waits for a job it started or found before it answers "not yet": long
  // enough that refused credentials or a missing bucket come back from the first call.
  std::chrono::milliseconds wait{3000};
  std::chrono::milliseconds poll{100};
};

// The datapath calls behind the three CSI paths. Stateless: the jobs live in the datapaths, the
// backups in the bucket.
class Backups {
 public:
  Backups(Nodes& nodes, BackupOptions opts) : nodes_(nodes), opts_(opts) {}

  // CreateSnapshot, before anything is cut: true when the backup `name` already exists (a
  // retry after it completed); `out` is then the ready snapshot. EEXIST when it exists from
  // another source. Asks `node` (the source's), or any live node when "".
  StatusOr<bool> Finished(const BackupClass& c, const std::string& name,
                          const std::string& source_pool_name, const std::string& node,
                          ::csi::v1::Snapshot* out);
  // CreateSnapshot, once the local snapshot `name` is cut on `node` (`out` describes it): starts
  // (or finds) the backup and waits a little. `out` becomes the b1 snapshot, ready when the
  // backup is complete (the local snapshot is then removed). A failed job is its error.
  Status Start(const BackupClass& c, const std::string& name, const std::string& node,
               ::csi::v1::Snapshot* out);
  // DeleteSnapshot of a b1 id. EALREADY (ABORTED) while a backup of it still runs on some node.
  Status Delete(const csi::BackupRef& ref, const SecretMap& secrets);
  // ListSnapshots of one b1 id: nothing when the backup does not exist.
  StatusOr<std::optional<::csi::v1::Snapshot>> Get(const csi::BackupRef& ref,
                                                   const SecretMap& secrets);

  // CreateVolume: the backup's manifest, read through any live node (ENOENT: no such backup).
  StatusOr<dpv1::BackupInfo> Inspect(const dpv1::BackupTarget& t, const std::string& name);
  // The newest restore job into `volume` on `node`, if it has one.
  StatusOr<std::optional<dpv1::BackupJob>> RestoreJobOf(const std::string& node,
                                                        const std::string& volume) {
    return JobOf(node, volume, "restore");
  }
  // The newest job of `kind` ("restore", "copy") into `volume` on `node`, if it has one.
  StatusOr<std::optional<dpv1::BackupJob>> JobOf(const std::string& node,
                                                 const std::string& volume,
                                                 std::string_view kind);
  // Polls the job until it ends or opts_.wait passes.
  StatusOr<dpv1::BackupJob> Wait(const std::string& node, dpv1::BackupJob job);
  // Starts the restore on `node` and waits a little: the job as last seen (running, succeeded
  // or failed). ENOSPC from the datapath when the pool has no room.
  StatusOr<dpv1::BackupJob> StartRestore(const std::string& node, const dpv1::BackupTarget& t,
                                         const std::string& name, const std::string& volume);

  // A failed job as the caller's error: its errno (a missing bucket: FAILED_PRECONDITION, not
  // NOT_FOUND, which CSI reserves for the request's own objects), `what` and its message.
  static Status JobError(const dpv1::BackupJob& job, std::string_view what);
  // The ABORTED answer while a restore runs, with its progress.
  static Status RestoreRunning(const dpv1::BackupJob& job, const std::string& node);

 private:
  // A live node to read the bucket through: `preferred` when live, else the first.
  StatusOr<std::string> Reader(const std::string& preferred);

  Nodes& nodes_;
  BackupOptions opts_;
};

}  // namespace nbdcsi::controller
