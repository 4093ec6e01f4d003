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
#pragma once

#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "controller/node_datapath.h"

namespace nbdcsi::controller {

class LastListings {
 public:
  // `node` answered a full listing: `volumes` is all it has.
  void Put(const std::string& node, std::vector<dpv1::Volume> volumes) {
    std::lock_guard lock(mu_);
    nodes_[node] = std::move(volumes);
  }
  // `node` answered for one volume: it exists as `v` (kept only for a node listed before).
  void PutVolume(const std::string& node, const dpv1::Volume& v) {
    std::lock_guard lock(mu_);
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

 private:
  mutable std::mutex mu_;
  std::map<std::string, std::vector<dpv1::Volume>> nodes_;  // guarded by mu_
};

}  // namespace nbdcsi::controller
