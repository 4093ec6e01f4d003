#include "controller/csi_status.h"

#include <spdlog/spdlog.h>

#include "common/grpc_status.h"
#include "csi/logging.h"

namespace nbdcsi::controller {

grpc::Status ToCsiStatus(const Status& s) {
  if (s.code() == kForeignPageToken) return grpc::Status(grpc::StatusCode::ABORTED, s.message());
  return ToGrpc(s);
}

Status CallError(int err, std::string msg) {
  spdlog::debug("[{}] {}", csi::CurrentRequestId(), msg);
  return Status(err, std::move(msg));
}

}  // namespace nbdcsi::controller
