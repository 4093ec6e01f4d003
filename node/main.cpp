// nbd-csi-node: the CSI Identity and Node services kubelet talks to, on one node, in front of
// that node's nbd-datapathd. It keeps no state of its own: every call reads the mount table and
// the datapath's attachments, so a restart touches no I/O and needs no recovery.
#include <sys/stat.h>

#include <atomic>
#include <chrono>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <CLI/CLI.hpp>
#include <spdlog/spdlog.h>

#include "common/cli_parse.h"
#include "common/endpoint.h"
#include "common/log_format.h"
#include "common/log_level.h"
#include "common/metrics/server.h"
#include "common/process.h"
#include "common/unix_listener.h"
#include "csi/driver.h"
#include "csi/identity.h"
#include "csi/ids.h"
#include "csi/server.h"
#include "csi/server_flags.h"
#include "node/datapath_client.h"
#include "node/metrics.h"
#include "node/node_service.h"
#include "node/os.h"

namespace {

using nbdcsi::Status;
using nbdcsi::StatusOr;
namespace csi = nbdcsi::csi;
namespace node = nbdcsi::node;

// Every command-line flag, with its default.
struct Flags {
  std::string csi_endpoint = "unix:///csi/csi.sock";
  std::string node_id;
  std::string datapath = "unix:///run/nbd-csi/datapath.sock";
  unsigned max_volumes = 0;
  std::string log_level = "info";
  std::string kubelet_root = "/var/lib/kubelet";
  std::vector<std::string> allow_uids;
  std::string metrics_listen;
  std::string log_format = "text";
};

void AddFlags(CLI::App& app, Flags& f) {
  app.add_option("--csi-endpoint", f.csi_endpoint, "where kubelet connects: unix:///path")
      ->capture_default_str();
  app.add_option("--node-id", f.node_id, "this node's Kubernetes name (spec.nodeName)")
      ->required();
  app.add_option("--datapath", f.datapath, "the local nbd-datapathd API socket: unix:///path")
      ->capture_default_str();
  app.add_option("--max-volumes", f.max_volumes,
                 "volumes per node reported to the scheduler; 0: the number of /dev/nbd* devices "
                 "(64 without nbd.ko)")
      ->capture_default_str();
  csi::AddCsiServerFlags(app, f.log_level, f.log_format, f.metrics_listen, f.allow_uids);
  app.add_option("--kubelet-root", f.kubelet_root,
                 "kubelet's directory: staging, target and volume paths must lie beneath it "
                 "(symlinks out of it are refused)")
      ->capture_default_str();
}

// What the flags resolve to once checked.
struct Config {
  nbdcsi::PeerUids peers;
  nbdcsi::Endpoint datapath;
};

// Checks every flag before anything is served: a misconfigured DaemonSet fails at once, naming
// the flag (exit 2).
StatusOr<Config> Resolve(const Flags& f) {
  using nbdcsi::Error;
  if (Status s = csi::ValidateNodeId(f.node_id); !s.ok()) {
    return Error(EINVAL, "--node-id: {}", s.message());
  }
  if (Status s = node::ValidateKubeletRoot(f.kubelet_root); !s.ok()) return s;
  struct stat root_st {};
  if (stat(f.kubelet_root.c_str(), &root_st) != 0 || !S_ISDIR(root_st.st_mode)) {
    return Error(EINVAL, "--kubelet-root {}: not a directory", f.kubelet_root);
  }
  Config c;
  for (const auto& u : f.allow_uids) {
    auto uid = nbdcsi::ParseUid(u);
    if (!uid.ok()) return uid.status();
    c.peers.extra.push_back(*uid);
  }
  auto dp = nbdcsi::ParseEndpoint(f.datapath);
  if (!dp.ok()) return Error(EINVAL, "--datapath: {}", dp.status().message());
  c.datapath = *dp;
  if (!f.metrics_listen.empty()) {
    if (auto m = nbdcsi::ParseMetricsListen(f.metrics_listen); !m.ok()) {
      return Error(EINVAL, "--metrics-listen: {}", m.status().message());
    }
  }
  return c;
}

// /metrics, /healthz and /readyz, before the CSI socket: /readyz says why not ready while the
// plugin starts. Null when --metrics-listen is not given.
StatusOr<std::unique_ptr<nbdcsi::MetricsServer>> StartMetrics(
    const std::string& listen, node::NodeMetrics& metrics, const std::atomic<bool>& csi_served,
    node::DatapathClient& probe_dp) {
  if (listen.empty()) return std::unique_ptr<nbdcsi::MetricsServer>();
  nbdcsi::HealthChecks health;
  // Serving HTTP is the sign of life; a datapath that is down is not a reason to restart the
  // node plugin (it cannot fix it), only not to send it work.
  health.live = [] { return std::string(); };
  health.ready = [&csi_served, &probe_dp]() -> std::string {
    if (!csi_served.load()) return "the CSI endpoint is not served";
    if (auto info = probe_dp.GetPoolInfo(); !info.ok()) {
      return "the datapath does not answer: " + info.status().message();
    }
    return "";
  };
  auto server = nbdcsi::MetricsServer::Start(listen, metrics.Collectables(), std::move(health));
  if (!server.ok()) return nbdcsi::Error(server.status().code(), "--metrics-listen: {}",
                                         server.status().message());
  spdlog::info("metrics: http://{}/metrics, /healthz, /readyz", listen);
  return std::move(*server);
}

// Serves until SIGTERM/SIGINT; exit 1 when an endpoint cannot be served.
int Serve(const Flags& f, const Config& c) {
  node::NodeMetrics metrics(csi::DriverVersion());
  auto linux_os = node::MakeLinuxOs();
  auto os = node::MeasuredOs(*linux_os, metrics);
  auto grpc_dp = node::MakeGrpcDatapathClient(c.datapath.GrpcTarget());
  auto dp = node::MeasuredDatapath(*grpc_dp, metrics);
  // Kubelet's probe gives up after a few seconds; a datapath that takes longer than this to say
  // how its pool is is as good as down for new work.
  auto probe_dp = node::MakeGrpcDatapathClient(c.datapath.GrpcTarget(), std::chrono::seconds(2));
  std::atomic<bool> csi_served{false};
  auto metrics_server = StartMetrics(f.metrics_listen, metrics, csi_served, *probe_dp);
  if (!metrics_server.ok()) {
    spdlog::error("{}", metrics_server.status().message());
    return 1;
  }
  auto node_service = node::MakeLockedNodeService(node::MakeNodeService(
      {.node_id = f.node_id, .max_volumes = f.max_volumes, .kubelet_root = f.kubelet_root}, *os,
      *dp));
  csi::IdentityOptions identity_opts;
  identity_opts.controller_service = false;
  // Ready once the datapath answers: before that no stage or publish could work.
  identity_opts.ready = [&dp]() -> Status { return dp->GetPoolInfo().status(); };
  auto identity = csi::MakeIdentityService(std::move(identity_opts));

  auto server = csi::StartCsiServer({.endpoint = f.csi_endpoint,
                                     .services = {identity.get(), node_service.get()},
                                     .peers = c.peers,
                                     .interceptors = {[&metrics] {
                                       return metrics.rpc().InterceptorFactory();
                                     }}});
  if (!server.ok()) {
    spdlog::error("CSI endpoint {}: {}", f.csi_endpoint, server.status().message());
    return 1;
  }
  spdlog::info("nbd-csi-node {} for node {} serving {} (datapath {}, kubelet root {})",
               csi::DriverVersion(), f.node_id, f.csi_endpoint, f.datapath, f.kubelet_root);
  csi_served = true;
  int sig = nbdcsi::WaitForTerminationSignal();
  spdlog::info("signal {}: stopping", sig);
  csi_served = false;
  // The HTTP server takes up to a couple of seconds to stop (CivetWeb's master thread notices on
  // its next poll); it reads nothing the CSI server's shutdown tears down, so both stop at once
  // and the pod's termination grace is spent once, not twice.
  std::thread stop_metrics([&metrics_server] { metrics_server->reset(); });
  (*server)->Shutdown();
  (*server)->Wait();
  spdlog::debug("CSI server stopped");
  stop_metrics.join();
  spdlog::info("stopped");  // the rest is the process's exit: a slow stop shows which side
  return 0;
}

int Run(int argc, char** argv) {
  CLI::App app{
      "nbd-csi-node: the CSI Node service (stage, publish, expand, stats) over the "
      "local nbd-datapathd"};
  Flags f;
  AddFlags(app, f);
  if (auto rc = nbdcsi::ParseCommandLine(app, argc, argv)) return *rc;
  if (!nbdcsi::ApplyLogFlags(f.log_level, f.log_format)) return 2;
  auto config = Resolve(f);
  if (!config.ok()) {
    spdlog::error("{}", config.status().message());
    return 2;
  }
  return Serve(f, *config);
}

}  // namespace

int main(int argc, char** argv) { nbdcsi::DaemonMain(argc, argv, Run); }
