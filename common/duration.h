// Durations as operators type them: "90s", "10m", "1h30m", "500ms". Used where a flag or an API
// field takes a span of time in words (`nbdctl log-level --for 10m`).
#pragma once

#include <chrono>
#include <string>
#include <string_view>

#include "common/status.h"

namespace nbdcsi {

// One or more NUMBER UNIT pairs, largest unit first or in any order ("1h30m", "90s"), units ms,
// s, m, h and d; whole numbers only. EINVAL naming the input otherwise: a bare number (is "10"
// seconds or minutes?), an unknown unit, a negative or overflowing value.
StatusOr<std::chrono::milliseconds> ParseDuration(std::string_view text);

// The inverse, compact: "7d", "1h30m", "9m59s", "450ms", "0s". Sub-second parts are shown only
// below a second (a countdown to the second is what a reader needs).
std::string FormatDuration(std::chrono::milliseconds d);

}  // namespace nbdcsi
