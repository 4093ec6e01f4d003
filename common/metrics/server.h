// The HTTP endpoint for operators that every daemon serves on --metrics-listen: /metrics
// (Prometheus text format, served by prometheus-cpp's Exposer), /healthz and /readyz (answered on
// the Exposer's own CivetWeb server, through its begin_request callback: one listener, one set of
// threads).
#pragma once

#include <atomic>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "common/status.h"

namespace prometheus {
class Collectable;
class Exposer;
}  // namespace prometheus

namespace nbdcsi {

// What the probes report. Each check returns "" when fine, else why not (the body of the 503).
struct HealthChecks {
  // Liveness ("restart me" when failing): the process answers and its workers run.
  std::function<std::string()> live;
  // Readiness ("send me work"): everything the daemon serves is up.
  std::function<std::string()> ready;
};

// Checks the value of --metrics-listen: HOST:PORT with HOST an IPv4 or IPv6 literal ("[::1]")
// and PORT 1..65535. Returns CivetWeb's form of it.
StatusOr<std::string> ParseMetricsListen(const std::string& addr);

class MetricsServer {
 public:
  // Listens on `addr` (ParseMetricsListen) and serves every one of `collectables` on /metrics
  // (their families must not share names).
  static StatusOr<std::unique_ptr<MetricsServer>> Start(
      const std::string& addr, std::vector<std::shared_ptr<prometheus::Collectable>> collectables,
      HealthChecks health);
  static StatusOr<std::unique_ptr<MetricsServer>> Start(
      const std::string& addr, std::shared_ptr<prometheus::Collectable> collectable,
      HealthChecks health) {
    return Start(addr, std::vector{std::move(collectable)}, std::move(health));
  }
  ~MetricsServer();

  // The port it listens on.
  int port() const { return port_; }

 private:
  MetricsServer() = default;
  std::unique_ptr<prometheus::Exposer> exposer_;
  std::vector<std::shared_ptr<prometheus::Collectable>> collectables_;
  int port_ = 0;
};

}  // namespace nbdcsi
