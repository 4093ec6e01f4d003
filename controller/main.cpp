// nbd-csi-controller: the CSI Controller (and Identity) service on --csi-endpoint, and the
// Registry service on --registry-listen where every node's nbd-datapathd heartbeats (and, on the
// same listener, the read-only ClusterView that `nbdctl cluster` asks). Stateless:
// the registry is rebuilt from heartbeats after a restart, volume truth stays in the pools.
#include <atomic>
#include <chrono>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <CLI/CLI.hpp>
#include <fmt/ranges.h>
#include <grpcpp/server.h>
#include <grpcpp/security/credentials.h>
#include <grpcpp/security/server_credentials.h>
#include <grpcpp/server_builder.h>
#include <spdlog/spdlog.h>

#include "common/cli_parse.h"
#include "common/cluster/etcd_flags.h"
#include "common/grpc_drain.h"
#include "common/log_format.h"
#include "common/log_level.h"
#include "common/metrics/server.h"
#include "common/process.h"
#include "common/tls.h"
#include "common/unix_listener.h"
#include "controller/controller_service.h"
#include "controller/metrics.h"
#include "controller/node_datapath.h"
#include "controller/cluster_view.h"
#include "controller/replica_changes.h"
#include "controller/registry.h"
#include "csi/driver.h"
#include "csi/identity.h"
#include "csi/server.h"
#include "csi/server_flags.h"

using namespace nbdcsi;
namespace ncsi = nbdcsi::csi;

