// Cron expressions (common/cron.h) and volume schedules (common/volume_schedule.h): what parses,
// what is refused and why, and next-fire times across hour, day, month and year ends, the
// day-of-month / day-of-week OR rule and leap days.
#include "common/cron.h"

#include <gtest/gtest.h>

#include "common/volume_schedule.h"

namespace nbdcsi {
namespace {

int64_t T(int y, int mo, int d, int h = 0, int mi = 0) { return FromCivil(y, mo, d, h, mi); }

std::string NextIso(const std::string& expr, int64_t after) {
  auto c = ParseCron(expr);
  EXPECT_TRUE(c.ok()) << expr << ": " << c.status().message();
  if (!c.ok()) return "parse error";
  auto n = c->Next(after);
  return n ? IsoUtc(*n) : "never";
}

TEST(Cron, CivilConversions) {
  EXPECT_EQ(T(1970, 1, 1), 0);
  EXPECT_EQ(IsoUtc(T(2026, 12, 7, 5, 45) + 17), "2026-12-07T05:45:17Z");
  EXPECT_EQ(CompactUtc(T(2028, 2, 29, 23, 59)), "20280229T2359");
  CivilTime c = ToCivil(T(2026, 12, 7, 5, 45));
  EXPECT_EQ(c.weekday, 1);                                 // a Monday
  EXPECT_EQ(ToCivil(T(2032, 2, 29)).weekday, 0);           // a Sunday
  EXPECT_EQ(ToCivil(T(1969, 12, 31, 23, 59)).year, 1969);  // negative times floor
}

TEST(Cron, ValidExpressions) {
  for (const char* e : {"* * * * *",
                        "*/15 * * * *",
                        "0 3 * * *",
                        "0,30 8-18 * * mon-fri",
                        "5 4 1 jan,JUL *",
                        "0 0 29 2 *",
                        "0 0 * * 7",
                        "0 0 * * 0-7",
                        "1-59/2 */3 1-31/10 * *",
                        "10/20 * * * *",
                        "@hourly",
                        "@daily",
                        "@midnight",
                        "@weekly",
                        "@monthly",
                        "@yearly",
                        "@annually",
                        "  0   1  *  *  *  ",
                        "0 0 31 * *",
                        "0 0 31 2 mon"}) {
    auto c = ParseCron(e);
    EXPECT_TRUE(c.ok()) << e << ": " << c.status().message();
  }
  auto c = ParseCron("10/20 * * * *");
  ASSERT_TRUE(c.ok());
  EXPECT_TRUE(c->minutes[10] && c->minutes[30] && c->minutes[50]);
  EXPECT_FALSE(c->minutes[0] || c->minutes[20]);
  auto sun = ParseCron("0 0 * * 7");
  ASSERT_TRUE(sun.ok());
  EXPECT_TRUE(sun->weekdays[0]);
}

TEST(Cron, InvalidExpressionsSayWhy) {
  struct Case {
    const char* expr;
    const char* want;
  };
  for (const Case& c : std::vector<Case>{
           {"", "has 0 fields"},
           {"* * * *", "has 4 fields"},
           {"* * * * * *", "has 6 fields"},
           {"60 * * * *", "field 1 (minute): 60 is out of range 0-59"},
           {"* 24 * * *", "field 2 (hour): 24 is out of range 0-23"},
           {"* * 0 * *", "field 3 (day of month): 0 is out of range 1-31"},
           {"* * * 13 *", "field 4 (month): 13 is out of range 1-12"},
           {"* * * * 8", "field 5 (day of week): 8 is out of range 0-7"},
           {"* * * foo *", "field 4 (month): unknown name \"foo\""},
           {"* * * * funday", "unknown name"},
           {"*/0 * * * *", "bad step \"0\""},
           {"*/x * * * *", "bad step"},
           {"/5 * * * *", "a step needs a range"},
           {"5-1 * * * *", "range 5-1 is backwards"},
           {"1,,2 * * * *", "empty list item"},
           {"a * * * *", "\"a\" is not a number"},
           {"-1 * * * *", "field 1 (minute)"},
           {"@reboot", "unknown macro"},
           {"0 0 30 2 *", "never fires"},
           {"0 0 31 4,6,9,11 *", "never fires"},
       }) {
    auto r = ParseCron(c.expr);
    ASSERT_FALSE(r.ok()) << "accepted: " << c.expr;
    EXPECT_EQ(r.status().code(), EINVAL);
    EXPECT_NE(r.status().message().find(c.want), std::string::npos)
        << c.expr << ": " << r.status().message();
  }
}

TEST(Cron, NextFire) {
  const int64_t mon = T(2026, 12, 7, 5, 45);                     // Monday 2026-12-07 05:45:00
  EXPECT_EQ(NextIso("* * * * *", mon), "2026-12-07T05:46:00Z");  // strictly after
  EXPECT_EQ(NextIso("* * * * *", mon + 59), "2026-12-07T05:46:00Z");
  EXPECT_EQ(NextIso("*/15 * * * *", mon), "2026-12-07T06:00:00Z");
  EXPECT_EQ(NextIso("*/15 * * * *", mon - 1), "2026-12-07T05:45:00Z");
  EXPECT_EQ(NextIso("0 3 * * *", mon), "2026-12-08T03:00:00Z");
  EXPECT_EQ(NextIso("30 5 * * *", mon), "2026-12-08T05:30:00Z");
  EXPECT_EQ(NextIso("0 0 * * sun", mon), "2026-12-13T00:00:00Z");
  EXPECT_EQ(NextIso("0 9 * * mon-fri", T(2026, 12, 11, 10)), "2026-12-14T09:00:00Z");
  // Month and year ends.
  EXPECT_EQ(NextIso("0 0 1 * *", T(2026, 12, 31, 23, 59)), "2027-01-01T00:00:00Z");
  EXPECT_EQ(NextIso("59 23 31 * *", T(2026, 12, 31, 23, 59)), "2027-01-31T23:59:00Z");
  EXPECT_EQ(NextIso("0 0 31 * *", T(2027, 1, 31, 1)), "2027-03-31T00:00:00Z");  // no Feb 31
  EXPECT_EQ(NextIso("0 12 * dec *", T(2026, 12, 31, 12)), "2027-12-01T12:00:00Z");
  EXPECT_EQ(NextIso("@yearly", mon), "2027-01-01T00:00:00Z");
  EXPECT_EQ(NextIso("@monthly", mon), "2027-01-01T00:00:00Z");
  // Leap day: the next Feb 29 is 2028; after it, 2032; 2100 is not a leap year.
  EXPECT_EQ(NextIso("0 0 29 2 *", mon), "2028-02-29T00:00:00Z");
  EXPECT_EQ(NextIso("0 0 29 2 *", T(2028, 2, 29)), "2032-02-29T00:00:00Z");
  EXPECT_EQ(NextIso("0 0 29 2 *", T(2096, 3, 1)), "2104-02-29T00:00:00Z");
  EXPECT_EQ(NextIso("0 0 * feb *", T(2028, 2, 28, 12)), "2028-02-29T00:00:00Z");
  EXPECT_EQ(NextIso("0 0 * feb *", T(2027, 2, 28, 12)), "2028-02-01T00:00:00Z");
}

TEST(Cron, DayOfMonthOrDayOfWeek) {
  const int64_t mon = T(2026, 12, 7, 5, 45);
  // Both restricted: either matches. The 13th (a Sunday) or any Friday: Friday the 11th first.
  EXPECT_EQ(NextIso("0 0 13 * fri", mon), "2026-12-11T00:00:00Z");
  EXPECT_EQ(NextIso("0 0 13 * fri", T(2026, 12, 11, 1)), "2026-12-13T00:00:00Z");
  // Day of week '*': the date alone decides (AND with an always-true field).
  EXPECT_EQ(NextIso("0 0 13 * *", mon), "2026-12-13T00:00:00Z");
  // Day of month starting with * (even with a step): AND, so odd days that are Fridays.
  EXPECT_EQ(NextIso("0 0 * * fri", mon), "2026-12-11T00:00:00Z");
  EXPECT_EQ(NextIso("0 0 */2 * fri", mon), "2026-12-11T00:00:00Z");
  // Feb 29 or a Monday of February: the first Monday of Feb 2027, not the leap day of 2028.
  EXPECT_EQ(NextIso("0 0 29 2 mon", mon), "2027-02-01T00:00:00Z");
  auto c = ParseCron("0 0 13 * fri");
  ASSERT_TRUE(c.ok());
  EXPECT_TRUE(c->Matches(T(2027, 8, 13)));      // Friday the 13th
  EXPECT_TRUE(c->Matches(T(2026, 12, 18, 0)));  // a Friday
  EXPECT_FALSE(c->Matches(T(2026, 12, 17, 0)));
}

TEST(VolumeScheduleRules, Validate) {
  VolumeSchedule s;
  EXPECT_TRUE(ValidateSchedule(s).ok());
  EXPECT_TRUE(s.empty());
  s.snapshot_cron = "@hourly";
  EXPECT_TRUE(ValidateSchedule(s).ok());
  s.snapshot_retain = 0;
  EXPECT_NE(ValidateSchedule(s).message().find("snapshot retain: 0 is outside 1..1000"),
            std::string::npos);
  s.snapshot_retain = 1000;
  s.backup_cron = "0 1 * * *";
  EXPECT_NE(ValidateSchedule(s).message().find("needs a backup target"), std::string::npos);
  s.backup_target = "s3://bucket/a/b";
  EXPECT_TRUE(ValidateSchedule(s).ok()) << ValidateSchedule(s).message();
  s.backup_retain = 1001;
  EXPECT_FALSE(ValidateSchedule(s).ok());
  s.backup_retain = 1;
  s.backup_cron = "bad";
  EXPECT_NE(ValidateSchedule(s).message().find("backup schedule:"), std::string::npos);
  s.backup_cron = "";
  EXPECT_NE(ValidateSchedule(s).message().find("without a backup schedule"), std::string::npos);
  EXPECT_TRUE(ValidateS3Target("s3://b").ok());
  EXPECT_FALSE(ValidateS3Target("s3://").ok());
  EXPECT_FALSE(ValidateS3Target("s3://b/").ok());
  EXPECT_FALSE(ValidateS3Target("s3://b/a//c").ok());
  EXPECT_FALSE(ValidateS3Target("gs://b").ok());
}

}  // namespace
}  // namespace nbdcsi
