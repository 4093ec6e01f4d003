#include "common/volume_schedule.h"

#include <fmt/format.h>

#include "common/cron.h"

namespace nbdcsi {

Status ValidateS3Target(const std::string& url) {
  constexpr std::string_view kScheme = "s3://";
  if (url.rfind(kScheme, 0) != 0) {
    return Error(EINVAL, "\"{}\" is not an s3://BUCKET[/PREFIX] URL", url);
  }
  std::string rest = url.substr(kScheme.size());
  const size_t slash = rest.find('/');
  const std::string bucket = rest.substr(0, slash);
  if (bucket.empty()) return Error(EINVAL, "\"{}\" names no bucket", url);
  if (slash != std::string::npos) {
    const std::string prefix = rest.substr(slash + 1);
    if (prefix.empty() || prefix.back() == '/' || prefix.find("//") != std::string::npos) {
      return Error(EINVAL, "\"{}\": the prefix must not be empty, end with '/' or hold \"//\"",
                   url);
    }
  }
  return Status::Ok();
}

Status ValidateSchedule(const VolumeSchedule& s) {
  if (!s.snapshot_cron.empty()) {
    if (auto c = ParseCron(s.snapshot_cron); !c.ok())
      return Error(EINVAL, "snapshot schedule: {}", c.status().message());
  }
  if (!s.backup_cron.empty()) {
    if (auto c = ParseCron(s.backup_cron); !c.ok())
      return Error(EINVAL, "backup schedule: {}", c.status().message());
  }
  for (auto [what, n] : {std::pair{"snapshot retain", s.snapshot_retain},
                         std::pair{"backup retain", s.backup_retain}}) {
    if (n < 1 || n > kMaxScheduleRetain) {
      return Error(EINVAL, "{}: {} is outside 1..{}", what, n, kMaxScheduleRetain);
    }
  }
  if (!s.backup_cron.empty() && s.backup_target.empty()) {
    return Error(EINVAL, "a backup schedule needs a backup target (s3://BUCKET[/PREFIX])");
  }
  if (s.backup_cron.empty() && !s.backup_target.empty()) {
    return Error(EINVAL, "a backup target is set without a backup schedule");
  }
  if (!s.backup_target.empty()) {
    if (Status st = ValidateS3Target(s.backup_target); !st.ok())
      return Error(EINVAL, "backup target: {}", st.message());
  }
  return Status::Ok();
}

std::string DescribeSchedule(const VolumeSchedule& s) {
  if (s.empty()) return "none";
  std::string out;
  if (!s.snapshot_cron.empty()) {
    out = fmt::format("snapshots \"{}\" keep {}", s.snapshot_cron, s.snapshot_retain);
  }
  if (!s.backup_cron.empty()) {
    out += fmt::format("{}backups \"{}\" keep {} to {}", out.empty() ? "" : "; ", s.backup_cron,
                       s.backup_retain, s.backup_target);
  }
  return out;
}

}  // namespace nbdcsi
