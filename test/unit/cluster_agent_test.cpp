// The datapath's cluster agent (datapath/replica/cluster_agent.h) on the memory cluster store
// with a recording export host: registration, the refusals of OpenTarget (no volume, nobody
// reachable, a lost lease) leaving no claim and no export behind, and Stop revoking the lease.
// The serving path against real replicas is integration.replicated_target.
#include <gtest/gtest.h>

#include <atomic>
#include <mutex>
#include <vector>

#include "datapath/replica/cluster_agent.h"
#include "common/fs_util.h"
#include "test/support/memory_cluster_store.h"
#include "test/support/temp_dir.h"
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
  EXPECT_EQ((*agent)->StartResync("rv", "node-b", 0).code(), ENOENT);
  EXPECT_TRUE((*agent)->ListTargets().empty());
  // A snapshot's freeze needs the target here; a thaw of none is done already.
  EXPECT_EQ((*agent)->FreezeTarget("rv", 1s).status().code(), ENOENT);
  EXPECT_FALSE((*agent)->ThawTarget("rv", 1));

  // Another node's live claim: EBUSY, naming it.
  auto theirs = store.ClaimTarget("rv", "node-u", *other);
  ASSERT_TRUE(theirs.ok());
  EXPECT_EQ((*agent)->OpenTarget("rv").status().code(), EBUSY);
}

// The targets open before a restart (state_dir/.open-targets) are reopened at start: a volume
// that is gone is forgotten, one that cannot be served now (no replica reachable) is kept for the
// next start; a failed open records nothing.
TEST(ClusterAgent, TargetsRecordedOpenAreReopenedAtStartOrForgottenWhenGone) {
  test::TempDir dir("cluster_agent_test");
  ASSERT_TRUE(dir.ok()) << dir.error();
  test::MemoryClusterStore store;
  RecordingHost host;
  auto other = store.GrantLease(30);
  ASSERT_TRUE(store.RegisterNode("node-a", *other, "tcp://127.0.0.1:1").ok());
  ASSERT_TRUE(store.CreateVolume({"rv", 1 << 20, {"node-a"}, {"node-a"}, "", 0}).ok());
  ASSERT_TRUE(WriteFileAtomic(dir.path(), OpenTargets::kFileName, "gone\nrv\n").ok());
  auto o = Opts();
  o.state_dir = dir.path();
  auto agent = ClusterAgent::Start(store, host, o);
  ASSERT_TRUE(agent.ok());
  EXPECT_TRUE((*agent)->ListTargets().empty()) << "node-a is unreachable: nothing opened";
  EXPECT_EQ(ReadSmallFile(dir.path() + "/" + OpenTargets::kFileName).value(), "rv\n");
  EXPECT_TRUE(store.GetVolume("rv")->target.empty()) << "the failed reopen released its claim";
  // A failed open by request records nothing.
  ASSERT_TRUE(store.CreateVolume({"rv2", 1 << 20, {"node-a"}, {"node-a"}, "", 0}).ok());
  EXPECT_FALSE((*agent)->OpenTarget("rv2").ok());
  EXPECT_EQ(ReadSmallFile(dir.path() + "/" + OpenTargets::kFileName).value(), "rv\n");
  (*agent)->Stop();
}

TEST(OpenTargets, AddAndRemoveAreKeptInTheFile) {
  test::TempDir dir("open_targets_test");
  ASSERT_TRUE(dir.ok()) << dir.error();
  OpenTargets f(dir.path() + "/targets");
  EXPECT_TRUE(f.Load().value().empty());
  ASSERT_TRUE(f.Add("b").ok());
  ASSERT_TRUE(f.Add("a").ok());
  ASSERT_TRUE(f.Add("a").ok());
  EXPECT_EQ(OpenTargets(dir.path() + "/targets").Load().value(), (std::set<std::string>{"a", "b"}));
  ASSERT_TRUE(f.Remove("b").ok());
  ASSERT_TRUE(f.Remove("nope").ok());
  EXPECT_EQ(OpenTargets(dir.path() + "/targets").Load().value(), std::set<std::string>{"a"});
  OpenTargets none("");
  EXPECT_TRUE(none.Add("a").ok());
  EXPECT_TRUE(none.Load().value().empty());
}

TEST(ClusterAgent, ALostLeaseIsReplacedByANewOne) {
  test::MemoryClusterStore store;
  RecordingHost host;
  auto o = Opts();
  o.lease_ttl_seconds = 1;
  auto agent = ClusterAgent::Start(store, host, o);
  ASSERT_TRUE(agent.ok());
  ASSERT_TRUE((*agent)->joined());
  // What etcd does when the TTL runs out: the node's key goes with the lease, the keepalive
  // learns it is gone, and the agent joins again with a new lease. The memory store numbers
  // leases from 0x1000; the agent's is the only one.
  ASSERT_TRUE(store.ExpireLease(0x1000));
  EXPECT_TRUE(store.LiveNodes().value().empty());
  // The agent registers, then says it has joined: wait for both (under TSan the second can
  // trail the first by a scheduling slot).
  ASSERT_TRUE(test::WaitUntil(
      [&] {
        return store.LiveNodes().value() == std::vector<std::string>{"node-t"} &&
               (*agent)->joined();
      },
      10s));
  EXPECT_EQ(store.KeepAliveLease(0x1000).status().code(), ENOENT);
  EXPECT_TRUE(store.KeepAliveLease(0x1001).ok()) << "the new lease is kept alive";
}

// etcd unreachable when the datapath starts: the agent does not hold the daemon up, refuses
// targets saying why, and joins once etcd answers.
class UnreachableStore : public test::MemoryClusterStore {
 public:
  StatusOr<cluster::LeaseId> GrantLease(int64_t ttl) override {
    if (down) return Error(EAGAIN, "etcd 127.0.0.22:2379: connection refused");
    return test::MemoryClusterStore::GrantLease(ttl);
  }
  std::atomic<bool> down{true};
};

TEST(ClusterAgent, StartsWithoutEtcdAndJoinsLater) {
  UnreachableStore store;
  RecordingHost host;
  auto agent = ClusterAgent::Start(store, host, Opts());
  ASSERT_TRUE(agent.ok()) << agent.status().message();
  EXPECT_FALSE((*agent)->joined());
  auto r = (*agent)->OpenTarget("rv");
  EXPECT_EQ(r.status().code(), ENOLINK);
  EXPECT_NE(r.status().message().find("connection refused"), std::string::npos)
      << r.status().message();
  store.down = false;
  ASSERT_TRUE(test::WaitUntil([&] { return (*agent)->joined(); }, 10s));
  EXPECT_EQ(store.NodeEndpoint("node-t").value(), "tcp://127.0.0.13:10809");
  EXPECT_EQ((*agent)->OpenTarget("rv").status().code(), ENOENT) << "joined: now the volume is "
                                                                   "what is missing";
}

}  // namespace
}  // namespace nbdcsi::replica
