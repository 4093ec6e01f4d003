#include "datapath/replica/target.h"

#include <algorithm>
#include <atomic>
#include <future>
#include <utility>

#include <spdlog/spdlog.h>

#include "common/endpoint.h"

namespace nbdcsi::replica {
namespace {

StatusOr<std::unique_ptr<ReplicaClient>> ConnectReplica(cluster::ClusterStore& store,
                                                        const TargetOptions& o,
                                                        const std::string& node, uint64_t epoch,
                                                        bool base_allocation = false) {
  auto where = store.NodeEndpoint(node);
  if (!where.ok()) return where.status();
  auto endpoint = ParseEndpoint(*where);
  if (!endpoint.ok())
    return Error(EINVAL, "node {} registered a bad endpoint: {}", node,
                 endpoint.status().message());
  ClientOptions c;
  c.endpoint = *endpoint;
  c.export_name = o.volume;
  c.epoch = epoch;
  c.tls = o.tls;
  if (!c.tls.cert.empty()) c.tls.server_node = node;
  c.connections = o.connections;
  c.handshake_timeout = o.handshake_timeout;
  c.request_timeout = o.request_timeout;
  c.name = fmt::format("{} on {}", o.volume, node);
  c.base_allocation = base_allocation;
  return ReplicaClient::Connect(c);
}

// The in-sync replicas a claim could reach, and why the others could not be.
struct Reached {
  std::vector<ReplicaMember> members;
  std::vector<std::string> nodes;
  std::vector<std::string> unreachable;  // "node: why"
};

// Connects to every in-sync replica at the claim's epoch. In parallel: one dead node costs one
// handshake timeout, not one per replica. ESTALE when a replica refused the epoch.
StatusOr<Reached> ConnectInSync(cluster::ClusterStore& store, const TargetOptions& options,
                                const cluster::VolumeState& state) {
  std::vector<std::future<StatusOr<std::unique_ptr<ReplicaClient>>>> pending;
  for (const auto& node : state.in_sync)
    pending.push_back(std::async(std::launch::async, ConnectReplica, std::ref(store),
                                 std::cref(options), node, state.epoch, false));
  Reached r;
  for (size_t i = 0; i < pending.size(); ++i) {
    auto c = pending[i].get();
    const std::string& node = state.in_sync[i];
    if (!c.ok()) {
      if (c.status().code() == ESTALE) {
        // A replica has seen a newer epoch: another target claimed after us. Never serve.
        return Error(ESTALE, "volume {}: replica on {} refused epoch {}: {}", options.volume, node,
                     state.epoch, c.status().message());
      }
      spdlog::warn("target {}: replica on {} is unreachable at epoch {}: {}", options.volume, node,
                   state.epoch, c.status().message());
      r.unreachable.push_back(fmt::format("{}: {}", node, c.status().message()));
      continue;
    }
    r.nodes.push_back(node);
    r.members.push_back({node, ClientChannel(std::move(c.value()))});
  }
  return r;
}

bool Contains(const std::vector<std::string>& v, const std::string& x) {
  return std::find(v.begin(), v.end(), x) != v.end();
}

void CloseChannels(std::vector<ReplicaMember>& members) {
  for (auto& m : members)
    if (m.channel) m.channel->Close();
}

}  // namespace

Target::Target(cluster::ClusterStore& store, TargetOptions options, uint64_t epoch)
    : store_(store), opts_(std::move(options)), epoch_(epoch) {}

StatusOr<std::unique_ptr<Target>> Target::Open(cluster::ClusterStore& store,
                                               const TargetOptions& options) {
  if (options.volume.empty() || options.node.empty() || !options.lease)
    return Error(EINVAL, "a target needs a volume, this node's id and a lease");
  // Did the previous target end cleanly? Read before the claim: the claim sets dirty. An epoch
  // that moved past the one read means a target came and went in between: not known clean.
  auto before = store.GetVolume(options.volume);
  auto claimed = store.ClaimTarget(options.volume, options.node, options.lease);
  if (!claimed.ok()) return claimed.status();
  const cluster::VolumeState state = *claimed;
  const bool unclean = !before.ok() || before->dirty || state.epoch != before->epoch + 1;
  std::unique_ptr<Target> t(new Target(store, options, state.epoch));
  auto release = [&](Status why) {
    // Nothing was served: the volume is as clean as it was.
    Status r = store.ReleaseTarget(options.volume, options.node, state.epoch, !unclean);
    if (!r.ok())
      spdlog::warn("target {}: releasing the claim at epoch {} after a failed open: {}",
                   options.volume, state.epoch, r.message());
    return why;
  };
  if (state.in_sync.empty())
    return release(Error(EHOSTUNREACH, "volume {} has no replica in sync", options.volume));
  auto reached = ConnectInSync(store, options, state);
  if (!reached.ok()) return release(reached.status());
  t->unreachable_ = std::move(reached->unreachable);
  std::vector<ReplicaMember>& members = reached->members;
  if (members.empty()) {
    return release(Error(EHOSTUNREACH, "volume {}: no in-sync replica is reachable ({})",
                         options.volume, fmt::join(t->unreachable_, "; ")));
  }
  // The others are members too, out of sync: the set reports itself degraded, their misses are
  // logged, and a resync can bring them back.
  for (const auto& node : state.replicas) {
    if (!Contains(reached->nodes, node)) members.push_back({node, nullptr, /*in_sync=*/false});
  }
  Status ready = Status::Ok();
  if (reached->nodes.size() != state.in_sync.size())
    ready = store.SetInSync(options.volume, options.node, state.epoch, reached->nodes).status();
  if (ready.ok()) {
    t->membership_ = std::make_unique<ClusterMembership>(store, options.volume, options.node,
                                                         state.epoch, options.membership_retry);
    ready = t->OpenLog(state, reached->nodes, unclean);
  }
  if (!ready.ok()) {
    CloseChannels(members);
    return release(ready);
  }
  if (Status s = t->StartServing(state, reached->nodes, unclean, std::move(members)); !s.ok())
    return release(s);
  return t;
}

Status Target::OpenLog(const cluster::VolumeState& state, const std::vector<std::string>& reached,
                       bool unclean) {
  if (opts_.state_dir.empty()) return Status::Ok();
  auto log = BitmapLog::Open(opts_.state_dir + "/" + opts_.volume, state.size_bytes, state.epoch);
  if (!log.ok()) return log.status();
  log_ = std::move(*log);
  // A replica already out of sync at the claim missed writes of earlier targets that no bitmap
  // here knows: everything is dirty for it, and its resync is a full copy. After an unclean
  // end, so is an in-sync one that could not be reached: it may hold writes nobody else has.
  for (const auto& node : state.replicas) {
    if (Contains(reached, node) || (Contains(state.in_sync, node) && !unclean)) continue;
    auto b = log_->Get(node);
    Status s = b.ok() ? (*b)->MarkAllDurable() : b.status();
    if (!s.ok()) return s;
    full_resync_.insert(node);
  }
  return Status::Ok();
}

Status Target::StartServing(const cluster::VolumeState& state,
                            const std::vector<std::string>& reached, bool unclean,
                            std::vector<ReplicaMember> members) {
  ReplicaSetOptions so{opts_.volume, state.size_bytes, opts_.node};
  // After an unclean end, two or more replicas in sync may differ: one is the source (this
  // node's own when it has one) until they are reconciled.
  if (unclean && reached.size() > 1)
    so.reconcile_from = Contains(reached, opts_.node) ? opts_.node : reached.front();
  auto set = ReplicaSet::Create(so, std::move(members), *membership_, log_.get());
  if (!set.ok()) return set.status();
  set_ = std::shared_ptr<ReplicaSet>(std::move(set.value()));
  spdlog::info("target {}: serving at epoch {} with replicas [{}]{}", opts_.volume, state.epoch,
               fmt::join(reached, ", "),
               so.reconcile_from.empty()
                   ? (unclean ? "; the previous target ended uncleanly, one replica: nothing to "
                                "reconcile"
                              : "")
                   : fmt::format("; the previous target ended uncleanly: reconciling from {}",
                                 so.reconcile_from));
  if (!so.reconcile_from.empty()) {
    reconciled_ = false;
    reconcile_thread_ = std::thread([this] { ReconcileLoop(); });
  }
  return Status::Ok();
}

Target::~Target() { Close(); }

void Target::ReconcileLoop() {
  const auto start = std::chrono::steady_clock::now();
  for (;;) {
    Status s = set_->Reconcile({}, &reconcile_cancel_);
    if (s.ok()) break;
    if (reconcile_cancel_ || set_->health().stopped) {
      spdlog::warn("target {}: reconciliation ended unfinished: {}", opts_.volume, s.message());
      return;
    }
    spdlog::warn("target {}: reconciliation failed, starting over in 1 s: {}", opts_.volume,
                 s.message());
    for (int i = 0; i < 20 && !reconcile_cancel_; ++i)
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  // Replicas dropped during the pass did not get every region: what they hold beyond the source
  // is unknown, so their resync copies everything.
  const ReplicaSetHealth h = set_->health();
  {
    std::lock_guard<std::mutex> lock(resync_mu_);
    for (const auto& m : h.members)
      if (m.state != MemberState::kInSync) full_resync_.insert(m.node);
    reconciled_ = true;
  }
  set_->EndReconcile();
  spdlog::info("target {}: in-sync replicas reconciled in {} ms", opts_.volume,
               std::chrono::duration_cast<std::chrono::milliseconds>(
                   std::chrono::steady_clock::now() - start)
                   .count());
}

std::optional<ResyncStatus> Target::resync_status() const {
  std::lock_guard<std::mutex> lock(resync_mu_);
  if (!resync_) return std::nullopt;
  ResyncStatus s = *resync_;
  if (resync_job_) {
    const ResyncProgress p = resync_job_->progress();
    s.pass_done_bytes = p.done_bytes();
    s.pass_total_bytes = p.total_bytes;
    s.percent = p.percent();
    s.eta = p.eta();
    s.copied_bytes += p.copied_bytes;
  }
  return s;
}

std::map<std::string, uint64_t> Target::OutOfSyncBytes() {
  return log_ ? log_->DirtyBytes() : std::map<std::string, uint64_t>{};
}

StatusOr<std::string> Target::ResyncSource(const std::string& node) const {
  // Who is out, and who can be the source (this node's own replica first: no network hop).
  std::string source;
  bool out = false, known = false;
  const ReplicaSetHealth h = set_->health();
  for (const auto& m : h.members) {
    if (m.node == node) {
      known = true;
      out = m.state == MemberState::kOut;
    } else if (m.state == MemberState::kInSync && (source.empty() || m.node == opts_.node)) {
      source = m.node;
    }
  }
  if (!known) return Error(ENOENT, "target {}: no replica on node {}", opts_.volume, node);
  if (!out)
    return Error(EINVAL, "target {}: the replica on {} is not out of sync", opts_.volume, node);
  if (source.empty()) return Error(EIO, "target {}: no replica in sync to copy from", opts_.volume);
  return source;
}

StatusOr<RegionBitmap*> Target::ResyncBitmap(const std::string& node, bool full, ResyncOptions* ro,
                                             ResyncReport* report) {
  RegionBitmap* bm = full ? nullptr : log_->Find(node);
  if (bm) return bm;
  // Out since another epoch (or its bitmap was lost): everything, holes as zeroes because the
  // replica may hold stale data there.
  auto all = log_->Get(node);
  if (!all.ok()) return all.status();
  bm = *all;
  if (Status s = bm->MarkAllDurable(); !s.ok()) return s;
  report->full = true;
  ro->dirty_uses_block_status = true;
  ro->holes = HolePolicy::kWriteZeroes;
  return bm;
}

Status Target::ResyncPass(BlockChannel& from, BlockChannel& to, const ResyncOptions& ro,
                          RegionBitmap& bm, ResyncReport* report) {
  Resync job(from, to, ro);
  {
    std::lock_guard<std::mutex> lock(resync_mu_);
    resync_->pass = report->passes + 1;
    resync_->copied_bytes = report->copied_bytes;
    resync_job_ = &job;
  }
  Status s = job.RunDirty(bm);
  {
    std::lock_guard<std::mutex> lock(resync_mu_);
    resync_job_ = nullptr;
  }
  const ResyncProgress p = job.progress();
  report->copied_bytes += p.copied_bytes;
  report->skipped_bytes += p.skipped_bytes;
  report->zeroed_bytes += p.zeroed_bytes;
  ++report->passes;
  return s;
}

StatusOr<ResyncReport> Target::ResyncReplica(const std::string& node, ResyncOptions ro) {
  const auto start = std::chrono::steady_clock::now();
  if (!log_)
    return Error(ENOTSUP, "target {}: resync needs the target's state directory", opts_.volume);
  bool full = false;
  {
    std::lock_guard<std::mutex> lock(resync_mu_);
    if (!reconciled_)
      return Error(EAGAIN,
                   "target {}: the in-sync replicas are being reconciled after an "
                   "unclean takeover; a resync waits for that",
                   opts_.volume);
    full = full_resync_.count(node) > 0;
  }
  auto source = ResyncSource(node);
  if (!source.ok()) return source.status();
  auto src = ConnectReplica(store_, opts_, *source, epoch_, /*base_allocation=*/true);
  if (!src.ok()) return src.status();
  auto dst = ConnectReplica(store_, opts_, node, epoch_, /*base_allocation=*/false);
  if (!dst.ok()) return dst.status();

  ResyncReport report;
  report.node = node;
  auto bitmap = ResyncBitmap(node, full, &ro, &report);
  if (!bitmap.ok()) return bitmap.status();
  RegionBitmap& bm = **bitmap;
  report.dirty_bytes_at_start = bm.dirty_bytes();
  {
    std::lock_guard<std::mutex> lock(resync_mu_);
    resync_ = ResyncStatus{};
    resync_->node = node;
    resync_->full = report.full;
  }
  // Whichever way this ends, the status goes with it.
  struct ClearStatus {
    Target* t;
    ~ClearStatus() {
      std::lock_guard<std::mutex> lock(t->resync_mu_);
      t->resync_.reset();
      t->resync_job_ = nullptr;
    }
  } clear_status{this};
  ClientBlockChannel from(**src), to(**dst);
  // While writes go on they keep dirtying regions: passes until little is left.
  constexpr uint64_t kFinalPassBytes = 8ull << 20;
  constexpr int kMaxLivePasses = 8;
  for (int i = 0; i < kMaxLivePasses && bm.dirty_bytes() > kFinalPassBytes; ++i) {
    if (Status s = ResyncPass(from, to, ro, bm, &report); !s.ok()) return s;
  }
  const auto frozen_at = std::chrono::steady_clock::now();
  // Writes wait during the last pass: it runs at full speed whatever the rate limit.
  ro.rate_bytes_per_second = 0;
  set_->Freeze();
  Status s = ResyncPass(from, to, ro, bm, &report);
  if (s.ok() && bm.dirty_bytes() != 0)
    s = Error(EIO, "target {}: {} bytes still dirty on {} after the last pass", opts_.volume,
              bm.dirty_bytes(), node);
  if (s.ok()) s = set_->Readmit(node, ClientChannel(std::move(*dst)));
  set_->Thaw();
  report.frozen = std::chrono::duration_cast<std::chrono::milliseconds>(
      std::chrono::steady_clock::now() - frozen_at);
  if (!s.ok()) return s;
  {
    std::lock_guard<std::mutex> lock(resync_mu_);
    full_resync_.erase(node);
  }
  if (Status f = log_->Forget(node); !f.ok())
    spdlog::warn("target {}: {}", opts_.volume, f.message());
  report.took = std::chrono::duration_cast<std::chrono::milliseconds>(
      std::chrono::steady_clock::now() - start);
  spdlog::info(
      "target {}: replica on {} resynced from {}: {} bytes copied in {} passes ({}), "
      "writes held {} ms",
      opts_.volume, node, *source, report.copied_bytes, report.passes,
      report.full ? "full" : "dirty regions", report.frozen.count());
  return report;
}

StatusOr<cluster::VolumeState> Target::AddReplica(const std::string& node) {
  if (!log_)
    return Error(ENOTSUP, "target {}: adding a replica needs the target's state directory",
                 opts_.volume);
  for (const auto& m : set_->health().members)
    if (m.node == node)
      return Error(EEXIST, "volume {}: node {} holds a replica already ({})", opts_.volume, node,
                   MemberStateName(m.state));
  auto v = store_.GetVolume(opts_.volume);
  if (!v.ok()) return v.status();
  if (v->epoch != epoch_ || v->target != opts_.node)
    return Error(ESTALE,
                 "target of {}: the volume is at epoch {} (target \"{}\"), this target at {}",
                 opts_.volume, v->epoch, v->target, epoch_);
  if (Contains(v->replicas, node))
    return Error(EEXIST, "volume {}: node {} holds a replica already", opts_.volume, node);
  // The node and its copy answer now, at this epoch (a copy that is missing or too small is a
  // clear error here, not a resync failing later).
  {
    auto probe = ConnectReplica(store_, opts_, node, epoch_);
    if (!probe.ok())
      return Error(probe.status().code(), "volume {}: the new replica on {} does not answer: {}",
                   opts_.volume, node, probe.status().message());
    const uint64_t size = (*probe)->size();
    (*probe)->Close();
    if (size < set_->size())
      return Error(ENOSPC, "volume {}: the copy on {} has {} bytes, the volume {}", opts_.volume,
                   node, size, set_->size());
  }
  // Everything is missing there: the bitmap says so before the cluster state lists the replica.
  auto bm = log_->Get(node);
  Status marked = bm.ok() ? (*bm)->MarkAllDurable() : bm.status();
  if (!marked.ok()) return marked;
  {
    std::lock_guard<std::mutex> lock(resync_mu_);
    full_resync_.insert(node);
  }
  auto undo = [&](Status why) -> Status {
    {
      std::lock_guard<std::mutex> lock(resync_mu_);
      full_resync_.erase(node);
    }
    (void)log_->Forget(node);
    return why;
  };
  std::vector<std::string> replicas = v->replicas;
  replicas.push_back(node);
  auto r = store_.SetReplicas(opts_.volume, replicas, opts_.node, epoch_);
  if (!r.ok()) return undo(r.status());
  // Writes the copy misses from here on are logged (they already count as missing).
  if (Status a = set_->AddMember(node); !a.ok()) {
    // The cluster state lists it out of sync, which is safe: the next target copies it whole.
    spdlog::warn("target {}: replica on {} recorded, but not added here: {}", opts_.volume, node,
                 a.message());
    return a;
  }
  spdlog::info("target {}: replica on {} added out of sync; replicas [{}]", opts_.volume, node,
               fmt::join(r->replicas, ", "));
  return *r;
}

StatusOr<cluster::VolumeState> Target::RemoveReplica(const std::string& node) {
  {
    std::lock_guard<std::mutex> lock(resync_mu_);
    if (resync_)
      return Error(EBUSY, "target {}: a resync of the replica on {} runs; retry when it ended",
                   opts_.volume, resync_->node);
  }
  cluster::VolumeState after;
  Status s = set_->RemoveMember(node, [&]() -> Status {
    auto v = store_.GetVolume(opts_.volume);
    if (!v.ok()) return v.status();
    std::vector<std::string> replicas;
    for (const auto& n : v->replicas)
      if (n != node) replicas.push_back(n);
    if (replicas.empty())
      return Error(EBUSY, "volume {}: the replica on {} is its last one", opts_.volume, node);
    auto r = store_.SetReplicas(opts_.volume, replicas, opts_.node, epoch_);
    if (!r.ok()) return r.status();
    after = *r;
    return Status::Ok();
  });
  if (!s.ok()) return s;
  {
    std::lock_guard<std::mutex> lock(resync_mu_);
    full_resync_.erase(node);
  }
  if (Status f = log_ ? log_->Forget(node) : Status::Ok(); !f.ok())
    spdlog::warn("target {}: {}", opts_.volume, f.message());
  spdlog::info("target {}: replica on {} removed; replicas [{}], in sync [{}]", opts_.volume, node,
               fmt::join(after.replicas, ", "), fmt::join(after.in_sync, ", "));
  return after;
}

StatusOr<SnapshotFreeze> Target::FreezeForSnapshot(std::chrono::milliseconds lift_after) {
  using Clock = std::chrono::steady_clock;
  if (lift_after.count() < 1 || lift_after > kMaxSnapshotFreeze)
    return Error(EINVAL, "target {}: a snapshot freeze lifts itself after 1 to {} ms, not {}",
                 opts_.volume, kMaxSnapshotFreeze.count(), lift_after.count());
  static std::atomic<uint64_t> last_id{0};
  const auto began = Clock::now();
  const auto lifts_at = began + lift_after;
  if (Status s = set_->FreezeUntil(lifts_at); !s.ok())
    return Error(s.code(), "target {}: cannot freeze for a snapshot: {}", opts_.volume,
                 s.message());
  SnapshotFreeze f;
  f.id = ++last_id;
  f.epoch = epoch_;
  f.drained = std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - began);
  {
    // Registered before the flush: a flush that hangs is still lifted on time.
    std::lock_guard<std::mutex> lock(freeze_mu_);
    if (closed_ || freeze_quit_) {
      set_->Thaw();
      return Error(ESHUTDOWN, "target {} is closing", opts_.volume);
    }
    freezes_[f.id] = lifts_at;
    if (!freeze_thread_.joinable()) freeze_thread_ = std::thread([this] { FreezeWatchdog(); });
    freeze_cv_.notify_all();
  }
  auto fail = [&](Status why) -> Status {
    ThawSnapshot(f.id);
    return why;
  };
  if (Status s = set_->FlushFrozen(); !s.ok())
    return fail(Error(s.code(), "target {}: {}", opts_.volume, s.message()));
  // After the flush every replica that failed a change has been dropped (the flush waited for
  // it): the members still in sync hold every acknowledged write.
  const ReplicaSetHealth h = set_->health();
  if (h.stopped)
    return fail(Error(EIO, "target {} stopped during the freeze: {}", opts_.volume, h.stop_reason));
  for (const auto& m : h.members)
    if (m.state == MemberState::kInSync) f.in_sync.push_back(m.node);
  // While reconciling, the in-sync replicas may still differ where the previous target's writes
  // were in flight: only the source holds what reads return.
  if (h.reconciling && !h.reconcile_source.empty()) f.in_sync = {h.reconcile_source};
  if (f.in_sync.empty()) return fail(Error(EIO, "target {}: no replica in sync", opts_.volume));
  const auto now = Clock::now();
  {
    std::lock_guard<std::mutex> lock(freeze_mu_);
    if (!freezes_.count(f.id))
      return Error(ETIMEDOUT,
                   "target {}: the freeze lifted itself after {} ms, before the flush "
                   "of the replicas ended",
                   opts_.volume, lift_after.count());
  }
  f.lifts_in = std::chrono::duration_cast<std::chrono::milliseconds>(lifts_at - now);
  spdlog::info(
      "target {}: frozen for a snapshot (freeze {}, drained in {} ms, lifts itself in "
      "{} ms); in sync: [{}]",
      opts_.volume, f.id, f.drained.count(), f.lifts_in.count(), fmt::join(f.in_sync, ", "));
  return f;
}

bool Target::ThawSnapshot(uint64_t id) {
  size_t lifted = 0;
  {
    std::lock_guard<std::mutex> lock(freeze_mu_);
    if (id == 0) {
      lifted = freezes_.size();
      freezes_.clear();
    } else {
      lifted = freezes_.erase(id);
    }
    freeze_cv_.notify_all();
  }
  // Outside the lock: Thaw resubmits the held requests, whose answers may run inline.
  for (size_t i = 0; i < lifted; ++i) set_->Thaw();
  if (lifted) {
    spdlog::info("target {}: {} lifted", opts_.volume,
                 id ? fmt::format("snapshot freeze {}", id)
                    : fmt::format("every snapshot freeze ({})", lifted));
  }
  return lifted > 0;
}

void Target::FreezeWatchdog() {
  std::unique_lock<std::mutex> lock(freeze_mu_);
  while (!freeze_quit_) {
    if (freezes_.empty()) {
      freeze_cv_.wait(lock);
      continue;
    }
    auto first = std::min_element(freezes_.begin(), freezes_.end(),
                                  [](const auto& a, const auto& b) { return a.second < b.second; });
    // Copies: the map may change while the wait releases the lock.
    const uint64_t id = first->first;
    const auto deadline = first->second;
    if (freeze_cv_.wait_until(lock, deadline) != std::cv_status::timeout) continue;
    auto it = freezes_.find(id);
    if (it == freezes_.end() || it->second > std::chrono::steady_clock::now()) continue;
    freezes_.erase(it);
    lock.unlock();
    spdlog::warn(
        "target {}: snapshot freeze {} was not thawed in time; it lifts itself and "
        "writes go on",
        opts_.volume, id);
    set_->Thaw();
    lock.lock();
  }
}

void Target::Stop(const std::string& reason) {
  if (set_) set_->Stop(reason);
}

StatusOr<uint64_t> Target::Grow() {
  auto v = store_.GetVolume(opts_.volume);
  if (!v.ok()) return v.status();
  const uint64_t was = set_->size();
  if (v->size_bytes <= was) return was;
  if (v->epoch != epoch_) {
    return Error(ESTALE, "target of {}: the cluster state is at epoch {}, this target at {}",
                 opts_.volume, v->epoch, epoch_);
  }
  // Before the set: a replica dropped after this has its bitmap cover the new end.
  if (log_) {
    if (Status s = log_->Grow(v->size_bytes); !s.ok()) {
      return Error(s.code() == EBUSY ? EAGAIN : s.code(), "target of {}: {}", opts_.volume,
                   s.message());
    }
  }
  if (Status s = set_->Grow(v->size_bytes); !s.ok()) return s;
  spdlog::info("target of {}: grew from {} to {} bytes at epoch {}", opts_.volume, was,
               v->size_bytes, epoch_);
  return v->size_bytes;
}

Status Target::Close() {
  {
    std::lock_guard<std::mutex> lock(freeze_mu_);
    if (closed_) return Status::Ok();
    closed_ = true;
    freeze_quit_ = true;
    freeze_cv_.notify_all();
  }
  if (freeze_thread_.joinable()) freeze_thread_.join();
  reconcile_cancel_ = true;
  // Clean: nothing in flight (the freeze drained it and holds the rest, which Close fails
  // unsent), every in-sync replica flushed, none half-applied a failed change, and reconciled.
  bool clean = false;
  bool reconciled;
  {
    std::lock_guard<std::mutex> lock(resync_mu_);
    reconciled = reconciled_;
  }
  if (set_ && reconciled &&
      set_->FreezeUntil(std::chrono::steady_clock::now() + std::chrono::seconds(5)).ok()) {
    const Status flushed = set_->FlushFrozen();
    const ReplicaSetHealth h = set_->health();
    clean = flushed.ok() && !h.stopped && !h.may_differ;
  }
  // The set's Close answers whatever a freeze still holds (ESHUTDOWN).
  if (set_) set_->Close();
  if (reconcile_thread_.joinable()) reconcile_thread_.join();
  Status r = store_.ReleaseTarget(opts_.volume, opts_.node, epoch_, clean);
  if (!r.ok())
    spdlog::warn("target {}: release of the claim at epoch {}: {}", opts_.volume, epoch_,
                 r.message());
  return r;
}

}  // namespace nbdcsi::replica
