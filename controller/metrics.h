// What nbd-csi-controller tells Prometheus (--metrics-listen): its CSI calls
// (the interceptor of common/metrics/grpc_metrics.h, nbdcsi_csi_*), the node
// registry read at scrape time, and the CreateVolume calls that found no node.
//
//   nbdcsi_controller_nodes{state="live"|"expired"}        gauge
//   nbdcsi_controller_node_up{node}                        gauge: 1 live, 0
//   expired (past the ttl) nbdcsi_controller_node_heartbeat_age_seconds{node}
//   gauge: since the node's last heartbeat
//   nbdcsi_controller_heartbeat_interval_seconds           gauge: what
//   datapaths are told nbdcsi_controller_heartbeat_ttl_seconds gauge: silence
//   after which a node is out
//   nbdcsi_controller_placement_refusals_total{reason="no_room"|"node_missing"}
//   counter nbdcsi_controller_build_info{version}                  gauge, 1
// Labels stay bounded: node names are the cluster's nodes, and an expired node
// leaves the registry (and these series) once a call for it finds it gone.
#pragma once

#include <prometheus/collectable.h>

#include <memory>
#include <string>
#include <vector>

#include "common/metrics/grpc_metrics.h"
#include "controller/controller_service.h"
#include "controller/registry.h"

namespace prometheus {
class Registry;
class Counter;
}  // namespace prometheus

namespace nbdcsi::controller {

class ControllerMetrics {
 public:
  // `registry` must outlive this object and the metrics server that serves
  // Collectables().
  ControllerMetrics(const NodeRegistry& registry, std::string version);
  ~ControllerMetrics();

  // For MetricsServer::Start.
  std::vector<std::shared_ptr<prometheus::Collectable>> Collectables() const;
  // For CsiServerOptions::interceptors.
  GrpcServerMetrics& rpc() { return *rpc_; }
  // For ControllerOptions::on_placement_refused.
  void PlacementRefused(ControllerOptions::Refusal why);

 private:
  std::shared_ptr<prometheus::Registry> registry_;
  std::unique_ptr<GrpcServerMetrics> rpc_;
  prometheus::Counter* no_room_;
  prometheus::Counter* node_missing_;
  std::shared_ptr<prometheus::Collectable> nodes_;
};

}  // namespace nbdcsi::controller
