#include "common/duration.h"

#include <cctype>
#include <cstdint>
#include <limits>

namespace nbdcsi {

StatusOr<std::chrono::milliseconds> ParseDuration(std::string_view text) {
  auto bad = [&](std::string_view why) {
    return Error(EINVAL, "duration \"{}\": {} (e.g. 90s, 10m, 1h30m)", text, why);
  };
  if (text.empty()) return bad("empty");
  constexpr int64_t kMax = std::numeric_limits<int64_t>::max();
  int64_t total = 0;
  size_t i = 0;
  while (i < text.size()) {
    if (!std::isdigit(static_cast<unsigned char>(text[i]))) return bad("want NUMBER UNIT pairs");
    int64_t n = 0;
    for (; i < text.size() && std::isdigit(static_cast<unsigned char>(text[i])); ++i) {
      const int d = text[i] - '0';
      if (n > (kMax - d) / 10) return bad("too large");
      n = n * 10 + d;
    }
    size_t j = i;
    while (j < text.size() && std::isalpha(static_cast<unsigned char>(text[j]))) ++j;
    const std::string_view unit = text.substr(i, j - i);
    i = j;
    int64_t ms_per;
    if (unit == "ms") {
      ms_per = 1;
    } else if (unit == "s") {
      ms_per = 1000;
    } else if (unit == "m") {
      ms_per = 60'000;
    } else if (unit == "h") {
      ms_per = 3'600'000;
    } else if (unit == "d") {
      ms_per = 86'400'000;
    } else if (unit.empty()) {
      return bad("a unit is required: ms, s, m, h or d");
    } else {
      return bad("unknown unit \"" + std::string(unit) + "\": want ms, s, m, h or d");
    }
    if (n > kMax / ms_per || total > kMax - n * ms_per) return bad("too large");
    total += n * ms_per;
  }
  return std::chrono::milliseconds(total);
}

std::string FormatDuration(std::chrono::milliseconds d) {
  int64_t ms = d.count();
  if (ms < 0) return "-" + FormatDuration(-d);
  if (ms < 1000) return ms == 0 ? "0s" : fmt::format("{}ms", ms);
  int64_t s = ms / 1000;
  const int64_t days = s / 86400;
  const int64_t h = s / 3600 % 24;
  const int64_t m = s / 60 % 60;
  s %= 60;
  std::string out;
  if (days) out += fmt::format("{}d", days);
  if (h) out += fmt::format("{}h", h);
  if (m) out += fmt::format("{}m", m);
  if (s || out.empty()) out += fmt::format("{}s", s);
  return out;
}

}  // namespace nbdcsi
