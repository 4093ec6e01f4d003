#include "tools/nbdctl/connection.h"

#include <netdb.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <iostream>

#include <fmt/format.h>

#include "common/grpc_status.h"

namespace nbdcsi::nbdctl {
namespace {

// The datapath's refusals in words an operator acts on.
std::string ReasonText(grpc::StatusCode c) {
  switch (c) {
    case grpc::StatusCode::INVALID_ARGUMENT:
      return "invalid argument";
    case grpc::StatusCode::NOT_FOUND:
      return "not found";
    case grpc::StatusCode::ALREADY_EXISTS:
      return "already exists";
    case grpc::StatusCode::FAILED_PRECONDITION:
      return "failed precondition";
    case grpc::StatusCode::RESOURCE_EXHAUSTED:
      return "out of space";
    case grpc::StatusCode::ABORTED:
      return "busy, retry";
    case grpc::StatusCode::UNAVAILABLE:
      return "not ready yet, retry later";
    case grpc::StatusCode::PERMISSION_DENIED:
      return "permission denied";
    case grpc::StatusCode::OUT_OF_RANGE:
      return "out of range";
    case grpc::StatusCode::UNIMPLEMENTED:
      return "not supported by this nbd-datapathd";
    case grpc::StatusCode::INTERNAL:
      return "internal error";
    case grpc::StatusCode::DATA_LOSS:
      return "data loss";
    default:
      return fmt::format("gRPC code {}", static_cast<int>(c));
  }
}

// Whether a TCP connection to host:port opens within a second: tells "nobody listens" from "it
// listens but ended the connection" (a refused TLS handshake).
bool TcpConnects(const std::string& host, uint16_t port) {
  addrinfo hints{};
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* res = nullptr;
  if (getaddrinfo(host.c_str(), std::to_string(port).c_str(), &hints, &res) != 0) return false;
  bool ok = false;
  for (addrinfo* a = res; a && !ok; a = a->ai_next) {
    int fd = socket(a->ai_family, a->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, a->ai_protocol);
    if (fd < 0) continue;
    if (connect(fd, a->ai_addr, a->ai_addrlen) == 0) {
      ok = true;
    } else if (errno == EINPROGRESS) {
      pollfd p{fd, POLLOUT, 0};
      int err = 0;
      socklen_t len = sizeof err;
      ok = poll(&p, 1, 1000) == 1 && getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) == 0 &&
           err == 0;
    }
    close(fd);
  }
  freeaddrinfo(res);
  return ok;
}

}  // namespace

void Print(const std::string& output, const nlohmann::json& j, const std::string& text) {
  if (output == "json")
    std::cout << j.dump(2) << "\n";
  else
    std::cout << text;
}

Connection::Connection(Peer peer, const std::string& flag, const std::string& endpoint,
                       double timeout_s)
    : Connection(peer, flag, endpoint, timeout_s, grpc::InsecureChannelCredentials(), "") {}

Connection::Connection(Peer peer, const std::string& flag, const std::string& endpoint,
                       double timeout_s, std::shared_ptr<grpc::ChannelCredentials> creds,
                       const std::string& server_name)
    : peer_(peer), timeout_s_(timeout_s) {
  auto ep = ParseEndpoint(endpoint);
  if (!ep.ok()) throw UsageError{flag + ": " + ep.status().message()};
  ep_ = *ep;
  grpc::ChannelArguments args;
  // Fail fast with a clear message instead of gRPC's reconnect back-off when the peer is down.
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 100);
  if (!server_name.empty()) args.SetSslTargetNameOverride(server_name);
  channel_ = grpc::CreateCustomChannel(ep_.GrpcTarget(), std::move(creds), args);
}

std::unique_ptr<grpc::ClientContext> Connection::Ctx() const {
  return Ctx(std::chrono::system_clock::now() +
             std::chrono::milliseconds(static_cast<int64_t>(timeout_s_ * 1000)));
}

std::unique_ptr<grpc::ClientContext> Connection::Ctx(
    std::chrono::system_clock::time_point deadline) const {
  auto ctx = std::make_unique<grpc::ClientContext>();
  ctx->set_deadline(deadline);
  return ctx;
}

std::string Connection::UnreachableHint(const grpc::Status& s) const {
  if (ep_.kind != Endpoint::Kind::kUnix) return s.error_message();
  struct stat st{};
  if (stat(ep_.path.c_str(), &st) != 0) return fmt::format("socket {} does not exist", ep_.path);
  if (access(ep_.path.c_str(), R_OK | W_OK) != 0) {
    return fmt::format("no permission on socket {} (mode {:o}): run as its owner or root", ep_.path,
                       st.st_mode & 07777);
  }
  return s.error_message();
}

int Connection::Fail(const std::string& what, const grpc::Status& s) const {
  const bool datapath = peer_ == Peer::kDatapath;
  const char* who = datapath                          ? "nbd-datapathd"
                    : peer_ == Peer::kController ? "nbd-csi-controller"
                                                 : "the CSI plugin";
  // UNAVAILABLE is both gRPC's "no connection" and the peer's own "not now" (a copy must finish
  // first); a channel that is connected after the call means the peer itself answered.
  const bool reached = channel_->GetState(false) == GRPC_CHANNEL_READY;
  if (s.error_code() == grpc::StatusCode::UNAVAILABLE && !reached &&
      peer_ == Peer::kController && ep_.kind == Endpoint::Kind::kTcp &&
      TcpConnects(ep_.host, ep_.port)) {
    std::cerr << fmt::format(
        "nbdctl: nbd-csi-controller at {} ended the connection: is --tls-cert signed by the CA "
        "the controller trusts, and do --tls-ca and --insecure match how it serves? ({})\n",
        ep_.ToString(), s.error_message());
  } else if (s.error_code() == grpc::StatusCode::UNAVAILABLE && !reached) {
    std::cerr << fmt::format("nbdctl: cannot reach {} at {}: is it running? ({})\n", who,
                             ep_.ToString(), UnreachableHint(s));
  } else if (s.error_code() == grpc::StatusCode::DEADLINE_EXCEEDED) {
    std::cerr << (datapath ? fmt::format("nbdctl: {}: nbd-datapathd at {} did not answer within "
                                         "{}s (--timeout)\n",
                                         what, ep_.ToString(), timeout_s_)
                           : fmt::format("nbdctl: cannot {}: DEADLINE_EXCEEDED: no answer from {} "
                                         "within {}s (--timeout)\n",
                                         what, ep_.ToString(), timeout_s_));
  } else if (datapath) {
    std::cerr << fmt::format("nbdctl: cannot {}: {} ({})\n", what, s.error_message(),
                             ReasonText(s.error_code()));
  } else {
    std::cerr << fmt::format("nbdctl: cannot {}: {}: {}\n", what, GrpcCodeName(s.error_code()),
                             s.error_message());
  }
  return kExitServer;
}

}  // namespace nbdcsi::nbdctl
