// The gRPC Backups service (datapath/api/backup.proto) over BackupJobs. Registered on the same
// server as the Datapath service (StartApiServer's extra services).
#pragma once

#include <grpcpp/impl/codegen/service_type.h>

#include <memory>

#include "datapath/backup/jobs.h"

namespace nbdcsi::datapath {

// `jobs` must outlive the service. Every handler returns quickly: backups and restores run on
// the jobs' own threads; list, inspect and delete make a few object-store calls.
std::unique_ptr<grpc::Service> MakeBackupService(backup::BackupJobs& jobs);

}  // namespace nbdcsi::datapath
