// Stopping a gRPC server without waiting on idle clients.
//
// grpc::Server::Shutdown(deadline) sends GOAWAY, lets calls in flight finish, and completes when
// every connection is gone. A client that keeps its connection open after GOAWAY while making no
// call holds the shutdown until the deadline: measured on nbd-csi-node, an idle HTTP/2 client on
// the CSI socket made every stop take the full 5 s grace (kubelet and the sidecars keep their
// connections open). CallTracker counts the calls in flight (an interceptor per call), and
// DrainAndShutdown waits for them, bounded by the grace, then shuts the server down at once.
#pragma once

#include <atomic>
#include <chrono>
#include <memory>

#include <grpcpp/server.h>
#include <grpcpp/support/server_interceptor.h>

namespace nbdcsi {

class CallTracker {
 public:
  CallTracker() : in_flight_(std::make_shared<std::atomic<int64_t>>(0)) {}
  // One interceptor per call: counts it from its creation to the end of the call.
  std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface> Factory() const;
  int64_t in_flight() const { return in_flight_->load(std::memory_order_acquire); }

 private:
  // Shared with the factories: the server may outlive the tracker's owner for a moment.
  std::shared_ptr<std::atomic<int64_t>> in_flight_;
};

// Waits until no call is in flight or `grace` has passed, then Shutdown(now) on each server: a
// call still running then is cancelled, and idle connections are closed instead of waited for.
// The servers keep serving existing connections while it waits; stop their listeners first.
void DrainAndShutdown(const CallTracker& calls, std::initializer_list<grpc::Server*> servers,
                      std::chrono::milliseconds grace);

}  // namespace nbdcsi
