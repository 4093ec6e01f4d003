// What nbd-csi-node tells Prometheus (--metrics-listen): its CSI calls (the
// interceptor of common/metrics/grpc_metrics.h: nbdcsi_csi_*, where
// NodeStageVolume, NodePublishVolume and NodeExpandVolume give the stage,
// publish and expand durations) and, beneath them, the slow steps they are made
// of, timed by decorators around the OS seam and the datapath client (so
// node_service.cpp carries no metrics code):
//
//   nbdcsi_node_operation_duration_seconds{operation,result}   histogram
//     operation: attach, detach, resize_attachment (datapath calls), mkfs,
//     grow_fs, mount, unmount result: ok or error
//   nbdcsi_node_build_info{version}                            gauge, 1
#pragma once

#include <prometheus/collectable.h>

#include <memory>
#include <string>
#include <vector>

#include "common/metrics/grpc_metrics.h"
#include "node/datapath_client.h"
#include "node/os.h"

namespace prometheus {
class Registry;
class Histogram;
template <typename T>
class Family;
}  // namespace prometheus

namespace nbdcsi::node {

class NodeMetrics {
 public:
  explicit NodeMetrics(const std::string& version);
  ~NodeMetrics();

  // For MetricsServer::Start.
  std::vector<std::shared_ptr<prometheus::Collectable>> Collectables() const;
  // For CsiServerOptions::interceptors.
  GrpcServerMetrics& rpc() { return *rpc_; }
  // Records one step that took `seconds`.
  void Observe(const char* operation, bool ok, double seconds);

 private:
  // The series of `operation` and `ok`, made at zero when new.
  prometheus::Histogram& Series(const char* operation, bool ok);

  std::shared_ptr<prometheus::Registry> registry_;
  std::unique_ptr<GrpcServerMetrics> rpc_;
  prometheus::Family<prometheus::Histogram>* ops_;
};

// `inner` with MakeFs, GrowFs, Mount and Unmount timed into `m`; everything
// else passes through. Both must outlive the result.
std::unique_ptr<NodeOs> MeasuredOs(NodeOs& inner, NodeMetrics& m);
// `inner` with Attach, Detach and ResizeAttachment timed into `m`.
std::unique_ptr<DatapathClient> MeasuredDatapath(DatapathClient& inner, NodeMetrics& m);

}  // namespace nbdcsi::node
