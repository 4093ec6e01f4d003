// --log-format of the daemons: "text" (the project's one-line pattern) or "json" (one JSON object
// per line, for log collectors). In JSON every line of a thread that serves a call also carries
// that call's context (request_id, volume_id), from the provider its server installs (the CSI
// logging interceptor), so lines can be joined without parsing messages.
#pragma once

#include <string>
#include <utility>
#include <vector>

#include "common/status.h"

namespace nbdcsi {

// Key/value pairs added to each JSON line logged on the calling thread; empty values are left out.
using LogContextFn = std::vector<std::pair<const char*, std::string>> (*)();

// Applies `format` ("text" or "json") to spdlog's default logger; EINVAL naming the choices
// otherwise (nothing changes).
Status SetLogFormat(const std::string& format);

// The daemons' --log-level (a name CLI11 already checked against LogLevelNames) and --log-format,
// applied at start-up. False, with the reason logged, when the format is unknown: the daemon then
// exits 2.
bool ApplyLogFlags(const std::string& level, const std::string& format);

// The context source for JSON lines (one per process; null: none).
void SetLogContextProvider(LogContextFn fn);

}  // namespace nbdcsi
