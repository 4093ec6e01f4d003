#include "datapath/replica/cluster_agent.h"

#include <algorithm>
#include <utility>

#include <spdlog/spdlog.h>

#include "common/cluster/etcd_cluster_store.h"
#include "common/cluster/keys.h"

namespace nbdcsi::replica {

ClusterAgent::ClusterAgent(cluster::ClusterStore& store, ExportHost& host,
                           ClusterAgentOptions options)
    : store_(store), host_(host), opts_(std::move(options)), open_records_(opts_.state_dir) {}

StatusOr<std::unique_ptr<ClusterAgent>> ClusterAgent::Start(cluster::ClusterStore& store,
                                                            ExportHost& host,
                                                            ClusterAgentOptions options) {
  if (options.node_id.empty()) return Error(EINVAL, "the cluster agent needs this node's id");
  std::unique_ptr<ClusterAgent> agent(new ClusterAgent(store, host, std::move(options)));
  ClusterAgent* raw = agent.get();
  if (Status s = agent->Join(); !s.ok()) {
    spdlog::warn("cluster: node {} cannot join yet ({}); retrying in the background, local "
                 "volumes are served meanwhile",
                 agent->opts_.node_id, s.message());
  } else {
    agent->ReopenRecorded();
  }
  agent->join_thread_ = std::thread([raw] { raw->JoinLoop(); });
  // Always: it runs the resyncs asked for with StartResync too.
  agent->resync_thread_ = std::thread([raw] { raw->ResyncLoop(); });
  return agent;
}

Status ClusterAgent::Join() {
  auto lease = cluster::Lease::Grant(store_, opts_.lease_ttl_seconds,
                                     [this](const Status& why) { OnLeaseLost(why); });
  Status s;
  if (!lease.ok()) {
    s = Error(lease.status().code(), "cannot get a lease: {}", lease.status().message());
  } else if (Status r = store_.RegisterNode(opts_.node_id, (*lease)->id(), opts_.nbd_endpoint);
             !r.ok()) {
    s = Error(r.code(), "cannot register: {}", r.message());
  }
  std::shared_ptr<cluster::Lease> old;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!s.ok()) {
      join_error_ = s;
    } else {
      old = std::move(lease_);
      lease_ = std::move(*lease);
      join_error_ = Status::Ok();
    }
  }
  // Outside the lock: a Lease's destructor joins its keepalive thread, whose loss callback
  // takes the lock.
  old.reset();
  if (s.ok()) {
    spdlog::info("cluster: node {} registered (NBD endpoint {}, lease TTL {} s)", opts_.node_id,
                 opts_.nbd_endpoint.empty() ? "none" : opts_.nbd_endpoint,
                 opts_.lease_ttl_seconds);
  }
  return s;
}

void ClusterAgent::JoinLoop() {
  auto pause = std::chrono::milliseconds(500);
  std::string logged;
  std::unique_lock<std::mutex> lock(mu_);
  while (!stopped_) {
    const bool need = !lease_ || lease_->lost();
    if (!need) {
      pause = std::chrono::milliseconds(500);
      resync_cv_.wait_for(lock, std::chrono::seconds(1), [&] { return stopped_; });
      continue;
    }
    lock.unlock();
    Status s = Join();
    lock.lock();
    if (s.ok()) {
      logged.clear();
      continue;
    }
    if (s.message() != logged) {
      logged = s.message();
      spdlog::warn("cluster: node {} cannot join: {} (retrying)", opts_.node_id, s.message());
    }
    resync_cv_.wait_for(lock, pause, [&] { return stopped_; });
    pause = std::min(pause * 2, std::chrono::milliseconds(5000));
  }
}

bool ClusterAgent::joined() const {
  std::lock_guard<std::mutex> lock(mu_);
  return lease_ && !lease_->lost();
}

ClusterAgent::~ClusterAgent() { Stop(); }

void ClusterAgent::OnLeaseLost(const Status& why) {
  spdlog::error("cluster: node {} lost its lease ({}); every target here stops serving",
                opts_.node_id, why.message());
  std::lock_guard<std::mutex> lock(mu_);
  for (auto& [name, t] : targets_)
    t->Stop(fmt::format("node {} lost its cluster lease: {}", opts_.node_id, why.message()));
  resync_cv_.notify_all();
}

TargetInfo ClusterAgent::Info(Target& t) {
  TargetInfo i;
  i.volume = t.volume();
  i.export_name = t.volume() + std::string(datapath::kTargetSuffix);
  i.epoch = t.epoch();
  i.size = t.set()->size();
  i.health = t.set()->health();
  i.unreachable = t.unreachable();
  i.out_of_sync_bytes = t.OutOfSyncBytes();
  i.resync = t.resync_status();
  return i;
}

