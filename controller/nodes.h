// The controller's way to the nodes: the registry's live nodes and the datapath client of each,
// in the errno the CSI edge needs, plus the parallel fan-out for questions every node must answer
// (idempotency by name, listings).
#pragma once

#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include "common/status.h"
#include "controller/node_datapath.h"
#include "controller/registry.h"

namespace nbdcsi::controller {

class Nodes {
 public:
  explicit Nodes(NodeRegistry& registry) : registry_(registry) {}

  std::vector<NodeInfo> List() const { return registry_.List(); }  // live, sorted by node id
  std::optional<NodeInfo> Get(const std::string& node) const { return registry_.Get(node); }
  // Why a node is not among List() (its heartbeats stopped), in words that do not change from one
  // call to the next (they end up in the health monitor's events, which Kubernetes folds).
  std::string WhyAbsent() const;

  // EAGAIN (UNAVAILABLE) when `node` has not registered or its heartbeats stopped: the sidecar
  // retries, and the node may come (back) within a heartbeat. Never "done" or "not found".
  StatusOr<std::shared_ptr<NodeDatapath>> Datapath(const std::string& node);

  // fn(datapath of `node`), or Datapath()'s error.
  template <typename F>
  auto On(const std::string& node, F&& fn) -> std::invoke_result_t<F, NodeDatapath&> {
    auto dp = Datapath(node);
    if (!dp.ok()) return dp.status();
    return std::forward<F>(fn)(**dp);
  }

  StatusOr<dpv1::Volume> GetVolume(const std::string& node, const std::string& name) {
    return On(node, [&](NodeDatapath& d) { return d.GetVolume(name); });
  }
  StatusOr<dpv1::Snapshot> GetSnapshot(const std::string& node, const std::string& name) {
    return On(node, [&](NodeDatapath& d) { return d.GetSnapshot(name); });
  }

 private:
  NodeRegistry& registry_;
};

// fn(node) for every node at once, results in the nodes' order: a question every node must answer
// costs one round trip, not one per node. The first node is asked on the calling thread.
template <typename F>
auto FanOut(const std::vector<NodeInfo>& nodes, F fn)
    -> std::vector<std::invoke_result_t<F&, const NodeInfo&>> {
  using T = std::invoke_result_t<F&, const NodeInfo&>;
  std::vector<std::optional<T>> out(nodes.size());
  std::vector<std::thread> threads;
  for (size_t i = 1; i < nodes.size(); ++i) {
    threads.emplace_back([&out, &nodes, &fn, i] { out[i].emplace(fn(nodes[i])); });
  }
  if (!nodes.empty()) out[0].emplace(fn(nodes[0]));
  for (auto& t : threads) t.join();
  std::vector<T> results;
  results.reserve(out.size());
  for (auto& r : out) results.push_back(std::move(*r));
  return results;
}

// Where a search by name over every node (FanOut's answers) found it: the index of the first node
// that has it, nullopt when every node said ENOENT, or the error of a node before that one (a node
// that cannot answer could hold it: the caller must not go on as if it did not exist).
template <typename T>
StatusOr<std::optional<size_t>> FirstHolder(const std::vector<StatusOr<T>>& answers) {
  for (size_t i = 0; i < answers.size(); ++i) {
    if (answers[i].ok()) return std::optional<size_t>(i);
    if (answers[i].status().code() != ENOENT) return answers[i].status();
  }
  return std::optional<size_t>();
}

}  // namespace nbdcsi::controller
