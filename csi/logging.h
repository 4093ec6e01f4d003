// Request logging for the CSI services: every call gets a request id and is logged once on the
// way in (method + request, secrets redacted) and once on the way out (code, message, duration).
// Fields marked with the (csi.v1.csi_secret) option are never printed, at any depth, including
// map values; the keys of a secrets map are not printed either.
#pragma once

#include <memory>
#include <string>

#include <google/protobuf/message.h>
#include <grpcpp/support/server_interceptor.h>

namespace nbdcsi::csi {

// The text form of `msg` on one line, with every csi_secret field replaced by "***stripped***".
std::string RedactedText(const google::protobuf::Message& msg);

// The id of the call the current thread is serving ("" outside a call): handlers put it in
// their own log lines so one call's lines can be found together.
const std::string& CurrentRequestId();

// Lines: "[r-000123] /csi.v1.Controller/CreateVolume <- {name: \"pvc-1\", ...}" when the request
// arrives, then "[r-000123] -> OK 3.2 ms" or "[r-000123] -> NOT_FOUND: <message> (3.2 ms)". Info
// level, except the calls kubelet and the sidecars poll (Probe, GetPluginInfo, the three
// Get*Capabilities, NodeGetInfo, NodeGetVolumeStats, GetCapacity, ControllerGetVolume): debug
// unless they fail. StartCsiServer installs it on every server.
std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>
MakeLoggingInterceptorFactory();

}  // namespace nbdcsi::csi
