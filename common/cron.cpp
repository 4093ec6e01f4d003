#include "common/cron.h"

#include <algorithm>
#include <cctype>
#include <charconv>
#include <string_view>
#include <vector>

#include <fmt/format.h>

namespace nbdcsi {
namespace {

// Howard Hinnant's days_from_civil / civil_from_days (public domain algorithms).
int64_t DaysFromCivil(int64_t y, unsigned m, unsigned d) {
  y -= m <= 2;
  const int64_t era = (y >= 0 ? y : y - 399) / 400;
  const unsigned yoe = static_cast<unsigned>(y - era * 400);
  const unsigned doy = (153 * (m + (m > 2 ? -3 : 9)) + 2) / 5 + d - 1;
  const unsigned doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
  return era * 146097 + static_cast<int64_t>(doe) - 719468;
}

void CivilFromDays(int64_t z, int& y, int& m, int& d) {
  z += 719468;
  const int64_t era = (z >= 0 ? z : z - 146096) / 146097;
  const unsigned doe = static_cast<unsigned>(z - era * 146097);
  const unsigned yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
  const int64_t yy = static_cast<int64_t>(yoe) + era * 400;
  const unsigned doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
  const unsigned mp = (5 * doy + 2) / 153;
  d = static_cast<int>(doy - (153 * mp + 2) / 5 + 1);
  m = static_cast<int>(mp < 10 ? mp + 3 : mp - 9);
  y = static_cast<int>(yy + (m <= 2));
}

int64_t FloorDiv(int64_t a, int64_t b) { return a / b - ((a % b != 0) && ((a < 0) != (b < 0))); }

int WeekdayOfDays(int64_t days) {  // 1970-01-01 was a Thursday (4)
  int64_t w = (days + 4) % 7;
  return static_cast<int>(w < 0 ? w + 7 : w);
}

struct FieldDef {
  const char* name;
  int lo, hi;
  const char* const* names;  // lo-based names or null
};

constexpr const char* kMonthNames[] = {"jan", "feb", "mar", "apr", "may", "jun",
                                       "jul", "aug", "sep", "oct", "nov", "dec"};
constexpr const char* kDayNames[] = {"sun", "mon", "tue", "wed", "thu", "fri", "sat"};

constexpr FieldDef kFields[] = {{"minute", 0, 59, nullptr},
                                {"hour", 0, 23, nullptr},
                                {"day of month", 1, 31, nullptr},
                                {"month", 1, 12, kMonthNames},
                                {"day of week", 0, 7, kDayNames}};

StatusOr<int> ParseValue(std::string_view s, const FieldDef& f, int index) {
  auto err = [&](const std::string& why) {
    return Error(EINVAL, "field {} ({}): {}", index + 1, f.name, why);
  };
  if (s.empty()) return err("empty value");
  if (f.names && std::isalpha(static_cast<unsigned char>(s[0]))) {
    std::string low(s);
    for (char& c : low) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    const int count = f.lo == 1 ? 12 : 7;
    for (int i = 0; i < count; ++i) {
      if (low == f.names[i]) return f.lo + i;
    }
    return err(fmt::format("unknown name \"{}\"", s));
  }
  int v = 0;
  auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  if (ec != std::errc() || p != s.data() + s.size()) {
    return err(fmt::format("\"{}\" is not a number", s));
  }
  if (v < f.lo || v > f.hi) return err(fmt::format("{} is out of range {}-{}", v, f.lo, f.hi));
  return v;
}

// One field into `bits` (indexed by value); `star` is set when it starts with '*'.
Status ParseField(std::string_view text, int index, std::vector<bool>& bits, bool& star) {
  const FieldDef& f = kFields[index];
  star = !text.empty() && text[0] == '*';
  auto err = [&](const std::string& why) {
    return Error(EINVAL, "field {} ({}): {}", index + 1, f.name, why);
  };
  size_t start = 0;
  while (true) {
    size_t comma = text.find(',', start);
    std::string_view item = text.substr(
        start, comma == std::string_view::npos ? std::string_view::npos : comma - start);
    if (item.empty()) return err(fmt::format("empty list item in \"{}\"", text));
    int step = 1;
    bool has_step = false;
    if (size_t slash = item.find('/'); slash != std::string_view::npos) {
      std::string_view st = item.substr(slash + 1);
      auto [p, ec] = std::from_chars(st.data(), st.data() + st.size(), step);
      if (st.empty() || ec != std::errc() || p != st.data() + st.size() || step < 1 ||
          step > f.hi) {
        return err(fmt::format("bad step \"{}\"", st));
      }
      item = item.substr(0, slash);
      has_step = true;
      if (item.empty()) return err("a step needs a range before it");
    }
    int lo = 0, hi = 0;
    if (item == "*") {
      lo = f.lo;
      hi = f.hi;
    } else if (size_t dash = item.find('-', 1); dash != std::string_view::npos) {
      auto a = ParseValue(item.substr(0, dash), f, index);
      if (!a.ok()) return a.status();
      auto b = ParseValue(item.substr(dash + 1), f, index);
      if (!b.ok()) return b.status();
      lo = *a;
      hi = *b;
      if (lo > hi) return err(fmt::format("range {} is backwards", item));
    } else {
      auto a = ParseValue(item, f, index);
      if (!a.ok()) return a.status();
      lo = *a;
      // "a/n" is "from a to the field's end, every n"; a lone value is itself.
      hi = has_step ? f.hi : *a;
    }
    for (int v = lo; v <= hi; v += step) bits[static_cast<size_t>(v)] = true;
    if (comma == std::string_view::npos) break;
    start = comma + 1;
  }
  return Status::Ok();
}

constexpr int kDaysInMonth[] = {0, 31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};

bool DayMatches(const CronSpec& c, int month, int day, int weekday) {
  if (!c.months[static_cast<size_t>(month)]) return false;
  const bool dom = c.days[static_cast<size_t>(day)];
  const bool dow = c.weekdays[static_cast<size_t>(weekday)];
  if (!c.days_star && !c.weekdays_star) return dom || dow;
  return dom && dow;
}

}  // namespace

CivilTime ToCivil(int64_t unix_s) {
  const int64_t days = FloorDiv(unix_s, 86400);
  const int64_t secs = unix_s - days * 86400;
  CivilTime t;
  CivilFromDays(days, t.year, t.month, t.day);
  t.hour = static_cast<int>(secs / 3600);
  t.minute = static_cast<int>(secs % 3600 / 60);
  t.weekday = WeekdayOfDays(days);
  return t;
}

int64_t FromCivil(int year, int month, int day, int hour, int minute) {
  return DaysFromCivil(year, static_cast<unsigned>(month), static_cast<unsigned>(day)) * 86400 +
         hour * 3600 + minute * 60;
}

std::string CompactUtc(int64_t unix_s) {
  CivilTime t = ToCivil(unix_s);
  return fmt::format("{:04}{:02}{:02}T{:02}{:02}", t.year, t.month, t.day, t.hour, t.minute);
}

std::string IsoUtc(int64_t unix_s) {
  CivilTime t = ToCivil(unix_s);
  const int64_t s = unix_s - FloorDiv(unix_s, 60) * 60;
  return fmt::format("{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z", t.year, t.month, t.day, t.hour,
                     t.minute, s);
}

StatusOr<CronSpec> ParseCron(const std::string& expr_in) {
  std::string expr = expr_in;
  static const std::pair<const char*, const char*> kMacros[] = {
      {"@yearly", "0 0 1 1 *"}, {"@annually", "0 0 1 1 *"}, {"@monthly", "0 0 1 * *"},
      {"@weekly", "0 0 * * 0"}, {"@daily", "0 0 * * *"},    {"@midnight", "0 0 * * *"},
      {"@hourly", "0 * * * *"}};
  if (!expr.empty() && expr[0] == '@') {
    bool found = false;
    for (auto [m, e] : kMacros) {
      if (expr == m) {
        expr = e;
        found = true;
      }
    }
    if (!found) {
      return Error(EINVAL,
                   "unknown macro \"{}\" (known: @yearly @monthly @weekly @daily "
                   "@hourly)",
                   expr);
    }
  }
  std::vector<std::string_view> fields;
  std::string_view rest(expr);
  while (!rest.empty()) {
    size_t b = rest.find_first_not_of(" \t");
    if (b == std::string_view::npos) break;
    rest = rest.substr(b);
    size_t e = rest.find_first_of(" \t");
    fields.push_back(rest.substr(0, e));
    rest = e == std::string_view::npos ? std::string_view() : rest.substr(e);
  }
  if (fields.size() != 5) {
    return Error(EINVAL,
                 "\"{}\" has {} fields; a cron expression has 5 (minute hour "
                 "day-of-month month day-of-week, UTC)",
                 expr_in, fields.size());
  }
  CronSpec c;
  std::vector<bool> bits[5] = {std::vector<bool>(60), std::vector<bool>(24), std::vector<bool>(32),
                               std::vector<bool>(13), std::vector<bool>(8)};
  bool star[5] = {};
  for (int i = 0; i < 5; ++i) {
    if (Status s = ParseField(fields[static_cast<size_t>(i)], i, bits[i], star[i]); !s.ok())
      return s;
  }
  for (size_t v = 0; v < 60; ++v) c.minutes[v] = bits[0][v];
  for (size_t v = 0; v < 24; ++v) c.hours[v] = bits[1][v];
  for (size_t v = 1; v < 32; ++v) c.days[v] = bits[2][v];
  for (size_t v = 1; v < 13; ++v) c.months[v] = bits[3][v];
  for (size_t v = 0; v < 7; ++v) c.weekdays[v] = bits[4][v];
  if (bits[4][7]) c.weekdays[0] = true;  // 7 is Sunday too
  c.days_star = star[2];
  c.weekdays_star = star[4];
  // Can some month in the set hold some day in the set? With the OR rule the weekdays fire
  // anyway; with a '*' day-of-week the date alone decides.
  if (c.days_star || !c.weekdays_star) return c;
  for (int m = 1; m <= 12; ++m) {
    if (!c.months[static_cast<size_t>(m)]) continue;
    for (int d = 1; d <= kDaysInMonth[m]; ++d) {
      if (c.days[static_cast<size_t>(d)]) return c;
    }
  }
  return Error(EINVAL, "\"{}\" never fires: no month in it has that day of the month", expr_in);
}

bool CronSpec::Matches(int64_t unix_s) const {
  CivilTime t = ToCivil(unix_s);
  return minutes[static_cast<size_t>(t.minute)] && hours[static_cast<size_t>(t.hour)] &&
         DayMatches(*this, t.month, t.day, t.weekday);
}

std::optional<int64_t> CronSpec::Next(int64_t after_unix_s) const {
  const int64_t start = (FloorDiv(after_unix_s, 60) + 1) * 60;
  int64_t day = FloorDiv(start, 86400);
  int first_minute_of_day = static_cast<int>((start - day * 86400) / 60);
  // Feb 29 with a '*' weekday is at most 8 years away (2096 -> 2104); anything else sooner.
  for (int i = 0; i < 366 * 9; ++i, ++day, first_minute_of_day = 0) {
    int y, m, d;
    CivilFromDays(day, y, m, d);
    if (y > 9999) return std::nullopt;
    if (!DayMatches(*this, m, d, WeekdayOfDays(day))) continue;
    for (int mod = first_minute_of_day; mod < 24 * 60; ++mod) {
      if (hours[static_cast<size_t>(mod / 60)] && minutes[static_cast<size_t>(mod % 60)]) {
        return day * 86400 + mod * 60;
      }
    }
  }
  return std::nullopt;
}

}  // namespace nbdcsi
