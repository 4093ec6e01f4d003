// The last volume listing each node's datapath gave this controller, so that a node that stops
// answering does not make its volumes vanish from ListVolumes: the health monitor sidecar
// (external-health-monitor-controller) records an event only for a volume it is told about with an
// abnormal condition, and says nothing about one that is simply missing. So a silent node's
// volumes are listed from here, abnormal, with the cause.
//
// Kept in memory only. Refreshed by every full listing a node answers, and per volume by
// ControllerGetVolume's answers and DeleteVolume; a volume created on a node after its last
// listing is not in it until the next one. A restarted controller starts empty: the volumes of a
// node that has not answered a listing since are still left out (replicated volumes are not: they
// are listed from the catalogue in etcd, controller/replicated.h).
//
// An answer is published after the node gave it, and a volume may be deleted in between: a
// ListVolumes (or ControllerGetVolume) in flight while DeleteVolume runs would otherwise put the
// deleted volume back until the next listing. So each question takes a Ticket before it asks the
// node, Forget leaves a tombstone newer than every ticket in flight, and Put / PutVolume drop what
// a tombstone newer than their ticket names. Tombstones live only while a ticket older than them
// is in flight. A volume deleted and created again under the same name while a listing is in
// flight is left out of that listing's answer (it is back with the next one): never a deleted one
// kept.
#pragma once

#include <cstdint>
#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "controller/node_datapath.h"

namespace nbdcsi::controller {

class LastListings {
 public:
  // Taken before a node is asked (a full listing, or one volume); its answer is published with
  // it. Ends (and lets older tombstones go) when destroyed, whether it was used or not.
  class Ticket {
   public:
    Ticket(const Ticket&) = delete;
    Ticket& operator=(const Ticket&) = delete;
    ~Ticket() { owner_.End(seq_); }

   private:
    friend class LastListings;
    Ticket(LastListings& owner, uint64_t seq) : owner_(owner), seq_(seq) {}
    LastListings& owner_;
    const uint64_t seq_;
  };
  Ticket Begin() {
    std::lock_guard lock(mu_);
    const uint64_t seq = ++seq_;
    in_flight_.insert(seq);
    return Ticket(*this, seq);
  }

  // `node` answered a full listing, asked under `t`: `volumes` is all it has, less what was
  // deleted since it was asked.
  void Put(const Ticket& t, const std::string& node, std::vector<dpv1::Volume> volumes) {
    std::lock_guard lock(mu_);
    std::erase_if(volumes,
                  [&](const dpv1::Volume& v) { return DeletedSinceLocked(t, node, v.name()); });
    nodes_[node] = std::move(volumes);
  }
  // `node` answered for one volume, asked under `t`: it exists as `v` (kept only for a node
  // listed before, and unless it was deleted since it was asked).
  void PutVolume(const Ticket& t, const std::string& node, const dpv1::Volume& v) {
    std::lock_guard lock(mu_);
    if (DeletedSinceLocked(t, node, v.name())) return;
    auto it = nodes_.find(node);
    if (it == nodes_.end()) return;
    for (auto& cached : it->second) {
      if (cached.name() == v.name()) {
        cached = v;
        return;
      }
    }
    it->second.push_back(v);
  }
  // `node` said volume `name` does not exist (deleted, or NOT_FOUND).
  void Forget(const std::string& node, const std::string& name) {
    std::lock_guard lock(mu_);
    // An answer given before the deletion may still be on its way: its ticket is older.
    if (!in_flight_.empty()) tombstones_[{node, name}] = ++seq_;
    auto it = nodes_.find(node);
    if (it == nodes_.end()) return;
    std::erase_if(it->second, [&](const dpv1::Volume& v) { return v.name() == name; });
  }
  // The volumes of `node` at its last answer; nullopt when it never answered a listing.
  std::optional<std::vector<dpv1::Volume>> Of(const std::string& node) const {
    std::lock_guard lock(mu_);
    auto it = nodes_.find(node);
    if (it == nodes_.end()) return std::nullopt;
    return it->second;
  }
  std::optional<dpv1::Volume> Volume(const std::string& node, const std::string& name) const {
    std::lock_guard lock(mu_);
    auto it = nodes_.find(node);
    if (it == nodes_.end()) return std::nullopt;
    for (const auto& v : it->second) {
      if (v.name() == name) return v;
    }
    return std::nullopt;
  }
  // Every node with a listing, sorted.
  std::vector<std::string> Nodes() const {
    std::lock_guard lock(mu_);
    std::vector<std::string> out;
    for (const auto& [node, _] : nodes_) out.push_back(node);
    return out;
  }

  // Tombstones held now (for tests: none once no ticket is in flight).
  size_t Tombstones() const {
    std::lock_guard lock(mu_);
    return tombstones_.size();
  }

 private:
  bool DeletedSinceLocked(const Ticket& t, const std::string& node, const std::string& name) const {
    auto it = tombstones_.find({node, name});
    return it != tombstones_.end() && it->second > t.seq_;
  }
  void End(uint64_t seq) {
    std::lock_guard lock(mu_);
    in_flight_.erase(seq);
    // A tombstone older than every ticket still in flight can drop nothing any more.
    const uint64_t oldest = in_flight_.empty() ? UINT64_MAX : *in_flight_.begin();
    std::erase_if(tombstones_, [&](const auto& kv) { return kv.second < oldest; });
  }

  mutable std::mutex mu_;
  std::map<std::string, std::vector<dpv1::Volume>> nodes_;  // guarded by mu_
  uint64_t seq_ = 0;                                        // guarded by mu_
  std::set<uint64_t> in_flight_;                            // tickets not ended; guarded by mu_
  // (node, name) -> the sequence number of its deletion; guarded by mu_
  std::map<std::pair<std::string, std::string>, uint64_t> tombstones_;
};

}  // namespace nbdcsi::controller
