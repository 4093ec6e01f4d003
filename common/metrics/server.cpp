#include "common/metrics/server.h"

#include <arpa/inet.h>

#include <map>
#include <mutex>

#include <CivetServer.h>
#include <civetweb.h>
#include <prometheus/exposer.h>
#include <spdlog/spdlog.h>

#include "common/endpoint.h"

namespace nbdcsi {
namespace {

// CivetWeb's callbacks are plain functions and the Exposer keeps its server's user data to
// itself, so the probes find their checks by the port the request came in on.
std::mutex g_mu;
std::map<int, HealthChecks>& Checks() {
  static auto* m = new std::map<int, HealthChecks>;  // never destroyed: CivetWeb threads may
  return *m;                                         // still run during static destruction
}

int Reply(mg_connection* conn, int code, const std::string& body) {
  mg_printf(conn,
            "HTTP/1.1 %d %s\r\nContent-Type: text/plain; charset=utf-8\r\n"
            "Cache-Control: no-store\r\nContent-Length: %zu\r\nConnection: close\r\n\r\n%s",
            code,
            code == 200   ? "OK"
            : code == 404 ? "Not Found"
                          : "Service Unavailable",
            body.size(), body.c_str());
  return code;  // 1..999: handled here, CivetWeb sends nothing more
}

int BeginRequest(mg_connection* conn) {
  const mg_request_info* ri = mg_get_request_info(conn);
  if (!ri || !ri->local_uri) return 0;
  const std::string uri = ri->local_uri;
  if (uri != "/healthz" && uri != "/readyz") return 0;  // /metrics and the rest: the Exposer
  std::function<std::string()> check;
  {
    std::lock_guard lk(g_mu);
    auto it = Checks().find(ri->server_port);
    if (it == Checks().end()) return Reply(conn, 503, "starting\n");
    check = uri == "/healthz" ? it->second.live : it->second.ready;
  }
  std::string why = check ? check() : "";
  return why.empty() ? Reply(conn, 200, "ok\n") : Reply(conn, 503, why + "\n");
}

}  // namespace

StatusOr<std::string> ParseMetricsListen(const std::string& addr) {
  if (addr.find("://") != std::string::npos) {
    return Error(EINVAL, "\"{}\": write HOST:PORT without a scheme (e.g. 0.0.0.0:9821)", addr);
  }
  auto ep = ParseEndpoint("tcp://" + addr);
  if (!ep.ok()) {
    return Error(EINVAL, "\"{}\": expected HOST:PORT (e.g. 0.0.0.0:9821): {}", addr,
                 ep.status().message());
  }
  in_addr v4{};
  in6_addr v6{};
  if (inet_pton(AF_INET, ep->host.c_str(), &v4) == 1) {
    return fmt::format("{}:{}", ep->host, ep->port);
  }
  if (inet_pton(AF_INET6, ep->host.c_str(), &v6) == 1) {
    // CivetWeb's syntax for an IPv6 listener: "[addr]:port" plus the 'x' suffix would also take
    // IPv4; a literal IPv6 address binds that one.
    return fmt::format("[{}]:{}", ep->host, ep->port);
  }
  return Error(EINVAL,
               "\"{}\": the host must be an IP address (0.0.0.0, 127.0.0.1, [::]), not a "
               "name",
               addr);
}

StatusOr<std::unique_ptr<MetricsServer>> MetricsServer::Start(
    const std::string& addr, std::vector<std::shared_ptr<prometheus::Collectable>> collectables,
    HealthChecks health) {
  auto civet = ParseMetricsListen(addr);
  if (!civet.ok()) return civet.status();
  // Copied by CivetServer at start.
  CivetCallbacks callbacks;
  callbacks.begin_request = BeginRequest;
  std::unique_ptr<MetricsServer> m(new MetricsServer);
  try {
    // Two threads: Prometheus scrapes and kubelet probes, rarely at once.
    m->exposer_ = std::make_unique<prometheus::Exposer>(*civet, 2, &callbacks);
  } catch (const std::exception& e) {
    return Error(EADDRNOTAVAIL, "cannot listen on {}: {}", addr, e.what());
  }
  std::vector<int> ports = m->exposer_->GetListeningPorts();
  if (ports.empty()) return Error(EADDRNOTAVAIL, "cannot listen on {}", addr);
  m->port_ = ports.front();
  {
    std::lock_guard lk(g_mu);
    Checks()[m->port_] = std::move(health);
  }
  m->collectables_ = std::move(collectables);
  for (const auto& c : m->collectables_) m->exposer_->RegisterCollectable(c);
  return m;
}

MetricsServer::~MetricsServer() {
  // The server first: no request may run a check whose objects are going away.
  exposer_.reset();
  std::lock_guard lk(g_mu);
  Checks().erase(port_);
}

}  // namespace nbdcsi
