// The datapath's cluster agent (datapath/replica/cluster_agent.h) on the memory cluster store
// with a recording export host: registration, the refusals of OpenTarget (no volume, nobody
// reachable, a lost lease) leaving no claim and no export behind, and Stop revoking the lease.
// The serving path against real replicas is integration.replicated_target.
#include <gtest/gtest.h>

#include <mutex>
#include <vector>

#include "datapath/replica/cluster_agent.h"
#include "test/support/memory_cluster_store.h"
#include "test/support/wait.h"

namespace nbdcsi::replica {
namespace {

using namespace std::chrono_literals;

class RecordingHost final : public ExportHost {
 public:
  Status AddBackendExport(std::shared_ptr<datapath::ExportBackend> b) override {
    std::lock_guard<std::mutex> lock(mu);
    added.push_back(b->name());
    return Status::Ok();
  }
  Status RemoveBackendExport(const std::string& name) override {
    std::lock_guard<std::mutex> lock(mu);
    removed.push_back(name);
    return Status::Ok();
  }
  std::mutex mu;
  std::vector<std::string> added, removed;
};

ClusterAgentOptions Opts() {
  ClusterAgentOptions o;
  o.node_id = "node-t";
  o.nbd_endpoint = "tcp://127.0.0.13:10809";
  o.lease_ttl_seconds = 3;
  o.handshake_timeout = 1s;
  return o;
}

TEST(ClusterAgent, RegistersTheNodeAndRevokesItsLeaseAtStop) {
  test::MemoryClusterStore store;
  RecordingHost host;
  auto agent = ClusterAgent::Start(store, host, Opts());
  ASSERT_TRUE(agent.ok()) << agent.status().message();
  EXPECT_EQ(store.NodeEndpoint("node-t").value(), "tcp://127.0.0.13:10809");
  EXPECT_EQ(store.LiveNodes().value(), std::vector<std::string>{"node-t"});
  (*agent)->Stop();
  EXPECT_TRUE(store.LiveNodes().value().empty());
  EXPECT_EQ(ClusterAgent::Start(store, host, {}).status().code(), EINVAL);
}

TEST(ClusterAgent, RefusalsLeaveNoClaimAndNoExport) {
  test::MemoryClusterStore store;
  RecordingHost host;
  auto agent = ClusterAgent::Start(store, host, Opts());
  ASSERT_TRUE(agent.ok());
  EXPECT_EQ((*agent)->OpenTarget("nope").status().code(), ENOENT);

  // Both replicas are registered where nothing listens (port 1 on loopback).
  auto other = store.GrantLease(30);
  ASSERT_TRUE(store.RegisterNode("node-a", *other, "tcp://127.0.0.1:1").ok());
  ASSERT_TRUE(store.RegisterNode("node-b", *other, "tcp://127.0.0.1:1").ok());
  ASSERT_TRUE(store.CreateVolume({"rv", 1 << 20, {"node-a", "node-b"}, {"node-a", "node-b"}, "", 0})
                  .ok());
  auto r = (*agent)->OpenTarget("rv");
  EXPECT_EQ(r.status().code(), EHOSTUNREACH) << r.status().message();
  EXPECT_NE(r.status().message().find("node-a"), std::string::npos) << r.status().message();
  auto v = store.GetVolume("rv");
  EXPECT_TRUE(v->target.empty()) << "the claim was released";
  EXPECT_EQ(v->epoch, 1u);
  EXPECT_EQ(v->in_sync, (std::vector<std::string>{"node-a", "node-b"})) << "nobody dropped";
  EXPECT_TRUE(host.added.empty());
  EXPECT_EQ((*agent)->CloseTarget("rv").code(), ENOENT);
  EXPECT_TRUE((*agent)->ListTargets().empty());

  // Another node's live claim: EBUSY, naming it.
  auto theirs = store.ClaimTarget("rv", "node-u", *other);
  ASSERT_TRUE(theirs.ok());
  EXPECT_EQ((*agent)->OpenTarget("rv").status().code(), EBUSY);
}

TEST(ClusterAgent, ALostLeaseRefusesNewTargets) {
  test::MemoryClusterStore store;
  RecordingHost host;
  auto o = Opts();
  o.lease_ttl_seconds = 1;
  auto agent = ClusterAgent::Start(store, host, o);
  ASSERT_TRUE(agent.ok());
  // What etcd does when the TTL runs out: the keepalive then learns the lease is gone. The
  // memory store numbers leases from 0x1000; the agent's is the only one.
  bool expired = false;
  for (cluster::LeaseId id = 0x1000; id < 0x1010 && !expired; ++id) expired = store.ExpireLease(id);
  ASSERT_TRUE(expired);
  ASSERT_TRUE(test::WaitUntil([&] { return (*agent)->lease_lost(); }, 5s));
  ASSERT_TRUE(store.CreateVolume({"rv", 1 << 20, {"node-a"}, {"node-a"}, "", 0}).ok());
  auto r = (*agent)->OpenTarget("rv");
  EXPECT_EQ(r.status().code(), ENOLINK) << r.status().message();
  EXPECT_EQ(store.GetVolume("rv")->epoch, 0u) << "no claim was even tried";
}

}  // namespace
}  // namespace nbdcsi::replica
