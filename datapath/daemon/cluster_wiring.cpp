// nbd-datapathd's part in the cluster of replicated volumes (cluster_wiring.h).
#include "datapath/daemon/cluster_wiring.h"

namespace nbdcsi::datapath::daemon {

// The engine as the cluster agent's export host.
class ClusterWiring::FrontendHost final : public replica::ExportHost {
 public:
  explicit FrontendHost(NbdFrontend& f) : f_(f) {}
  Status AddBackendExport(std::shared_ptr<ExportBackend> b) override {
    return f_.AddBackendExport(std::move(b));
  }
  Status RemoveBackendExport(const std::string& name) override {
    return f_.RemoveBackendExport(name);
  }

 private:
  NbdFrontend& f_;
};

// The cluster agent's targets as the attach module sees them (it does not link datapath/replica).
class ClusterWiring::AgentTargets final : public TargetAccess {
 public:
  explicit AgentTargets(replica::ClusterAgent& a) : a_(a) {}
  StatusOr<uint64_t> OpenTargetSize(const std::string& volume) override {
    auto t = a_.GetTarget(volume);
    if (!t.ok()) return t.status();
    return t->size;
  }
  StatusOr<uint64_t> ReopenTarget(const std::string& volume) override {
    auto t = a_.OpenTarget(volume);
    if (!t.ok()) return t.status();
    return t->size;
  }
  StatusOr<uint64_t> GrowTarget(const std::string& volume) override {
    return a_.GrowTarget(volume);
  }

 private:
  replica::ClusterAgent& a_;
};

ClusterWiring::ClusterWiring(NbdFrontend& frontend)
    : host_(std::make_unique<FrontendHost>(frontend)) {}

ClusterWiring::~ClusterWiring() {
  // What the daemon destroyed in this order when it held the parts itself: the attach module's
  // view first, then the agent, then the store it used, then the host it exported on.
  targets_.reset();
  agent_.reset();
  store_.reset();
  host_.reset();
}

TargetAccess* ClusterWiring::targets() { return targets_.get(); }

StatusOr<std::unique_ptr<ClusterWiring>> ClusterWiring::Start(
    const std::optional<etcd::EtcdOptions>& etcd, const std::string& prefix,
    const replica::ClusterAgentOptions& options, NbdFrontend& frontend) {
  std::unique_ptr<ClusterWiring> w(new ClusterWiring(frontend));
  if (!etcd) return w;
  auto store = cluster::ConnectEtcdStore(*etcd, prefix);
  if (!store.ok()) {
    return Error(store.status().code(), "--cluster-etcd: {}", store.status().message());
  }
  w->store_ = std::move(*store);
  auto a = replica::ClusterAgent::Start(*w->store_, *w->host_, options);
  if (!a.ok()) return a.status();
  w->agent_ = std::move(*a);
  w->targets_ = std::make_unique<AgentTargets>(*w->agent_);
  return w;
}

// The cluster agent's targets as the collector's samples.
std::vector<TargetSample> TargetSamples(replica::ClusterAgent& agent) {
  std::vector<TargetSample> out;
  for (const auto& t : agent.ListTargets()) {
    TargetSample s;
    s.volume = t.volume;
    s.epoch = t.epoch;
    s.degraded = t.health.degraded;
    s.stopped = t.health.stopped;
    s.acked_degraded = t.health.acked_degraded;
    for (const auto& m : t.health.members) {
      TargetSample::Replica r;
      r.node = m.node;
      r.in_sync = m.state == replica::MemberState::kInSync;
      if (auto it = t.out_of_sync_bytes.find(m.node); it != t.out_of_sync_bytes.end())
        r.out_of_sync_bytes = it->second;
      r.errors = m.counters.errors;
      s.replicas.push_back(std::move(r));
    }
    out.push_back(std::move(s));
  }
  return out;
}

}  // namespace nbdcsi::datapath::daemon
