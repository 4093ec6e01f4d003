// gRPC server plumbing shared by nbd-csi-controller and nbd-csi-node: one listening endpoint,
// the logging interceptor on every call, and a graceful stop on SIGINT/SIGTERM. A unix endpoint
// is accepted by a UnixPeerListener (common/unix_listener.h): mode 0600 and, per connection,
// the caller's uid checked with SO_PEERCRED (others get PERMISSION_DENIED).
#pragma once

#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <grpcpp/server.h>
#include <grpcpp/support/server_interceptor.h>

#include "common/endpoint.h"
#include "common/grpc_drain.h"
#include "common/status.h"
#include "common/unix_listener.h"

namespace nbdcsi::csi {

struct CsiServerOptions {
  // "unix:///path" (what kubelet and the sidecars use: a stale socket file is removed first, a
  // live one is EADDRINUSE, the parent directory is created) or "tcp://host:port".
  std::string endpoint = {};
  // Registered in order; not owned, they must outlive the server.
  std::vector<grpc::Service*> services = {};
  // Unix socket mode. kubelet and the sidecars run as root: 0600 keeps everyone else out.
  unsigned socket_mode = 0600;
  // Unix endpoints: who may call besides root and this process's uid (--allow-uid).
  PeerUids peers = {};
  // More interceptors, after the logging one (e.g. GrpcServerMetrics::InterceptorFactory).
  std::vector<
      std::function<std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>()>>
      interceptors = {};
};

class CsiServer {
 public:
  ~CsiServer();  // Shutdown() + Wait()
  CsiServer(const CsiServer&) = delete;
  CsiServer& operator=(const CsiServer&) = delete;

  // In-flight calls may finish until `grace` runs out, then are cancelled; idle connections are
  // closed at once (common/grpc_drain.h). Idempotent. Removes the unix socket file.
  void Shutdown(std::chrono::milliseconds grace = std::chrono::seconds(5));
  void Wait();
  const Endpoint& endpoint() const { return endpoint_; }
  int port() const { return port_; }  // tcp endpoints: the bound port

 private:
  friend StatusOr<std::unique_ptr<CsiServer>> StartCsiServer(const CsiServerOptions&);
  CsiServer() = default;
  Endpoint endpoint_;
  int port_ = 0;
  std::unique_ptr<UnixPeerListener> listener_;  // unix endpoints
  std::unique_ptr<grpc::Server> server_;
  CallTracker calls_;
  bool shut_down_ = false;
};

StatusOr<std::unique_ptr<CsiServer>> StartCsiServer(const CsiServerOptions& opts);

}  // namespace nbdcsi::csi
