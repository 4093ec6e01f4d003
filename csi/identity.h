// The CSI Identity service, shared by both binaries.
#pragma once

#include <functional>
#include <memory>

#include "common/status.h"
#include "csi/csi.grpc.pb.h"

namespace nbdcsi::csi {

struct IdentityOptions {
  // Report CONTROLLER_SERVICE (the controller binary does; the node plugin does too when it runs
  // in the same process set, which it does not: false there).
  bool controller_service = true;
  // Probe: OK = ready; an error Status = not ready, reported as ready=false with the reason
  // logged (the CSI spec reserves gRPC errors for "unhealthy, restart me"). Null: always ready.
  std::function<Status()> ready = {};
};

// GetPluginInfo: kDriverName + DriverVersion(). GetPluginCapabilities: CONTROLLER_SERVICE (if
// set), VOLUME_ACCESSIBILITY_CONSTRAINTS, and VolumeExpansion ONLINE.
std::unique_ptr<::csi::v1::Identity::Service> MakeIdentityService(IdentityOptions opts);

}  // namespace nbdcsi::csi
