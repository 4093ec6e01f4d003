#include "tools/nbdctl/logging_render.h"

#include <fmt/format.h>

#include <chrono>

#include "common/duration.h"

namespace nbdcsi::nbdctl {

using nlohmann::json;

json LogLevelJson(const lv1::LogLevelResponse& r) {
  json j = {{"level", r.level()}, {"revert_to", nullptr}, {"revert_in_ms", nullptr}};
  if (!r.previous().empty()) j["previous"] = r.previous();
  if (!r.revert_to().empty()) {
    j["revert_to"] = r.revert_to();
    j["revert_in_ms"] = r.revert_in_ms();
  }
  return j;
}

std::string LogLevelText(const lv1::LogLevelResponse& r) {
  std::string out = "Log level: ";
  if (!r.previous().empty()) out += r.previous() + " -> ";
  out += r.level();
  if (!r.revert_to().empty()) {
    // Rounded up: "in 10m" right after `--for 10m`, never "in 9m59s".
    const int64_t s = (static_cast<int64_t>(r.revert_in_ms()) + 999) / 1000;
    out +=
        fmt::format(" (back to {} in {})", r.revert_to(), FormatDuration(std::chrono::seconds(s)));
  }
  return out + "\n";
}

}  // namespace nbdcsi::nbdctl
