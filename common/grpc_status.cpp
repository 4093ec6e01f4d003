#include "common/grpc_status.h"

#include <cerrno>

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

}  // namespace nbdcsi
