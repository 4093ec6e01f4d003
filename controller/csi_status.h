// The controller's errors: errno-style Status inside (as in the node plugin and the datapath),
// turned into a CSI gRPC status once, by the service decorator (controller_service.cpp).
//
// The errno each CSI code comes from (common/grpc_status.h ErrnoToGrpcCode, and back from the
// datapaths through GrpcCodeToErrno, so a datapath's code reaches the sidecar unchanged):
//   EINVAL INVALID_ARGUMENT      ENOENT NOT_FOUND             EEXIST ALREADY_EXISTS
//   ERANGE OUT_OF_RANGE          ENOSPC RESOURCE_EXHAUSTED    EAGAIN UNAVAILABLE
//   EALREADY ABORTED (in flight) ETIMEDOUT DEADLINE_EXCEEDED  EBUSY FAILED_PRECONDITION
//   ENOTSUP UNIMPLEMENTED        EACCES PERMISSION_DENIED     anything else INTERNAL
// One spec code has no errno of its own there: an invalid starting_token is ABORTED (CSI
// ListVolumes/ListSnapshots), which is not "another call is in flight"; it travels as
// kForeignPageToken and ToCsiStatus maps it.
#pragma once

#include <cerrno>
#include <string>
#include <utility>

#include <fmt/format.h>
#include <grpcpp/support/status.h>

#include "common/status.h"

namespace nbdcsi::controller {

// A starting_token this controller did not make. ESTALE: no datapath error maps to it
// (GrpcCodeToErrno never yields it), so it cannot be confused with one.
inline constexpr int kForeignPageToken = ESTALE;

// The CSI gRPC status for `s`: the table above, plus kForeignPageToken -> ABORTED.
grpc::Status ToCsiStatus(const Status& s);

// An error of the current CSI call. The logging interceptor logs the code and message of every
// failed call, so this adds a debug line only (with the request id, to find it among the call's).
Status CallError(int err, std::string msg);

template <typename... Args>
Status Err(int err, fmt::format_string<Args...> f, Args&&... args) {
  return CallError(err, fmt::format(f, std::forward<Args>(args)...));
}

}  // namespace nbdcsi::controller
