#include "common/cluster/etcd_flags.h"

#include <CLI/CLI.hpp>

#include "common/cluster/etcd_cluster_store.h"

namespace nbdcsi::cluster {

void AddEtcdFlags(CLI::App& app, EtcdFlags& f, std::string_view purpose) {
  app.add_option("--cluster-etcd", f.endpoints,
                 "etcd endpoints (HOST:PORT, repeatable or comma-separated) holding " +
                     std::string(purpose))
      ->delimiter(',');
  app.add_option("--cluster-prefix", f.prefix, "Key prefix of the cluster state in etcd")
      ->capture_default_str();
  app.add_option("--cluster-etcd-tls-cert", f.tls.cert, "PEM client certificate for etcd");
  app.add_option("--cluster-etcd-tls-key", f.tls.key, "PEM key of --cluster-etcd-tls-cert");
  app.add_option("--cluster-etcd-tls-ca", f.tls.ca,
                 "PEM CA bundle etcd's certificate must chain to");
  app.add_flag("--cluster-etcd-insecure", f.tls.insecure,
               "Plaintext etcd, no authentication (loopback tests only)");
}

StatusOr<std::optional<etcd::EtcdOptions>> ResolveEtcdFlags(
    const EtcdFlags& f, std::chrono::milliseconds call_timeout) {
  if (f.endpoints.empty()) {
    if (!f.tls.cert.empty() || !f.tls.key.empty() || !f.tls.ca.empty() || f.tls.insecure) {
      return Error(EINVAL, "--cluster-etcd-* flags need --cluster-etcd");
    }
    return std::optional<etcd::EtcdOptions>();
  }
  if (Status s = f.tls.Validate({.cert = "--cluster-etcd-tls-cert",
                                 .key = "--cluster-etcd-tls-key",
                                 .ca = "--cluster-etcd-tls-ca",
                                 .insecure = "--cluster-etcd-insecure"});
      !s.ok()) {
    return Error(EINVAL, "--cluster-etcd: {}", s.message());
  }
  if (auto keys = KeyLayout::Make(f.prefix); !keys.ok()) {
    return Error(EINVAL, "--cluster-prefix: {}", keys.status().message());
  }
  etcd::EtcdOptions e;
  e.endpoints = f.endpoints;
  e.tls = f.tls;
  e.call_timeout = call_timeout;
  return std::optional<etcd::EtcdOptions>(std::move(e));
}

StatusOr<std::unique_ptr<ClusterStore>> ConnectEtcdStore(const etcd::EtcdOptions& etcd,
                                                         const std::string& prefix) {
  auto keys = KeyLayout::Make(prefix);
  if (!keys.ok()) return keys.status();
  auto client = etcd::EtcdClient::Create(etcd);
  if (!client.ok()) return client.status();
  return std::unique_ptr<ClusterStore>(
      std::make_unique<EtcdClusterStore>(std::move(*client), *keys));
}

}  // namespace nbdcsi::cluster
