// What every nbdctl command shares: the exit codes, usage errors, the output switch (-o), and the
// connection to whoever answers (nbd-datapathd's API or a CSI plugin) with the one place where a
// failed call becomes a message on stderr and exit code 1.
#pragma once

#include <chrono>
#include <memory>
#include <string>

#include <grpcpp/grpcpp.h>
#include <nlohmann/json.hpp>

#include "common/endpoint.h"

namespace CLI {
class Option;
}

namespace nbdcsi::nbdctl {

inline constexpr int kExitOk = 0;
inline constexpr int kExitServer = 1;  // the daemon or plugin refused, or could not be reached
inline constexpr int kExitUsage = 2;

// Bad arguments that CLI11 cannot check itself (quantities, combinations): main() prints
// "nbdctl: <message>" and exits kExitUsage.
struct UsageError {
  std::string message;
};

// nbdctl's global options (--api, -o, --timeout), read when a command runs.
struct GlobalOptions {
  std::string api;
  std::string output = "table";
  double timeout_s = 30;
  const CLI::Option* timeout_opt = nullptr;  // whether --timeout was given
};

// -o json prints `j` (2-space indent), anything else `text` as is.
void Print(const std::string& output, const nlohmann::json& j, const std::string& text);

// Who answers: the wording of the errors differs (the datapath's names its reasons in words, the
// CSI client shows gRPC's code names, as CSI tools do).
// nbd-csi-controller (`nbdctl cluster`) is worded as the CSI client is.
enum class Peer { kDatapath, kCsi, kController };

class Connection {
 public:
  // Parses `endpoint` (UsageError "<flag>: why" when it does not) and opens a channel that
  // connects on the first call. `timeout_s` bounds every call made with Ctx().
  Connection(Peer peer, const std::string& flag, const std::string& endpoint, double timeout_s);
  // The same over `creds` (mutual TLS); `server_name`, when not empty, is the name the server's
  // certificate must carry instead of the endpoint's host.
  Connection(Peer peer, const std::string& flag, const std::string& endpoint, double timeout_s,
             std::shared_ptr<grpc::ChannelCredentials> creds, const std::string& server_name);

  const std::shared_ptr<grpc::Channel>& channel() const { return channel_; }
  double timeout_s() const { return timeout_s_; }
  std::unique_ptr<grpc::ClientContext> Ctx() const;
  // Until `deadline`: a call must not outlive a --wait's overall bound.
  std::unique_ptr<grpc::ClientContext> Ctx(std::chrono::system_clock::time_point deadline) const;
  // Prints why the call on `what` ("create volume \"x\"") failed and returns kExitServer.
  int Fail(const std::string& what, const grpc::Status& s) const;
  // One call, (stub.*method) with a context from Ctx(): kExitOk with *resp filled, or Fail(what).
  template <typename Stub, typename Req, typename Resp>
  int Call(Stub& stub, grpc::Status (Stub::*method)(grpc::ClientContext*, const Req&, Resp*),
           const Req& req, Resp* resp, const std::string& what) const {
    grpc::Status s = (stub.*method)(Ctx().get(), req, resp);
    return s.ok() ? kExitOk : Fail(what, s);
  }
  // The same for a call spelled out by the caller: call(ctx) makes it.
  template <typename F>
  int Call(const std::string& what, F call) const {
    grpc::Status s = call(Ctx().get());
    return s.ok() ? kExitOk : Fail(what, s);
  }

 private:
  std::string UnreachableHint(const grpc::Status& s) const;

  Peer peer_;
  Endpoint ep_;
  double timeout_s_;
  std::shared_ptr<grpc::Channel> channel_;
};

}  // namespace nbdcsi::nbdctl
