#include "common/grpc_status.h"

#include <cerrno>

#include <fmt/format.h>

namespace nbdcsi {

grpc::StatusCode ErrnoToGrpcCode(int err) {
  switch (err) {
    case 0: return grpc::StatusCode::OK;
    case ENOENT: return grpc::StatusCode::NOT_FOUND;
    case EEXIST: return grpc::StatusCode::ALREADY_EXISTS;
    case EINVAL:
    case ENAMETOOLONG: return grpc::StatusCode::INVALID_ARGUMENT;
    case ENOSPC:
    case EDQUOT: return grpc::StatusCode::RESOURCE_EXHAUSTED;
    case EBUSY:
    case ENODEV:  // e.g. kernel NBD unavailable: fixable on the node, not by retrying
    case EROFS:
    case ENOTEMPTY: return grpc::StatusCode::FAILED_PRECONDITION;
    case EAGAIN:
    case ECONNREFUSED:
    case EHOSTUNREACH: return grpc::StatusCode::UNAVAILABLE;
    case EPERM:
    case EACCES: return grpc::StatusCode::PERMISSION_DENIED;
    case ERANGE:
    case EOVERFLOW:
    case EFBIG: return grpc::StatusCode::OUT_OF_RANGE;
    case ENOTSUP: return grpc::StatusCode::UNIMPLEMENTED;
    case ECANCELED: return grpc::StatusCode::CANCELLED;
    case ETIMEDOUT: return grpc::StatusCode::DEADLINE_EXCEEDED;
    case EALREADY: return grpc::StatusCode::ABORTED;
    default: return grpc::StatusCode::INTERNAL;
  }
}

int GrpcCodeToErrno(grpc::StatusCode code) {
  switch (code) {
    case grpc::StatusCode::OK: return 0;
    case grpc::StatusCode::NOT_FOUND: return ENOENT;
    case grpc::StatusCode::ALREADY_EXISTS: return EEXIST;
    case grpc::StatusCode::INVALID_ARGUMENT: return EINVAL;
    case grpc::StatusCode::RESOURCE_EXHAUSTED: return ENOSPC;
    case grpc::StatusCode::FAILED_PRECONDITION: return EBUSY;
    case grpc::StatusCode::UNAVAILABLE: return EAGAIN;
    case grpc::StatusCode::PERMISSION_DENIED:
    case grpc::StatusCode::UNAUTHENTICATED: return EACCES;
    case grpc::StatusCode::OUT_OF_RANGE: return ERANGE;
    case grpc::StatusCode::UNIMPLEMENTED: return ENOTSUP;
    case grpc::StatusCode::CANCELLED: return ECANCELED;
    case grpc::StatusCode::DEADLINE_EXCEEDED: return ETIMEDOUT;
    case grpc::StatusCode::ABORTED: return EALREADY;
    default: return EIO;
  }
}

std::string GrpcCodeName(grpc::StatusCode code) {
  switch (code) {
    case grpc::StatusCode::OK: return "OK";
    case grpc::StatusCode::CANCELLED: return "CANCELLED";
    case grpc::StatusCode::UNKNOWN: return "UNKNOWN";
    case grpc::StatusCode::INVALID_ARGUMENT: return "INVALID_ARGUMENT";
    case grpc::StatusCode::DEADLINE_EXCEEDED: return "DEADLINE_EXCEEDED";
    case grpc::StatusCode::NOT_FOUND: return "NOT_FOUND";
    case grpc::StatusCode::ALREADY_EXISTS: return "ALREADY_EXISTS";
    case grpc::StatusCode::PERMISSION_DENIED: return "PERMISSION_DENIED";
    case grpc::StatusCode::RESOURCE_EXHAUSTED: return "RESOURCE_EXHAUSTED";
    case grpc::StatusCode::FAILED_PRECONDITION: return "FAILED_PRECONDITION";
    case grpc::StatusCode::ABORTED: return "ABORTED";
    case grpc::StatusCode::OUT_OF_RANGE: return "OUT_OF_RANGE";
    case grpc::StatusCode::UNIMPLEMENTED: return "UNIMPLEMENTED";
    case grpc::StatusCode::INTERNAL: return "INTERNAL";
    case grpc::StatusCode::UNAVAILABLE: return "UNAVAILABLE";
    case grpc::StatusCode::DATA_LOSS: return "DATA_LOSS";
    case grpc::StatusCode::UNAUTHENTICATED: return "UNAUTHENTICATED";
    default: return fmt::format("CODE_{}", static_cast<int>(code));
  }
}

}  // namespace nbdcsi
