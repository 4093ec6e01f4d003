#include "common/metrics/grpc_metrics.h"

#include <google/protobuf/descriptor.h>
#include <prometheus/counter.h>
#include <prometheus/family.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>

#include <chrono>
#include <string_view>

#include "common/grpc_status.h"

namespace nbdcsi {
namespace {

// From a fast Probe (sub-millisecond) to a mkfs or a copy that takes minutes.
const prometheus::Histogram::BucketBoundaries& Buckets() {
  static const prometheus::Histogram::BucketBoundaries b = {
      0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
      0.5,    1,     2.5,    5,     10,   30,    60,   120, 300};
  return b;
}

}  // namespace

std::string GrpcMethodLabel(const char* path) {
  // "/package.Service/Method"
  std::string_view p = path ? path : "";
  if (p.size() < 4 || p.front() != '/') return "unknown";
  const size_t slash = p.find('/', 1);
  if (slash == std::string_view::npos || slash + 1 >= p.size()) return "unknown";
  std::string full(p.substr(1, slash - 1));
  full += '.';
  full += p.substr(slash + 1);
  const auto* m = google::protobuf::DescriptorPool::generated_pool()->FindMethodByName(full);
  return m ? m->name() : "unknown";
}

class GrpcMetricsInterceptor final : public grpc::experimental::Interceptor {
 public:
  GrpcMetricsInterceptor(GrpcServerMetrics& m, grpc::experimental::ServerRpcInfo* info)
      : m_(m),
        method_(GrpcMethodLabel(info->method())),
        in_flight_(m.in_flight_.Add({{"method", method_}})),
        start_(std::chrono::steady_clock::now()) {
    in_flight_.Increment();
  }

  // A call that ends without a status of ours (the server shut down under it)
  // still leaves the in-flight gauge, counted as CANCELLED: what its client
  // saw.
  ~GrpcMetricsInterceptor() override {
    if (!done_) Finish(grpc::StatusCode::CANCELLED);
  }

  void Intercept(grpc::experimental::InterceptorBatchMethods* methods) override {
    using grpc::experimental::InterceptionHookPoints;
    if (!done_ && methods->QueryInterceptionHookPoint(InterceptionHookPoints::PRE_SEND_STATUS)) {
      Finish(methods->GetSendStatus().error_code());
    }
    methods->Proceed();
  }

 private:
  void Finish(grpc::StatusCode code) {
    done_ = true;
    const double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
    in_flight_.Decrement();
    m_.duration_.Add({{"method", method_}}, Buckets()).Observe(seconds);
    m_.rpcs_.Add({{"method", method_}, {"code", GrpcCodeName(code)}}).Increment();
  }

  GrpcServerMetrics& m_;
  std::string method_;
  prometheus::Gauge& in_flight_;
  std::chrono::steady_clock::time_point start_;
  bool done_ = false;
};

namespace {

class Factory final : public grpc::experimental::ServerInterceptorFactoryInterface {
 public:
  explicit Factory(GrpcServerMetrics& m) : m_(m) {}
  grpc::experimental::Interceptor* CreateServerInterceptor(
      grpc::experimental::ServerRpcInfo* info) override {
    return new GrpcMetricsInterceptor(m_, info);
  }

 private:
  GrpcServerMetrics& m_;
};

}  // namespace

GrpcServerMetrics::GrpcServerMetrics(prometheus::Registry& registry, const std::string& prefix)
    : rpcs_(prometheus::BuildCounter()
                .Name(prefix + "_rpcs_total")
                .Help("gRPC calls answered, by method and status code (errors: "
                      "code != OK)")
                .Register(registry)),
      duration_(prometheus::BuildHistogram()
                    .Name(prefix + "_rpc_duration_seconds")
                    .Help("Time from a gRPC call's arrival to its status, by method")
                    .Register(registry)),
      in_flight_(prometheus::BuildGauge()
                     .Name(prefix + "_rpcs_in_flight")
                     .Help("gRPC calls being served, by method")
                     .Register(registry)) {}

void GrpcServerMetrics::Declare(const std::string& service) {
  const auto* s = google::protobuf::DescriptorPool::generated_pool()->FindServiceByName(service);
  if (!s) return;
  for (int i = 0; i < s->method_count(); ++i) {
    const std::string& m = s->method(i)->name();
    rpcs_.Add({{"method", m}, {"code", "OK"}});
    duration_.Add({{"method", m}}, Buckets());
    in_flight_.Add({{"method", m}});
  }
}

std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>
GrpcServerMetrics::InterceptorFactory() {
  return std::make_unique<Factory>(*this);
}

}  // namespace nbdcsi
