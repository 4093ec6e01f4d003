// `nbdctl csi`: a CSI client for people (in the spirit of gocsi's csc), to drive
// nbd-csi-controller and nbd-csi-node by hand: identity, controller and node calls with table or
// JSON output (README.md lists the commands and the JSON keys). One function per command,
// registered in a CommandTree.
#pragma once

#include <memory>

#include "tools/nbdctl/command_tree.h"
#include "tools/nbdctl/connection.h"

namespace nbdcsi::nbdctl {

class CsiCommands {
 public:
  // Adds `csi` and its subcommands. `csi --timeout` (default 60 s: NodeStageVolume may run mkfs)
  // wins over the global --timeout when both are given; -o is the global one.
  CsiCommands(CommandTree& tree, const GlobalOptions& global);
  ~CsiCommands();
  CsiCommands(const CsiCommands&) = delete;
  CsiCommands& operator=(const CsiCommands&) = delete;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace nbdcsi::nbdctl
