// nbdctl target's pure helpers: the health word, the stable JSON keys scripts read, the details
// and the list table of replicated volumes' targets.
#include <gtest/gtest.h>

#include "tools/nbdctl/target_render.h"

namespace nbdcsi::nbdctl {
namespace {

tv1::Target Degraded() {
  tv1::Target t;
  t.set_volume("pvc-1");
  t.set_node("node-t");
  t.set_export_name("pvc-1@target");
  t.set_epoch(7);
  t.set_size_bytes(64ull << 20);
  t.add_in_sync("node-a");
  t.set_degraded(true);
  t.set_acked_degraded(913);
  auto* a = t.add_replicas();
  a->set_node("node-a");
  a->set_state("in-sync");
  a->set_requests(1600);
  a->set_bytes_written(6553600);
  a->set_healthy_connections(2);
  auto* b = t.add_replicas();
  b->set_node("node-b");
  b->set_state("out-of-sync");
  b->set_why("write: connection reset");
  b->set_errors(3);
  return t;
}

TEST(TargetRender, HealthWord) {
  tv1::Target t = Degraded();
  EXPECT_EQ(TargetHealth(t), "degraded");
  t.set_stopped(true);
  EXPECT_EQ(TargetHealth(t), "stopped");
  EXPECT_EQ(TargetHealth(tv1::Target{}), "ok");
}

TEST(TargetRender, JsonKeysAreStable) {
  auto j = TargetJson(Degraded());
  EXPECT_EQ(j["volume"], "pvc-1");
  EXPECT_EQ(j["node"], "node-t");
  EXPECT_EQ(j["export_name"], "pvc-1@target");
  EXPECT_EQ(j["epoch"], 7);
  EXPECT_EQ(j["health"], "degraded");
  EXPECT_EQ(j["in_sync"], nlohmann::json::array({"node-a"}));
  EXPECT_EQ(j["acked_degraded"], 913);
  ASSERT_EQ(j["replicas"].size(), 2u);
  EXPECT_EQ(j["replicas"][1]["node"], "node-b");
  EXPECT_EQ(j["replicas"][1]["state"], "out-of-sync");
  EXPECT_EQ(j["replicas"][1]["why"], "write: connection reset");
  EXPECT_EQ(j["replicas"][0]["healthy_connections"], 2);
}

TEST(TargetRender, ABackgroundResyncQueuedOrFailedShowsPerReplica) {
  tv1::Target t = Degraded();
  t.mutable_replicas(1)->set_resync_pending(true);
  auto j = TargetJson(t);
  EXPECT_EQ(j["replicas"][1]["resync_pending"], true);
  EXPECT_EQ(j["replicas"][1]["resync_error"], "");
  EXPECT_EQ(j["replicas"][0]["resync_pending"], false);
  EXPECT_NE(TargetDetails(t).find("resync of node-b: queued"), std::string::npos)
      << TargetDetails(t);
  t.mutable_replicas(1)->set_resync_pending(false);
  t.mutable_replicas(1)->set_resync_error("connect node-b: connection refused");
  EXPECT_EQ(TargetJson(t)["replicas"][1]["resync_error"], "connect node-b: connection refused");
  const std::string d = TargetDetails(t);
  EXPECT_NE(d.find("last resync of node-b failed: connect node-b: connection refused"),
            std::string::npos)
      << d;
  EXPECT_EQ(d.find("queued"), std::string::npos) << d;
}

TEST(TargetRender, ReconcileProgress) {
  tv1::Target t = Degraded();
  EXPECT_TRUE(TargetJson(t)["reconcile"].is_null());
  EXPECT_EQ(TargetDetails(t).find("reconciling"), std::string::npos);
  auto* r = t.mutable_reconcile();
  r->set_source("node-a");
  r->set_done_bytes(16 << 20);
  r->set_total_bytes(64 << 20);
  r->set_percent(25);
  auto j = TargetJson(t);
  EXPECT_EQ(j["reconcile"]["source"], "node-a");
  EXPECT_EQ(j["reconcile"]["done_bytes"], 16 << 20);
  EXPECT_EQ(j["reconcile"]["total_bytes"], 64 << 20);
  EXPECT_EQ(j["reconcile"]["percent"], 25.0);
  const std::string d = TargetDetails(t);
  EXPECT_NE(d.find("reconciling: after an unclean takeover, from node-a: 25% (16 MiB of 64 MiB); "
                   "reads go to node-a only until done"),
            std::string::npos)
      << d;
}

TEST(TargetRender, ResyncProgress) {
  tv1::Target t = Degraded();
  EXPECT_TRUE(TargetJson(t)["resync"].is_null());
  auto* r = t.mutable_resync();
  r->set_node("node-b");
  r->set_pass(2);
  r->set_pass_done_bytes(3 << 20);
  r->set_pass_total_bytes(12 << 20);
  r->set_percent(25);
  r->set_eta_seconds(-1);
  r->set_copied_bytes(20 << 20);
  auto j = TargetJson(t);
  EXPECT_EQ(j["resync"]["node"], "node-b");
  EXPECT_EQ(j["resync"]["pass"], 2);
  EXPECT_EQ(j["resync"]["percent"], 25.0);
  EXPECT_TRUE(j["resync"]["eta_seconds"].is_null()) << "unknown, not -1";
  EXPECT_EQ(j["resync"]["copied_bytes"], 20 << 20);
  std::string d = TargetDetails(t);
  EXPECT_NE(d.find("resync:      node-b: pass 2, 25% (3 MiB of 12 MiB), 20 MiB copied so far"),
            std::string::npos)
      << d;
  r->set_eta_seconds(9);
  EXPECT_NE(TargetDetails(t).find(", ETA 9 s,"), std::string::npos);
}

TEST(TargetRender, DetailsAndTable) {
  std::string d = TargetDetails(Degraded());
  EXPECT_NE(d.find("epoch:       7"), std::string::npos) << d;
  EXPECT_NE(d.find("health:      degraded"), std::string::npos) << d;
  EXPECT_NE(d.find("913 acknowledged while a replica missed them"), std::string::npos) << d;
  EXPECT_NE(d.find("write: connection reset"), std::string::npos) << d;
  EXPECT_EQ(d.find("stopped:"), std::string::npos) << d;
  tv1::ListTargetsResponse list;
  *list.add_targets() = Degraded();
  std::string table = TargetsTable(list);
  EXPECT_NE(table.find("VOLUME"), std::string::npos);
  EXPECT_NE(table.find("pvc-1"), std::string::npos);
  EXPECT_NE(table.find("degraded"), std::string::npos);
  EXPECT_NE(table.find("node-a"), std::string::npos);
}

}  // namespace
}  // namespace nbdcsi::nbdctl
