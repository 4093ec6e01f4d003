// Pure helpers of `nbdctl target`: the JSON and table forms of replicated volumes' targets.
// Unit-tested without a server.
#pragma once

#include <nlohmann/json.hpp>
#include <string>

#include "datapath/api/target.pb.h"

namespace nbdcsi::nbdctl {

namespace tv1 = ::nbdcsi::datapath::v1;

nlohmann::json TargetJson(const tv1::Target& t);
// The state in one word: ok, degraded, stopped.
std::string TargetHealth(const tv1::Target& t);
std::string TargetDetails(const tv1::Target& t);
std::string TargetsTable(const tv1::ListTargetsResponse& list);

}  // namespace nbdcsi::nbdctl
