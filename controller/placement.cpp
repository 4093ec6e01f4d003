#include "controller/placement.h"

#include <algorithm>

#include "controller/csi_request.h"

namespace nbdcsi::controller {

uint64_t PlacementLedger::Pending(const NodeInfo& n) {
  std::lock_guard lock(mu_);
  auto it = placed_.find(n.node_id);
  if (it == placed_.end() || it->second.first != n.last_seen) return 0;
  return it->second.second;
}

void PlacementLedger::Add(const NodeInfo& n, uint64_t bytes) {
  std::lock_guard lock(mu_);
  auto& e = placed_[n.node_id];
  if (e.first != n.last_seen) e = {n.last_seen, 0};
  e.second += bytes;
}

uint64_t PlacementLedger::Room(const NodeInfo& n) {
  uint64_t pending = Pending(n);
  return n.provisionable_bytes > pending ? n.provisionable_bytes - pending : 0;
}

namespace {

// Every node once, at its first place.
std::vector<std::string> Unique(const std::vector<std::string>& order) {
  std::set<std::string> seen;
  std::vector<std::string> out;
  for (const auto& n : order) {
    if (seen.insert(n).second) out.push_back(n);
  }
  return out;
}

// Most room first; equal room keeps the registry's order (by node id).
std::vector<std::string> ByRoom(const std::vector<NodeInfo>& live, PlacementLedger& ledger) {
  std::vector<std::pair<uint64_t, std::string>> by_room;
  for (const auto& n : live) by_room.emplace_back(ledger.Room(n), n.node_id);
  std::stable_sort(by_room.begin(), by_room.end(),
                   [](const auto& a, const auto& b) { return a.first > b.first; });
  std::vector<std::string> out;
  for (auto& n : by_room) out.push_back(std::move(n.second));
  return out;
}

}  // namespace

StatusOr<Candidates> CandidatesFor(const ::csi::v1::TopologyRequirement* req,
                                   const std::vector<NodeInfo>& live, PlacementLedger& ledger) {
  Candidates c;
  std::vector<std::string> requisite, order;
  if (req) {
    for (const auto& t : req->requisite()) {
      auto n = NodeOfTopology(t);
      if (!n.ok()) return n.status();
      c.allowed.insert(*n);
      requisite.push_back(*n);
      c.any_node = false;
    }
    for (const auto& t : req->preferred()) {
      auto n = NodeOfTopology(t);
      if (!n.ok()) return n.status();
      if (c.Allows(*n)) order.push_back(*n);
    }
    order.insert(order.end(), requisite.begin(), requisite.end());
  }
  if (c.any_node) {
    std::vector<std::string> rest = ByRoom(live, ledger);
    order.insert(order.end(), rest.begin(), rest.end());
  }
  c.order = Unique(order);
  return c;
}

Candidates EveryNodeAfter(Candidates c, const std::vector<NodeInfo>& live, PlacementLedger& ledger) {
  std::vector<std::string> rest = ByRoom(live, ledger);
  c.order.insert(c.order.end(), rest.begin(), rest.end());
  c.order = Unique(c.order);
  c.allowed.clear();
  c.any_node = true;
  return c;
}

}  // namespace nbdcsi::controller
