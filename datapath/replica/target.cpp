#include "datapath/replica/target.h"

#include <future>
#include <utility>

#include <spdlog/spdlog.h>

#include "common/endpoint.h"

namespace nbdcsi::replica {
namespace {

StatusOr<std::unique_ptr<ReplicaClient>> ConnectReplica(cluster::ClusterStore& store,
                                                        const TargetOptions& o,
                                                        const std::string& node, uint64_t epoch) {
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
  return ReplicaClient::Connect(c);
}

}  // namespace

Target::Target(cluster::ClusterStore& store, TargetOptions options, uint64_t epoch)
    : store_(store), opts_(std::move(options)), epoch_(epoch) {}

StatusOr<std::unique_ptr<Target>> Target::Open(cluster::ClusterStore& store,
                                               const TargetOptions& options) {
  if (options.volume.empty() || options.node.empty() || !options.lease)
    return Error(EINVAL, "a target needs a volume, this node's id and a lease");
  auto claimed = store.ClaimTarget(options.volume, options.node, options.lease);
  if (!claimed.ok()) return claimed.status();
  const cluster::VolumeState state = *claimed;
  std::unique_ptr<Target> t(new Target(store, options, state.epoch));
  auto release = [&](Status why) {
    Status r = store.ReleaseTarget(options.volume, options.node, state.epoch);
    if (!r.ok())
      spdlog::warn("target {}: releasing the claim at epoch {} after a failed open: {}",
                   options.volume, state.epoch, r.message());
    return why;
  };
  if (state.in_sync.empty())
    return release(Error(EHOSTUNREACH, "volume {} has no replica in sync", options.volume));

  // In parallel: one dead node costs one handshake timeout, not one per replica.
  std::vector<std::future<StatusOr<std::unique_ptr<ReplicaClient>>>> pending;
  for (const auto& node : state.in_sync)
    pending.push_back(std::async(std::launch::async, ConnectReplica, std::ref(store),
                                 std::cref(options), node, state.epoch));
  std::vector<ReplicaMember> members;
  std::vector<std::string> reached;
  for (size_t i = 0; i < pending.size(); ++i) {
    auto c = pending[i].get();
    const std::string& node = state.in_sync[i];
    if (!c.ok()) {
      if (c.status().code() == ESTALE) {
        // A replica has seen a newer epoch: another target claimed after us. Never serve.
        return release(Error(ESTALE, "volume {}: replica on {} refused epoch {}: {}",
                             options.volume, node, state.epoch, c.status().message()));
      }
      spdlog::warn("target {}: replica on {} is unreachable at epoch {}: {}", options.volume,
                   node, state.epoch, c.status().message());
      t->unreachable_.push_back(fmt::format("{}: {}", node, c.status().message()));
      continue;
    }
    reached.push_back(node);
    members.push_back({node, ClientChannel(std::move(c.value()))});
  }
  if (members.empty()) {
    return release(Error(EHOSTUNREACH, "volume {}: no in-sync replica is reachable ({})",
                         options.volume, fmt::join(t->unreachable_, "; ")));
  }
  if (reached.size() != state.in_sync.size()) {
    auto r = store.SetInSync(options.volume, options.node, state.epoch, reached);
    if (!r.ok()) {
      for (auto& m : members) m.channel->Close();
      return release(r.status());
    }
  }
  t->membership_ = std::make_unique<ClusterMembership>(store, options.volume, options.node,
                                                       state.epoch, options.membership_retry);
  auto set = ReplicaSet::Create({options.volume, state.size_bytes, options.node},
                                std::move(members), *t->membership_);
  if (!set.ok()) return release(set.status());
  t->set_ = std::shared_ptr<ReplicaSet>(std::move(set.value()));
  spdlog::info("target {}: serving at epoch {} with replicas [{}]", options.volume, state.epoch,
               fmt::join(reached, ", "));
  return t;
}

Target::~Target() { Close(); }

void Target::Stop(const std::string& reason) {
  if (set_) set_->Stop(reason);
}

Status Target::Close() {
  if (closed_) return Status::Ok();
  closed_ = true;
  if (set_) set_->Close();
  Status r = store_.ReleaseTarget(opts_.volume, opts_.node, epoch_);
  if (!r.ok())
    spdlog::warn("target {}: release of the claim at epoch {}: {}", opts_.volume, epoch_,
                 r.message());
  return r;
}

}  // namespace nbdcsi::replica
