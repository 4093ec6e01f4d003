// The datapath's side of the node registry: a thread that tells nbd-csi-controller, over
// Registry.Heartbeat (registry.proto), that this node's datapath is alive, where its Datapath API
// listens, and how much room its pool has. The controller keeps only soft state, so every
// heartbeat carries everything it needs, and a restarted controller knows the node again at the
// next one.
//
// Every controller replica keeps its own registry, so a heartbeat goes to every address the
// controller's name resolves to (a headless Service gives one per replica), re-resolved each
// interval: replicas that come and go are followed without a datapath restart.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include <grpcpp/channel.h>
#include <grpcpp/client_context.h>
#include <grpcpp/security/credentials.h>

#include "common/status.h"
#include "datapath/api/registry.grpc.pb.h"
#include "datapath/pool/pool.h"

namespace nbdcsi::datapath {

// The sender's time. The real one is the steady clock and a condition variable; a test injects
// its own to run many intervals without waiting them out, and to know when the sender waits.
class HeartbeatClock {
 public:
  virtual ~HeartbeatClock() = default;
  virtual std::chrono::steady_clock::time_point Now() = 0;
  // Called with `lock` held on the mutex that guards `stopped`: returns once this clock reaches
  // `deadline`, or sooner when `stopped()` holds (Stop() notifies `cv` after setting it).
  virtual void WaitUntil(std::unique_lock<std::mutex>& lock, std::condition_variable& cv,
                         std::chrono::steady_clock::time_point deadline,
                         const std::function<bool()>& stopped) = 0;
};

struct HeartbeatOptions {
  std::string node_id;     // Kubernetes node name (common/node_id.h rules)
  std::string advertise;   // host:port of our TCP Datapath API, as the controller should dial it
  std::string nbd_endpoint;  // tcp://HOST:PORT other nodes read our volumes at ("": none)
  std::string controller;  // host:port of the controller's Registry service
  std::shared_ptr<grpc::ChannelCredentials> creds;  // mutual TLS, or insecure for tests
  std::chrono::milliseconds interval{2000};
  std::string version;
  int64_t started_unix_ns = 0;  // tells the controller when this datapath restarted
  std::string dev_dir = "/dev";  // where /dev/nbdN devices are counted
  // The addresses ("ip:port", "[v6]:port") to heartbeat for `controller`; null: getaddrinfo
  // (ResolveController). Tests inject their own.
  std::function<StatusOr<std::vector<std::string>>(const std::string&)> resolve;
  // Null: the steady clock. gRPC call deadlines stay on the real clock whatever this is.
  std::shared_ptr<HeartbeatClock> clock;
};

// Every address of host:port (IPv4 and IPv6, deduplicated, sorted); an IP literal gives itself.
// EHOSTUNREACH (with the resolver's message) when the name does not resolve.
StatusOr<std::vector<std::string>> ResolveController(const std::string& controller);

// One heartbeat for the pool state `info`.
nbdcsi::datapath::v1::HeartbeatRequest MakeHeartbeatRequest(const HeartbeatOptions& opts,
                                                            const PoolInfo& info,
                                                            uint32_t nbd_devices);

class HeartbeatSender {
 public:
  // The pool must outlive the sender.
  HeartbeatSender(Pool& pool, HeartbeatOptions opts);
  ~HeartbeatSender();  // Stop()
  HeartbeatSender(const HeartbeatSender&) = delete;
  HeartbeatSender& operator=(const HeartbeatSender&) = delete;

  // Checks the options (EINVAL naming the bad one) and starts the thread, which sends at once and
  // then every interval (or the controller's shorter one). A failed call is retried at the next
  // interval, never sooner. Logs the first success, then only changes (lost / regained).
  Status Start();
  // Wakes the thread, cancels a call in flight and joins. Idempotent.
  void Stop();

  struct Counters {
    uint64_t ok = 0;
    uint64_t failed = 0;
    bool connected = false;  // every controller address answered the last round
    size_t controllers = 0;  // addresses heartbeated in the last round
  };
  Counters counters() const;

 private:
  // One controller address and its channel. Only the Run() thread touches these.
  struct Target {
    std::string address;
    std::shared_ptr<grpc::Channel> channel;
    std::unique_ptr<nbdcsi::datapath::v1::Registry::Stub> stub;
    bool ever_ok = false;
    bool ok_state = false;
    bool first = true;
  };
  void Run();
  // Re-resolves the controller and adds/drops targets; keeps the old set when resolving fails.
  void SyncTargets();
  std::unique_ptr<Target> MakeTarget(const std::string& address) const;
  // One Heartbeat call; returns the interval the controller asked for (0: none).
  Status SendOnce(Target& t, const nbdcsi::datapath::v1::HeartbeatRequest& req,
                  std::chrono::milliseconds* asked);

  Pool& pool_;
  HeartbeatOptions opts_;
  std::string controller_host_;  // the name TLS verifies, whatever address is dialled
  std::map<std::string, std::unique_ptr<Target>> targets_;  // Run() thread only
  std::string resolve_error_;                               // Run() thread only
  std::thread thread_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;                          // guarded by mu_
  std::set<grpc::ClientContext*> in_flight_;   // guarded by mu_; cancelled by Stop()
  Counters counters_;                          // guarded by mu_
};

}  // namespace nbdcsi::datapath
