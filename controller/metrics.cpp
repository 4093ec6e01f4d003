#include "controller/metrics.h"

#include <prometheus/counter.h>
#include <prometheus/family.h>
#include <prometheus/gauge.h>
#include <prometheus/registry.h>

#include <chrono>

namespace nbdcsi::controller {
namespace {

using prometheus::ClientMetric;
using prometheus::MetricFamily;
using prometheus::MetricType;

MetricFamily Gauges(std::string name, std::string help) {
  MetricFamily f;
  f.name = std::move(name);
  f.help = std::move(help);
  f.type = MetricType::Gauge;
  return f;
}

void Add(MetricFamily& f, std::vector<ClientMetric::Label> labels, double value) {
  ClientMetric m;
  m.label = std::move(labels);
  m.gauge.value = value;
  f.metric.push_back(std::move(m));
}

double Seconds(std::chrono::steady_clock::duration d) {
  return std::chrono::duration<double>(d).count();
}

// The registry as it is at scrape time: no copy kept between scrapes.
class NodesCollector final : public prometheus::Collectable {
 public:
  NodesCollector(const NodeRegistry& registry, std::string version)
      : registry_(registry), version_(std::move(version)) {}

  std::vector<MetricFamily> Collect() const override {
    std::chrono::steady_clock::time_point now;
    const std::vector<NodeInfo> nodes = registry_.ListKnown(&now);
    MetricFamily count = Gauges("nbdcsi_controller_nodes",
                                "Nodes whose datapath heartbeats reach this controller, by state "
                                "(expired: silent for longer than the ttl)");
    MetricFamily up = Gauges("nbdcsi_controller_node_up",
                             "1 while the node's datapath heartbeats within the ttl, else 0");
    MetricFamily age = Gauges("nbdcsi_controller_node_heartbeat_age_seconds",
                              "Time since the node's datapath last heartbeated");
    int live = 0;
    for (const NodeInfo& n : nodes) {
      const auto since = now - n.last_seen;
      const bool is_live = since <= registry_.ttl();
      live += is_live;
      Add(up, {{"node", n.node_id}}, is_live ? 1 : 0);
      Add(age, {{"node", n.node_id}}, Seconds(since));
    }
    Add(count, {{"state", "live"}}, live);
    Add(count, {{"state", "expired"}}, static_cast<double>(nodes.size()) - live);
    MetricFamily interval = Gauges("nbdcsi_controller_heartbeat_interval_seconds",
                                   "How often datapaths are told to heartbeat");
    Add(interval, {}, Seconds(registry_.heartbeat_interval()));
    MetricFamily ttl = Gauges("nbdcsi_controller_heartbeat_ttl_seconds",
                              "Silence after which a node is treated as absent");
    Add(ttl, {}, Seconds(registry_.ttl()));
    MetricFamily info = Gauges("nbdcsi_controller_build_info", "The running version, as a label");
    Add(info, {{"version", version_}}, 1);
    return {std::move(count),    std::move(up),  std::move(age),
            std::move(interval), std::move(ttl), std::move(info)};
  }

 private:
  const NodeRegistry& registry_;
  std::string version_;
};

}  // namespace

ControllerMetrics::ControllerMetrics(const NodeRegistry& registry, std::string version)
    : registry_(std::make_shared<prometheus::Registry>()),
      rpc_(std::make_unique<GrpcServerMetrics>(*registry_, "nbdcsi_csi")),
      nodes_(std::make_shared<NodesCollector>(registry, std::move(version))) {
  auto& refusals = prometheus::BuildCounter()
                       .Name("nbdcsi_controller_placement_refusals_total")
                       .Help(
                           "CreateVolume calls that found no node for the volume: no_room "
                           "(RESOURCE_EXHAUSTED), node_missing (an allowed node is not "
                           "registered: UNAVAILABLE, retried)")
                       .Register(*registry_);
  rpc_->Declare("csi.v1.Identity");
  rpc_->Declare("csi.v1.Controller");
  // Both series from the start, at 0: a rate over a series that appears late
  // misses its first increment.
  no_room_ = &refusals.Add({{"reason", "no_room"}});
  node_missing_ = &refusals.Add({{"reason", "node_missing"}});
}

ControllerMetrics::~ControllerMetrics() = default;

std::vector<std::shared_ptr<prometheus::Collectable>> ControllerMetrics::Collectables() const {
  return {registry_, nodes_};
}

void ControllerMetrics::PlacementRefused(ControllerOptions::Refusal why) {
  (why == ControllerOptions::Refusal::kNoRoom ? no_room_ : node_missing_)->Increment();
}

}  // namespace nbdcsi::controller
