// nbd-datapathd: the per-node engine. Owns the pool, serves its volumes over NBD, and exposes the
// management API that nbdctl and the CSI controller use.
//
// This file is the daemon's outline: Serve brings the parts up in dependency order and takes
// them down in reverse. The flags and their checks are in daemon/config.*, the cluster of
// replicated volumes (etcd, the cluster agent and its adapters) in daemon/cluster_wiring.*.
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <filesystem>
#include <mutex>

#include <CLI/CLI.hpp>
#include <grpcpp/server.h>
#include <spdlog/spdlog.h>

#include "common/cli_parse.h"
#include "common/endpoint.h"
#include "common/log_format.h"
#include "common/log_level.h"
#include "common/metrics/server.h"
#include "common/process.h"
#include "datapath/api/attach_service.h"
#include "datapath/api/backup_service.h"
#include "datapath/api/heartbeat.h"
#include "datapath/api/logging_service.h"
#include "datapath/api/service.h"
#include "datapath/api/target_service.h"
#include "datapath/attach/attachments.h"
#include "datapath/attach/runtime.h"
#include "datapath/backup/jobs.h"
#include "datapath/daemon/cluster_wiring.h"
#include "datapath/daemon/config.h"
#include "datapath/engine/frontend.h"
#include "datapath/metrics/collector.h"
#include "datapath/pool/pool.h"
#include "datapath/schedule/runner.h"

using namespace nbdcsi;
using namespace nbdcsi::datapath;
using namespace nbdcsi::datapath::daemon;

namespace {

// Unix sockets live in directories that may not exist yet (/run/nbd-csi on a fresh node).
Status EnsureSocketDir(const Endpoint& ep) {
  if (ep.kind != Endpoint::Kind::kUnix) return Status::Ok();
  std::error_code ec;
  std::filesystem::create_directories(std::filesystem::path(ep.path).parent_path(), ec);
  if (ec) return Error(ec.value(), "cannot create the directory of {}: {}", ep.path, ec.message());
  return Status::Ok();
}

// What the probes and the collector look at, set as each part comes up.
struct Progress {
  std::atomic<bool> workers_up{false}, nbd_up{false}, api_up{false}, stopping{false};
  std::atomic<AttachmentManager*> attachments{nullptr};
  std::atomic<replica::ClusterAgent*> agent{nullptr};  // with --cluster-etcd, once it runs
  // The schedule runner once it runs; cleared (under the lock, so no scrape is still reading
  // it) before it is destroyed.
  std::mutex schedules_mu;
  schedule::ScheduleRunner* schedules = nullptr;  // guarded by schedules_mu
};

// The /metrics, /healthz and /readyz server. It starts before the NBD listeners and the API, so
// that /healthz answers during a long start (attached devices to reconnect) and /readyz says
// why the daemon is not ready yet.
StatusOr<std::unique_ptr<MetricsServer>> StartMetrics(const Config& c, Pool& pool,
                                                      NbdFrontend& frontend, Progress& up) {
  const unsigned workers = c.frontend.workers;
  auto engine = [&]() { return up.workers_up.load() ? frontend.counters() : EngineCounters{}; };
  HealthChecks health;
  health.live = [&, workers]() -> std::string {
    if (!up.workers_up.load()) return "";  // starting: nothing to restart yet
    const uint64_t running = frontend.counters().workers_running;
    if (running < workers) {
      return fmt::format("{} of {} NBD workers stopped", workers - running, workers);
    }
    return "";
  };
  health.ready = [&]() -> std::string {
    if (up.stopping.load()) return "shutting down";
    if (!up.nbd_up.load()) return "NBD listeners not started";
    if (!up.api_up.load()) return "management API not serving";
    return "";
  };
  auto attached = [&]() {
    AttachmentManager* m = up.attachments.load();
    return m ? m->List() : std::vector<AttachmentRecord>{};
  };
  auto collector = std::make_shared<DatapathCollector>(pool, engine, attached, NBDCSI_VERSION);
  collector->SetTargets([&up]() {
    replica::ClusterAgent* a = up.agent.load();
    return a ? TargetSamples(*a) : std::vector<TargetSample>{};
  });
  collector->SetSchedules([&up] {
    std::lock_guard lock(up.schedules_mu);
    return up.schedules ? up.schedules->All()
                        : std::vector<std::pair<std::string, ScheduleRunStatus>>{};
  });
  auto server = MetricsServer::Start(c.metrics_listen, collector, std::move(health));
  if (!server.ok()) return Error(EINVAL, "--metrics-listen: {}", server.status().message());
  spdlog::info("metrics: http://{}/metrics, /healthz, /readyz", c.metrics_listen);
  return server;
}

StatusOr<std::unique_ptr<HeartbeatSender>> StartHeartbeat(const Config& c, Pool& pool,
                                                           std::chrono::system_clock::time_point
                                                               started) {
  HeartbeatOptions h;
  h.node_id = c.cluster.node_id;
  h.advertise = c.cluster.advertise;
  h.nbd_endpoint = c.peer_nbd_endpoint;
  h.controller = c.cluster.controller;
  h.creds = c.channel_creds;
  h.interval = c.cluster.heartbeat_interval;
  h.version = NBDCSI_VERSION;
  h.started_unix_ns =
      std::chrono::duration_cast<std::chrono::nanoseconds>(started.time_since_epoch()).count();
  auto sender = std::make_unique<HeartbeatSender>(pool, std::move(h));
  if (Status st = sender->Start(); !st.ok()) return Error(st.code(), "heartbeat: {}", st.message());
  return sender;
}

void LogPool(const PoolInfo& info) {
  spdlog::info("pool {}: {} volumes, {} file system, capacity {} bytes, overcommit {}, {} bytes "
               "free of which {} kept in reserve",
               info.dir, info.volumes, info.fs_type, info.capacity, info.overcommit_ratio,
               info.free, info.free_reserve);
  for (const auto& o : info.cleaned_orphans) spdlog::warn("pool: cleaned orphan {}", o);
  for (const auto& b : info.broken_volumes)
    spdlog::warn("pool: broken volume {}: left in place, see nbdctl pool info", b);
}

// The tcp:// and unix:// NBD listeners, then the workers that serve them.
Status StartNbd(const Config& c, NbdFrontend& frontend) {
  for (const auto& ep : c.nbd_eps) {
    Status st = EnsureSocketDir(ep);
    if (st.ok()) st = frontend.Listen(ep);
    if (!st.ok()) return st;
  }
  if (Status st = frontend.Start(); !st.ok()) {
    return Error(st.code(), "cannot start the NBD workers: {}", st.message());
  }
  return Status::Ok();
}

// The management API and the services it carries. Members are destroyed last first: the server
// stops before the services it calls, and before the backup jobs, whose destructor cancels
// running jobs while the pool is still open.
struct Api {
  Api(Pool& pool, AttachmentManager& attachments, replica::ClusterAgent* agent)
      : attach(MakeAttachmentService(attachments)),
        target(MakeTargetService(agent, &attachments)),
        freeze_local(MakeTargetFreezeService(agent)),
        freeze_remote(MakeTargetFreezeService(agent)),
        replicas_local(MakeTargetReplicasService(agent)),
        replicas_remote(MakeTargetReplicasService(agent)),
        backup_jobs(pool),
        backup(MakeBackupService(backup_jobs)),
        backup_remote(MakeBackupService(backup_jobs)),
        logging(MakeLoggingService(ProcessLogLevel())) {}

