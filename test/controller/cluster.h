// A small cluster on one machine for the controller acceptance tests: a real nbd-csi-controller
// and N real nbd-datapathd processes (one per "node"), each datapath with its own pool under a
// private temp dir, registering with the controller over loopback TCP (plaintext, or mutual TLS
// with certificates from test/tls/make-certs.sh). Tests drive the controller over real gRPC on
// its unix CSI socket and look at the pools through each datapath's unix API socket.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include <grpcpp/channel.h>
#include <grpcpp/security/credentials.h>

#include "csi/csi.grpc.pb.h"
#include "datapath/api/datapath.grpc.pb.h"
#include "test/controller/csi_requests.h"

namespace nbdcsi::test {

// A child process with its output in a log file. Stopped (SIGTERM, then SIGKILL) on destruction.
class Process {
 public:
  Process() = default;
  ~Process() { Stop(); }
  Process(const Process&) = delete;
  Process& operator=(const Process&) = delete;

  bool Start(const std::vector<std::string>& argv, const std::string& log_path);
  bool Running();
  // SIGTERM, wait up to `grace`, then SIGKILL. Returns the exit status (waitpid form), -1 if
  // not running.
  int Stop(std::chrono::milliseconds grace = std::chrono::seconds(5));
  void Kill9();
  // Waits up to `timeout` for the process to exit on its own: its waitpid status, or -1 when it
  // is still running (it is left running).
  int Wait(std::chrono::milliseconds timeout);
  pid_t pid() const { return pid_; }

 private:
  pid_t pid_ = -1;
};

struct TlsDirs {
  // A make-certs.sh directory, "" = --insecure. The controller presents server.crt; each
  // datapath presents its node certificate node-<node id>.crt (make-certs.sh DIR NODE...).
  // A directory holding tls.crt, tls.key and ca.crt (a Kubernetes TLS secret) is used as is.
  std::string controller;
  std::string datapath;
};

struct ClusterOptions {
  std::vector<std::string> nodes = {"node-a", "node-b"};
  std::string capacity = "4Gi";  // each pool's --capacity
  int heartbeat_ms = 200;
  TlsDirs tls;
  bool wait_registered = true;  // Start() waits until every node is usable
  std::vector<std::string> controller_args;  // appended to nbd-csi-controller's command line
};

class Cluster {
 public:
  explicit Cluster(ClusterOptions opts = {});
  ~Cluster();

  // Starts the controller and every datapath; "" or a message saying what failed (with the
  // tail of the relevant log).
  std::string Start();

  std::string StartController();
  void StopController(bool kill9 = false);
  std::string StartDatapath(size_t i);
  void StopDatapath(size_t i, bool kill9 = false);
  pid_t datapath_pid(size_t i) const { return datapath_procs_[i]->pid(); }
  int api_port(size_t i) const { return api_ports_[i]; }  // where datapath i serves over TCP

  // True once GetCapacity on the node's topology segment is non-zero (the registry knows it).
  bool WaitRegistered(const std::string& node, std::chrono::milliseconds timeout);
  // True once the CSI socket answers Probe.
  bool WaitControllerServing(std::chrono::milliseconds timeout);

  ::csi::v1::Controller::Stub& controller();
  ::csi::v1::Identity::Stub& identity();
  // The node's datapath over its unix API socket (no TLS), to check what the pool holds.
  nbdcsi::datapath::v1::Datapath::Stub& datapath(const std::string& node);
  // `nbdctl --api <node's socket> ARGS...`: stdout, or "" with *ok=false when it failed.
  std::string Nbdctl(const std::string& node, const std::vector<std::string>& args, bool* ok);

  const std::string& dir() const { return dir_; }
  const std::vector<std::string>& nodes() const { return opts_.nodes; }
  int registry_port() const { return registry_port_; }
  std::string LogTail(const std::string& name, int lines = 30) const;  // "controller", node id

  static std::string Bin(const std::string& name);  // $NBDCSI_BIN/name
  static std::string Src(const std::string& rel);   // $NBDCSI_SRC/rel

 private:
  ClusterOptions opts_;
  std::string dir_;
  int registry_port_ = 0;
  std::vector<int> api_ports_;
  std::unique_ptr<Process> controller_proc_;
  std::vector<std::unique_ptr<Process>> datapath_procs_;
  std::shared_ptr<grpc::Channel> csi_channel_;
  std::unique_ptr<::csi::v1::Controller::Stub> controller_stub_;
  std::unique_ptr<::csi::v1::Identity::Stub> identity_stub_;
  std::vector<std::unique_ptr<nbdcsi::datapath::v1::Datapath::Stub>> datapath_stubs_;
};

// A context with a 20 s deadline.
std::unique_ptr<grpc::ClientContext> Ctx();

// One Registry.Heartbeat to 127.0.0.1:REGISTRY_PORT over `creds`, claiming NODE's datapath at
// ADDRESS with 4 GiB free, as a datapath would send it.
grpc::Status Heartbeat(int registry_port, const std::shared_ptr<grpc::ChannelCredentials>& creds,
                       const std::string& node, const std::string& address);

}  // namespace nbdcsi::test
