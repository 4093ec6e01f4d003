// `nbdctl log-level [LEVEL] [--for DURATION]`: nbd-datapathd's log level at run time
// (datapath/api/logging.proto). Without LEVEL it prints the level and a pending revert.
#pragma once

#include <memory>

#include "tools/nbdctl/command_tree.h"
#include "tools/nbdctl/connection.h"

namespace nbdcsi::nbdctl {

class LoggingCommands {
 public:
  LoggingCommands(CommandTree& tree, const GlobalOptions& global);
  ~LoggingCommands();
  LoggingCommands(const LoggingCommands&) = delete;
  LoggingCommands& operator=(const LoggingCommands&) = delete;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace nbdcsi::nbdctl
