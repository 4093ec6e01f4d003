#include "controller/cluster_view.h"

#include <algorithm>
#include <condition_variable>
#include <map>
#include <mutex>
#include <optional>
#include <thread>
#include <utility>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <spdlog/spdlog.h>

#include "common/tls.h"
#include "controller/csi_response.h"
#include "csi/ids.h"

namespace nbdcsi::controller {

namespace {

using std::chrono::duration_cast;
using std::chrono::milliseconds;

uint64_t AgeMs(std::chrono::steady_clock::time_point now,
               std::chrono::steady_clock::time_point seen) {
  return now > seen ? static_cast<uint64_t>(duration_cast<milliseconds>(now - seen).count()) : 0;
}

// fn(datapath) for each of `live` at once, as FanOut does, but waiting `wait` at most: a node
// that hangs must not hold the whole listing (nor the client, whose deadline would fail it all).
// The calls still running then keep what they use (their client, the shared answers) alive and
// end within the datapath client's deadline; their answers are dropped.
template <typename T, typename F>
std::vector<StatusOr<T>> AskAll(Nodes& nodes, const std::vector<NodeInfo>& live, F fn,
                                milliseconds wait) {
  struct Answers {
    std::mutex mu;
    std::condition_variable cv;
    std::vector<std::optional<StatusOr<T>>> got;  // guarded by mu
    size_t left = 0;                              // guarded by mu
  };
  auto a = std::make_shared<Answers>();
  a->got.resize(live.size());
  a->left = live.size();
  for (size_t i = 0; i < live.size(); ++i) {
    auto dp = nodes.Datapath(live[i].node_id);
    if (!dp.ok()) {
      std::lock_guard lock(a->mu);
      a->got[i].emplace(dp.status());
      --a->left;
      continue;
    }
    std::thread([a, i, dp = *dp, fn] {
      StatusOr<T> r = fn(*dp);
      std::lock_guard lock(a->mu);
      a->got[i].emplace(std::move(r));
      if (--a->left == 0) a->cv.notify_all();
    }).detach();
  }
  std::unique_lock lock(a->mu);
  a->cv.wait_for(lock, wait, [&] { return a->left == 0; });
  std::vector<StatusOr<T>> out;
  out.reserve(live.size());
  for (size_t i = 0; i < live.size(); ++i) {
    if (a->got[i]) {
      out.push_back(*a->got[i]);
    } else {
      // Made in place: GCC 12 warns (maybe-uninitialized, a false positive) about moving a
      // temporary StatusOr<vector> in here.
      out.emplace_back(Error(ETIMEDOUT, "node {}: no answer within {} ms", live[i].node_id,
                             wait.count()));
    }
  }
  return out;
}

// each(node, item) for every item of every live node's answer. `nodes` lists every known node;
// the live ones, in order, are the ones `answers` answers for. A failed answer is that node's
// error.
template <typename Node, typename T, typename Each>
void EachAnswer(google::protobuf::RepeatedPtrField<Node>* nodes,
                std::vector<StatusOr<std::vector<T>>>& answers, Each each) {
  size_t li = 0;
  for (auto& node : *nodes) {
    if (!node.live()) continue;
    auto& answer = answers[li++];
    if (!answer.ok()) {
      node.set_error(answer.status().message());
      continue;
    }
    for (const auto& item : *answer) each(node, item);
  }
}

}  // namespace

ClusterView::ClusterView(NodeRegistry& registry, cluster::ClusterStore* store)
    : registry_(registry),
      store_(store),
      nodes_(registry),
      replicated_(store, nodes_, ledger_) {}

void ClusterView::ListNodes(dpv1::ListClusterNodesResponse* out) {
  std::chrono::steady_clock::time_point now;
  for (const NodeInfo& n : registry_.ListKnown(&now)) {
    auto* c = out->add_nodes();
    c->set_node_id(n.node_id);
    c->set_api_address(n.api_address);
    c->set_heartbeat_age_ms(AgeMs(now, n.last_seen));
    c->set_live(now - n.last_seen <= registry_.ttl());
    c->set_capacity_bytes(n.capacity_bytes);
    c->set_free_bytes(n.free_bytes);
    c->set_provisionable_bytes(n.provisionable_bytes);
    c->set_provisioned_bytes(n.provisioned_bytes);
    c->set_volumes(n.volumes);
    c->set_version(n.version);
    c->set_nbd_devices(n.nbd_devices);
    c->set_reflink(n.reflink);
  }
  out->set_heartbeat_ttl_ms(static_cast<uint64_t>(registry_.ttl().count()));
}

std::vector<NodeInfo> ClusterView::Known(
    google::protobuf::RepeatedPtrField<dpv1::NodeAnswer>* answers) {
  std::chrono::steady_clock::time_point now;
  std::vector<NodeInfo> live;
  for (const NodeInfo& n : registry_.ListKnown(&now)) {
    auto* a = answers->Add();
    a->set_node_id(n.node_id);
    const bool is_live = now - n.last_seen <= registry_.ttl();
    a->set_live(is_live);
    if (is_live) {
      live.push_back(n);
    } else {
      a->set_error(fmt::format("heartbeat expired: last heard from {} ms ago (ttl {} ms)",
                               AgeMs(now, n.last_seen), registry_.ttl().count()));
    }
  }
  return live;
}

void ClusterView::ListVolumes(dpv1::ListClusterVolumesResponse* out, milliseconds wait) {
  std::vector<NodeInfo> live = Known(out->mutable_nodes());
  auto answers = AskAll<std::vector<dpv1::Volume>>(
      nodes_, live, [](NodeDatapath& d) { return d.ListVolumes(); }, wait);
  // The catalogue: each replicated volume, and which pool volume is whose copy.
  std::map<std::pair<std::string, std::string>, std::string> copy_of;
  if (store_) {
    auto every = replicated_.All();
    if (!every.ok()) {
      out->set_catalogue_error(every.status().message());
      spdlog::warn("cluster view: the replicated volumes' catalogue: {}",
                   every.status().message());
      every = std::vector<cluster::VolumeState>{};  // none listed, as when there is no catalogue
    }
    for (const auto& v : *every) {
      auto* r = out->add_replicated();
      ::csi::v1::Volume cv;
      ::csi::v1::VolumeCondition cond;
      replicated_.Fill(v, &cv, &cond);
      r->set_volume_id(cv.volume_id());
      r->set_name(v.name);
      r->set_size_bytes(v.size_bytes);
      for (const auto& n : v.replicas) {
        r->add_replicas(n);
        copy_of[{n, v.name}] = cv.volume_id();
      }
      for (const auto& n : v.in_sync) r->add_in_sync(n);
      r->set_target(v.target);
      r->set_epoch(v.epoch);
      r->set_abnormal(cond.abnormal());
      r->set_condition(cond.message());
    }
  }
  EachAnswer(out->mutable_nodes(), answers, [&](const auto& a, const dpv1::Volume& dv) {
    auto* c = out->add_volumes();
    c->set_node_id(a.node_id());
    c->set_volume_id(VolumeIdOf(a.node_id(), dv.name()));
    *c->mutable_volume() = dv;
    ::csi::v1::VolumeCondition cond;
    FillCondition(dv, &cond);
    c->set_abnormal(cond.abnormal());
    c->set_condition(cond.message());
    if (auto it = copy_of.find({a.node_id(), dv.name()}); it != copy_of.end())
      c->set_replica_of(it->second);
  });
}

void ClusterView::ListSnapshots(dpv1::ListClusterSnapshotsResponse* out, milliseconds wait) {
  std::vector<NodeInfo> live = Known(out->mutable_nodes());
  auto answers = AskAll<std::vector<dpv1::Snapshot>>(
      nodes_, live, [](NodeDatapath& d) { return d.ListSnapshots(""); }, wait);
  // Snapshots of a replicated volume's copy name the r1 volume as their source, as in CSI.
  const auto copies = replicated_.CopyIds();
  EachAnswer(out->mutable_nodes(), answers, [&](const auto& a, const dpv1::Snapshot& ds) {
    auto* c = out->add_snapshots();
    c->set_node_id(a.node_id());
    c->set_snapshot_id(SnapshotIdOf(a.node_id(), ds.name()));
    auto r1 = copies.find({a.node_id(), ds.source_volume()});
    c->set_source_volume_id(r1 != copies.end() ? r1->second
                                               : VolumeIdOf(a.node_id(), ds.source_volume()));
    *c->mutable_snapshot() = ds;
  });
}

namespace {

class Service final : public dpv1::ClusterView::Service {
 public:
  Service(ClusterView& view, ClusterViewServiceOptions opts) : view_(view), opts_(opts) {}