namespace {

struct Flags {
  std::string csi_endpoint = "unix:///csi/csi.sock";
  std::string registry_listen;
  TlsFiles tls;
  uint32_t heartbeat_interval_ms = 2000;
  uint32_t heartbeat_ttl_ms = 0;
  uint32_t datapath_timeout_ms = 30000;
  std::string log_level = "info";
  std::string log_format = "text";
  std::string metrics_listen;
  std::string datapath_server_name;
  std::vector<std::string> allow_uids;
  PeerUids csi_peers;  // from allow_uids
  cluster::EtcdFlags etcd;  // replicated volumes (StorageClass replicas >= 2)
  uint32_t etcd_timeout_ms = 5000;
};

void AddFlags(CLI::App& app, Flags& f) {
  app.add_option("--csi-endpoint", f.csi_endpoint, "CSI endpoint (unix:///path or tcp://host:port)")
      ->capture_default_str();
  app.add_option("--registry-listen", f.registry_listen,
                 "host:port where node datapaths register and heartbeat (mutual TLS)")
      ->required();
  app.add_option("--tls-cert", f.tls.cert, "PEM certificate of this controller");
  app.add_option("--tls-key", f.tls.key, "PEM private key of --tls-cert");
  app.add_option("--tls-ca", f.tls.ca, "PEM CA bundle that datapath certificates must chain to");
  app.add_option("--datapath-server-name", f.datapath_server_name,
                 "One certificate shared by every datapath: verify each datapath's certificate "
                 "against this DNS name. Turns node binding off: by default a datapath's "
                 "certificate must name its node (URI SAN spiffe://nbd.csi.io/node/<node-id>) "
                 "to heartbeat as that node and to be called as it");
  app.add_flag("--insecure", f.tls.insecure,
               "Plaintext gRPC to and from the datapaths (loopback tests only)");
  app.add_option("--heartbeat-interval", f.heartbeat_interval_ms,
                 "How often datapaths are told to heartbeat, in ms")
      ->check(CLI::Range(100u, 600000u))
      ->capture_default_str();
  app.add_option("--heartbeat-ttl", f.heartbeat_ttl_ms,
                 "A node silent this long (ms) is treated as absent; default 3x the interval");
  app.add_option("--datapath-timeout", f.datapath_timeout_ms,
                 "Deadline of each call to a node's datapath, in ms")
      ->check(CLI::Range(100u, 600000u))
      ->capture_default_str();
  nbdcsi::csi::AddCsiServerFlags(app, f.log_level, f.log_format, f.metrics_listen,
                                 f.allow_uids);
  cluster::AddEtcdFlags(app, f.etcd,
                        "the catalogue of replicated volumes (StorageClass parameter replicas "
                        ">= 2); without it such a CreateVolume is refused");
  app.add_option("--cluster-etcd-timeout", f.etcd_timeout_ms,
                 "Deadline of each etcd call, in milliseconds")
      ->check(CLI::Range(100u, 600000u))
      ->capture_default_str();
}

// What the parser cannot check alone; false (logged) when the flags do not make sense together.
bool CheckFlags(Flags& f) {
  if (f.heartbeat_ttl_ms == 0) f.heartbeat_ttl_ms = 3 * f.heartbeat_interval_ms;
  if (f.heartbeat_ttl_ms <= f.heartbeat_interval_ms) {
    spdlog::critical("--heartbeat-ttl {} ms must exceed --heartbeat-interval {} ms",
                     f.heartbeat_ttl_ms, f.heartbeat_interval_ms);
    return false;
  }
  if (Status s = f.tls.Validate(); !s.ok()) {
    spdlog::critical("{}", s.message());
    return false;
  }
  if (!f.datapath_server_name.empty() && f.tls.insecure) {
    spdlog::critical("--datapath-server-name has no meaning with --insecure");
    return false;
  }
  if (!f.metrics_listen.empty()) {
    if (auto m = ParseMetricsListen(f.metrics_listen); !m.ok()) {
      spdlog::critical("--metrics-listen: {}", m.status().message());
      return false;
    }
  }
  for (const auto& u : f.allow_uids) {
    auto uid = ParseUid(u);
    if (!uid.ok()) {
      spdlog::critical("{}", uid.status().message());
      return false;
    }
    f.csi_peers.extra.push_back(*uid);
  }
  return true;
}

// The Registry service on --registry-listen; null (logged) when it cannot listen.
std::unique_ptr<grpc::Server> StartRegistryServer(const Flags& f,
                                                  std::shared_ptr<grpc::ServerCredentials> creds,
                                                  std::vector<grpc::Service*> services,
                                                  const CallTracker& calls, int* port) {
  grpc::ServerBuilder rb;
  // A second controller on the same host port must fail to bind, not share the connections.
  rb.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
  rb.AddListeningPort(f.registry_listen, std::move(creds), port);
  for (grpc::Service* service : services) rb.RegisterService(service);
  std::vector<std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>> icpts;
  icpts.push_back(calls.Factory());
  rb.experimental().SetInterceptorCreators(std::move(icpts));
  std::unique_ptr<grpc::Server> server = rb.BuildAndStart();
  if (!server || *port == 0) {
    spdlog::critical("cannot listen for datapath registrations on {}", f.registry_listen);
    return nullptr;
  }
  return server;
}

// Serves CSI (Identity + Controller) over `registry` until a termination signal. `ready` is
// what /readyz reports: set once CSI is served, cleared when shutting down.
int ServeCsi(const Flags& f, controller::NodeRegistry& registry, cluster::ClusterStore* cluster,
             grpc::Server& registry_server, const CallTracker& registry_calls, int registry_port,
             controller::ControllerMetrics& metrics, std::atomic<bool>& ready) {
  // Ready once datapaths can register. A controller that knows no node yet still serves
  // (CreateVolume answers UNAVAILABLE until a node heartbeats), so it is not held back on that.
  std::atomic<bool> registry_up{true};
  ncsi::IdentityOptions iopts;
  iopts.controller_service = true;
  iopts.ready = [&registry_up]() -> Status {
    if (!registry_up.load()) return Error(EAGAIN, "the registry listener is not running");
    return Status::Ok();
  };
  auto identity = ncsi::MakeIdentityService(iopts);
  controller::ControllerOptions copts;
  copts.cluster = cluster;
  copts.on_placement_refused = [&metrics](controller::ControllerOptions::Refusal why) {
    metrics.PlacementRefused(why);
  };
  auto controller_service = controller::MakeControllerService(registry, std::move(copts));

  ncsi::CsiServerOptions sopts;
  sopts.endpoint = f.csi_endpoint;
  sopts.services = {identity.get(), controller_service.get()};
  sopts.peers = f.csi_peers;
  sopts.interceptors = {[&metrics] { return metrics.rpc().InterceptorFactory(); }};
  auto csi_server = ncsi::StartCsiServer(sopts);
  if (!csi_server.ok()) {
    spdlog::critical("cannot serve CSI on {}: {}", f.csi_endpoint, csi_server.status().message());
    registry_server.Shutdown();
    return 1;
  }
  spdlog::info("nbd-csi-controller {} ready: CSI on {}, registry on {} (port {}, {}), heartbeat "
               "every {} ms, ttl {} ms",
               ncsi::DriverVersion(), f.csi_endpoint, f.registry_listen, registry_port,
               f.tls.insecure ? "plaintext" : "mutual TLS", f.heartbeat_interval_ms,
               f.heartbeat_ttl_ms);
  ready = true;

  int sig = nbdcsi::WaitForTerminationSignal();
  spdlog::info("signal {}: shutting down", sig);
  ready = false;
  registry_up = false;
  (*csi_server)->Shutdown();
  (*csi_server)->Wait();
  spdlog::debug("CSI server stopped");
  // Heartbeats in flight end; the datapaths' idle connections are not waited for.
  DrainAndShutdown(registry_calls, {&registry_server}, std::chrono::seconds(2));
  registry_server.Wait();
  spdlog::info("stopped");
  return 0;
}

// The cluster state of replicated volumes (--cluster-etcd) into `out`, left null without it.
// False (logged) when the flags are wrong.
bool ConnectCluster(const Flags& f, std::unique_ptr<cluster::ClusterStore>& out) {
  auto etcd = cluster::ResolveEtcdFlags(f.etcd, std::chrono::milliseconds(f.etcd_timeout_ms));
  if (!etcd.ok()) {
    spdlog::critical("{}", etcd.status().message());
    return false;
  }
  if (!*etcd) return true;
  auto store = cluster::ConnectEtcdStore(**etcd, f.etcd.prefix);
  if (!store.ok()) {
    spdlog::critical("--cluster-etcd: {}", store.status().message());
    return false;
  }
  out = std::move(*store);
  spdlog::info("replicated volumes: cluster state in etcd {} under {}",
               fmt::join(f.etcd.endpoints, ","), f.etcd.prefix);
  return true;
}

// The registry listener's credentials and those of the calls to datapaths (with node binding,
// a channel per node). False (logged) when the TLS files cannot be loaded.
bool LoadTransport(const Flags& f, bool bind_nodes,
                   std::shared_ptr<grpc::ServerCredentials>& server_creds,
                   controller::GrpcDatapathOptions& dopts) {
  server_creds = grpc::InsecureServerCredentials();
  dopts.creds = grpc::InsecureChannelCredentials();
  if (f.tls.insecure) {
    spdlog::warn("--insecure: datapath traffic is plaintext; use only on loopback for tests");
    return true;
  }
  auto tls = TlsCredentials::Load(f.tls);
  if (!tls.ok()) {
    spdlog::critical("TLS credentials: {}", tls.status().message());
    return false;
  }
  server_creds = (*tls)->Server();
  dopts.creds = (*tls)->Channel();
  if (bind_nodes) {
    dopts.creds_for_node = [tls = *tls](const std::string& node) {
      return tls->ChannelToNode(node);
    };
    spdlog::info("node binding on: a datapath's certificate must name its node ({}<node-id>) "
                 "to heartbeat as it and to be called as it", kNodeIdentityPrefix);
  } else {
    spdlog::warn("node binding off (--datapath-server-name {}): any certificate the CA signed "
                 "may heartbeat as any node", f.datapath_server_name);
  }
  return true;
}

// The /metrics, /healthz and /readyz server into `out` (left null without --metrics-listen).
// False (logged) when it cannot listen.
bool StartMetrics(const Flags& f, controller::ControllerMetrics& metrics,
                  const std::atomic<bool>& registry_serving, const std::atomic<bool>& ready,
                  std::unique_ptr<MetricsServer>& out) {
  if (f.metrics_listen.empty()) return true;
  HealthChecks health;
  // The process answers: nothing of its own can wedge without the CSI socket showing it.
  health.live = [] { return std::string(); };
  health.ready = [&]() -> std::string {
    if (!registry_serving.load()) return "the registry listener is not running";
    if (!ready.load()) return "the CSI endpoint is not served";
    return "";
  };
  auto server = MetricsServer::Start(f.metrics_listen, metrics.Collectables(), std::move(health));
  if (!server.ok()) {
    spdlog::critical("--metrics-listen: {}", server.status().message());
    return false;
  }
  out = std::move(*server);
  spdlog::info("metrics: http://{}/metrics, /healthz, /readyz", f.metrics_listen);
  return true;
}

int Run(int argc, char** argv) {
  CLI::App app{"nbd-csi-controller: the CSI Controller service of the nbd.csi.io driver"};
  Flags f;
  AddFlags(app, f);
  if (auto rc = ParseCommandLine(app, argc, argv)) return *rc;

  if (!nbdcsi::ApplyLogFlags(f.log_level, f.log_format)) return 2;
  if (!CheckFlags(f)) return 2;
  std::unique_ptr<cluster::ClusterStore> cluster_store;
  if (!ConnectCluster(f, cluster_store)) return 2;
  std::shared_ptr<grpc::ServerCredentials> server_creds;
  controller::GrpcDatapathOptions dopts;
  dopts.tls_server_name = f.datapath_server_name;
  dopts.timeout = std::chrono::milliseconds(f.datapath_timeout_ms);
  const bool bind_nodes = !f.tls.insecure && f.datapath_server_name.empty();
  if (!LoadTransport(f, bind_nodes, server_creds, dopts)) return 2;
  controller::NodeRegistry registry(controller::MakeGrpcDatapathFactory(std::move(dopts)),
                                    std::chrono::milliseconds(f.heartbeat_ttl_ms),
                                    std::chrono::milliseconds(f.heartbeat_interval_ms));
  // Before the listeners: /healthz answers and /readyz says why not ready while they start.
  controller::ControllerMetrics metrics(registry, ncsi::DriverVersion());
  std::atomic<bool> ready{false}, registry_serving{false};
  std::unique_ptr<MetricsServer> metrics_server;
  if (!StartMetrics(f, metrics, registry_serving, ready, metrics_server)) return 1;
  auto registry_service =
      controller::MakeRegistryService(registry, {.bind_node_identity = bind_nodes});
  // `nbdctl cluster`: read-only, on the same listener, so the same mutual TLS lets clients in.
  controller::ClusterView cluster_view(registry, cluster_store.get());
  auto cluster_view_service = controller::MakeClusterViewService(
      cluster_view, {.refuse_node_certificates = bind_nodes});
  // `nbdctl cluster volume move|replica`: replica changes, on the same listener and terms.
  controller::ReplicaChanges replica_changes(cluster_store.get(), registry);
  auto replica_changes_service = controller::MakeReplicaChangesService(
      replica_changes, {.refuse_node_certificates = bind_nodes});
  int registry_port = 0;
  CallTracker registry_calls;
  auto registry_server = StartRegistryServer(
      f, server_creds,
      {registry_service.get(), cluster_view_service.get(), replica_changes_service.get()},
      registry_calls, &registry_port);
  if (!registry_server) return 1;
  registry_serving = true;
  int rc =
      ServeCsi(f, registry, cluster_store.get(), *registry_server, registry_calls, registry_port,
               metrics, ready);
  registry_serving = false;
  // The server first: a scrape must not read the registry or the metrics as they go.
  metrics_server.reset();
  return rc;
}

}  // namespace

int main(int argc, char** argv) { nbdcsi::DaemonMain(argc, argv, Run); }
