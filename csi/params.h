// StorageClass parameters (CreateVolume.parameters) and VolumeAttributesClass parameters
// (ControllerModifyVolume.mutable_parameters): the QoS keys. See the table in README.md.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "common/qos_fields.h"
#include "common/status.h"
#include "common/volume_schedule.h"

namespace nbdcsi::csi {

// Each field is set only when its key was given. Values are per second (bytes per second for the
// Bps keys); 0 = no limit. One member per row of common/qos_fields.h, named like the proto field.
struct QosParameters {
#define NBDCSI_QOS_MEMBER(f, key, flag, kind, help) std::optional<QosValue<QosKind::kind>> f;
  NBDCSI_QOS_FIELDS(NBDCSI_QOS_MEMBER)
#undef NBDCSI_QOS_MEMBER
  bool empty() const;
  bool operator==(const QosParameters&) const = default;
};

// The accepted keys in table order (common/qos_fields.h): maxIops maxReadIops maxWriteIops maxBps
// maxReadBps maxWriteBps iopsPerGiB bpsPerGiB burstMs.
const std::vector<std::string>& QosParameterKeys();

// Keys prefixed "csi.storage.k8s.io/" are skipped (the external-provisioner's own). IOPS keys and
// burstMs take a decimal integer; Bps keys take an integer or a Kubernetes quantity ("100Mi",
// "1G"). EINVAL: an unknown key ("unknown parameter \"maxIOPS\"; known: maxIops, ...") or a bad
// value ("parameter maxBps: bad value \"fast\": ...").
StatusOr<QosParameters> ParseQosParameters(const std::map<std::string, std::string>& params);

// The StorageClass key for node-independent volumes (issue 16): how many nodes keep a copy.
inline constexpr std::string_view kReplicasKey = "replicas";
inline constexpr int kMaxReplicas = 3;

// Recurring snapshots and backups (issue 18), run by the node's nbd-datapathd:
//   snapshotSchedule  5-field cron, UTC (common/cron.h)   snapshotRetain  1..1000, default 7
//   backupSchedule    5-field cron, UTC                    backupRetain    1..1000, default 7
//   backupTarget      s3://BUCKET[/PREFIX]: required with backupSchedule, refused without it
// A retain key without its schedule is refused (it would do nothing). Schedules on replicated
// volumes (replicas >= 2) are refused: not supported yet.
inline constexpr std::string_view kSnapshotScheduleKey = "snapshotSchedule";
inline constexpr std::string_view kSnapshotRetainKey = "snapshotRetain";
inline constexpr std::string_view kBackupScheduleKey = "backupSchedule";
inline constexpr std::string_view kBackupRetainKey = "backupRetain";
inline constexpr std::string_view kBackupTargetKey = "backupTarget";

// CreateVolume.parameters: the QoS keys above, `replicas` (a decimal 1..kMaxReplicas, default
// 1; 1 is the local single-node volume) and the schedule keys. Not mutable: ControllerModifyVolume's
// mutable_parameters go through ParseQosParameters, which does not know them. EINVAL as above,
// naming the key and the problem.
struct StorageClassParameters {
  QosParameters qos;
  int replicas = 1;
  VolumeSchedule schedule;  // empty() when no schedule key was given
};
StatusOr<StorageClassParameters> ParseStorageClassParameters(
    const std::map<std::string, std::string>& params);

// VolumeAttributesClass parameters (the mutable_parameters of CreateVolume and
// ControllerModifyVolume): the QoS keys, and the schedule keys. A class that gives any schedule
// key gives the volume's whole new schedule (the same rules as in a StorageClass: a retain without
// its schedule, a backupSchedule without backupTarget are refused); one that gives none leaves
// the schedule as it is. EINVAL as above.
struct AttributesClassParameters {
  QosParameters qos;
  std::optional<VolumeSchedule> schedule;
};
StatusOr<AttributesClassParameters> ParseAttributesClassParameters(
    const std::map<std::string, std::string>& params);

}  // namespace nbdcsi::csi
