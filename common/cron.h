// Standard 5-field cron expressions, always in UTC: "minute hour day-of-month month day-of-week".
// Used by recurring snapshot and backup schedules (StorageClass snapshotSchedule/backupSchedule,
// nbdctl volume schedule); the controller validates with it, nbd-datapathd fires with it.
//
// Each field: `*`, a number, a range `a-b`, a step `*/n` or `a-b/n` or `a/n` (from a to the
// field's end), or a comma list of those. Months take jan..dec, days of week sun..sat (case
// insensitive; names also in ranges); day of week 7 is Sunday like 0. The macros @yearly
// (@annually), @monthly, @weekly, @daily (@midnight) and @hourly are accepted.
// Day rule (Vixie cron, POSIX): when both day-of-month and day-of-week are restricted (neither
// starts with `*`), a day matches when EITHER matches; otherwise both must (the `*` one always
// does). An expression that can never fire ("0 0 31 2 *") is refused.
#pragma once

#include <bitset>
#include <cstdint>
#include <optional>
#include <string>

#include "common/status.h"

namespace nbdcsi {

struct CronSpec {
  std::bitset<60> minutes;
  std::bitset<24> hours;
  std::bitset<32> days;        // 1..31
  std::bitset<13> months;      // 1..12
  std::bitset<7> weekdays;     // 0..6, Sunday = 0
  bool days_star = false;      // day-of-month field started with '*'
  bool weekdays_star = false;  // day-of-week field started with '*'

  // The first fire time strictly after `after_unix_s` (seconds since the epoch, UTC), on a
  // whole minute. nullopt only past year 9999 (never for a spec ParseCron accepted, within it).
  std::optional<int64_t> Next(int64_t after_unix_s) const;
  // Whether the minute that holds `unix_s` is a fire time.
  bool Matches(int64_t unix_s) const;
};

// EINVAL with the field and the reason: "field 2 (hour): 24 is out of range 0-23".
StatusOr<CronSpec> ParseCron(const std::string& expr);

// UTC calendar helpers (proleptic Gregorian), exposed for names and tests.
struct CivilTime {
  int year = 1970, month = 1, day = 1, hour = 0, minute = 0, weekday = 4;  // weekday: Sun = 0
};
CivilTime ToCivil(int64_t unix_s);
int64_t FromCivil(int year, int month, int day, int hour = 0, int minute = 0);
// "20261207T0545" (UTC): sorts by time as text.
std::string CompactUtc(int64_t unix_s);
// "2026-12-07T05:45:00Z".
std::string IsoUtc(int64_t unix_s);

}  // namespace nbdcsi