StatusOr<TargetInfo> ClusterAgent::OpenTarget(const std::string& volume) {
  std::lock_guard<std::mutex> ops(ops_mu_);
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopped_) return Error(ESHUTDOWN, "cluster agent of node {} is stopping", opts_.node_id);
    if (auto it = targets_.find(volume); it != targets_.end()) return Info(*it->second);
  }
  std::shared_ptr<cluster::Lease> lease;
  Status why_not;
  {
    std::lock_guard<std::mutex> lock(mu_);
    lease = lease_;
    why_not = join_error_;
  }
  if (!lease || lease->lost()) {
    return Error(ENOLINK, "node {} is not in the cluster now ({}): it cannot claim {}",
                 opts_.node_id,
                 lease ? "its lease was lost: " + lease->lost_reason().message()
                       : why_not.message(),
                 volume);
  }
  TargetOptions o;
  o.volume = volume;
  o.node = opts_.node_id;
  o.lease = lease->id();
  o.tls = opts_.replica_tls;
  o.connections = opts_.connections;
  o.handshake_timeout = opts_.handshake_timeout;
  o.request_timeout = opts_.request_timeout;
  o.state_dir = opts_.state_dir;
  auto t = Target::Open(store_, o);
  if (!t.ok()) return t.status();
  if (Status s = host_.AddBackendExport((*t)->set()); !s.ok()) {
    (*t)->Close();
    return Error(s.code(), "target {}: cannot serve it: {}", volume, s.message());
  }
  if (Status r = open_records_.Add(volume); !r.ok())
    spdlog::warn("target {}: cannot record it as open (it will not be reopened after a restart "
                 "of this datapath): {}", volume, r.message());
  TargetInfo info = Info(**t);
  std::lock_guard<std::mutex> lock(mu_);
  // A lease lost while we opened: the new target must not serve either.
  if (lease->lost()) (*t)->Stop("node lost its cluster lease while the target opened");
  targets_[volume] = std::move(*t);
  return info;
}

Status ClusterAgent::CloseTarget(const std::string& volume) {
  std::lock_guard<std::mutex> ops(ops_mu_);
  std::shared_ptr<Target> t;
  bool stopping = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = targets_.find(volume);
    if (it == targets_.end())
      return Error(ENOENT, "no target of volume {} is open on node {}", volume, opts_.node_id);
    t = std::move(it->second);
    targets_.erase(it);
    stopping = stopped_;
    // Its resync outcomes go with it (a queued request then fails with ENOENT, unrecorded).
    std::erase_if(resync_errors_,
                  [&](const auto& e) { return e.first.rfind(volume + "/", 0) == 0; });
  }
  // Closed by request: not to be reopened. The daemon stopping keeps it for its next start.
  if (Status r = stopping ? Status::Ok() : open_records_.Remove(volume); !r.ok())
    spdlog::warn("target {}: cannot forget it as open (the next start of this datapath will "
                 "reopen it): {}", volume, r.message());
  Status removed = host_.RemoveBackendExport(volume);
  if (!removed.ok())
    spdlog::warn("target {}: removing its export: {}", volume, removed.message());
  Status released = t->Close();
  // ESTALE: somebody claimed after our lease ran out; the target is closed here all the same.
  if (!released.ok() && released.code() != ESTALE) return released;
  return Status::Ok();
}

StatusOr<std::shared_ptr<Target>> ClusterAgent::FindTarget(const std::string& volume) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = targets_.find(volume);
  if (it == targets_.end())
    return Error(ENOENT, "no target of volume {} is open on node {}", volume, opts_.node_id);
  return it->second;
}

StatusOr<TargetInfo> ClusterAgent::GetTarget(const std::string& volume) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = targets_.find(volume);
  if (it == targets_.end())
    return Error(ENOENT, "no target of volume {} is open on node {}", volume, opts_.node_id);
  return InfoLocked(*it->second);
}

TargetInfo ClusterAgent::InfoLocked(Target& t) const {
  TargetInfo i = Info(t);
  const std::string prefix = i.volume + "/";
  for (const auto& key : resync_pending_)
    if (key.rfind(prefix, 0) == 0) i.resync_pending.insert(key.substr(prefix.size()));
  for (const auto& [key, why] : resync_errors_)
    if (key.rfind(prefix, 0) == 0) i.resync_errors[key.substr(prefix.size())] = why;
  return i;
}

