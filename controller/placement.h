// Where CreateVolume may put a volume, and in which order it tries the nodes.
//
// Candidates: requisite (when given) bounds the choice; preferred comes first in its order, then
// requisite in its order; with no requirement at all, any registered node, the one with the most
// room first. Room = the node's last heartbeat's provisionable bytes minus what this controller
// placed there since (the PlacementLedger), so a burst of CreateVolume calls between two
// heartbeats spreads over the nodes instead of piling onto the one that looked roomiest.
#pragma once

#include <chrono>
#include <cstdint>
#include <map>
#include <mutex>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "common/status.h"
#include "controller/registry.h"
#include "csi/csi.pb.h"

namespace nbdcsi::controller {

// Bytes placed on each node since its last heartbeat. Soft state with its own small mutex:
// placement hints only; the datapath checks capacity for real.
class PlacementLedger {
 public:
  // What `n` has taken since the heartbeat that `n` carries (a newer heartbeat resets it).
  uint64_t Pending(const NodeInfo& n);
  void Add(const NodeInfo& n, uint64_t bytes);
  // n.provisionable_bytes - Pending(n), 0 when placed past it.
  uint64_t Room(const NodeInfo& n);

 private:
  std::mutex mu_;
  std::map<std::string, std::pair<std::chrono::steady_clock::time_point, uint64_t>> placed_;
};

struct Candidates {
  std::vector<std::string> order;  // the nodes to try, in order, each once
  std::set<std::string> allowed;   // what requisite allows; empty with any_node
  bool any_node = true;            // no requisite: every node is allowed

  bool Allows(const std::string& node) const { return any_node || allowed.count(node) > 0; }
};

// The candidates for `req` (null: no accessibility_requirements) among the `live` nodes. EINVAL
// for a topology segment that is not ours.
StatusOr<Candidates> CandidatesFor(const ::csi::v1::TopologyRequirement* req,
                                   const std::vector<NodeInfo>& live, PlacementLedger& ledger);

// The candidates of a replicated volume: it is reachable from every node, so it meets any
// requisite (CSI: accessible from at least one requisite topology) wherever its copies are.
// The topology only orders the nodes (preferred, then requisite: the pod's node first under
// WaitForFirstConsumer, for local reads), then every other live node, the most room first. Under
// the provisioner's --strict-topology, requisite is the pod's node alone: a bound there would
// leave one node for two or three copies.
Candidates EveryNodeAfter(Candidates c, const std::vector<NodeInfo>& live, PlacementLedger& ledger);

}  // namespace nbdcsi::controller
