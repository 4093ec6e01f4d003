// A volume's recurring snapshot and backup schedule (issue 18): what the StorageClass parameters
// snapshotSchedule/snapshotRetain/backupSchedule/backupRetain/backupTarget and `nbdctl volume
// schedule` set, what the pool stores with the volume and nbd-datapathd's schedule runner fires.
// The one validator: the controller checks parameters with it (naming the StorageClass keys),
// the pool checks what it stores with it (naming the fields).
#pragma once

#include <cstdint>
#include <string>

#include "common/status.h"

namespace nbdcsi {

inline constexpr uint32_t kDefaultScheduleRetain = 7;
inline constexpr uint32_t kMaxScheduleRetain = 1000;

struct VolumeSchedule {
  std::string snapshot_cron;  // "": no recurring snapshots
  uint32_t snapshot_retain = kDefaultScheduleRetain;
  std::string backup_cron;  // "": no recurring backups
  uint32_t backup_retain = kDefaultScheduleRetain;
  std::string backup_target;  // s3://bucket[/prefix]; required with backup_cron

  bool empty() const { return snapshot_cron.empty() && backup_cron.empty(); }
  bool operator==(const VolumeSchedule&) const = default;
};

// One spelling of "no schedule": an empty() schedule whatever its retains say, so that what is
// stored and compared does not depend on fields that mean nothing without a cron expression.
inline VolumeSchedule Normalized(const VolumeSchedule& s) {
  return s.empty() ? VolumeSchedule{} : s;
}

// EINVAL naming the field and the problem: a cron expression ParseCron refuses, a retain count
// outside 1..kMaxScheduleRetain, a backup schedule without a target, a target that is not
// s3://BUCKET[/PREFIX], or a target without a backup schedule. An empty schedule is valid.
Status ValidateSchedule(const VolumeSchedule& s);

// The bucket part of an s3:// target must be non-empty; the prefix must not start or end with '/'
// and must not hold "//" (it becomes object keys). EINVAL with the reason.
Status ValidateS3Target(const std::string& url);

// "snapshots <cron> keep N; backups <cron> keep N to <target>" or "none" (logs, nbdctl).
std::string DescribeSchedule(const VolumeSchedule& s);

}  // namespace nbdcsi
