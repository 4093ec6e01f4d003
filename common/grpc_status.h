// The single place where an internal errno-style Status becomes a gRPC status.
#pragma once

#include <string>

#include <grpcpp/support/status.h>

#include "common/status.h"

namespace nbdcsi {

grpc::StatusCode ErrnoToGrpcCode(int err);

// The inverse, for errors that come back from another of our processes over gRPC and travel on
// as a Status: ErrnoToGrpcCode(GrpcCodeToErrno(c)) == c for every code ErrnoToGrpcCode produces
// (UNAUTHENTICATED becomes PERMISSION_DENIED, UNKNOWN and DATA_LOSS become INTERNAL).
int GrpcCodeToErrno(grpc::StatusCode code);

// "NOT_FOUND", "UNAVAILABLE", ...: the code's name as the gRPC spec spells it.
std::string GrpcCodeName(grpc::StatusCode code);

// Logs nothing; callers log the real cause before the lossy code leaves the process.
inline grpc::Status ToGrpc(const Status& s) {
  if (s.ok()) return grpc::Status::OK;
  return grpc::Status(ErrnoToGrpcCode(s.code()), s.message());
}

}  // namespace nbdcsi
