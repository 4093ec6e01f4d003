#include "controller/registry.h"

#include <algorithm>
#include <utility>

#include <spdlog/spdlog.h>

#include "common/grpc_status.h"
#include "common/node_id.h"
#include "common/tls.h"

namespace nbdcsi::controller {

namespace v1 = ::nbdcsi::datapath::v1;
using std::chrono::steady_clock;

NodeRegistry::NodeRegistry(NodeDatapathFactory datapaths, std::chrono::milliseconds ttl,
                           std::chrono::milliseconds heartbeat_interval, Clock clock)
    : datapaths_(std::move(datapaths)), ttl_(ttl), interval_(heartbeat_interval),
      clock_(std::move(clock)) {}

bool NodeRegistry::Live(const Entry& e, steady_clock::time_point now) const {
  return now - e.info.last_seen <= ttl_;
}

Status NodeRegistry::Heartbeat(const v1::HeartbeatRequest& req) {
  if (Status s = ValidateNodeId(req.node_id()); !s.ok()) return s;
  if (Status s = ValidateDialAddress(req.api_address()); !s.ok()) {
    return Error(EINVAL, "node {}: api {}", req.node_id(), s.message());
  }
  const auto now = clock_();
  std::lock_guard lock(mu_);
  auto [it, inserted] = nodes_.try_emplace(req.node_id());
  Entry& e = it->second;
  NodeInfo& n = e.info;
  const bool expired = !inserted && !Live(e, now);
  if (inserted || expired) {
    spdlog::info("registry: node {} {} at {} (datapath {})", req.node_id(),
                 inserted ? "registered" : "is back", req.api_address(), req.version());
    n.first_seen = now;
  } else if (n.started_unix_ns != req.started_unix_ns()) {
    spdlog::info("registry: node {}: datapath restarted (version {})", req.node_id(),
                 req.version());
  }
  if (!inserted && n.api_address != req.api_address()) {
    if (!expired) {
      spdlog::info("registry: node {} moved its API from {} to {}", req.node_id(), n.api_address,
                   req.api_address());
    }
    // Calls in flight on the old client keep their reference and finish or fail on their own.
    e.datapath.reset();
  }
  n.node_id = req.node_id();
  n.api_address = req.api_address();
  n.capacity_bytes = req.capacity_bytes();
  n.free_bytes = req.free_bytes();
  n.provisionable_bytes = req.provisionable_bytes();
  n.provisioned_bytes = req.provisioned_bytes();
  n.volumes = req.volumes();
  n.reflink = req.reflink();
  n.nbd_devices = req.nbd_devices();
  n.nbd_endpoint = req.nbd_endpoint();
  n.version = req.version();
  n.started_unix_ns = req.started_unix_ns();
  n.last_seen = now;
  return Status::Ok();
}

std::optional<NodeInfo> NodeRegistry::Get(const std::string& node_id) const {
  const auto now = clock_();
  std::lock_guard lock(mu_);
  auto it = nodes_.find(node_id);
  if (it == nodes_.end() || !Live(it->second, now)) return std::nullopt;
  return it->second.info;
}

std::vector<NodeInfo> NodeRegistry::List() const {
  const auto now = clock_();
  std::lock_guard lock(mu_);
  std::vector<NodeInfo> out;
  for (const auto& [id, e] : nodes_) {  // std::map: already sorted by node id
    if (Live(e, now)) out.push_back(e.info);
  }
  return out;
}

std::vector<NodeInfo> NodeRegistry::ListKnown(steady_clock::time_point* now) const {
  *now = clock_();
  std::lock_guard lock(mu_);
  std::vector<NodeInfo> out;
  out.reserve(nodes_.size());
  for (const auto& [id, e] : nodes_) out.push_back(e.info);
  return out;
}

StatusOr<std::shared_ptr<NodeDatapath>> NodeRegistry::Datapath(const std::string& node_id) {
  const auto now = clock_();
  std::lock_guard lock(mu_);
  auto it = nodes_.find(node_id);
  if (it == nodes_.end()) {
    return Error(ENODEV, "node {} has no registered datapath (no heartbeat received)", node_id);
  }
  Entry& e = it->second;
  if (!Live(e, now)) {
    const auto ago = std::chrono::duration_cast<std::chrono::milliseconds>(now - e.info.last_seen);
    spdlog::warn("registry: node {} expired: last heartbeat {} ms ago (ttl {} ms)", node_id,
                 ago.count(), ttl_.count());
    // Forget it entirely: the next heartbeat registers it again with a fresh channel.
    nodes_.erase(it);
    return Error(ENODEV, "node {}: datapath not heard from for {} ms (ttl {} ms)", node_id,
                 ago.count(), ttl_.count());
  }
  if (!e.datapath) e.datapath = datapaths_(node_id, e.info.api_address);
  return e.datapath;
}

namespace {

class RegistryService final : public v1::Registry::Service {
 public:
  RegistryService(NodeRegistry& reg, RegistryServiceOptions opts) : reg_(reg), opts_(opts) {}

  grpc::Status Heartbeat(grpc::ServerContext* ctx, const v1::HeartbeatRequest* req,
                         v1::HeartbeatResponse* resp) override {
    if (opts_.bind_node_identity && ValidateNodeId(req->node_id()).ok()) {
      if (Status s = CheckPeerIsNode(*ctx->auth_context(), req->node_id()); !s.ok()) {
        spdlog::warn("registry: heartbeat from {} refused: {}", ctx->peer(), s.message());
        return ToGrpc(s);
      }
    }
    if (Status s = reg_.Heartbeat(*req); !s.ok()) {
      spdlog::warn("registry: heartbeat from {} refused: {}", ctx->peer(), s.message());
      return ToGrpc(s);
    }
    const auto ms = std::clamp<int64_t>(reg_.heartbeat_interval().count(), 1, UINT32_MAX);
    resp->set_interval_ms(static_cast<uint32_t>(ms));
    return grpc::Status::OK;
  }

 private:
  NodeRegistry& reg_;
  const RegistryServiceOptions opts_;
};

}  // namespace

std::unique_ptr<v1::Registry::Service> MakeRegistryService(NodeRegistry& reg,
                                                           RegistryServiceOptions opts) {
  return std::make_unique<RegistryService>(reg, opts);
}

}  // namespace nbdcsi::controller
