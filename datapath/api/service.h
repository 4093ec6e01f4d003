// The gRPC management API of nbd-datapathd (datapath/api/datapath.proto) over a Pool.
#pragma once

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include <grpcpp/security/server_credentials.h>
#include <grpcpp/server.h>

#include "common/endpoint.h"
#include "common/grpc_drain.h"
#include "common/name_locks.h"
#include "common/status.h"
#include "common/unix_listener.h"
#include "datapath/pool/pool.h"
#include "datapath/schedule/status.h"

namespace nbdcsi::datapath {

class DatapathService;

// One listening address of the API server.
struct ApiListen {
  std::string endpoint;  // "unix:///path" or "tcp://host:port"
  // TCP: the transport security, normally MakeServerCredentials (mutual TLS). Null means
  // plaintext, which is refused (EINVAL) unless `insecure` is set. Unix: must be null; the
  // socket's mode and the per-connection uid check below are the access control.
  std::shared_ptr<grpc::ServerCredentials> creds;
  bool insecure = false;
  // Unix: who may call besides root and this process's uid, checked per connection with
  // SO_PEERCRED (others get PERMISSION_DENIED).
  PeerUids peers;
};

// A running API server. It owns the service object as well as the grpc::Server, because gRPC
// does not take ownership of registered services and the service must outlive the server.
// Shutdown() and Wait() mirror grpc::Server so callers can treat it like one.
class ApiServer {
 public:
  ~ApiServer();  // Shutdown() + Wait()
  ApiServer(const ApiServer&) = delete;
  ApiServer& operator=(const ApiServer&) = delete;

  // Stops accepting calls; in-flight calls may finish until `deadline`, then are cancelled, and
  // idle connections are closed at once (common/grpc_drain.h). Idempotent.
  void Shutdown(std::chrono::system_clock::time_point deadline);
  void Shutdown() { Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(1)); }
  void Wait();

  // The first listener (what the single-endpoint StartApiServer was given).
  const Endpoint& endpoint() const { return endpoints_.front(); }
  // For a tcp first listener: the bound port.
  int port() const { return ports_.front(); }
  // Every listener in the order given, and its bound port (unix: 1, as gRPC reports).
  const std::vector<Endpoint>& endpoints() const { return endpoints_; }
  const std::vector<int>& ports() const { return ports_; }
  // The server holding the unix listeners (null when there are none).
  grpc::Server* grpc_server() { return local_.get(); }
  // Where GetVolume and ListVolumes read each volume's schedule runs (Volume.schedule_runs); the
  // schedule runner starts after the server, so it is set then. Thread-safe.
  void SetScheduleStatus(ScheduleStatusFn fn);

 private:
  friend StatusOr<std::unique_ptr<ApiServer>> StartApiServer(Pool&, std::vector<ApiListen>,
                                                             std::vector<grpc::Service*>,
                                                             std::vector<grpc::Service*>);
  ApiServer() = default;
  bool BuildAndStart(const std::vector<ApiListen>& listens,
                     const std::vector<grpc::Service*>& extra,
                     const std::vector<grpc::Service*>& remote_extra);
  Status BindUnix(const std::vector<ApiListen>& listens);
  Status CheckListening(const std::vector<ApiListen>& listens, bool remote_failed) const;
  std::vector<Endpoint> endpoints_;
  std::vector<int> ports_;
  // Names with a mutating call in flight ("volume/NAME", "snapshot/NAME"; see service.cpp).
  std::shared_ptr<NameLocks> in_flight_;
  // gRPC serves every registered service on every port of a server, so local and remote
  // listeners are two servers: the remote one carries the Datapath service and the remote extras
  // only (attaching kernel devices is the node plugin's business, over the unix socket). Both service objects share one
  // in-flight set, so a call over TCP and one over the socket still exclude each other.
  std::unique_ptr<DatapathService> local_service_;
  std::unique_ptr<DatapathService> remote_service_;
  std::unique_ptr<grpc::Server> local_;
  std::unique_ptr<grpc::Server> remote_;
  std::vector<std::unique_ptr<UnixPeerListener>> unix_;  // accept into local_
  CallTracker calls_;  // both servers' calls, so a shutdown waits for them, not for idle clients
  bool shut_down_ = false;
};

// Starts the gRPC management API on every listener (at least one):
//  - unix:///path: a stale socket file is removed first (a live one is EADDRINUSE); the socket
//    is created with mode 0600 and verified with stat() before this returns. Serves the Datapath
//    service and the `extra` services (e.g. Attachments).
//  - tcp://host:port: serves the Datapath service and the `remote_extra` services (the
//    controller's: TargetFreeze), with `creds` (or plaintext when `insecure`, with a warning
//    logged). A service object serves one server: remote_extra and extra never share one.
// Nothing is left listening when any listener fails. The pool must outlive the returned server;
// so must the `extra` and `remote_extra` services.
StatusOr<std::unique_ptr<ApiServer>> StartApiServer(Pool& pool, std::vector<ApiListen> listens,
                                                    std::vector<grpc::Service*> extra = {},
                                                    std::vector<grpc::Service*> remote_extra = {});

// One listener, as before TCP had TLS: a unix socket, or a plaintext tcp://host:port for tests
// (insecure implied; a warning is logged).
StatusOr<std::unique_ptr<ApiServer>> StartApiServer(Pool& pool, const std::string& endpoint,
                                                    std::vector<grpc::Service*> extra = {});

// The Datapath service (a v1::Datapath::Service) over `pool`, outside any server, so that its
// handlers can be called in-process with no socket: the request fuzzer (test/fuzz) feeds them
// messages parsed from raw bytes. The daemon serves it through StartApiServer.
std::unique_ptr<grpc::Service> MakeDatapathService(Pool& pool);

}  // namespace nbdcsi::datapath
