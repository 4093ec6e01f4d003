// `nbdctl cluster` rendering (tools/nbdctl/cluster_render.h): JSON keys, tables, the nodes that
// did not answer after the table.
#include <gtest/gtest.h>

#include "tools/nbdctl/cluster_render.h"

namespace nbdcsi::nbdctl {
namespace {

constexpr uint64_t kMiB = uint64_t{1} << 20;

TEST(ClusterRender, NodesJsonAndTable) {
  cv1::ListClusterNodesResponse r;
  r.set_heartbeat_ttl_ms(3000);
  auto* n = r.add_nodes();
  n->set_node_id("n1");
  n->set_api_address("10.0.0.1:9820");
  n->set_live(true);
  n->set_heartbeat_age_ms(1200);
  n->set_capacity_bytes(1024 * kMiB);
  n->set_free_bytes(512 * kMiB);
  n->set_provisionable_bytes(900 * kMiB);
  n->set_provisioned_bytes(124 * kMiB);
  n->set_volumes(3);
  n->set_version("1.2.3");
  auto* m = r.add_nodes();
  m->set_node_id("n2");
  m->set_heartbeat_age_ms(125'000);
  auto j = ClusterNodesJson(r);
  EXPECT_EQ(j["heartbeat_ttl_ms"], 3000);
  EXPECT_EQ(j["nodes"][0]["node"], "n1");
  EXPECT_EQ(j["nodes"][0]["address"], "10.0.0.1:9820");
  EXPECT_EQ(j["nodes"][0]["live"], true);
  EXPECT_EQ(j["nodes"][0]["capacity_bytes"], 1024 * kMiB);
  EXPECT_EQ(j["nodes"][0]["provisionable_bytes"], 900 * kMiB);
  EXPECT_EQ(j["nodes"][0]["volumes"], 3);
  EXPECT_EQ(j["nodes"][1]["live"], false);
  const std::string t = ClusterNodesTable(r);
  EXPECT_NE(t.find("NODE"), std::string::npos);
  EXPECT_NE(t.find("1.2s ago"), std::string::npos) << t;
  EXPECT_NE(t.find("2m5s ago"), std::string::npos) << t;
  EXPECT_NE(t.find("expired"), std::string::npos) << t;
  EXPECT_EQ(ClusterNodesTable({}), "No node has registered with the controller.\n");
}

TEST(ClusterRender, VolumesJsonAndTable) {
  cv1::ListClusterVolumesResponse r;
  auto* c = r.add_volumes();
  c->set_node_id("n1");
  c->set_volume_id("v1:n1:a");
  c->mutable_volume()->set_name("a");
  c->mutable_volume()->set_size_bytes(64 * kMiB);
  c->mutable_volume()->set_open_connections(2);
  c->mutable_volume()->mutable_qos()->set_max_iops(500);
  c->set_condition("volume is healthy");
  c->set_replica_of("r1:a");
  auto* rv = r.add_replicated();
  rv->set_volume_id("r1:a");
  rv->set_size_bytes(64 * kMiB);
  rv->add_replicas("n1");
  rv->add_replicas("n2");
  rv->add_in_sync("n1");
  rv->set_abnormal(true);
  rv->set_condition("degraded");
  auto* a = r.add_nodes();
  a->set_node_id("n1");
  a->set_live(true);
  auto* b = r.add_nodes();
  b->set_node_id("n2");
  b->set_live(true);
  b->set_error("connection refused");
  auto j = ClusterVolumesJson(r);
  EXPECT_EQ(j["volumes"][0]["node"], "n1");
  EXPECT_EQ(j["volumes"][0]["volume_id"], "v1:n1:a");
  EXPECT_EQ(j["volumes"][0]["size_bytes"], 64 * kMiB);
  EXPECT_EQ(j["volumes"][0]["attached"], true);
  EXPECT_EQ(j["volumes"][0]["qos"]["max_iops"], 500);
  EXPECT_EQ(j["volumes"][0]["condition"]["abnormal"], false);
  EXPECT_EQ(j["volumes"][0]["replica_of"], "r1:a");
  EXPECT_EQ(j["replicated"][0]["replicas"], nlohmann::json({"n1", "n2"}));
  EXPECT_EQ(j["replicated"][0]["target"], nullptr);
  EXPECT_EQ(j["replicated"][0]["condition"]["message"], "degraded");
  EXPECT_EQ(j["nodes"][0]["error"], nullptr);
  EXPECT_EQ(j["nodes"][1]["error"], "connection refused");
  EXPECT_EQ(j["catalogue_error"], nullptr);
  const std::string t = ClusterVolumesTable(r);
  EXPECT_NE(t.find("yes (2)"), std::string::npos) << t;
  EXPECT_NE(t.find("n1,n2"), std::string::npos) << t;
  EXPECT_NE(t.find("abnormal: degraded"), std::string::npos) << t;
  EXPECT_NE(t.find("\nnode n2: not listed: connection refused\n"), std::string::npos) << t;
}

TEST(ClusterRender, SnapshotsJsonAndTable) {
  cv1::ListClusterSnapshotsResponse r;
  auto* s = r.add_snapshots();
  s->set_node_id("n2");
  s->set_snapshot_id("s1:n2:s");
  s->set_source_volume_id("v1:n2:v");
  s->mutable_snapshot()->set_name("s");
  s->mutable_snapshot()->set_size_bytes(32 * kMiB);
  s->mutable_snapshot()->set_ready(true);
  auto j = ClusterSnapshotsJson(r);
  EXPECT_EQ(j["snapshots"][0]["node"], "n2");
  EXPECT_EQ(j["snapshots"][0]["snapshot_id"], "s1:n2:s");
  EXPECT_EQ(j["snapshots"][0]["source_volume_id"], "v1:n2:v");
  EXPECT_EQ(j["snapshots"][0]["size_bytes"], 32 * kMiB);
  EXPECT_EQ(j["nodes"], nlohmann::json::array());
  EXPECT_NE(ClusterSnapshotsTable(r).find("v1:n2:v"), std::string::npos);
  EXPECT_EQ(ClusterSnapshotsTable({}), "No snapshots.\n");
}

}  // namespace
}  // namespace nbdcsi::nbdctl
