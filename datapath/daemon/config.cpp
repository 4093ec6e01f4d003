// nbd-datapathd's flags and their resolution into a Config (config.h).
#include "datapath/daemon/config.h"

#include <algorithm>

#include <spdlog/spdlog.h>

#include "common/cli_parse.h"
#include "common/log_level.h"
#include "common/metrics/server.h"
#include "common/node_id.h"
#include "common/quantity.h"
#include "common/unix_listener.h"

namespace nbdcsi::datapath::daemon {

namespace {


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


void AddPoolFlags(CLI::App& app, Flags& f) {
  app.add_option("--pool", f.pool_dir, "Pool directory (volumes are sparse files in it)")
      ->required();
  app.add_flag("--no-reflink", f.no_reflink,
               "Never use reflink: snapshots, restores and clones use background copies even "
               "where the file system could share extents (for tests and comparisons)");
  app.add_option("--overcommit", f.overcommit,
                 "Provisioned bytes may reach capacity times this ratio")
      ->check(CLI::Range(0.01, 1000.0))
      ->capture_default_str();
  app.add_option("--free-reserve", f.free_reserve_percent,
                 "Percent of the pool file system's size kept free: below it nothing more is "
                 "provisioned, and at most (free - reserve) x overcommit may be (0: off)")
      ->check(CLI::Range(0.0, 90.0))
      ->capture_default_str();
  app.add_option("--capacity", f.capacity,
                 "Pool capacity (e.g. 100Gi); default: the file system's size");
  app.add_option("--backup-secret-dir", f.backup_secret_dir,
                 "Directory (a mounted Secret) with the S3 credentials of scheduled backups, one "
                 "file per key: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, optional "
                 "AWS_SESSION_TOKEN, AWS_ENDPOINT_URL, AWS_REGION; read at each backup");
}

void AddNbdFlags(CLI::App& app, Flags& f) {
  app.add_option("--nbd-listen", f.listens,
                 "NBD listener, repeatable: unix:///path (default unix:///run/nbd-csi/nbd.sock) "
                 "or tcp://HOST:PORT (off unless given)");
  app.add_option("--nbd-tls-cert", f.nbd_tls.cert,
                 "PEM certificate (chain) of the tcp:// NBD listeners; the three --nbd-tls files "
                 "are reloaded for new connections when they change on disk");
  app.add_option("--nbd-tls-key", f.nbd_tls.key, "PEM private key of --nbd-tls-cert");
  app.add_option("--nbd-tls-ca", f.nbd_tls.ca,
                 "PEM CA bundle that NBD clients' certificates must chain to (mutual TLS, "
                 "required on tcp:// listeners)");
  app.add_flag("--insecure-nbd-tcp", f.insecure_nbd_tcp,
               "Plaintext NBD on tcp:// listeners, no authentication (trusted networks only)");
  app.add_option("--workers", f.workers, "io_uring worker threads")
      ->check(CLI::Range(1u, 64u))
      ->capture_default_str();
}

void AddAttachFlags(CLI::App& app, Flags& f) {
  app.add_option("--attach-connections", f.attach.default_connections,
                 "Sockets per kernel NBD attachment when the caller does not say (0: min(nproc, 4))")
      ->check(CLI::Range(0u, AttachmentManager::kMaxConnections))
      ->capture_default_str();
  app.add_option("--attach-dead-conn-timeout", f.attach.dead_conn_timeout_s,
                 "Seconds the kernel keeps an attached device, queueing I/O, while this daemon is "
                 "down; a restart must reconnect within it")
      ->check(CLI::Range(uint64_t{1}, uint64_t{86400}))
      ->capture_default_str();
  app.add_option("--attach-io-timeout", f.attach.io_timeout_s,
                 "Kernel NBD request timeout in seconds: requests in flight when this daemon died "
                 "are requeued after it; live requests slower than this get their socket dropped")
      ->check(CLI::Range(uint64_t{1}, uint64_t{3600}))
      ->capture_default_str();
  app.add_flag("--require-kernel-nbd", f.require_kernel_nbd,
               "Never attach through the nbdfuse + loop fallback: refuse to start without kernel "
               "NBD (nbd.ko), and fail attaches if it goes away");
}

void AddApiAndClusterFlags(CLI::App& app, Flags& f) {
  app.add_option("--api", f.api, "Management API endpoint (unix:///path; socket mode 0600)")
      ->capture_default_str();
  app.add_option("--allow-uid", f.allow_uids,
                 "A uid that may call the unix API socket besides root and this process's own "
                 "(repeatable; others get PERMISSION_DENIED)");
  ClusterConfig& c = f.cluster;
  app.add_option("--node-id", c.node_id,
                 "This node's Kubernetes name; the controller places volumes by it");
  app.add_option("--advertise", c.advertise,
                 "HOST:PORT where the controller reaches the Datapath API over TCP (mutual TLS); "
                 "also where it listens unless --api-tcp-listen says otherwise");
  app.add_option("--api-tcp-listen", c.tcp_listen,
                 "HOST:PORT to listen on for the TCP Datapath API (e.g. 0.0.0.0:9820)");
  app.add_option("--controller", c.controller,
                 "HOST:PORT of nbd-csi-controller's Registry: heartbeat to it (needs --node-id "
                 "and --advertise); without it the datapath runs alone");
  app.add_option("--tls-cert", c.tls.cert, "PEM certificate (chain) of this datapath");
  app.add_option("--tls-key", c.tls.key, "PEM private key of --tls-cert");
  app.add_option("--tls-ca", c.tls.ca, "PEM CA bundle the controller's certificate must chain to");
  app.add_flag("--insecure", c.tls.insecure,
               "Plaintext TCP API and heartbeats, no authentication (loopback tests only)");
  app.add_option("--heartbeat-interval", f.heartbeat_ms, "Milliseconds between heartbeats")
      ->check(CLI::Range(int64_t{100}, int64_t{600000}))
      ->capture_default_str();
}

void AddReplicaClusterFlags(CLI::App& app, Flags& f) {
  ReplicaClusterFlags& r = f.replicas;
  cluster::AddEtcdFlags(app, r.etcd,
                        "the cluster state of replicated volumes; with it this node registers "
                        "itself and can serve their targets (needs --node-id)");
  app.add_option("--cluster-lease-ttl", r.lease_ttl,
                 "Seconds this node's claims outlive it: after a crash, another node can take "
                 "over a volume this long after the last keepalive")
      ->check(CLI::Range(int64_t{2}, int64_t{300}))
      ->capture_default_str();
  app.add_option("--cluster-nbd-endpoint", r.nbd_endpoint,
                 "tcp://HOST:PORT where other nodes' targets reach this node's replicas; "
                 "default: the tcp:// --nbd-listen (which must then not be a wildcard address)");
  app.add_option("--replica-connections", r.connections,
                 "NBD connections from a target to each of its replicas")
      ->check(CLI::Range(1, 16))
      ->capture_default_str();
  app.add_option("--replica-timeout", r.replica_timeout_s,
                 "Seconds a replica may take to answer a request before it is dropped from the "
                 "in-sync set (writes stall at most this long when a replica falls silent)")
      ->check(CLI::Range(0.1, 600.0))
      ->capture_default_str();
  app.add_option("--replica-resync-interval", r.resync_interval_s,
                 "Seconds between the targets' looks for out-of-sync replicas whose node is back "
                 "(they are then resynced: only what they missed); 0: only by `nbdctl target "
                 "resync`")
      ->check(CLI::Range(int64_t{0}, int64_t{3600}))
      ->capture_default_str();
  app.add_option("--replica-resync-rate", r.resync_rate,
                 "Bytes per second an automatic resync may copy (a quantity, e.g. 100Mi; default "
                 "unlimited)");
}

void AddObservabilityFlags(CLI::App& app, Flags& f) {
  app.add_option("--metrics-listen", f.metrics_listen,
                 "HOST:PORT (IP address) serving /metrics (Prometheus), /healthz and /readyz "
                 "over plain HTTP, e.g. 0.0.0.0:9821; off when empty");
  app.add_option("--log-level", f.log_level,
                 LogLevelChoices() + "; changes at run time: nbdctl log-level, SIGUSR1/SIGUSR2")
      ->check(CLI::IsMember(LogLevelNames()))
      ->capture_default_str();
  app.add_option("--log-format", f.log_format,
                 "text (one line per message) or json (one JSON object per line)")
      ->check(CLI::IsMember({"text", "json"}))
      ->capture_default_str();
}


Status ResolvePool(const Flags& f, PoolOptions& p) {
  p.dir = f.pool_dir;
  p.overcommit_ratio = f.overcommit;
  p.free_reserve_ratio = f.free_reserve_percent / 100;
  p.disable_reflink = f.no_reflink;
  if (!f.capacity.empty()) {
    auto q = ParseQuantity(f.capacity);
    if (!q.ok()) return Error(EINVAL, "--capacity: {}", q.status().message());
    p.capacity_bytes = *q;
  }
  return Status::Ok();
}

Status ResolveNbd(const Flags& f, Config& c) {
  std::vector<std::string> listens = f.listens;
  if (listens.empty()) listens.push_back("unix:///run/nbd-csi/nbd.sock");
  for (const auto& l : listens) {
    auto ep = ParseEndpoint(l);
    if (!ep.ok()) return Error(EINVAL, "--nbd-listen {}: {}", l, ep.status().message());
    c.nbd_eps.push_back(*ep);
  }
  if (Status st = ValidateNbdTls(c.nbd_eps, f.nbd_tls, f.insecure_nbd_tcp); !st.ok()) return st;
  c.frontend.workers = f.workers;
  c.frontend.insecure_tcp = f.insecure_nbd_tcp;
  if (!f.nbd_tls.cert.empty()) {
    auto ctx = NbdTlsContext::Load(f.nbd_tls);
    if (!ctx.ok()) return Error(EINVAL, "NBD TLS: {}", ctx.status().message());
    c.frontend.tls = std::move(ctx.value());
  }
  return Status::Ok();
}

// The unix API, the TCP API for the controller and the heartbeat's credentials. The TLS files
// are read now: an unreadable key is a configuration error, reported before the pool is opened.
Status ResolveApiAndCluster(const Flags& f, Config& c) {
  PeerUids peers;
  for (const auto& u : f.allow_uids) {
    auto uid = ParseUid(u);
    if (!uid.ok()) return uid.status();
    peers.extra.push_back(*uid);
  }
  auto api_ep = ParseEndpoint(f.api);
  if (!api_ep.ok()) return Error(EINVAL, "--api {}: {}", f.api, api_ep.status().message());
  if (api_ep->kind != Endpoint::Kind::kUnix) {
    return Error(EINVAL, "--api {}: must be a unix socket; the TCP API is --advertise / "
                         "--api-tcp-listen, with TLS", f.api);
  }
  c.api = f.api;
  c.api_ep = *api_ep;
  c.cluster = f.cluster;
  c.cluster.heartbeat_interval = std::chrono::milliseconds(f.heartbeat_ms);
  if (Status st = ValidateCluster(c.cluster); !st.ok()) return st;
  c.api_listens.resize(1);
  c.api_listens[0].endpoint = f.api;
  c.api_listens[0].peers = peers;
  const ClusterConfig& k = c.cluster;
  std::shared_ptr<TlsCredentials> tls;
  if ((!k.tcp_listen.empty() || !k.controller.empty()) && !k.tls.insecure) {
    auto loaded = TlsCredentials::Load(k.tls);
    if (!loaded.ok()) {
      return Error(EINVAL, "TLS (--tls-cert/--tls-key/--tls-ca): {}", loaded.status().message());
    }
    tls = *loaded;
    if (Status st = CheckNodeIdentity(*tls, k.node_id); !st.ok()) return st;
  }
  if (!k.tcp_listen.empty()) {
    ApiListen tcp;
    tcp.endpoint = "tcp://" + k.tcp_listen;
    tcp.insecure = k.tls.insecure;
    // The controller calls this API; another datapath's certificate must not.
    if (tls) tcp.creds = tls->Server(TlsPeers::kNotNodes);
    c.api_listens.push_back(std::move(tcp));
  }
  if (!k.controller.empty()) {
    c.channel_creds = tls ? tls->Channel() : grpc::InsecureChannelCredentials();
  }
  return Status::Ok();
}

// The cluster of replicated volumes: etcd, this node's registration, and the replica client's
// TLS (the node's NBD certificate, presented in the client role).
Status ResolveReplicaCluster(const Flags& f, Config& c) {
  const ReplicaClusterFlags& r = f.replicas;
  if (!r.etcd.endpoints.empty() && f.cluster.node_id.empty())
    return Error(EINVAL, "--cluster-etcd needs --node-id (this node's name in the cluster)");
  auto etcd = cluster::ResolveEtcdFlags(
      r.etcd, std::chrono::milliseconds(std::max<int64_t>(1000, r.lease_ttl * 1000 / 4)));
  if (!etcd.ok()) return etcd.status();
  if (!*etcd) {
    if (!r.nbd_endpoint.empty()) return Error(EINVAL, "--cluster-nbd-endpoint needs --cluster-etcd");
    return Status::Ok();
  }
  c.etcd = **etcd;
  c.cluster_prefix = r.etcd.prefix;
  replica::ClusterAgentOptions& a = c.agent;
  a.node_id = f.cluster.node_id;
  a.lease_ttl_seconds = r.lease_ttl;
  a.connections = r.connections;
  a.replica_tls = {f.nbd_tls.cert, f.nbd_tls.key, f.nbd_tls.ca, ""};
  a.state_dir = f.pool_dir + "/targets";
  a.resync_interval = std::chrono::seconds(r.resync_interval_s);
  a.request_timeout = std::chrono::milliseconds(static_cast<int64_t>(r.replica_timeout_s * 1000));
  a.handshake_timeout = std::max(a.request_timeout, std::chrono::milliseconds(2000));
  if (!r.resync_rate.empty()) {
    auto q = ParseQuantity(r.resync_rate);
    if (!q.ok() || *q == 0)
      return Error(EINVAL, "--replica-resync-rate: {}",
                   q.ok() ? "must be greater than 0" : q.status().message());
    a.resync_rate_bytes_per_second = *q;
  }
  a.nbd_endpoint = r.nbd_endpoint;
  if (a.nbd_endpoint.empty()) {
    for (const auto& ep : c.nbd_eps) {
      if (ep.kind != Endpoint::Kind::kTcp) continue;
      if (ep.host == "0.0.0.0" || ep.host == "::")
        return Error(EINVAL, "--nbd-listen {} is a wildcard address: give "
                             "--cluster-nbd-endpoint (where other nodes reach this one)",
                     ep.ToString());
      a.nbd_endpoint = ep.ToString();
      break;
    }
  } else if (auto ep = ParseEndpoint(a.nbd_endpoint);
             !ep.ok() || ep->kind != Endpoint::Kind::kTcp) {
    return Error(EINVAL, "--cluster-nbd-endpoint {}: must be tcp://HOST:PORT", a.nbd_endpoint);
  }
  return Status::Ok();
}

}  // namespace

void AddFlags(CLI::App& app, Flags& f) {
  AddPoolFlags(app, f);
  AddNbdFlags(app, f);
  AddAttachFlags(app, f);
  AddApiAndClusterFlags(app, f);
  AddReplicaClusterFlags(app, f);
  AddObservabilityFlags(app, f);
}

StatusOr<Config> Resolve(const Flags& f) {
  Config c;
  if (Status st = ResolvePool(f, c.pool); !st.ok()) return st;
  if (Status st = ResolveNbd(f, c); !st.ok()) return st;
  if (Status st = ResolveApiAndCluster(f, c); !st.ok()) return st;
  if (Status st = ResolveReplicaCluster(f, c); !st.ok()) return st;
  if (!f.metrics_listen.empty()) {
    if (auto m = ParseMetricsListen(f.metrics_listen); !m.ok()) {
      return Error(EINVAL, "--metrics-listen: {}", m.status().message());
    }
  }
  c.peer_tls = {f.nbd_tls.cert, f.nbd_tls.key, f.nbd_tls.ca, ""};
  c.peer_nbd_endpoint = c.agent.nbd_endpoint;
  for (const auto& ep : c.nbd_eps) {
    if (!c.peer_nbd_endpoint.empty()) break;
    if (ep.kind == Endpoint::Kind::kTcp && ep.host != "0.0.0.0" && ep.host != "::") {
      c.peer_nbd_endpoint = ep.ToString();
    }
  }
  c.attach = f.attach;
  if (f.require_kernel_nbd) c.attach.fuse_fallback = false;
  c.metrics_listen = f.metrics_listen;
  c.backup_secret_dir = f.backup_secret_dir;
  return c;
}

}  // namespace nbdcsi::datapath::daemon
