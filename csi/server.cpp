#include "csi/server.h"

#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <system_error>

#include <fmt/format.h>
#include <grpcpp/grpcpp.h>
#include <spdlog/spdlog.h>

#include "csi/logging.h"

namespace nbdcsi::csi {
namespace {

Status PrepareUnixPath(const std::string& path) {
  std::filesystem::path parent = std::filesystem::path(path).parent_path();
  std::error_code ec;
  // kubelet creates the plugin directory, but a standalone run (tests, a VM) may not have it.
  std::filesystem::create_directories(parent, ec);
  if (ec) {
    return Error(ec.value(), "cannot create directory {} for socket {}: {}", parent.string(), path,
                 ec.message());
  }
  return RemoveStaleUnixSocket(path);
}

}  // namespace

CsiServer::~CsiServer() {
  Shutdown();
  Wait();
}

void CsiServer::Shutdown(std::chrono::milliseconds grace) {
  if (shut_down_ || !server_) return;
  shut_down_ = true;
  // No new connections first (this also removes the socket file), then the calls drain.
  if (listener_) listener_->Stop();
  DrainAndShutdown(calls_, {server_.get()}, grace);
}

void CsiServer::Wait() {
  if (server_) server_->Wait();
}

StatusOr<std::unique_ptr<CsiServer>> StartCsiServer(const CsiServerOptions& opts) {
  auto ep = ParseEndpoint(opts.endpoint);
  if (!ep.ok()) return Error(EINVAL, "CSI endpoint: {}", ep.status().message());
  if ((opts.socket_mode & ~07777u) != 0) {
    return Error(EINVAL, "socket mode {:o} is not a permission mode", opts.socket_mode);
  }
  std::unique_ptr<CsiServer> srv(new CsiServer());
  srv->endpoint_ = *ep;
  const bool unix_ep = ep->kind == Endpoint::Kind::kUnix;
  if (unix_ep) {
    if (Status s = PrepareUnixPath(ep->path); !s.ok()) return s;
    auto l = UnixPeerListener::Bind(
        ep->path, opts.peers.extra.empty() ? opts.socket_mode : opts.peers.SocketMode(),
        opts.peers);
    if (!l.ok()) return l.status();
    srv->listener_ = std::move(*l);
  }

  grpc::ServerBuilder builder;
  if (!unix_ep) {
    builder.AddListeningPort(ep->GrpcTarget(), grpc::InsecureServerCredentials(), &srv->port_);
  }
  for (grpc::Service* svc : opts.services) builder.RegisterService(svc);
  std::vector<std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>> icpts;
  icpts.push_back(srv->calls_.Factory());
  icpts.push_back(MakeLoggingInterceptorFactory());
  for (const auto& make : opts.interceptors) icpts.push_back(make());
  builder.experimental().SetInterceptorCreators(std::move(icpts));
  srv->server_ = builder.BuildAndStart();
  if (!srv->server_ || (!unix_ep && srv->port_ == 0)) {
    srv->server_.reset();
    return Error(EADDRINUSE, "cannot listen on {} (address in use or not permitted)",
                 ep->ToString());
  }
  if (unix_ep) {
    if (Status s = srv->listener_->Serve(srv->server_.get()); !s.ok()) return s;
    spdlog::info("CSI server listening on {} (callers: {})", ep->ToString(),
                 opts.peers.Describe());
  } else {
    spdlog::warn("CSI server listening on {}: TCP has no caller check, use it on loopback only",
                 ep->ToString());
  }
  return srv;
}

}  // namespace nbdcsi::csi
