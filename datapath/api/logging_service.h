// The gRPC Logging service (datapath/api/logging.proto) over a LogLevelControl. Registered as
// one of StartApiServer's extra services, which the Unix socket alone serves: its mode and
// --allow-uid decide who may change the level, as for every other operator call.
#pragma once

#include <grpcpp/impl/codegen/service_type.h>

#include <memory>

#include "common/log_level.h"

namespace nbdcsi::datapath {

// `control` must outlive the service (the daemon passes ProcessLogLevel()).
std::unique_ptr<grpc::Service> MakeLoggingService(LogLevelControl& control);

}  // namespace nbdcsi::datapath
