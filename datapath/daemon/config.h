// nbd-datapathd's command line: every flag with its default (Flags), and what they resolve to once
// every flag is checked and every file they name is read (Config). main.cpp runs the daemon with
// a Config; nothing here opens the pool or a socket.
#pragma once

#include <algorithm>
#include <chrono>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <CLI/CLI.hpp>
#include <grpcpp/security/credentials.h>

#include "common/cluster/etcd_flags.h"
#include "common/endpoint.h"
#include "common/status.h"
#include "common/tls.h"
#include "datapath/api/service.h"
#include "datapath/attach/attachments.h"
#include "datapath/engine/frontend.h"
#include "datapath/engine/nbd_tls.h"
#include "datapath/pool/pool.h"
#include "datapath/replica/cluster_agent.h"

namespace nbdcsi::datapath::daemon {

// What the cluster flags (--node-id ... --heartbeat-interval) resolve to.
struct ClusterConfig {
  std::string node_id;
  std::string advertise;   // host:port
  std::string tcp_listen;  // host:port; empty: no TCP API
  std::string controller;  // host:port; empty: no heartbeat
  TlsFiles tls;
  std::chrono::milliseconds heartbeat_interval{2000};
};

// Replicated volumes (issue 16): the cluster state in etcd and this node's part in it.
struct ReplicaClusterFlags {
  cluster::EtcdFlags etcd;  // no endpoints: no cluster
  int64_t lease_ttl = 10;
  std::string nbd_endpoint;  // tcp://HOST:PORT peers dial; default: the tcp:// --nbd-listen
  int connections = 2;
  int64_t resync_interval_s = 10;
  double replica_timeout_s = 5;
  std::string resync_rate;
};

// Every command-line flag, with its default.
struct Flags {
  std::string pool_dir;
  double overcommit = 1.0;
  double free_reserve_percent = 10;
  bool no_reflink = false;
  std::string capacity;
  std::string api = "unix:///run/nbd-csi/datapath.sock";
  std::vector<std::string> allow_uids;
  std::vector<std::string> listens;
  NbdTlsFiles nbd_tls;
  bool insecure_nbd_tcp = false;
  unsigned workers = std::max(1u, std::thread::hardware_concurrency());
  AttachOptions attach;
  bool require_kernel_nbd = false;
  ClusterConfig cluster;
  ReplicaClusterFlags replicas;
  int64_t heartbeat_ms = 2000;
  std::string metrics_listen;
  std::string log_level = "info";
  std::string log_format = "text";
  std::string backup_secret_dir;
};

// What the flags resolve to, every file they name read and checked: what the daemon runs with.
struct Config {
  PoolOptions pool;
  FrontendOptions frontend;
  std::vector<Endpoint> nbd_eps;
  Endpoint api_ep;
  std::string api;
  std::vector<ApiListen> api_listens;
  AttachOptions attach;
  ClusterConfig cluster;
  std::shared_ptr<grpc::ChannelCredentials> channel_creds;  // heartbeats; null without one
  std::string metrics_listen;
  // Replicated volumes: set when --cluster-etcd is given.
  std::optional<etcd::EtcdOptions> etcd;
  std::string cluster_prefix;
  replica::ClusterAgentOptions agent;
  // Restores and clones across nodes (issue 16): where other nodes read this node's volumes
  // (heartbeated to the controller; --cluster-nbd-endpoint, else the first non-wildcard tcp://
  // --nbd-listen; "" without one), and the client side of the copies (this node's NBD
  // certificate).
  std::string peer_nbd_endpoint;
  replica::TlsClientFiles peer_tls;
  // Scheduled backups read their credentials here at fire time (datapath/schedule/runner.h).
  std::string backup_secret_dir;
};

// Registers every flag of nbd-datapathd on `app`, writing into `f`.
void AddFlags(CLI::App& app, Flags& f);

// Checks every flag and reads every file they name; an error names the flag to fix.
StatusOr<Config> Resolve(const Flags& f);

}  // namespace nbdcsi::datapath::daemon
