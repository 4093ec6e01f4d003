// The single place where an internal errno-style Status becomes a gRPC status.
#pragma once

#include <grpcpp/support/status.h>

#include "common/status.h"

namespace nbdcsi {

grpc::StatusCode ErrnoToGrpcCode(int err);

// Logs nothing; callers log the real cause before the lossy code leaves the process.
inline grpc::Status ToGrpc(const Status& s) {
  if (s.ok()) return grpc::Status::OK;
  return grpc::Status(ErrnoToGrpcCode(s.code()), s.message());
}

}  // namespace nbdcsi
