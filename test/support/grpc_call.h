// The client side of a gRPC call in tests: a context with a deadline (so a wedged server fails
// the test instead of hanging it until ctest's timeout) and a stub on an insecure channel.
#pragma once

#include <chrono>
#include <memory>
#include <string>

#include <grpcpp/client_context.h>
#include <grpcpp/create_channel.h>
#include <grpcpp/security/credentials.h>

namespace nbdcsi::test {

inline std::unique_ptr<grpc::ClientContext> CallContext(
    std::chrono::milliseconds timeout = std::chrono::seconds(10)) {
  auto c = std::make_unique<grpc::ClientContext>();
  c->set_deadline(std::chrono::system_clock::now() + timeout);
  return c;
}

// Service::NewStub on an insecure channel to `target` ("unix:///path", "127.0.0.1:port").
template <typename Service>
auto InsecureStub(const std::string& target) {
  return Service::NewStub(grpc::CreateChannel(target, grpc::InsecureChannelCredentials()));
}

}  // namespace nbdcsi::test
