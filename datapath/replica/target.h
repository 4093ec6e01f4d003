// Target: a datapath's hold on one replicated volume (issue 16): the claim in the cluster state,
// the connections to the volume's in-sync replicas at the claim's epoch, and the ReplicaSet the
// engine serves as "VOLUME@target".
//
// Open, in this order (each step is what makes the next one safe):
//   1. ClaimTarget: the epoch rises by one; EBUSY while another node's claim is alive.
//   2. Connect to every in-sync replica at the new epoch (their endpoints from the nodes'
//      registrations). Each replica fences older epochs when the connection opens, and waits for
//      their in-flight writes first, so nothing of a previous target lands afterwards.
//   3. Replicas that could not be reached are dropped from the in-sync set (SetInSync at the
//      epoch) before anything is served; if none was reached, the claim is released and Open
//      fails with EHOSTUNREACH.
// The claim lives on `lease`: the holder of the lease must Stop() the target when the lease is
// lost (another node may claim as soon as it expires).
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "common/cluster/cluster_store.h"
#include "common/status.h"
#include "datapath/replica/replica_set.h"
#include "datapath/replica/tls_client.h"

namespace nbdcsi::replica {

struct TargetOptions {
  std::string volume;
  std::string node;  // this node's id: the claimant, and the replica reads prefer
  cluster::LeaseId lease = 0;
  // Client side of the replicas' mutual TLS; server_node is set per replica (each replica must
  // prove it is the node the cluster state names).
  TlsClientFiles tls;
  int connections = 2;  // per replica
  std::chrono::milliseconds handshake_timeout{5000};
  std::chrono::milliseconds request_timeout{10000};
  // How long a membership change may retry an unreachable cluster store.
  std::chrono::milliseconds membership_retry{5000};
};

class Target {
 public:
  // See above. Errors: EBUSY (another target), ENOENT (no such volume in the cluster state),
  // EHOSTUNREACH (no in-sync replica reachable), ESTALE (the claim was lost while opening), and
  // the store's errors.
  static StatusOr<std::unique_ptr<Target>> Open(cluster::ClusterStore& store,
                                                const TargetOptions& options);
  // Close().
  ~Target();
  Target(const Target&) = delete;
  Target& operator=(const Target&) = delete;

  // What the engine serves (datapath::ExportBackend).
  std::shared_ptr<ReplicaSet> set() const { return set_; }
  uint64_t epoch() const { return epoch_; }
  const std::string& volume() const { return opts_.volume; }
  // Replicas dropped at Open because they could not be reached, with why.
  const std::vector<std::string>& unreachable() const { return unreachable_; }

  // The lease is gone or the node is shutting down: every later request fails with EIO.
  void Stop(const std::string& reason);
  // Closes the set (what is in flight fails with ESHUTDOWN) and releases the claim (unstage).
  // Idempotent; the release's result.
  Status Close();

 private:
  Target(cluster::ClusterStore& store, TargetOptions options, uint64_t epoch);

  cluster::ClusterStore& store_;
  TargetOptions opts_;
  uint64_t epoch_;
  std::unique_ptr<ClusterMembership> membership_;
  std::shared_ptr<ReplicaSet> set_;
  std::vector<std::string> unreachable_;
  bool closed_ = false;
};

}  // namespace nbdcsi::replica