  Status Start(Pool& pool, const std::vector<ApiListen>& listens) {
    auto s = StartApiServer(pool, listens,
                            {attach.get(), backup.get(), target.get(), logging.get(),
                             freeze_local.get(), replicas_local.get()},
                            {freeze_remote.get(), backup_remote.get(), replicas_remote.get()});
    if (!s.ok()) {
      return Error(s.status().code(), "cannot start the management API: {}",
                   s.status().message());
    }
    server = std::move(*s);
    return Status::Ok();
  }

  std::unique_ptr<grpc::Service> attach, target;
  // Snapshots of replicated volumes: the controller freezes a target over TCP, nbdctl over unix.
  std::unique_ptr<grpc::Service> freeze_local, freeze_remote;
  // Replica changes of a served volume (move): the controller over TCP, nbdctl over unix.
  std::unique_ptr<grpc::Service> replicas_local, replicas_remote;
  // Backups to object storage (datapath/backup): nbdctl over unix, the controller over TCP
  // (VolumeSnapshotClass backupTarget, restores in CreateVolume).
  backup::BackupJobs backup_jobs;
  std::unique_ptr<grpc::Service> backup, backup_remote, logging;
  std::unique_ptr<ApiServer> server;
};

// Recurring snapshots and backups of this pool's volumes (the runner's first pass catches up once
// on what was missed while the daemon was down), shown by the API and the metrics while it lives:
// whichever way Serve ends, both stop reading the runner before it is destroyed.
struct ServedSchedules {
  ServedSchedules(Pool& pool, Api& api, Progress& up, schedule::RunnerOptions opts)
      : runner(pool, &api.backup_jobs, std::move(opts)), server(*api.server), up(up) {
    runner.Load();
    server.SetScheduleStatus([this](const std::string& volume, const VolumeSchedule& schedule) {
      return runner.Status(volume, schedule);
    });
    std::lock_guard lock(up.schedules_mu);
    up.schedules = &runner;
  }
  ~ServedSchedules() {
    server.SetScheduleStatus(nullptr);
    std::lock_guard lock(up.schedules_mu);
    up.schedules = nullptr;
  }
  ServedSchedules(const ServedSchedules&) = delete;
  ServedSchedules& operator=(const ServedSchedules&) = delete;