Status ClusterAgent::StartResync(const std::string& volume, const std::string& node,
                                 uint64_t rate_bytes_per_second) {
  std::lock_guard<std::mutex> lock(mu_);
  if (stopped_) return Error(ESHUTDOWN, "cluster agent of node {} is stopping", opts_.node_id);
  auto it = targets_.find(volume);
  if (it == targets_.end())
    return Error(ENOENT, "no target of volume {} is open on node {}", volume, opts_.node_id);
  const std::string key = volume + "/" + node;
  if (resync_pending_.count(key)) return Status::Ok();
  bool known = false, out = false;
  for (const auto& m : it->second->set()->health().members) {
    if (m.node != node) continue;
    known = true;
    out = m.state == MemberState::kOut;
  }
  if (!known) return Error(ENOENT, "target {}: no replica on node {}", volume, node);
  if (!out) return Error(EINVAL, "target {}: the replica on {} is not out of sync", volume, node);
  resync_pending_.insert(key);
  resync_errors_.erase(key);
  resync_requests_.push_back({volume, node, rate_bytes_per_second});
  resync_cv_.notify_all();
  return Status::Ok();
}

void ClusterAgent::RunResyncRequest(const ResyncRequest& r) {
  auto res = ResyncReplica(r.volume, r.node, r.rate);
  // EINVAL: in sync already (an automatic round got there first): what was asked for.
  if (!res.ok() && res.status().code() == EINVAL) res = ResyncReport{};
  if (!res.ok())
    spdlog::warn("cluster: resync of {} on {} (asked for) failed: {}", r.volume, r.node,
                 res.status().message());
  std::lock_guard<std::mutex> lock(mu_);
  resync_pending_.erase(r.volume + "/" + r.node);
  if (targets_.count(r.volume)) NoteResync(r.volume, r.node, res.status());
}

void ClusterAgent::NoteResync(const std::string& volume, const std::string& node,
                              const Status& s) {
  const std::string key = volume + "/" + node;
  if (s.ok())
    resync_errors_.erase(key);
  else
    resync_errors_[key] = s.message();
}

StatusOr<ResyncReport> ClusterAgent::ResyncReplica(const std::string& volume,
                                                   const std::string& node,
                                                   uint64_t rate_bytes_per_second) {
  std::lock_guard<std::mutex> ops(ops_mu_);  // the target cannot be closed under the copy
  auto t = FindTarget(volume);
  if (!t.ok()) return t.status();
  ResyncOptions ro;
  ro.rate_bytes_per_second = rate_bytes_per_second;
  return (*t)->ResyncReplica(node, ro);
}

StatusOr<SnapshotFreeze> ClusterAgent::FreezeTarget(const std::string& volume,
                                                    std::chrono::milliseconds lift_after) {
  auto t = FindTarget(volume);
  if (!t.ok()) return t.status();
  // Not under ops_mu_: a resync may hold it for the whole copy, and freezes nest with its own.
  return (*t)->FreezeForSnapshot(lift_after);
}

bool ClusterAgent::ThawTarget(const std::string& volume, uint64_t freeze_id) {
  std::shared_ptr<Target> t;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = targets_.find(volume);
    if (it == targets_.end()) return false;  // closed: its freezes went with it
    t = it->second;
  }
  return t->ThawSnapshot(freeze_id);
}

StatusOr<uint64_t> ClusterAgent::GrowTarget(const std::string& volume) {
  std::lock_guard<std::mutex> ops(ops_mu_);  // not closed, nor resynced, while it grows
  auto t = FindTarget(volume);
  if (!t.ok()) return t.status();
  return (*t)->Grow();
}

StatusOr<TargetInfo> ClusterAgent::AddReplica(const std::string& volume, const std::string& node,
                                              uint64_t rate_bytes_per_second) {
  {
    std::lock_guard<std::mutex> ops(ops_mu_);  // not closed, nor resynced, while it changes
    auto t = FindTarget(volume);
    if (!t.ok()) return t.status();
    auto added = (*t)->AddReplica(node);
    if (!added.ok()) return added.status();
  }
  if (Status s = StartResync(volume, node, rate_bytes_per_second); !s.ok()) {
    // Recorded out of sync already: the automatic resync (or the next target) copies it.
    spdlog::warn("target {}: replica on {} added, but its copy did not start: {}", volume, node,
                 s.message());
  }
  return GetTarget(volume);
}

StatusOr<TargetInfo> ClusterAgent::RemoveReplica(const std::string& volume,
                                                 const std::string& node) {
  std::lock_guard<std::mutex> ops(ops_mu_);
  auto t = FindTarget(volume);
  if (!t.ok()) return t.status();
  auto removed = (*t)->RemoveReplica(node);
  if (!removed.ok()) return removed.status();
  std::lock_guard<std::mutex> lock(mu_);
  resync_errors_.erase(volume + "/" + node);
  auto it = targets_.find(volume);
  if (it == targets_.end()) return Error(ENOENT, "target {} closed meanwhile", volume);
  return InfoLocked(*it->second);
}

