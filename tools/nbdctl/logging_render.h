// Pure helpers of `nbdctl log-level`: the JSON and text forms of the daemon's log level.
// Unit-tested without a server.
#pragma once

#include <nlohmann/json.hpp>
#include <string>

#include "datapath/api/logging.pb.h"

namespace nbdcsi::nbdctl {

namespace lv1 = ::nbdcsi::datapath::v1;

// {level, previous (a set only, else absent), revert_to (null: none pending), revert_in_ms (null
// likewise)}.
nlohmann::json LogLevelJson(const lv1::LogLevelResponse& r);
// "Log level: debug (back to info in 9m59s)\n", the time rounded up to the second; after a set
// "Log level: info -> debug ...".
std::string LogLevelText(const lv1::LogLevelResponse& r);

}  // namespace nbdcsi::nbdctl
