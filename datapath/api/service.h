// The gRPC management API of nbd-datapathd (datapath/api/datapath.proto) over a Pool.
#pragma once

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include <grpcpp/server.h>

#include "common/endpoint.h"
#include "common/status.h"
#include "datapath/pool/pool.h"

namespace nbdcsi::datapath {

class DatapathService;

// A running API server. It owns the service object as well as the grpc::Server, because gRPC
// does not take ownership of registered services and the service must outlive the server.
// Shutdown() and Wait() mirror grpc::Server so callers can treat it like one.
class ApiServer {
 public:
  ~ApiServer();  // Shutdown() + Wait()
  ApiServer(const ApiServer&) = delete;
  ApiServer& operator=(const ApiServer&) = delete;

  // Stops accepting calls; in-flight calls may finish until `deadline`, then are cancelled.
  // Idempotent.
  void Shutdown(std::chrono::system_clock::time_point deadline);
  void Shutdown() { Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(1)); }
  void Wait();

  const Endpoint& endpoint() const { return endpoint_; }
  // For tcp endpoints: the bound port.
  int port() const { return port_; }
  grpc::Server* grpc_server() { return server_.get(); }

 private:
  friend StatusOr<std::unique_ptr<ApiServer>> StartApiServer(Pool&, const std::string&,
                                                              std::vector<grpc::Service*>);
  ApiServer() = default;
  Endpoint endpoint_;
  int port_ = 0;
  std::unique_ptr<DatapathService> service_;
  std::unique_ptr<grpc::Server> server_;
  bool shut_down_ = false;
};

// Starts the gRPC management API on `endpoint`:
//  - "unix:///path": a stale socket file is removed first (a live one is EADDRINUSE); the socket
//    is created with mode 0600 and verified with stat() before this returns.
//  - "tcp://host:port": plaintext, for tests only until mTLS lands (a warning is logged).
// The pool must outlive the returned server. `extra` services (e.g. Attachments) are registered
// on the same server; they must outlive it too.
StatusOr<std::unique_ptr<ApiServer>> StartApiServer(Pool& pool, const std::string& endpoint,
                                                    std::vector<grpc::Service*> extra = {});

}  // namespace nbdcsi::datapath