std::vector<TargetInfo> ClusterAgent::ListTargets() {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<TargetInfo> out;
  for (const auto& [name, t] : targets_) out.push_back(InfoLocked(*t));
  return out;
}

void ClusterAgent::ResyncLoop() {
  const bool automatic = opts_.resync_interval.count() > 0;
  auto next = std::chrono::steady_clock::now() + opts_.resync_interval;
  std::unique_lock<std::mutex> lock(mu_);
  while (!stopped_) {
    auto woken = [&] { return stopped_ || !resync_requests_.empty(); };
    if (automatic)
      resync_cv_.wait_until(lock, next, woken);
    else
      resync_cv_.wait(lock, woken);
    if (stopped_) return;
    if (!resync_requests_.empty()) {
      const ResyncRequest r = resync_requests_.front();
      resync_requests_.pop_front();
      lock.unlock();
      RunResyncRequest(r);
      lock.lock();
      continue;
    }
    if (!automatic || std::chrono::steady_clock::now() < next) continue;
    lock.unlock();
    ResyncReturned();
    lock.lock();
    next = std::chrono::steady_clock::now() + opts_.resync_interval;
  }
}

void ClusterAgent::ResyncReturned() {
  std::vector<std::pair<std::string, std::string>> todo;  // volume, node
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (const auto& [name, t] : targets_) {
      const ReplicaSetHealth h = t->set()->health();
      if (h.stopped) continue;
      for (const auto& m : h.members)
        if (m.state == MemberState::kOut) todo.emplace_back(name, m.node);
    }
  }
  if (todo.empty()) return;
  auto live = store_.LiveNodes();
  if (!live.ok()) return;  // etcd unreachable: the next round tries again
  for (const auto& [volume, node] : todo) {
    if (!std::binary_search(live->begin(), live->end(), node)) continue;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (stopped_) return;
      if (resync_pending_.count(volume + "/" + node)) continue;  // asked for: runs next
    }
    auto r = ResyncReplica(volume, node, opts_.resync_rate_bytes_per_second);
    const std::string key = volume + "/" + node;
    {
      std::lock_guard<std::mutex> lock(mu_);
      NoteResync(volume, node, r.status());
    }
    if (r.ok()) {
      resync_failed_.erase(key);
      continue;
    }
    // Once per distinct failure, not every round: a node that is up but not serving yet.
    if (resync_failed_[key] != r.status().message()) {
      resync_failed_[key] = r.status().message();
      spdlog::warn("cluster: automatic resync of {} on {}: {} (retried every {} s)", volume, node,
                   r.status().message(), opts_.resync_interval.count() / 1000);
    }
  }
}

void ClusterAgent::ReopenRecorded() {
  auto recorded = open_records_.Load();
  if (!recorded.ok()) {
    spdlog::error("cluster: cannot read the targets open before this start: {}",
                  recorded.status().message());
    return;
  }
  for (const auto& volume : *recorded) {
    // After a crash our claim from before may still live (until its lease runs out): end it
    // first, so that the target claims again at a new epoch, as any restarted target must.
    if (auto v = store_.GetVolume(volume); v.ok() && v->target == opts_.node_id) {
      if (Status r = store_.ReleaseTarget(volume, opts_.node_id, v->epoch, /*clean=*/false);
          !r.ok())
        spdlog::warn("cluster: target {}: ending the claim from before this start (epoch {}): {}",
                     volume, v->epoch, r.message());
    }
    auto t = OpenTarget(volume);
    if (t.ok()) {
      spdlog::info("cluster: target {} reopened (open before this start), epoch {}", volume,
                   t->epoch);
      continue;
    }
    const int code = t.status().code();
    spdlog::warn("cluster: target {} was open before this start and cannot be reopened{}: {}",
                 volume, code == ENOENT || code == EBUSY ? "; forgetting it" : " now",
                 t.status().message());
    if (code == ENOENT || code == EBUSY) (void)open_records_.Remove(volume);
  }
}

void ClusterAgent::Stop() {
  std::vector<std::string> names;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopped_ && !resync_thread_.joinable() && !join_thread_.joinable()) return;
    stopped_ = true;
    resync_cv_.notify_all();
    for (const auto& [name, t] : targets_) names.push_back(name);
  }
  if (resync_thread_.joinable()) resync_thread_.join();
  if (join_thread_.joinable()) join_thread_.join();
  for (const auto& n : names) {
    if (Status s = CloseTarget(n); !s.ok())
      spdlog::warn("cluster: closing target {}: {}", n, s.message());
  }
  std::shared_ptr<cluster::Lease> lease;
  {
    std::lock_guard<std::mutex> lock(mu_);
    lease = std::move(lease_);
  }
  if (lease) lease->Release();
}

}  // namespace nbdcsi::replica
