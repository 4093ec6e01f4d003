// Volume schedules between the datapath proto (v1::VolumeSchedule) and common/volume_schedule.h.
// A retain of 0 in the proto means the default (kDefaultScheduleRetain).
#pragma once

#include "common/volume_schedule.h"
#include "datapath/api/datapath.pb.h"

namespace nbdcsi::datapath {

inline VolumeSchedule FromProto(const v1::VolumeSchedule& p) {
  VolumeSchedule s;
  s.snapshot_cron = p.snapshot_cron();
  s.snapshot_retain = p.snapshot_retain() ? p.snapshot_retain() : kDefaultScheduleRetain;
  s.backup_cron = p.backup_cron();
  s.backup_retain = p.backup_retain() ? p.backup_retain() : kDefaultScheduleRetain;
  s.backup_target = p.backup_target();
  return Normalized(s);
}

inline void ToProto(const VolumeSchedule& s, v1::VolumeSchedule* p) {
  p->set_snapshot_cron(s.snapshot_cron);
  p->set_snapshot_retain(s.snapshot_retain);
  p->set_backup_cron(s.backup_cron);
  p->set_backup_retain(s.backup_retain);
  p->set_backup_target(s.backup_target);
}

}  // namespace nbdcsi::datapath
