// The flags both CSI binaries (nbd-csi-controller, nbd-csi-node) take for their logging, their
// metrics endpoint and the callers of their unix CSI socket: one name, check and text each.
#pragma once

#include <string>
#include <vector>

namespace CLI {
class App;
}

namespace nbdcsi::csi {

// --log-level, --log-format, --metrics-listen and --allow-uid, into the caller's fields.
void AddCsiServerFlags(CLI::App& app, std::string& log_level, std::string& log_format,
                       std::string& metrics_listen, std::vector<std::string>& allow_uids);

}  // namespace nbdcsi::csi
