#include "csi/server_flags.h"

#include <CLI/CLI.hpp>

#include "common/log_level.h"

namespace nbdcsi::csi {

void AddCsiServerFlags(CLI::App& app, std::string& log_level, std::string& log_format,
                       std::string& metrics_listen, std::vector<std::string>& allow_uids) {
  app.add_option("--log-level", log_level,
                 LogLevelChoices() + "; changes at run time: SIGUSR1/SIGUSR2")
      ->check(CLI::IsMember(LogLevelNames()))
      ->capture_default_str();
  app.add_option("--log-format", log_format,
                 "text, or json: one object per line with the call's request_id and volume_id")
      ->check(CLI::IsMember({"text", "json"}))
      ->capture_default_str();
  app.add_option("--metrics-listen", metrics_listen,
                 "HOST:PORT (IP address) serving /metrics (Prometheus), /healthz and /readyz; "
                 "off when empty");
  app.add_option("--allow-uid", allow_uids,
                 "A uid that may call the unix CSI socket besides root and this process's own "
                 "(repeatable; others get PERMISSION_DENIED)");
}

}  // namespace nbdcsi::csi
