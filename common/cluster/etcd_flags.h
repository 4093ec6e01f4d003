// The command-line flags that point a daemon at the cluster state in etcd (issue 16), one
// definition for every daemon that reads or writes it: nbd-datapathd (its node's part: targets and
// replicas) and nbd-csi-controller (the catalogue of replicated volumes). Same names, same rules:
//
//   --cluster-etcd HOST:PORT[,...]   endpoints (repeatable or comma-separated); none: no cluster
//   --cluster-prefix P               key prefix (default /nbd-csi/)
//   --cluster-etcd-tls-cert/-key/-ca mutual TLS to etcd, or --cluster-etcd-insecure (loopback tests)
#pragma once

#include <chrono>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "common/cluster/cluster_store.h"
#include "common/cluster/keys.h"
#include "common/etcd/etcd_client.h"
#include "common/status.h"
#include "common/tls.h"

namespace CLI {
class App;
}

namespace nbdcsi::cluster {

struct EtcdFlags {
  std::vector<std::string> endpoints;  // empty: this daemon runs without cluster state
  std::string prefix = std::string(kDefaultPrefix);
  TlsFiles tls{.cert = "", .key = "", .ca = "", .insecure = false};
};

// Adds the flags above to `app`; `purpose` ends the --cluster-etcd help ("holding ...").
void AddEtcdFlags(CLI::App& app, EtcdFlags& f, std::string_view purpose);

// nullopt without --cluster-etcd (EINVAL when another --cluster-etcd-* flag was given alone).
// EINVAL naming the flags for a bad TLS combination. `call_timeout` bounds every etcd call.
StatusOr<std::optional<etcd::EtcdOptions>> ResolveEtcdFlags(const EtcdFlags& f,
                                                            std::chrono::milliseconds call_timeout);

// The store on etcd: the client (failover, deadlines, TLS) and the key layout under `prefix`.
// Does not dial: an etcd that is down shows up as EAGAIN/ETIMEDOUT on the first call.
StatusOr<std::unique_ptr<ClusterStore>> ConnectEtcdStore(const etcd::EtcdOptions& etcd,
                                                         const std::string& prefix);

}  // namespace nbdcsi::cluster
