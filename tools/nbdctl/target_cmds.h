// `nbdctl target ...`: the targets of replicated volumes on one nbd-datapathd
// (datapath/api/target.proto): open (claim the volume and serve it as VOLUME@target), close,
// inspect, list.
#pragma once

#include <memory>

#include "tools/nbdctl/command_tree.h"
#include "tools/nbdctl/connection.h"

namespace nbdcsi::nbdctl {

class TargetCommands {
 public:
  TargetCommands(CommandTree& tree, const GlobalOptions& global);
  ~TargetCommands();
  TargetCommands(const TargetCommands&) = delete;
  TargetCommands& operator=(const TargetCommands&) = delete;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace nbdcsi::nbdctl
