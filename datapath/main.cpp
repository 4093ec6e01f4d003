// nbd-datapathd: the per-node engine. Owns the pool, serves its volumes over NBD, and exposes the
// management API that nbdctl and the CSI controller use.
#include <sys/stat.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <thread>

#include <CLI/CLI.hpp>
#include <grpcpp/server.h>
#include <spdlog/spdlog.h>

#include "common/endpoint.h"
#include "common/node_id.h"
#include "common/process.h"
#include "common/quantity.h"
#include "common/tls.h"
#include "common/unix_listener.h"
#include "datapath/api/attach_service.h"
#include "datapath/api/heartbeat.h"
#include "datapath/api/service.h"
#include "datapath/attach/attachments.h"
#include "datapath/attach/runtime.h"
#include "datapath/engine/frontend.h"
#include "datapath/engine/nbd_tls.h"
#include "datapath/metrics/collector.h"
#include "datapath/metrics/server.h"
#include "datapath/pool/pool.h"

using namespace nbdcsi;
using namespace nbdcsi::datapath;

namespace {

// Unix sockets live in directories that may not exist yet (/run/nbd-csi on a fresh node).
Status EnsureSocketDir(const Endpoint& ep) {
  if (ep.kind != Endpoint::Kind::kUnix) return Status::Ok();
  std::error_code ec;
  std::filesystem::create_directories(std::filesystem::path(ep.path).parent_path(), ec);
  if (ec) return Error(ec.value(), "cannot create the directory of {}: {}", ep.path, ec.message());
  return Status::Ok();
}

// What the cluster flags (--node-id ... --heartbeat-interval) resolve to.
struct ClusterConfig {
  std::string node_id;
  std::string advertise;   // host:port
  std::string tcp_listen;  // host:port; empty: no TCP API
  std::string controller;  // host:port; empty: no heartbeat
  TlsFiles tls;
  std::chrono::milliseconds heartbeat_interval{2000};
};

// Checks the flag combinations before anything is opened, so a misconfigured DaemonSet fails at
// once with the flag to fix (exit 2) rather than running unregistered.
Status ValidateCluster(ClusterConfig& c) {
  if (!c.node_id.empty()) {
    if (Status s = ValidateNodeId(c.node_id); !s.ok()) {
      return Error(EINVAL, "--node-id: {}", s.message());
    }
  }
  if (!c.controller.empty()) {
    if (c.node_id.empty() || c.advertise.empty()) {
      return Error(EINVAL, "--controller needs --node-id (this node's Kubernetes name) and "
                           "--advertise (host:port where the controller reaches this datapath)");
    }
    if (Status s = ValidateDialAddress(c.controller); !s.ok()) {
      return Error(EINVAL, "--controller: {}", s.message());
    }
  }
  if (!c.advertise.empty()) {
    if (Status s = ValidateDialAddress(c.advertise); !s.ok()) {
      return Error(EINVAL, "--advertise: {}", s.message());
    }
    if (c.tcp_listen.empty()) c.tcp_listen = c.advertise;
  }
  if (!c.tcp_listen.empty()) {
    if (Status s = ValidateHostPort(c.tcp_listen); !s.ok()) {
      return Error(EINVAL, "--api-tcp-listen: {}", s.message());
    }
  }
  const bool any_tls = !c.tls.cert.empty() || !c.tls.key.empty() || !c.tls.ca.empty();
  if (!c.tcp_listen.empty() || !c.controller.empty() || any_tls || c.tls.insecure) {
    if (Status s = c.tls.Validate(); !s.ok()) {
      const char* who = !c.tcp_listen.empty()
                            ? "the TCP Datapath API (--advertise/--api-tcp-listen)"
                        : !c.controller.empty() ? "--controller"
                                                : "TLS";
      return Error(EINVAL, "{}: {}", who, s.message());
    }
  }
  return Status::Ok();
}

// NBD over TCP is TLS with client certificates unless the operator explicitly asks for
// plaintext; TLS flags without a TCP listener would be a silent no-op, so they are refused too.
Status ValidateNbdTls(const std::vector<Endpoint>& eps, const NbdTlsFiles& f, bool insecure) {
  std::string tcp;
  for (const auto& ep : eps) {
    if (ep.kind != Endpoint::Kind::kUnix && tcp.empty()) tcp = ep.ToString();
  }
  const bool any = !f.cert.empty() || !f.key.empty() || !f.ca.empty();
  if (insecure && any) {
    return Error(EINVAL, "--insecure-nbd-tcp cannot be combined with --nbd-tls-cert, "
                         "--nbd-tls-key or --nbd-tls-ca");
  }
  if (tcp.empty()) {
    if (any || insecure) {
      return Error(EINVAL, "{} applies to a tcp:// --nbd-listen, and none is given",
                   insecure ? "--insecure-nbd-tcp" : "--nbd-tls-cert/--nbd-tls-key/--nbd-tls-ca");
    }
    return Status::Ok();
  }
  if (insecure) return Status::Ok();
  if (!any) {
    return Error(EINVAL, "--nbd-listen {}: NBD over TCP requires TLS: give --nbd-tls-cert, "
                         "--nbd-tls-key and --nbd-tls-ca (clients must present a certificate "
                         "signed by that CA), or --insecure-nbd-tcp for plaintext on a trusted "
                         "network", tcp);
  }
  std::string missing;
  for (auto [flag, value] :
       {std::pair{"--nbd-tls-cert", &f.cert}, std::pair{"--nbd-tls-key", &f.key},
        std::pair{"--nbd-tls-ca", &f.ca}}) {
    if (value->empty()) missing += missing.empty() ? flag : std::string(", ") + flag;
  }
  if (!missing.empty()) {
    return Error(EINVAL, "incomplete NBD TLS configuration: missing {} (all of --nbd-tls-cert, "
                         "--nbd-tls-key and --nbd-tls-ca are needed)", missing);
  }
  return Status::Ok();
}

// A certificate that names nodes, none of them this one, is a mix-up the controller would refuse
// at every heartbeat: say so now. One that names no node is a shared certificate, which works
// only with a controller running --datapath-server-name.
Status CheckNodeIdentity(const TlsCredentials& tls, const std::string& node_id) {
  if (node_id.empty()) return Status::Ok();
  std::vector<std::string> ids = tls.NodeIds();
  if (ids.empty()) {
    spdlog::warn("--tls-cert {} names no node: the controller accepts this datapath only with "
                 "--datapath-server-name (node binding off); a per-node certificate carries the "
                 "URI SAN {}", tls.files().cert, NodeIdentityUri(node_id));
    return Status::Ok();
  }
  if (std::find(ids.begin(), ids.end(), node_id) != ids.end()) return Status::Ok();
  std::string names;
  for (const auto& id : ids) names += (names.empty() ? "" : ", ") + id;
  return Error(EINVAL, "--tls-cert {} is the certificate of node {}, not of --node-id {} (URI "
                       "SAN {} expected)", tls.files().cert, names, node_id,
               NodeIdentityUri(node_id));
}

int Run(int argc, char** argv) {
  CLI::App app{"nbd-datapathd: serves a pool of thin local-disk volumes over NBD"};
  std::string pool_dir;
  std::string api = "unix:///run/nbd-csi/datapath.sock";
  std::vector<std::string> listens;
  unsigned workers = std::max(1u, std::thread::hardware_concurrency());
  double overcommit = 1.0;
  bool no_reflink = false;
  std::string capacity;
  std::string log_level = "info";
  AttachOptions aopts;
  ClusterConfig cluster;
  int64_t heartbeat_ms = 2000;
  NbdTlsFiles nbd_tls;
  bool insecure_nbd_tcp = false;
  app.add_option("--pool", pool_dir, "Pool directory (volumes are sparse files in it)")->required();
  app.add_option("--api", api, "Management API endpoint (unix:///path; socket mode 0600)")
      ->capture_default_str();
  app.add_option("--nbd-listen", listens,
                 "NBD listener, repeatable: unix:///path (default unix:///run/nbd-csi/nbd.sock) "
                 "or tcp://HOST:PORT (off unless given)");
  app.add_option("--nbd-tls-cert", nbd_tls.cert,
                 "PEM certificate (chain) of the tcp:// NBD listeners; the three --nbd-tls files "
                 "are reloaded for new connections when they change on disk");
  app.add_option("--nbd-tls-key", nbd_tls.key, "PEM private key of --nbd-tls-cert");
  app.add_option("--nbd-tls-ca", nbd_tls.ca,
                 "PEM CA bundle that NBD clients' certificates must chain to (mutual TLS, "
                 "required on tcp:// listeners)");
  app.add_flag("--insecure-nbd-tcp", insecure_nbd_tcp,
               "Plaintext NBD on tcp:// listeners, no authentication (trusted networks only)");
  app.add_option("--workers", workers, "io_uring worker threads")
      ->check(CLI::Range(1u, 64u))
      ->capture_default_str();
  app.add_flag("--no-reflink", no_reflink,
               "Never use reflink: snapshots, restores and clones use background copies even "
               "where the file system could share extents (for tests and comparisons)");
  app.add_option("--overcommit", overcommit,
                 "Provisioned bytes may reach capacity times this ratio")
      ->check(CLI::Range(0.01, 1000.0))
      ->capture_default_str();
  double free_reserve_percent = 10;
  app.add_option("--free-reserve", free_reserve_percent,
                 "Percent of the pool file system's size kept free: below it nothing more is "
                 "provisioned, and at most (free - reserve) x overcommit may be (0: off)")
      ->check(CLI::Range(0.0, 90.0))
      ->capture_default_str();
  app.add_option("--capacity", capacity, "Pool capacity (e.g. 100Gi); default: the file system's size");
  app.add_option("--log-level", log_level, "trace, debug, info, warn or error")
      ->check(CLI::IsMember({"trace", "debug", "info", "warn", "error"}))
      ->capture_default_str();
  app.add_option("--attach-connections", aopts.default_connections,
                 "Sockets per kernel NBD attachment when the caller does not say (0: min(nproc, 4))")
      ->check(CLI::Range(0u, AttachmentManager::kMaxConnections))
      ->capture_default_str();
  app.add_option("--attach-dead-conn-timeout", aopts.dead_conn_timeout_s,
                 "Seconds the kernel keeps an attached device, queueing I/O, while this daemon is "
                 "down; a restart must reconnect within it")
      ->check(CLI::Range(uint64_t{1}, uint64_t{86400}))
      ->capture_default_str();
  app.add_option("--attach-io-timeout", aopts.io_timeout_s,
                 "Kernel NBD request timeout in seconds: requests in flight when this daemon died "
                 "are requeued after it; live requests slower than this get their socket dropped")
      ->check(CLI::Range(uint64_t{1}, uint64_t{3600}))
      ->capture_default_str();
  bool require_kernel_nbd = false;
  app.add_flag("--require-kernel-nbd", require_kernel_nbd,
               "Never attach through the nbdfuse + loop fallback: refuse to start without kernel "
               "NBD (nbd.ko), and fail attaches if it goes away");
  app.add_option("--node-id", cluster.node_id,
                 "This node's Kubernetes name; the controller places volumes by it");
  app.add_option("--advertise", cluster.advertise,
                 "HOST:PORT where the controller reaches the Datapath API over TCP (mutual TLS); "
                 "also where it listens unless --api-tcp-listen says otherwise");
  app.add_option("--api-tcp-listen", cluster.tcp_listen,
                 "HOST:PORT to listen on for the TCP Datapath API (e.g. 0.0.0.0:9820)");
  app.add_option("--controller", cluster.controller,
                 "HOST:PORT of nbd-csi-controller's Registry: heartbeat to it (needs --node-id "
                 "and --advertise); without it the datapath runs alone");
  app.add_option("--tls-cert", cluster.tls.cert, "PEM certificate (chain) of this datapath");
  app.add_option("--tls-key", cluster.tls.key, "PEM private key of --tls-cert");
  app.add_option("--tls-ca", cluster.tls.ca,
                 "PEM CA bundle the controller's certificate must chain to");
  app.add_flag("--insecure", cluster.tls.insecure,
               "Plaintext TCP API and heartbeats, no authentication (loopback tests only)");
  app.add_option("--heartbeat-interval", heartbeat_ms, "Milliseconds between heartbeats")
      ->check(CLI::Range(int64_t{100}, int64_t{600000}))
      ->capture_default_str();
  std::string metrics_listen;
  app.add_option("--metrics-listen", metrics_listen,
                 "HOST:PORT (IP address) serving /metrics (Prometheus), /healthz and /readyz "
                 "over plain HTTP, e.g. 0.0.0.0:9821; off when empty");
  std::vector<std::string> allow_uids;
  app.add_option("--allow-uid", allow_uids,
                 "A uid that may call the unix API socket besides root and this process's own "
                 "(repeatable; others get PERMISSION_DENIED)");
  CLI11_PARSE(app, argc, argv);
  PeerUids api_peers;
  for (const auto& u : allow_uids) {
    auto uid = ParseUid(u);
    if (!uid.ok()) {
      spdlog::critical("{}", uid.status().message());
      return 2;
    }
    api_peers.extra.push_back(*uid);
  }
  if (require_kernel_nbd) aopts.fuse_fallback = false;
  if (listens.empty()) listens.push_back("unix:///run/nbd-csi/nbd.sock");
  cluster.heartbeat_interval = std::chrono::milliseconds(heartbeat_ms);
  const auto started = std::chrono::system_clock::now();

  spdlog::set_level(spdlog::level::from_str(log_level));
  spdlog::set_pattern("%Y-%m-%dT%H:%M:%S.%e %^%l%$ [%t] %v");

  PoolOptions popts;
  popts.dir = pool_dir;
  popts.overcommit_ratio = overcommit;
  popts.free_reserve_ratio = free_reserve_percent / 100;
  popts.disable_reflink = no_reflink;
  if (!capacity.empty()) {
    auto q = ParseQuantity(capacity);
    if (!q.ok()) {
      spdlog::critical("--capacity: {}", q.status().message());
      return 2;
    }
    popts.capacity_bytes = *q;
  }
  std::vector<Endpoint> nbd_eps;
  for (const auto& l : listens) {
    auto ep = ParseEndpoint(l);
    if (!ep.ok()) {
      spdlog::critical("--nbd-listen {}: {}", l, ep.status().message());
      return 2;
    }
    nbd_eps.push_back(*ep);
  }
  auto api_ep = ParseEndpoint(api);
  if (!api_ep.ok()) {
    spdlog::critical("--api {}: {}", api, api_ep.status().message());
    return 2;
  }
  if (api_ep->kind != Endpoint::Kind::kUnix) {
    spdlog::critical("--api {}: must be a unix socket; the TCP API is --advertise / "
                     "--api-tcp-listen, with TLS", api);
    return 2;
  }
  if (Status st = ValidateCluster(cluster); !st.ok()) {
    spdlog::critical("{}", st.message());
    return 2;
  }
  if (Status st = ValidateNbdTls(nbd_eps, nbd_tls, insecure_nbd_tcp); !st.ok()) {
    spdlog::critical("{}", st.message());
    return 2;
  }
  if (!metrics_listen.empty()) {
    if (auto m = ParseMetricsListen(metrics_listen); !m.ok()) {
      spdlog::critical("--metrics-listen: {}", m.status().message());
      return 2;
    }
  }
  FrontendOptions fopts;
  fopts.workers = workers;
  fopts.insecure_tcp = insecure_nbd_tcp;
  if (!nbd_tls.cert.empty()) {
    auto ctx = NbdTlsContext::Load(nbd_tls);
    if (!ctx.ok()) {
      spdlog::critical("NBD TLS: {}", ctx.status().message());
      return 2;
    }
    fopts.tls = std::move(ctx.value());
  }
  // Read the TLS files now: an unreadable key is a configuration error, reported before the pool
  // is opened.
  std::vector<ApiListen> api_listens(1);
  api_listens[0].endpoint = api;
  api_listens[0].peers = api_peers;
  std::shared_ptr<grpc::ChannelCredentials> channel_creds;
  std::shared_ptr<TlsCredentials> tls;
  if ((!cluster.tcp_listen.empty() || !cluster.controller.empty()) && !cluster.tls.insecure) {
    auto loaded = TlsCredentials::Load(cluster.tls);
    if (!loaded.ok()) {
      spdlog::critical("TLS (--tls-cert/--tls-key/--tls-ca): {}", loaded.status().message());
      return 2;
    }
    tls = *loaded;
    if (Status st = CheckNodeIdentity(*tls, cluster.node_id); !st.ok()) {
      spdlog::critical("{}", st.message());
      return 2;
    }
  }
  if (!cluster.tcp_listen.empty()) {
    ApiListen tcp;
    tcp.endpoint = "tcp://" + cluster.tcp_listen;
    tcp.insecure = cluster.tls.insecure;
    // The controller calls this API; another datapath's certificate must not.
    if (tls) tcp.creds = tls->Server(TlsPeers::kNotNodes);
    api_listens.push_back(std::move(tcp));
  }
  if (!cluster.controller.empty()) {
    channel_creds = tls ? tls->Channel() : grpc::InsecureChannelCredentials();
  }

  auto pool = Pool::Open(popts);
  if (!pool.ok()) {
    spdlog::critical("cannot open pool: {}", pool.status().message());
    return 1;
  }
  PoolInfo info = (*pool)->Info();
  spdlog::info("pool {}: {} volumes, {} file system, capacity {} bytes, overcommit {}, {} bytes "
               "free of which {} kept in reserve",
               info.dir, info.volumes, info.fs_type, info.capacity, info.overcommit_ratio,
               info.free, info.free_reserve);
  for (const auto& o : info.cleaned_orphans) spdlog::warn("pool: cleaned orphan {}", o);
  for (const auto& b : info.broken_volumes)
    spdlog::warn("pool: broken volume {}: left in place, see nbdctl pool info", b);

  NbdFrontend frontend(**pool, fopts);
  // What the probes and the collector look at; set as each part comes up. The server starts
  // before the NBD listeners and the API so that /healthz answers during a long start (attached
  // devices to reconnect) and /readyz says why it is not ready yet.
  std::atomic<bool> workers_up{false}, nbd_up{false}, api_up{false}, stopping{false};
  std::atomic<AttachmentManager*> attachments{nullptr};
  std::unique_ptr<MetricsServer> metrics;
  if (!metrics_listen.empty()) {
    auto engine = [&]() { return workers_up.load() ? frontend.counters() : EngineCounters{}; };
    HealthChecks health;
    health.live = [&, workers]() -> std::string {
      if (!workers_up.load()) return "";  // starting: nothing to restart yet
      uint64_t running = frontend.counters().workers_running;
      if (running < workers)
        return fmt::format("{} of {} NBD workers stopped", workers - running, workers);
      return "";
    };
    health.ready = [&]() -> std::string {
      if (stopping.load()) return "shutting down";
      if (!nbd_up.load()) return "NBD listeners not started";
      if (!api_up.load()) return "management API not serving";
      return "";
    };
    auto attached = [&]() {
      AttachmentManager* m = attachments.load();
      return m ? m->List() : std::vector<AttachmentRecord>{};
    };
    auto collector = std::make_shared<DatapathCollector>(**pool, engine, attached, NBDCSI_VERSION);
    auto server = MetricsServer::Start(metrics_listen, collector, std::move(health));
    if (!server.ok()) {
      spdlog::critical("--metrics-listen: {}", server.status().message());
      return 1;
    }
    metrics = std::move(*server);
    spdlog::info("metrics: http://{}/metrics, /healthz, /readyz", metrics_listen);
  }
  for (const auto& ep : nbd_eps) {
    Status st = EnsureSocketDir(ep);
    if (st.ok()) st = frontend.Listen(ep);
    if (!st.ok()) {
      spdlog::critical("{}", st.message());
      return 1;
    }
  }
  if (Status st = frontend.Start(); !st.ok()) {
    spdlog::critical("cannot start the NBD workers: {}", st.message());
    return 1;
  }
  workers_up = true;
  nbd_up = true;
  auto attach = AttachRuntime::Start(**pool, frontend, info.dir + "/attachments", aopts);
  if (!attach.ok()) {
    spdlog::critical("attachments: {}", attach.status().message());
    return 1;
  }
  attachments = &(*attach)->manager();
  // Whichever way main ends from here, the server (whose collector reads the attachments) stops
  // before `attach` is destroyed.
  struct StopMetrics {
    std::unique_ptr<MetricsServer>& m;
    ~StopMetrics() { m.reset(); }
  } stop_metrics{metrics};

  if (Status st = EnsureSocketDir(*api_ep); !st.ok()) {
    spdlog::critical("{}", st.message());
    return 1;
  }
  auto attach_service = MakeAttachmentService((*attach)->manager());
  auto server = StartApiServer(**pool, api_listens, {attach_service.get()});
  if (!server.ok()) {
    spdlog::critical("cannot start the management API: {}", server.status().message());
    return 1;
  }
  api_up = true;
  // Only once the API serves: the controller may call it as soon as it hears from us.
  std::unique_ptr<HeartbeatSender> heartbeat;
  if (!cluster.controller.empty()) {
    HeartbeatOptions hopts;
    hopts.node_id = cluster.node_id;
    hopts.advertise = cluster.advertise;
    hopts.controller = cluster.controller;
    hopts.creds = channel_creds;
    hopts.interval = cluster.heartbeat_interval;
    hopts.version = NBDCSI_VERSION;
    hopts.started_unix_ns = std::chrono::duration_cast<std::chrono::nanoseconds>(
                                started.time_since_epoch()).count();
    heartbeat = std::make_unique<HeartbeatSender>(**pool, std::move(hopts));
    if (Status st = heartbeat->Start(); !st.ok()) {
      spdlog::critical("heartbeat: {}", st.message());
      return 1;
    }
  }
  spdlog::info("nbd-datapathd {} ready: api {}{}{}, {} NBD listener(s), {} workers",
               NBDCSI_VERSION, api,
               cluster.tcp_listen.empty() ? "" : " and tcp://" + cluster.tcp_listen,
               cluster.node_id.empty() ? "" : ", node " + cluster.node_id, nbd_eps.size(),
               workers);

  const int sig = WaitForTerminationSignal();
  spdlog::info("signal {}: shutting down", sig);
  stopping = true;
  // No more heartbeats first: the controller then expires this node instead of sending calls to
  // an API that is going away.
  if (heartbeat) heartbeat->Stop();
  (*server)->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(5));
  // Before the sockets close; attached devices stay attached (AttachRuntime::Stop says why).
  (*attach)->Stop();
  // Before what it reads goes away.
  metrics.reset();
  frontend.Stop();
  if (api_ep->kind == Endpoint::Kind::kUnix) unlink(api_ep->path.c_str());
  spdlog::info("stopped");
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  // Before any thread: every thread inherits the mask, and SIGTERM during start-up waits for the
  // daemon to be up and then stops it cleanly.
  nbdcsi::BlockTerminationSignals();
  nbdcsi::InstallCrashReporter();
  nbdcsi::ExitProcess(Run(argc, argv));
}
