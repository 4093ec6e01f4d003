#include "csi/identity.h"

#include <spdlog/spdlog.h>

#include "csi/driver.h"
#include "csi/logging.h"

namespace nbdcsi::csi {
namespace {

namespace v1 = ::csi::v1;

class IdentityService final : public v1::Identity::Service {
 public:
  explicit IdentityService(IdentityOptions opts) : opts_(std::move(opts)) {}

  grpc::Status GetPluginInfo(grpc::ServerContext*, const v1::GetPluginInfoRequest*,
                             v1::GetPluginInfoResponse* resp) override {
    resp->set_name(kDriverName);
    resp->set_vendor_version(DriverVersion());
    return grpc::Status::OK;
  }

  grpc::Status GetPluginCapabilities(grpc::ServerContext*,
                                     const v1::GetPluginCapabilitiesRequest*,
                                     v1::GetPluginCapabilitiesResponse* resp) override {
    if (opts_.controller_service) {
      resp->add_capabilities()->mutable_service()->set_type(
          v1::PluginCapability::Service::CONTROLLER_SERVICE);
    }
    resp->add_capabilities()->mutable_service()->set_type(
        v1::PluginCapability::Service::VOLUME_ACCESSIBILITY_CONSTRAINTS);
    resp->add_capabilities()->mutable_volume_expansion()->set_type(
        v1::PluginCapability::VolumeExpansion::ONLINE);
    return grpc::Status::OK;
  }

  grpc::Status Probe(grpc::ServerContext*, const v1::ProbeRequest*,
                     v1::ProbeResponse* resp) override {
    bool ready = true;
    if (opts_.ready) {
      Status s = opts_.ready();
      if (!s.ok()) {
        ready = false;
        spdlog::info("[{}] not ready: {}", CurrentRequestId(), s.message());
      }
    }
    resp->mutable_ready()->set_value(ready);
    return grpc::Status::OK;
  }

 private:
  IdentityOptions opts_;
};

}  // namespace

std::unique_ptr<v1::Identity::Service> MakeIdentityService(IdentityOptions opts) {
  return std::make_unique<IdentityService>(std::move(opts));
}

}  // namespace nbdcsi::csi
