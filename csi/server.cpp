#include "csi/server.h"

#include <signal.h>
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

sigset_t TerminationSignals() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  return set;
}

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

void BlockTerminationSignals() {
  sigset_t set = TerminationSignals();
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
  // A client that hangs up mid-reply must not kill the process.
  signal(SIGPIPE, SIG_IGN);
}

int WaitForTerminationSignal() {
  sigset_t set = TerminationSignals();
  int sig = 0;
  while (sigwait(&set, &sig) != 0) {
  }
  return sig;
}

CsiServer::~CsiServer() {
  Shutdown();
  Wait();
}

void CsiServer::Shutdown(std::chrono::milliseconds grace) {
  if (shut_down_ || !server_) return;
  shut_down_ = true;
  server_->Shutdown(std::chrono::system_clock::now() + grace);
  if (endpoint_.kind == Endpoint::Kind::kUnix) {
    // gRPC 1.51 unlinks the path itself when the listener closes; this covers versions that do
    // not, so the next start does not have to take the stale-socket path.
    struct stat st{};
    if (lstat(endpoint_.path.c_str(), &st) == 0 && S_ISSOCK(st.st_mode)) {
      unlink(endpoint_.path.c_str());
    }
  }
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
  if (ep->kind == Endpoint::Kind::kUnix) {
    if (Status s = PrepareUnixPath(ep->path); !s.ok()) return s;
  }

  grpc::ServerBuilder builder;
  builder.AddListeningPort(ep->GrpcTarget(), grpc::InsecureServerCredentials(),
                           ep->kind == Endpoint::Kind::kTcp ? &srv->port_ : nullptr);
  for (grpc::Service* svc : opts.services) builder.RegisterService(svc);
  std::vector<std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>> icpts;
  icpts.push_back(MakeLoggingInterceptorFactory());
  builder.experimental().SetInterceptorCreators(std::move(icpts));
  srv->server_ = builder.BuildAndStart();
  if (!srv->server_ || (ep->kind == Endpoint::Kind::kTcp && srv->port_ == 0)) {
    srv->server_.reset();
    return Error(EADDRINUSE, "cannot listen on {} (address in use or not permitted)",
                 ep->ToString());
  }

  if (ep->kind == Endpoint::Kind::kUnix) {
    // gRPC binds with the process umask; the mode is set right after and then checked, because
    // a socket left wider than asked is a security bug, not a detail.
    struct stat st{};
    Status bad;
    if (chmod(ep->path.c_str(), opts.socket_mode) != 0) {
      bad = Error(errno, "chmod {:o} {}: {}", opts.socket_mode, ep->path, strerror(errno));
    } else if (stat(ep->path.c_str(), &st) != 0) {
      bad = Error(errno, "stat {}: {}", ep->path, strerror(errno));
    } else if ((st.st_mode & 07777) != opts.socket_mode) {
      bad = Error(EPERM, "socket {} has mode {:o} after chmod {:o}", ep->path, st.st_mode & 07777,
                  opts.socket_mode);
    }
    if (!bad.ok()) {
      srv->Shutdown(std::chrono::milliseconds(0));
      srv->Wait();
      return bad;
    }
  }
  spdlog::info("CSI server listening on {}", ep->ToString());
  return srv;
}

}  // namespace nbdcsi::csi
