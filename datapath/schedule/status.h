// What the schedule runner (runner.h) reports about one kind of a volume's schedule: the last
// run and the next fire time. Plain data, so the API service can show it without linking the
// runner.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "common/volume_schedule.h"

namespace nbdcsi::datapath {

struct ScheduleRunStatus {
  std::string kind;  // "snapshot" or "backup"
  std::string cron;
  int64_t last_run_unix_ns = 0;  // 0: never ran
  std::string result;            // "", "ok", "error", "running"
  std::string error;
  std::string made;  // the snapshot or backup the last run made
  uint32_t pruned = 0;
  int64_t next_fire_unix_ns = 0;
  std::string job_id;  // a running backup's job
};

// Every volume's runs (metrics): (volume, run) pairs.
using ScheduleRunsFn =
    std::function<std::vector<std::pair<std::string, ScheduleRunStatus>>()>;

// The runs of a volume's schedule (one per kind `schedule`, the volume's, has; none without).
using ScheduleStatusFn = std::function<std::vector<ScheduleRunStatus>(
    const std::string& volume, const VolumeSchedule& schedule)>;

}  // namespace nbdcsi::datapath