  grpc::Status ListNodes(grpc::ServerContext* ctx, const dpv1::ListClusterNodesRequest*,
                         dpv1::ListClusterNodesResponse* resp) override {
    if (grpc::Status s = Admit(ctx); !s.ok()) return s;
    view_.ListNodes(resp);
    return grpc::Status::OK;
  }
  grpc::Status ListVolumes(grpc::ServerContext* ctx, const dpv1::ListClusterVolumesRequest*,
                           dpv1::ListClusterVolumesResponse* resp) override {
    if (grpc::Status s = Admit(ctx); !s.ok()) return s;
    view_.ListVolumes(resp, Wait(ctx));
    return grpc::Status::OK;
  }
  grpc::Status ListSnapshots(grpc::ServerContext* ctx, const dpv1::ListClusterSnapshotsRequest*,
                             dpv1::ListClusterSnapshotsResponse* resp) override {
    if (grpc::Status s = Admit(ctx); !s.ok()) return s;
    view_.ListSnapshots(resp, Wait(ctx));
    return grpc::Status::OK;
  }

 private:
  // How long the nodes may take: kClientShare of what is left of the client's deadline (the
  // answer must still reach it), between 100 ms and kMaxWait.
  static milliseconds Wait(grpc::ServerContext* ctx) {
    const auto left = ctx->deadline() - std::chrono::system_clock::now();
    if (left > std::chrono::hours(24)) return ClusterView::kMaxWait;  // no deadline
    const auto share = duration_cast<milliseconds>(left * ClusterView::kClientShare);
    return std::clamp(share, milliseconds(100), ClusterView::kMaxWait);
  }

  grpc::Status Admit(grpc::ServerContext* ctx) const {
    if (!opts_.refuse_node_certificates) return grpc::Status::OK;
    std::vector<std::string> ids = PeerNodeIds(*ctx->auth_context());
    if (ids.empty()) return grpc::Status::OK;
    const std::string who = fmt::format("{}", fmt::join(ids, ","));
    spdlog::warn("cluster view: refused a call from node {}'s certificate", who);
    return grpc::Status(grpc::StatusCode::PERMISSION_DENIED,
                        fmt::format("the client certificate is node {}'s: a datapath's "
                                    "certificate cannot read the cluster view",
                                    who));
  }

  ClusterView& view_;
  ClusterViewServiceOptions opts_;
};

}  // namespace

std::unique_ptr<dpv1::ClusterView::Service> MakeClusterViewService(
    ClusterView& view, ClusterViewServiceOptions opts) {
  return std::make_unique<Service>(view, opts);
}

}  // namespace nbdcsi::controller