  schedule::ScheduleRunner runner;
  ApiServer& server;
  Progress& up;
};

// Whichever way Serve ends, the metrics server (whose collector reads the agent's targets and
// the attachments) stops before what it reads is destroyed.
struct StopAgent {
  std::unique_ptr<MetricsServer>& m;
  std::unique_ptr<ClusterWiring>& cluster;
  ~StopAgent() {
    m.reset();
    cluster.reset();
  }
};
struct StopMetrics {
  std::unique_ptr<MetricsServer>& m;
  ~StopMetrics() { m.reset(); }
};

int Fail(const Status& st) {
  spdlog::critical("{}", st.message());
  return 1;
}

void LogReady(const Config& c) {
  spdlog::info("nbd-datapathd {} ready: api {}{}{}, {} NBD listener(s), {} workers",
               NBDCSI_VERSION, c.api,
               c.cluster.tcp_listen.empty() ? "" : " and tcp://" + c.cluster.tcp_listen,
               c.cluster.node_id.empty() ? "" : ", node " + c.cluster.node_id, c.nbd_eps.size(),
               c.frontend.workers);
}

// Brings the daemon up in dependency order, serves until SIGTERM/SIGINT, and takes it down in
// the reverse order. Returns the exit status.
int Serve(const Config& c, std::chrono::system_clock::time_point started) {
  auto pool = Pool::Open(c.pool);
  if (!pool.ok()) {
    spdlog::critical("cannot open pool: {}", pool.status().message());
    return 1;
  }
  const PoolInfo info = (*pool)->Info();
  LogPool(info);

  NbdFrontend frontend(**pool, c.frontend);
  Progress up;
  std::unique_ptr<MetricsServer> metrics;
  if (!c.metrics_listen.empty()) {
    auto m = StartMetrics(c, **pool, frontend, up);
    if (!m.ok()) return Fail(m.status());
    metrics = std::move(*m);
  }
  if (Status st = StartNbd(c, frontend); !st.ok()) return Fail(st);
  up.workers_up = true;
  up.nbd_up = true;
  // Replicated volumes: the node joins the cluster before the API serves OpenTarget.
  auto cluster = ClusterWiring::Start(c.etcd, c.cluster_prefix, c.agent, frontend);
  if (!cluster.ok()) return Fail(cluster.status());
  replica::ClusterAgent* agent = (*cluster)->agent();
  up.agent = agent;
  StopAgent stop_agent{metrics, *cluster};

  // After the agent: recovery reopens the targets of devices attached before a restart.
  AttachOptions attach_opts = c.attach;
  if (agent) attach_opts.targets = (*cluster)->targets();
  auto attach = AttachRuntime::Start(**pool, frontend, info.dir + "/attachments", attach_opts);
  if (!attach.ok())
    return Fail(Error(attach.status().code(), "attachments: {}", attach.status().message()));
  up.attachments = &(*attach)->manager();
  StopMetrics stop_metrics{metrics};

  if (Status st = EnsureSocketDir(c.api_ep); !st.ok()) return Fail(st);
  Api api(**pool, (*attach)->manager(), agent);
  api.backup_jobs.SetPeerTls(c.peer_tls);
  if (Status st = api.Start(**pool, c.api_listens); !st.ok()) return Fail(st);
  up.api_up = true;
  ServedSchedules schedules(**pool, api, up, {info.dir, c.backup_secret_dir, nullptr});
  schedules.runner.Start();
  // Only once the API serves: the controller may call it as soon as it hears from us.
  std::unique_ptr<HeartbeatSender> heartbeat;
  if (!c.cluster.controller.empty()) {
    auto h = StartHeartbeat(c, **pool, started);
    if (!h.ok()) return Fail(h.status());
    heartbeat = std::move(*h);
  }
  LogReady(c);

  const int sig = WaitForTerminationSignal();
  spdlog::info("signal {}: shutting down", sig);
  up.stopping = true;
  // No more heartbeats first: the controller then expires this node instead of sending calls to
  // an API that is going away.
  if (heartbeat) heartbeat->Stop();
  api.server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(5));
  schedules.runner.Stop();
  // No SetLogLevel can come in any more: a pending timed change is dropped with its timer.
  ProcessLogLevel().Shutdown();
  // Before the sockets close; attached devices stay attached (AttachRuntime::Stop says why).
  (*attach)->Stop();
  // Targets close (their claims released: another node may take over at once), then the lease.
  if (agent) agent->Stop();
  // Before what it reads goes away.
  metrics.reset();
  frontend.Stop();
  unlink(c.api_ep.path.c_str());
  spdlog::info("stopped");
  return 0;
}

int Run(int argc, char** argv) {
  CLI::App app{"nbd-datapathd: serves a pool of thin local-disk volumes over NBD"};
  Flags f;
  AddFlags(app, f);
  if (auto rc = ParseCommandLine(app, argc, argv)) return *rc;
  const auto started = std::chrono::system_clock::now();
  if (!nbdcsi::ApplyLogFlags(f.log_level, f.log_format)) return 2;
  auto config = Resolve(f);
  if (!config.ok()) {
    spdlog::critical("{}", config.status().message());
    return 2;
  }
  return Serve(*config, started);
}

}  // namespace

int main(int argc, char** argv) { nbdcsi::DaemonMain(argc, argv, Run); }
