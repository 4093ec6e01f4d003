// The controller's soft registry of node datapaths, fed by Registry.Heartbeat
// (datapath/api/registry.proto). Nothing is persisted: a restarted controller knows every live
// node again after one heartbeat interval.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "common/status.h"
#include "controller/node_datapath.h"
#include "datapath/api/registry.grpc.pb.h"

namespace nbdcsi::controller {

struct NodeInfo {
  std::string node_id;
  std::string api_address;  // host:port
  uint64_t capacity_bytes = 0;
  uint64_t free_bytes = 0;
  uint64_t provisionable_bytes = 0;
  uint64_t provisioned_bytes = 0;
  uint64_t volumes = 0;
  bool reflink = false;
  uint32_t nbd_devices = 0;
  std::string nbd_endpoint;  // tcp://HOST:PORT peers copy this node's volumes from; "": none
  std::string version;
  int64_t started_unix_ns = 0;  // the datapath's start time; a change means it restarted
  std::chrono::steady_clock::time_point first_seen;  // of this registration (reset on expiry)
  std::chrono::steady_clock::time_point last_seen;
};

class NodeRegistry {
 public:
  using Clock = std::function<std::chrono::steady_clock::time_point()>;

  // `datapaths` makes the client of each registered node (MakeGrpcDatapathFactory; fakes in
  // tests). A node not heard from within `ttl` is treated as absent (List() skips it, Get() is
  // nullopt, Datapath() is ENODEV) and its client is dropped. `heartbeat_interval` is what the
  // Registry service tells datapaths; ttl should be a few intervals. `clock` is for tests.
  NodeRegistry(NodeDatapathFactory datapaths, std::chrono::milliseconds ttl,
               std::chrono::milliseconds heartbeat_interval,
               Clock clock = std::chrono::steady_clock::now);

  // Records a heartbeat; EINVAL on a bad node id ([a-z0-9.-], 1-253, as Kubernetes node names)
  // or address (host:port). A changed address drops the cached client.
  Status Heartbeat(const nbdcsi::datapath::v1::HeartbeatRequest& req);

  std::optional<NodeInfo> Get(const std::string& node_id) const;
  std::vector<NodeInfo> List() const;  // live nodes, sorted by node id
  // Every node heard from and not yet forgotten (Datapath() forgets an expired node it is asked
  // for), live or expired, sorted by node id; `now` is the registry clock's reading, to age them.
  std::vector<NodeInfo> ListKnown(std::chrono::steady_clock::time_point* now) const;

  // The client of the node's datapath, made on first use and cached per node and address;
  // ENODEV when the node is not registered (or expired); the controller answers UNAVAILABLE for
  // it, so the sidecar retries.
  StatusOr<std::shared_ptr<NodeDatapath>> Datapath(const std::string& node_id);

  std::chrono::milliseconds heartbeat_interval() const { return interval_; }
  std::chrono::milliseconds ttl() const { return ttl_; }

 private:
  struct Entry {
    NodeInfo info;
    std::shared_ptr<NodeDatapath> datapath;  // made on first Datapath() use
  };
  bool Live(const Entry& e, std::chrono::steady_clock::time_point now) const;

  NodeDatapathFactory datapaths_;
  std::chrono::milliseconds ttl_;
  std::chrono::milliseconds interval_;
  Clock clock_;
  mutable std::mutex mu_;
  std::map<std::string, Entry> nodes_;  // guarded by mu_
};

struct RegistryServiceOptions {
  // Node binding: a heartbeat for node N is accepted only from a client certificate that names
  // N (common/tls.h NodeIdentityUri); any other is PERMISSION_DENIED and changes nothing. Off
  // for plaintext tests and for one certificate shared by every datapath
  // (--datapath-server-name), where any certificate the CA signed speaks for any node.
  bool bind_node_identity = false;
};

// The Registry gRPC service over a NodeRegistry (which must outlive it): INVALID_ARGUMENT for a
// bad heartbeat, PERMISSION_DENIED for a node the peer's certificate does not name (both
// logged), otherwise OK with the registry's heartbeat interval.
std::unique_ptr<nbdcsi::datapath::v1::Registry::Service> MakeRegistryService(
    NodeRegistry& reg, RegistryServiceOptions opts = {});

}  // namespace nbdcsi::controller
