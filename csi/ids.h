// CSI volume and snapshot ids, and the pool names behind them.
//
//   volume id            = "v1:<node-id>:<pool-volume-name>"
//   replicated volume id = "r1:<pool-volume-name>"   (issue 16: StorageClass replicas >= 2)
//   snapshot id          = "s1:<node-id>:<pool-snapshot-name>"
//   backup snapshot id   = "b1:s3://<bucket>/<prefix>#<backup-name>"   (issue 18)
//
// A v1 or s1 id alone says which node's pool holds the object, so the stateless controller can
// route every call without a lookup table. An r1 volume lives on several nodes, which the
// cluster state in etcd names (common/cluster/cluster_store.h); every replica keeps it under the
// same pool name, and any node may stage it (through a target, datapath/replica/target.h). The
// "v1"/"s1" prefix versions the format: a later layout gets a new prefix and old ids keep parsing.
#pragma once

#include <cstddef>
#include <string>
#include <string_view>

#include "common/status.h"

namespace nbdcsi::csi {

// Pool names made here stay this short so that ids stay well under CSI's 128-byte string limit
// for the node names seen in practice (the pool itself allows 128).
inline constexpr size_t kMaxPoolNameLen = 64;
// Kubernetes node names are DNS subdomains.
inline constexpr size_t kMaxNodeIdLen = 253;

struct VolumeRef {
  std::string node_id;
  std::string pool_name;
  bool operator==(const VolumeRef&) const = default;
};
struct SnapshotRef {
  std::string node_id;
  std::string pool_name;
  bool operator==(const SnapshotRef&) const = default;
};

// A Kubernetes node name: 1..253 bytes of [a-z0-9.-], starting and ending with [a-z0-9].
// EINVAL names the id and the rule broken. The same check as common/node_id.h (the datapath
// registers under it), so every registered node makes parseable ids.
Status ValidateNodeId(std::string_view node_id);
// The pool's name rules (A-Z a-z 0-9 . _ -, not starting with '.' or '-'), at most
// kMaxPoolNameLen bytes. `kind` ("volume", "snapshot") starts the message.
Status ValidatePoolName(std::string_view kind, std::string_view name);

// Both parts must be valid (callers format ids only from validated parts; an invalid part here
// is a bug, and the id would not parse back): EINVAL then.
StatusOr<std::string> FormatVolumeId(std::string_view node_id, std::string_view pool_name);
StatusOr<std::string> FormatSnapshotId(std::string_view node_id, std::string_view pool_name);

// EINVAL with a message that quotes the id and says why it is not one of ours.
StatusOr<VolumeRef> ParseVolumeId(std::string_view id);

// Replicated volumes: "r1:" + a valid pool name (EINVAL otherwise, as above).
StatusOr<std::string> FormatReplicatedVolumeId(std::string_view pool_name);
StatusOr<std::string> ParseReplicatedVolumeId(std::string_view id);
// True when `id` starts with "r1:" (whether the rest is valid is ParseReplicatedVolumeId's call).
bool IsReplicatedVolumeId(std::string_view id);
StatusOr<SnapshotRef> ParseSnapshotId(std::string_view id);

// A snapshot kept in object storage (a VolumeSnapshotClass with backupTarget): the target's URL
// and the backup's name there. It names no node, so any cluster that reaches the bucket can use
// it (a pre-provisioned VolumeSnapshotContent's snapshotHandle); endpoint, region and
// credentials come with each call's secrets.
struct BackupRef {
  std::string url;   // "s3://bucket/prefix"
  std::string name;  // a pool name (the backup's manifest is PREFIX/manifests/NAME.json)
  bool operator==(const BackupRef&) const = default;
};
// CSI's size limit for ids (and every string field): the whole id must fit.
inline constexpr size_t kMaxIdLen = 128;
bool IsBackupSnapshotId(std::string_view id);  // starts with "b1:"
// EINVAL: a url that is not "s3://" + a bucket (+ optional prefix) without '#', an invalid name,
// or an id longer than kMaxIdLen (the message says how long and why).
StatusOr<std::string> FormatBackupSnapshotId(std::string_view url, std::string_view name);
StatusOr<BackupRef> ParseBackupSnapshotId(std::string_view id);

// The pool name for a CSI CreateVolume / CreateSnapshot name: the name itself when it is a valid
// pool name of at most kMaxPoolNameLen bytes ("pvc-<uuid>", "snapshot-<uuid>"), otherwise
// "h-" + the first 32 hex digits of SHA-256(name). Deterministic, which is what makes
// CreateVolume idempotent: a retry finds the volume under the same name. EINVAL for an empty
// name.
StatusOr<std::string> PoolNameForCsiName(std::string_view csi_name);

}  // namespace nbdcsi::csi
