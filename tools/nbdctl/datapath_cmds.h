// The commands on nbd-datapathd's API (volume, snapshot, stats, pool, attach, detach,
// resize-attachment, attachments): one function per command, registered in a CommandTree.
#pragma once

#include <memory>
#include <string>

#include "tools/nbdctl/command_tree.h"
#include "tools/nbdctl/connection.h"

namespace nbdcsi::nbdctl {

class DatapathCommands {
 public:
  DatapathCommands(CommandTree& tree, const GlobalOptions& global);
  ~DatapathCommands();
  DatapathCommands(const DatapathCommands&) = delete;
  DatapathCommands& operator=(const DatapathCommands&) = delete;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace nbdcsi::nbdctl
