#include "common/grpc_drain.h"

#include <thread>

namespace nbdcsi {
namespace {

class CountingInterceptor final : public grpc::experimental::Interceptor {
 public:
  explicit CountingInterceptor(std::shared_ptr<std::atomic<int64_t>> n) : n_(std::move(n)) {
    n_->fetch_add(1, std::memory_order_acq_rel);
  }
  ~CountingInterceptor() override { n_->fetch_sub(1, std::memory_order_acq_rel); }
  void Intercept(grpc::experimental::InterceptorBatchMethods* methods) override {
    methods->Proceed();
  }

 private:
  std::shared_ptr<std::atomic<int64_t>> n_;
};

class CountingFactory final : public grpc::experimental::ServerInterceptorFactoryInterface {
 public:
  explicit CountingFactory(std::shared_ptr<std::atomic<int64_t>> n) : n_(std::move(n)) {}
  grpc::experimental::Interceptor* CreateServerInterceptor(
      grpc::experimental::ServerRpcInfo*) override {
    return new CountingInterceptor(n_);
  }

 private:
  std::shared_ptr<std::atomic<int64_t>> n_;
};

}  // namespace

std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface> CallTracker::Factory()
    const {
  return std::make_unique<CountingFactory>(in_flight_);
}

void DrainAndShutdown(const CallTracker& calls, std::initializer_list<grpc::Server*> servers,
                      std::chrono::milliseconds grace) {
  const auto deadline = std::chrono::steady_clock::now() + grace;
  while (calls.in_flight() > 0 && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  for (grpc::Server* s : servers) {
    if (s) s->Shutdown(std::chrono::system_clock::now());
  }
}

}  // namespace nbdcsi
