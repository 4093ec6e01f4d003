// What a gRPC server tells Prometheus about the calls it answers: one server
// interceptor counts and times every call at the edge, so no handler carries
// metrics code.
//
// Families (PREFIX is the constructor's, e.g. "nbdcsi_csi"):
//   PREFIX_rpcs_total{method,code}          counter: calls answered, by gRPC
//   status code name
//                                           ("OK", "NOT_FOUND", ...; an error
//                                           is any code but OK)
//   PREFIX_rpc_duration_seconds{method}     histogram: call received to status
//   sent PREFIX_rpcs_in_flight{method}           gauge: calls being served now
// `method` is the method's short name ("CreateVolume"). Labels stay bounded
// whatever a caller sends: a method that no service compiled into this binary
// declares is counted as "unknown".
#pragma once

#include <grpcpp/support/server_interceptor.h>

#include <memory>
#include <string>

namespace prometheus {
class Registry;
template <typename T>
class Family;
class Counter;
class Gauge;
class Histogram;
}  // namespace prometheus

namespace nbdcsi {

// The `method` label of a gRPC method path ("/csi.v1.Node/NodeStageVolume" ->
// "NodeStageVolume"); "unknown" unless the generated descriptor pool knows that
// service and method.
std::string GrpcMethodLabel(const char* path);

class GrpcServerMetrics {
 public:
  // Adds the families to `registry`, which must outlive this object.
  GrpcServerMetrics(prometheus::Registry& registry, const std::string& prefix);

  // Creates the series of every method of `service` ("csi.v1.Node", as the descriptor pool names
  // it) at zero: the OK count, the histogram and the in-flight gauge. A rate over a series that
  // appears with its first call would miss that call, and dashboards would show "no data" for
  // methods not called yet. A service the pool does not know adds nothing.
  void Declare(const std::string& service);

  // One factory per server (grpc::ServerBuilder takes ownership); every factory
  // made here feeds the same families. This object must outlive the servers.
  std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface> InterceptorFactory();

 private:
  friend class GrpcMetricsInterceptor;
  prometheus::Family<prometheus::Counter>& rpcs_;
  prometheus::Family<prometheus::Histogram>& duration_;
  prometheus::Family<prometheus::Gauge>& in_flight_;
};

}  // namespace nbdcsi
