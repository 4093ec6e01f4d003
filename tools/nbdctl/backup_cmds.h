// `nbdctl backup ...`: backups of snapshots and volumes to S3-compatible object storage, run as
// jobs in nbd-datapathd (datapath/api/backup.proto). Credentials come from the environment
// (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN) or --credentials-file; they are
// sent to the daemon with each call and never printed.
#pragma once

#include <memory>

#include "tools/nbdctl/command_tree.h"
#include "tools/nbdctl/connection.h"

namespace nbdcsi::nbdctl {

class BackupCommands {
 public:
  BackupCommands(CommandTree& tree, const GlobalOptions& global);
  ~BackupCommands();
  BackupCommands(const BackupCommands&) = delete;
  BackupCommands& operator=(const BackupCommands&) = delete;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace nbdcsi::nbdctl
