// The controller's part of replicated volumes (controller/replicated.h), in-process: the real
// Controller service over fake datapaths (one per node) and the in-memory cluster store that keeps
// the etcd store's rules (test/support/memory_cluster_store.h, checked by the same contract suite).
#include <set>

#include <gtest/gtest.h>

#include "common/grpc_status.h"
#include "test/controller/csi_requests.h"
#include "test/controller/fake_datapath.h"
#include "test/support/memory_cluster_store.h"

namespace nbdcsi::controller {
namespace {

namespace v1 = ::csi::v1;
using grpc::StatusCode;
using nbdcsi::test::BlockCap;
using nbdcsi::test::MemoryClusterStore;
using nbdcsi::test::NodeTopology;
using nbdcsi::test::VolumeRequest;
using testing::FakeCluster;
using testing::FakeDatapath;
using testing::PoolSnapshot;

constexpr uint64_t kMiB = uint64_t{1} << 20;
constexpr uint64_t kGiB = uint64_t{1} << 30;

v1::CreateVolumeRequest Replicated(const std::string& name, int replicas, int64_t bytes = 0) {
  auto r = VolumeRequest(name, bytes);
  (*r.mutable_parameters())["replicas"] = std::to_string(replicas);
  return r;
}

std::string Describe(const grpc::Status& s) {
  return GrpcCodeName(s.error_code()) + std::string(" ") + s.error_message();
}

class Replicated_ : public ::testing::Test {
 protected:
  // A node that heartbeats to the controller and is alive in the cluster state.
  void Up(const std::string& node, uint64_t room) {
    cluster_.Heartbeat(node, room);
    Alive(node);
  }
  void Alive(const std::string& node) {
    auto lease = store_.GrantLease(10);
    ASSERT_TRUE(lease.ok());
    leases_[node] = *lease;
    ASSERT_TRUE(store_.RegisterNode(node, *lease, "tcp://127.0.0.1:10809").ok());
  }
  FakeDatapath& Node(const std::string& id) { return cluster_.Node(id); }
  v1::Controller::Service& C() { return cluster_.csi(); }

  grpc::Status Create(const v1::CreateVolumeRequest& req, v1::CreateVolumeResponse* resp) {
    return C().CreateVolume(nullptr, &req, resp);
  }
  v1::Volume MustCreate(const v1::CreateVolumeRequest& req) {
    v1::CreateVolumeResponse resp;
    grpc::Status s = Create(req, &resp);
    EXPECT_TRUE(s.ok()) << Describe(s);
    return resp.volume();
  }
  grpc::Status Delete(const std::string& id) {
    v1::DeleteVolumeRequest r;
    r.set_volume_id(id);
    v1::DeleteVolumeResponse resp;
    return C().DeleteVolume(nullptr, &r, &resp);
  }
  grpc::Status Get(const std::string& id, v1::ControllerGetVolumeResponse* resp) {
    v1::ControllerGetVolumeRequest r;
    r.set_volume_id(id);
    return C().ControllerGetVolume(nullptr, &r, resp);
  }
  grpc::Status Expand(const std::string& id, uint64_t bytes,
                      v1::ControllerExpandVolumeResponse* resp) {
    v1::ControllerExpandVolumeRequest r;
    r.set_volume_id(id);
    r.mutable_capacity_range()->set_required_bytes(static_cast<int64_t>(bytes));
    return C().ControllerExpandVolume(nullptr, &r, resp);
  }
  // Pool copies of `name` over the nodes the test made.
  std::set<std::string> Holders(const std::string& name, const std::vector<std::string>& nodes) {
    std::set<std::string> out;
    for (const auto& n : nodes) {
      if (Node(n).Volume(name)) out.insert(n);
    }
    return out;
  }

  MemoryClusterStore store_;
  FakeCluster cluster_{&store_};
  std::map<std::string, cluster::LeaseId> leases_;
};

TEST(ReplicatedWithoutCatalogue, ReplicasAboveOneIsInvalidArgumentNamingTheFlag) {
  FakeCluster plain;
  plain.Heartbeat("node-a", 10 * kGiB);
  plain.Heartbeat("node-b", 10 * kGiB);
  v1::CreateVolumeResponse resp;
  auto two = Replicated("pvc-1", 2);
  grpc::Status s = plain.csi().CreateVolume(nullptr, &two, &resp);
  EXPECT_EQ(s.error_code(), StatusCode::INVALID_ARGUMENT) << Describe(s);
  EXPECT_NE(s.error_message().find("--cluster-etcd"), std::string::npos) << s.error_message();
  EXPECT_FALSE(plain.Node("node-a").Volume("pvc-1"));
  // replicas=1 is today's local volume, with or without the catalogue.
  auto one = Replicated("pvc-2", 1);
  s = plain.csi().CreateVolume(nullptr, &one, &resp);
  EXPECT_TRUE(s.ok()) << Describe(s);
  EXPECT_EQ(resp.volume().volume_id().substr(0, 3), "v1:");
  // An r1 id reaching such a controller is not found as "done": it says why.
  v1::DeleteVolumeRequest del;
  del.set_volume_id("r1:pvc-1");
  v1::DeleteVolumeResponse dresp;
  s = plain.csi().DeleteVolume(nullptr, &del, &dresp);
  EXPECT_EQ(s.error_code(), StatusCode::INVALID_ARGUMENT) << Describe(s);
}

TEST_F(Replicated_, BadReplicasValuesAreInvalidArgumentAndCreateNothing) {
  Up("node-a", 10 * kGiB);
  Up("node-b", 10 * kGiB);
  for (const char* bad : {"0", "4", "two", ""}) {
    auto req = VolumeRequest("pvc-bad", 0);
    (*req.mutable_parameters())["replicas"] = bad;
    v1::CreateVolumeResponse resp;
    grpc::Status s = Create(req, &resp);
    EXPECT_EQ(s.error_code(), StatusCode::INVALID_ARGUMENT) << bad << ": " << Describe(s);
    EXPECT_NE(s.error_message().find("replicas"), std::string::npos) << s.error_message();
  }
  EXPECT_EQ(Node("node-a").Count("CreateVolume") + Node("node-b").Count("CreateVolume"), 0);
  // Not a mutable parameter: a VolumeAttributesClass cannot change it.
  auto req = Replicated("pvc-vac", 2);
  (*req.mutable_mutable_parameters())["replicas"] = "3";
  v1::CreateVolumeResponse resp;
  EXPECT_EQ(Create(req, &resp).error_code(), StatusCode::INVALID_ARGUMENT);
}

TEST_F(Replicated_, CreatePutsEachReplicaOnADistinctNodeMostRoomFirstAllInSync) {
  Up("node-a", 10 * kGiB);
  Up("node-b", 30 * kGiB);
  Up("node-c", 20 * kGiB);
  auto req = Replicated("pvc-1", 2, static_cast<int64_t>(kGiB));
  (*req.mutable_parameters())["maxIops"] = "500";
  v1::Volume v = MustCreate(req);
  EXPECT_EQ(v.volume_id(), "r1:pvc-1");
  EXPECT_EQ(v.capacity_bytes(), static_cast<int64_t>(kGiB));
  EXPECT_EQ(v.accessible_topology_size(), 0) << "any node may stage a replicated volume";
  EXPECT_EQ(Holders("pvc-1", {"node-a", "node-b", "node-c"}),
            (std::set<std::string>{"node-b", "node-c"}));
  EXPECT_EQ(Node("node-b").Volume("pvc-1")->qos().max_iops(), 500u);
  EXPECT_EQ(Node("node-c").Volume("pvc-1")->qos().max_iops(), 500u);
  auto st = store_.GetVolume("pvc-1");
  ASSERT_TRUE(st.ok());
  EXPECT_EQ(st->replicas, (std::vector<std::string>{"node-b", "node-c"}));
  EXPECT_EQ(st->in_sync, st->replicas);
  EXPECT_EQ(st->size_bytes, kGiB);
  EXPECT_EQ(st->epoch, 0u);
  // Idempotency comes from the catalogue: no node is asked whether it has pvc-1.
  for (const char* n : {"node-a", "node-b", "node-c"}) EXPECT_EQ(Node(n).Count("GetVolume"), 0);
  // Three replicas on three nodes.
  v1::Volume three = MustCreate(Replicated("pvc-3", 3));
  EXPECT_EQ(Holders("pvc-3", {"node-a", "node-b", "node-c"}).size(), 3u);
  EXPECT_EQ(three.capacity_bytes(), static_cast<int64_t>(kGiB));  // the default size
}

TEST_F(Replicated_, ThePodsNodeGetsAReplicaAndTheTopologyNeverBoundsTheOthers) {
  Up("node-a", 30 * kGiB);
  Up("node-b", 20 * kGiB);
  Up("node-c", 1 * kGiB);  // the least room, but the pod runs there (WaitForFirstConsumer)
  auto req = Replicated("pvc-wffc", 2, static_cast<int64_t>(kMiB));
  auto* ar = req.mutable_accessibility_requirements();
  for (const char* n : {"node-a", "node-b", "node-c"}) *ar->add_requisite() = NodeTopology(n);
  *ar->add_preferred() = NodeTopology("node-c");
  MustCreate(req);
  EXPECT_TRUE(Holders("pvc-wffc", {"node-a", "node-b", "node-c"}).count("node-c"));
  // The provisioner's --strict-topology (the chart's) under WaitForFirstConsumer: requisite and
  // preferred are the pod's node alone. A replicated volume is reachable from every node, so it
  // meets that requisite wherever its copies are: the pod's node gets one, the others by room.
  auto strict = Replicated("pvc-strict", 2, static_cast<int64_t>(kMiB));
  *strict.mutable_accessibility_requirements()->add_requisite() = NodeTopology("node-c");
  *strict.mutable_accessibility_requirements()->add_preferred() = NodeTopology("node-c");
  v1::Volume v = MustCreate(strict);
  EXPECT_EQ(v.accessible_topology_size(), 0);
  EXPECT_EQ(Holders("pvc-strict", {"node-a", "node-b", "node-c"}),
            (std::set<std::string>{"node-a", "node-c"}));
  // Three copies with a requisite of two nodes: the third goes to the node outside it.
  auto three = Replicated("pvc-three", 3, static_cast<int64_t>(kMiB));
  for (const char* n : {"node-a", "node-b"}) {
    *three.mutable_accessibility_requirements()->add_requisite() = NodeTopology(n);
  }
  MustCreate(three);
  EXPECT_EQ(Holders("pvc-three", {"node-a", "node-b", "node-c"}).size(), 3u);
  // A restore under the same strict requisite: the snapshot's node (not the pod's) holds the
  // first copy, the pod's node the second.
  Node("node-b").PutSnapshot(PoolSnapshot("snap", "vol", kMiB));
  auto restore = strict;
  restore.set_name("pvc-strict-restore");
  restore.mutable_volume_content_source()->mutable_snapshot()->set_snapshot_id("s1:node-b:snap");
  MustCreate(restore);
  EXPECT_EQ(Holders("pvc-strict-restore", {"node-a", "node-b", "node-c"}),
            (std::set<std::string>{"node-b", "node-c"}));
  // A topology that is not ours is still refused.
  auto foreign = Replicated("pvc-foreign", 2, static_cast<int64_t>(kMiB));
  (*foreign.mutable_accessibility_requirements()->add_requisite()->mutable_segments())["zone"] =
      "z1";
  v1::CreateVolumeResponse resp;
  EXPECT_EQ(Create(foreign, &resp).error_code(), StatusCode::INVALID_ARGUMENT);
}

TEST_F(Replicated_, RetriesReturnTheSameVolumeAndMismatchesAreAlreadyExists) {
  Up("node-a", 10 * kGiB);
  Up("node-b", 10 * kGiB);
  Up("node-c", 10 * kGiB);
  v1::Volume first = MustCreate(Replicated("pvc-1", 2, static_cast<int64_t>(kGiB)));
  auto placed = store_.GetVolume("pvc-1")->replicas;
  // The heartbeats change; the retry still lands where the first attempt did.
  Up("node-a", 100 * kGiB);
  v1::Volume again = MustCreate(Replicated("pvc-1", 2, static_cast<int64_t>(kGiB)));
  EXPECT_EQ(again.volume_id(), first.volume_id());
  EXPECT_EQ(store_.GetVolume("pvc-1")->replicas, placed);
  v1::CreateVolumeResponse resp;
  grpc::Status s = Create(Replicated("pvc-1", 3, static_cast<int64_t>(kGiB)), &resp);
  EXPECT_EQ(s.error_code(), StatusCode::ALREADY_EXISTS) << Describe(s);
  s = Create(Replicated("pvc-1", 2, static_cast<int64_t>(2 * kGiB)), &resp);
  EXPECT_EQ(s.error_code(), StatusCode::ALREADY_EXISTS) << Describe(s);
  auto other_qos = Replicated("pvc-1", 2, static_cast<int64_t>(kGiB));
  (*other_qos.mutable_parameters())["maxIops"] = "7";
  s = Create(other_qos, &resp);
  EXPECT_EQ(s.error_code(), StatusCode::ALREADY_EXISTS) << Describe(s);
  // A mismatch takes nothing away from the volume that is there.
  EXPECT_EQ(store_.GetVolume("pvc-1")->replicas, placed);
  EXPECT_EQ(Holders("pvc-1", {"node-a", "node-b", "node-c"}),
            std::set<std::string>(placed.begin(), placed.end()));
}

TEST_F(Replicated_, ARetryFinishesAnAttemptThatStoppedAfterTheCatalogueEntry) {
  Up("node-a", 10 * kGiB);
  Up("node-b", 10 * kGiB);
  Up("node-c", 10 * kGiB);
  // A controller wrote the entry and died before any pool copy.
  cluster::VolumeState v{.name = "pvc-1", .size_bytes = kGiB, .replicas = {"node-a", "node-c"},
                         .in_sync = {"node-a", "node-c"}, .target = "", .epoch = 0};
  ASSERT_TRUE(store_.CreateVolume(v).ok());
  MustCreate(Replicated("pvc-1", 2, static_cast<int64_t>(kGiB)));
  EXPECT_EQ(Holders("pvc-1", {"node-a", "node-b", "node-c"}),
            (std::set<std::string>{"node-a", "node-c"}));
}

TEST_F(Replicated_, AFailedCopyRollsTheWholeAttemptBackSoTheRetryPlacesAfresh) {
  Up("node-a", 30 * kGiB);
  Up("node-b", 20 * kGiB);
  Up("node-c", 10 * kGiB);
  Node("node-b").SetRoom(kMiB);  // the heartbeat promises room the pool does not have
  v1::CreateVolumeResponse resp;
  grpc::Status s = Create(Replicated("pvc-1", 2, static_cast<int64_t>(kGiB)), &resp);
  EXPECT_EQ(s.error_code(), StatusCode::RESOURCE_EXHAUSTED) << Describe(s);
  EXPECT_NE(s.error_message().find("node-b"), std::string::npos) << s.error_message();
  EXPECT_TRUE(Holders("pvc-1", {"node-a", "node-b", "node-c"}).empty());
  EXPECT_EQ(store_.GetVolume("pvc-1").status().code(), ENOENT);
  // The ledger now counts node-b as holding what it was promised; the retry goes elsewhere.
  MustCreate(Replicated("pvc-1", 2, static_cast<int64_t>(kGiB)));
  EXPECT_EQ(Holders("pvc-1", {"node-a", "node-b", "node-c"}),
            (std::set<std::string>{"node-a", "node-c"}));
}

TEST_F(Replicated_, TooFewNodesIsResourceExhaustedButANodeNotYetInTheClusterIsUnavailable) {
  Up("node-a", 10 * kGiB);
  Up("node-b", 10 * kGiB);
  v1::CreateVolumeResponse resp;
  grpc::Status s = Create(Replicated("pvc-3", 3), &resp);
  EXPECT_EQ(s.error_code(), StatusCode::RESOURCE_EXHAUSTED) << Describe(s);
  EXPECT_NE(s.error_message().find("found 2"), std::string::npos) << s.error_message();
  // node-c heartbeats to the controller, but its datapath has not joined the cluster state: no
  // target could reach it. It may yet: retry.
  cluster_.Heartbeat("node-c", 10 * kGiB);
  s = Create(Replicated("pvc-3", 3), &resp);
  EXPECT_EQ(s.error_code(), StatusCode::UNAVAILABLE) << Describe(s);
  EXPECT_NE(s.error_message().find("node-c: not alive in the cluster state"), std::string::npos)
      << s.error_message();
  Alive("node-c");
  MustCreate(Replicated("pvc-3", 3));
}

TEST_F(Replicated_, DeleteRemovesEveryCopyThenTheEntryAndIsIdempotent) {
  Up("node-a", 10 * kGiB);
  Up("node-b", 10 * kGiB);
  MustCreate(Replicated("pvc-1", 2));
  const int reads = store_.live_nodes_reads();
  grpc::Status s = Delete("r1:pvc-1");
  EXPECT_TRUE(s.ok()) << Describe(s);
  EXPECT_EQ(store_.live_nodes_reads(), reads)
      << "every replica's node is registered: the live nodes need not be read";
  EXPECT_TRUE(Holders("pvc-1", {"node-a", "node-b"}).empty());
  EXPECT_EQ(store_.GetVolume("pvc-1").status().code(), ENOENT);
  EXPECT_TRUE(Delete("r1:pvc-1").ok());
  EXPECT_TRUE(Delete("r1:bad name").ok()) << "a malformed id names nothing";
}

TEST_F(Replicated_, DeleteOfAStagedVolumeIsFailedPreconditionAndKeepsEverything) {
  Up("node-a", 10 * kGiB);
  Up("node-b", 10 * kGiB);
  Up("node-t", 10 * kGiB);
  MustCreate(Replicated("pvc-1", 2, static_cast<int64_t>(kGiB)));
  auto lease = store_.GrantLease(10);
  ASSERT_TRUE(store_.ClaimTarget("pvc-1", "node-t", *lease).ok());
  grpc::Status s = Delete("r1:pvc-1");
  EXPECT_EQ(s.error_code(), StatusCode::FAILED_PRECONDITION) << Describe(s);
  EXPECT_NE(s.error_message().find("node-t"), std::string::npos) << s.error_message();
  EXPECT_EQ(Holders("pvc-1", {"node-a", "node-b", "node-t"}).size(), 2u);
  // The target's node died: its claim lapses with its lease, and the delete goes through.
  ASSERT_TRUE(store_.ExpireLease(*lease));
  s = Delete("r1:pvc-1");
  EXPECT_TRUE(s.ok()) << Describe(s);
}

TEST_F(Replicated_, ASingleNodeIdNamingACopyCannotDeleteGrowRetuneOrSnapshotIt) {
  Up("node-a", 10 * kGiB);
  Up("node-b", 10 * kGiB);
  MustCreate(Replicated("pvc-1", 2));
  const std::string crafted = "v1:node-a:pvc-1";
  grpc::Status s = Delete(crafted);
  EXPECT_EQ(s.error_code(), StatusCode::FAILED_PRECONDITION) << Describe(s);
  EXPECT_NE(s.error_message().find("r1:pvc-1"), std::string::npos) << s.error_message();
  EXPECT_TRUE(Node("node-a").Volume("pvc-1")) << "the copy must survive a crafted delete";
  v1::ControllerExpandVolumeRequest grow;
  grow.set_volume_id(crafted);
  grow.mutable_capacity_range()->set_required_bytes(20 * kGiB);
  v1::ControllerExpandVolumeResponse grown;
  s = C().ControllerExpandVolume(nullptr, &grow, &grown);
  EXPECT_EQ(s.error_code(), StatusCode::FAILED_PRECONDITION) << Describe(s);
  v1::ControllerModifyVolumeRequest mod;
  mod.set_volume_id(crafted);
  (*mod.mutable_mutable_parameters())["maxIops"] = "100";
  v1::ControllerModifyVolumeResponse modded;
  s = C().ControllerModifyVolume(nullptr, &mod, &modded);
  EXPECT_EQ(s.error_code(), StatusCode::FAILED_PRECONDITION) << Describe(s);
  v1::CreateSnapshotRequest snap;
  snap.set_name("snap-1");
  snap.set_source_volume_id(crafted);
  v1::CreateSnapshotResponse snapped;
  s = C().CreateSnapshot(nullptr, &snap, &snapped);
  EXPECT_EQ(s.error_code(), StatusCode::FAILED_PRECONDITION) << Describe(s);
  EXPECT_EQ(Node("node-a").Count("ResizeVolume") + Node("node-a").Count("SetQos") +
                Node("node-a").Count("CreateSnapshot") + Node("node-a").Count("DeleteVolume"),
            0);
  // Through its own id the volume goes, copies and all.
  EXPECT_TRUE(Delete("r1:pvc-1").ok());
  EXPECT_TRUE(Holders("pvc-1", {"node-a", "node-b"}).empty());
  // Gone from the catalogue, the same v1 id names nothing: deleting it is done.
  EXPECT_TRUE(Delete(crafted).ok());
}

TEST_F(Replicated_, DeleteSkipsANodeThatIsGoneButRetriesOneThatIsThereAndFails) {
  Up("node-a", 10 * kGiB);
  Up("node-b", 10 * kGiB);
  MustCreate(Replicated("pvc-1", 2));
  MustCreate(Replicated("pvc-2", 2));
  // A registered node that cannot answer: the delete fails (retried) and the entry stays.
  Node("node-b").SetDown(Error(EAGAIN, "node-b: connection refused"));
  grpc::Status s = Delete("r1:pvc-1");
  EXPECT_EQ(s.error_code(), StatusCode::UNAVAILABLE) << Describe(s);
  EXPECT_TRUE(store_.GetVolume("pvc-1").ok());
  // node-b goes for good: not registered, not alive in the cluster state. Its copy cannot be
  // reached; the delete does not wait for it forever.
  ASSERT_TRUE(store_.ExpireLease(leases_["node-b"]));
  cluster_.Advance(FakeCluster::kTtl * 2);
  cluster_.Heartbeat("node-a", 10 * kGiB);
  s = Delete("r1:pvc-2");
  EXPECT_TRUE(s.ok()) << Describe(s);
  EXPECT_FALSE(Node("node-a").Volume("pvc-2"));
  EXPECT_EQ(store_.GetVolume("pvc-2").status().code(), ENOENT);
}

TEST_F(Replicated_, GetVolumeReportsDegradedWhenAReplicaIsOutOfSync) {
  Up("node-a", 10 * kGiB);
  Up("node-b", 10 * kGiB);
  Up("node-t", 1 * kMiB);
  MustCreate(Replicated("pvc-1", 2, static_cast<int64_t>(kGiB)));
  v1::ControllerGetVolumeResponse resp;
  grpc::Status s = Get("r1:pvc-1", &resp);
  ASSERT_TRUE(s.ok()) << Describe(s);
  EXPECT_EQ(resp.volume().volume_id(), "r1:pvc-1");
  EXPECT_FALSE(resp.status().volume_condition().abnormal())
      << resp.status().volume_condition().message();
  // The target on node-t drops node-b (it stopped answering).
  auto lease = store_.GrantLease(10);
  auto claimed = store_.ClaimTarget("pvc-1", "node-t", *lease);
  ASSERT_TRUE(claimed.ok());
  ASSERT_TRUE(store_.SetInSync("pvc-1", "node-t", claimed->epoch, {"node-a"}).ok());
  resp.Clear();
  ASSERT_TRUE(Get("r1:pvc-1", &resp).ok());
  EXPECT_TRUE(resp.status().volume_condition().abnormal());
  EXPECT_NE(resp.status().volume_condition().message().find("1 of 2 replicas in sync"),
            std::string::npos)
      << resp.status().volume_condition().message();
  EXPECT_NE(resp.status().volume_condition().message().find("node-b"), std::string::npos);
  resp.Clear();
  EXPECT_EQ(Get("r1:pvc-absent", &resp).error_code(), StatusCode::NOT_FOUND);
  EXPECT_EQ(Get("r1:", &resp).error_code(), StatusCode::NOT_FOUND);
}

TEST_F(Replicated_, ListVolumesHasReplicatedAndLocalVolumesInIdOrder) {
  Up("node-a", 10 * kGiB);
  Up("node-b", 10 * kGiB);
  MustCreate(VolumeRequest("pvc-local", 0));
  MustCreate(Replicated("pvc-r1", 2));
  MustCreate(Replicated("pvc-r2", 2));
  std::vector<std::string> ids;
  std::string token;
  do {
    v1::ListVolumesRequest r;
    r.set_max_entries(1);
    r.set_starting_token(token);
    v1::ListVolumesResponse resp;
    grpc::Status s = C().ListVolumes(nullptr, &r, &resp);
    ASSERT_TRUE(s.ok()) << Describe(s);
    for (const auto& e : resp.entries()) {
      ids.push_back(e.volume().volume_id());
      EXPECT_FALSE(e.status().volume_condition().abnormal());
    }
    token = resp.next_token();
  } while (!token.empty());
  ASSERT_EQ(ids.size(), 3u);
  EXPECT_EQ(ids[0], "r1:pvc-r1");
  EXPECT_EQ(ids[1], "r1:pvc-r2");
  EXPECT_EQ(ids[2].substr(0, 3), "v1:");
}

TEST_F(Replicated_, ModifyVolumeSetsTheQosOnEveryReplica) {
  Up("node-a", 10 * kGiB);
  Up("node-b", 10 * kGiB);
  MustCreate(Replicated("pvc-1", 2));
  v1::ControllerModifyVolumeRequest r;
  r.set_volume_id("r1:pvc-1");
  (*r.mutable_mutable_parameters())["maxWriteIops"] = "300";
  v1::ControllerModifyVolumeResponse resp;
  grpc::Status s = C().ControllerModifyVolume(nullptr, &r, &resp);
  ASSERT_TRUE(s.ok()) << Describe(s);
  EXPECT_EQ(Node("node-a").Volume("pvc-1")->qos().max_write_iops(), 300u);
  EXPECT_EQ(Node("node-b").Volume("pvc-1")->qos().max_write_iops(), 300u);
  r.set_volume_id("r1:pvc-absent");
  EXPECT_EQ(C().ControllerModifyVolume(nullptr, &r, &resp).error_code(), StatusCode::NOT_FOUND);
}

TEST_F(Replicated_, ValidateCapabilitiesConfirmsAnExistingVolumeWithItsParameters) {
  Up("node-a", 10 * kGiB);
  Up("node-b", 10 * kGiB);
  MustCreate(Replicated("pvc-1", 2));
  v1::ValidateVolumeCapabilitiesRequest r;
  r.set_volume_id("r1:pvc-1");
  *r.add_volume_capabilities() = BlockCap();
  (*r.mutable_parameters())["replicas"] = "2";
  v1::ValidateVolumeCapabilitiesResponse resp;
  grpc::Status s = C().ValidateVolumeCapabilities(nullptr, &r, &resp);
  ASSERT_TRUE(s.ok()) << Describe(s);
  EXPECT_TRUE(resp.has_confirmed()) << resp.message();
  r.set_volume_id("r1:pvc-absent");
  EXPECT_EQ(C().ValidateVolumeCapabilities(nullptr, &r, &resp).error_code(),
            StatusCode::NOT_FOUND);
}

// ---- expansion ----

TEST_F(Replicated_, ExpandGrowsEveryCopyThenTheEntryAndNeedsTheNodeSide) {
  Up("node-a", 10 * kGiB);
  Up("node-b", 10 * kGiB);
  Up("node-c", 10 * kGiB);
  MustCreate(Replicated("pvc-1", 2, static_cast<int64_t>(kGiB)));
  const auto before = store_.GetVolume("pvc-1");
  ASSERT_TRUE(before.ok());
  v1::ControllerExpandVolumeResponse resp;
  grpc::Status s = Expand("r1:pvc-1", 2 * kGiB, &resp);
  ASSERT_TRUE(s.ok()) << Describe(s);
  EXPECT_EQ(resp.capacity_bytes(), static_cast<int64_t>(2 * kGiB));
  EXPECT_TRUE(resp.node_expansion_required());
  for (const auto& n : before->replicas) EXPECT_EQ(Node(n).Volume("pvc-1")->size_bytes(), 2 * kGiB) << n;
  auto after = store_.GetVolume("pvc-1");
  ASSERT_TRUE(after.ok());
  EXPECT_EQ(after->size_bytes, 2 * kGiB);
  EXPECT_EQ(after->replicas, before->replicas);
  EXPECT_EQ(after->epoch, before->epoch);
  v1::ControllerGetVolumeResponse got;
  ASSERT_TRUE(Get("r1:pvc-1", &got).ok());
  EXPECT_EQ(got.volume().capacity_bytes(), static_cast<int64_t>(2 * kGiB));
  // The same request again: done already, no copy is asked to resize.
  int resizes = 0;
  for (const auto& n : before->replicas) resizes += Node(n).Count("ResizeVolume");
  s = Expand("r1:pvc-1", 2 * kGiB, &resp);
  ASSERT_TRUE(s.ok()) << Describe(s);
  EXPECT_EQ(resp.capacity_bytes(), static_cast<int64_t>(2 * kGiB));
  int again = 0;
  for (const auto& n : before->replicas) again += Node(n).Count("ResizeVolume");
  EXPECT_EQ(again, resizes);
}

TEST_F(Replicated_, ExpandWithAReplicaNodeDownIsUnavailableAndLeavesTheEntry) {
  Up("node-a", 10 * kGiB);
  Up("node-b", 10 * kGiB);
  MustCreate(Replicated("pvc-1", 2, static_cast<int64_t>(kGiB)));
  Node("node-b").SetDown(Error(EAGAIN, "node-b: connection refused"));
  v1::ControllerExpandVolumeResponse resp;
  grpc::Status s = Expand("r1:pvc-1", 2 * kGiB, &resp);
  EXPECT_EQ(s.error_code(), StatusCode::UNAVAILABLE) << Describe(s);
  EXPECT_NE(s.error_message().find("node-b"), std::string::npos) << s.error_message();
  EXPECT_EQ(store_.GetVolume("pvc-1")->size_bytes, kGiB);
  // Not registered at all (its heartbeats stopped): refused before any copy grows.
  Node("node-b").SetDown(Status::Ok());
  cluster_.Advance(FakeCluster::kTtl * 2);
  cluster_.Heartbeat("node-a", 10 * kGiB);
  const int resizes = Node("node-a").Count("ResizeVolume");
  s = Expand("r1:pvc-1", 2 * kGiB, &resp);
  EXPECT_EQ(s.error_code(), StatusCode::UNAVAILABLE) << Describe(s);
  EXPECT_NE(s.error_message().find("not registered"), std::string::npos) << s.error_message();
  EXPECT_EQ(Node("node-a").Count("ResizeVolume"), resizes);
  EXPECT_EQ(store_.GetVolume("pvc-1")->size_bytes, kGiB);
}

TEST_F(Replicated_, ARetryFinishesAnExpandThatGrewOnlySomeCopies) {
  Up("node-a", 10 * kGiB);
  Up("node-b", 10 * kGiB);
  MustCreate(Replicated("pvc-1", 2, static_cast<int64_t>(kGiB)));
  Node("node-b").FailNext("ResizeVolume", Error(EAGAIN, "node-b: deadline exceeded"));
  v1::ControllerExpandVolumeResponse resp;
  grpc::Status s = Expand("r1:pvc-1", 2 * kGiB, &resp);
  EXPECT_EQ(s.error_code(), StatusCode::UNAVAILABLE) << Describe(s);
  EXPECT_EQ(Node("node-a").Volume("pvc-1")->size_bytes(), 2 * kGiB);
  EXPECT_EQ(Node("node-b").Volume("pvc-1")->size_bytes(), kGiB);
  EXPECT_EQ(store_.GetVolume("pvc-1")->size_bytes, kGiB) << "the entry grows last";
  const int a_resizes = Node("node-a").Count("ResizeVolume");
  s = Expand("r1:pvc-1", 2 * kGiB, &resp);
  ASSERT_TRUE(s.ok()) << Describe(s);
  EXPECT_EQ(Node("node-a").Count("ResizeVolume"), a_resizes) << "a grown copy is left alone";
  EXPECT_EQ(Node("node-b").Volume("pvc-1")->size_bytes(), 2 * kGiB);
  EXPECT_EQ(store_.GetVolume("pvc-1")->size_bytes, 2 * kGiB);
}

TEST_F(Replicated_, ExpandNeverShrinksAndAnUnknownVolumeIsNotFound) {
  Up("node-a", 10 * kGiB);
  Up("node-b", 10 * kGiB);
  MustCreate(Replicated("pvc-1", 2, static_cast<int64_t>(2 * kGiB)));
  v1::ControllerExpandVolumeResponse resp;
  grpc::Status s = Expand("r1:pvc-1", kGiB, &resp);
  ASSERT_TRUE(s.ok()) << Describe(s);
  EXPECT_EQ(resp.capacity_bytes(), static_cast<int64_t>(2 * kGiB));
  EXPECT_EQ(Node("node-a").Count("ResizeVolume") + Node("node-b").Count("ResizeVolume"), 0);
  EXPECT_EQ(store_.GetVolume("pvc-1")->size_bytes, 2 * kGiB);
  EXPECT_EQ(Expand("r1:nope", 2 * kGiB, &resp).error_code(), StatusCode::NOT_FOUND);
  EXPECT_EQ(Expand("r1:bad name", 2 * kGiB, &resp).error_code(), StatusCode::NOT_FOUND);
  EXPECT_EQ(Expand("r1:pvc-1", 0, &resp).error_code(), StatusCode::INVALID_ARGUMENT);
}

TEST_F(Replicated_, WhatIsNotSupportedYetIsInvalidArgumentSayingSo) {
  Up("node-a", 10 * kGiB);
  Up("node-b", 10 * kGiB);
  MustCreate(Replicated("pvc-1", 2, static_cast<int64_t>(kGiB)));
  auto said = [](const grpc::Status& s, const char* words) {
    EXPECT_EQ(s.error_code(), StatusCode::INVALID_ARGUMENT) << Describe(s);
    EXPECT_NE(s.error_message().find(words), std::string::npos) << s.error_message();
  };
  auto clone = VolumeRequest("pvc-clone", 0);
  clone.mutable_volume_content_source()->mutable_volume()->set_volume_id("r1:pvc-1");
  v1::CreateVolumeResponse cr;
  said(Create(clone, &cr), "replicated volume");
  auto into = Replicated("pvc-into", 2);
  into.mutable_volume_content_source()->mutable_volume()->set_volume_id("r1:pvc-1");
  said(Create(into, &cr), "replicated volume");
  EXPECT_FALSE(store_.GetVolume("pvc-into").ok());
}

// ---- restores and clones into a replicated volume ----

v1::CreateVolumeRequest RestoredFrom(v1::CreateVolumeRequest r, const std::string& snapshot_id) {
  r.mutable_volume_content_source()->mutable_snapshot()->set_snapshot_id(snapshot_id);
  return r;
}

TEST_F(Replicated_, ARestoreIsMadeOnTheSnapshotsNodeAndTheOtherCopiesStartOutOfSync) {
  Up("node-a", 10 * kGiB);
  Up("node-b", 30 * kGiB);
  Up("node-c", 20 * kGiB);
  Node("node-a").PutSnapshot(PoolSnapshot("snap", "vol", kGiB));
  const auto req = RestoredFrom(Replicated("pvc-r", 2), "s1:node-a:snap");
  v1::Volume made = MustCreate(req);
  EXPECT_EQ(made.volume_id(), "r1:pvc-r");
  EXPECT_EQ(made.capacity_bytes(), static_cast<int64_t>(kGiB));  // the snapshot's size
  EXPECT_EQ(made.content_source().snapshot().snapshot_id(), "s1:node-a:snap");
  // The snapshot's node holds the first copy, whatever its room; the most room the second.
  auto v = store_.GetVolume("pvc-r");
  ASSERT_TRUE(v.ok());
  EXPECT_EQ(v->replicas, (std::vector<std::string>{"node-a", "node-b"}));
  EXPECT_EQ(v->in_sync, (std::vector<std::string>{"node-a"}));
  EXPECT_EQ(v->source, "s1:node-a:snap");
  ASSERT_TRUE(Node("node-a").Volume("pvc-r") && Node("node-b").Volume("pvc-r"));
  EXPECT_EQ(Node("node-a").Volume("pvc-r")->source(), "snapshot/snap");
  EXPECT_EQ(Node("node-b").Volume("pvc-r")->source(), "");  // blank, out of sync
  EXPECT_EQ(Node("node-b").Volume("pvc-r")->size_bytes(), kGiB);
  // Degraded until a target copies the data to node-b.
  v1::ControllerGetVolumeResponse got;
  ASSERT_TRUE(Get("r1:pvc-r", &got).ok());
  EXPECT_TRUE(got.status().volume_condition().abnormal());
  EXPECT_NE(got.status().volume_condition().message().find("1 of 2 replicas in sync (out of "
                                                           "sync: node-b)"),
            std::string::npos)
      << got.status().volume_condition().message();
  EXPECT_EQ(got.volume().content_source().snapshot().snapshot_id(), "s1:node-a:snap");

  // A retry is the same volume, even once the snapshot is gone; another source is not.
  ASSERT_TRUE(Node("node-a").DeleteSnapshot("snap").ok());
  EXPECT_EQ(MustCreate(req).volume_id(), "r1:pvc-r");
  v1::CreateVolumeResponse resp;
  grpc::Status s = Create(Replicated("pvc-r", 2), &resp);
  EXPECT_EQ(s.error_code(), StatusCode::ALREADY_EXISTS) << Describe(s);
  EXPECT_NE(s.error_message().find("s1:node-a:snap"), std::string::npos) << s.error_message();
  s = Create(RestoredFrom(Replicated("pvc-r", 2), "s1:node-c:other"), &resp);
  EXPECT_EQ(s.error_code(), StatusCode::ALREADY_EXISTS) << Describe(s);
  // And a blank volume is not one restored under the same name.
  MustCreate(Replicated("pvc-blank", 2));
  Node("node-a").PutSnapshot(PoolSnapshot("snap2", "vol", kGiB));
  s = Create(RestoredFrom(Replicated("pvc-blank", 2), "s1:node-a:snap2"), &resp);
  EXPECT_EQ(s.error_code(), StatusCode::ALREADY_EXISTS) << Describe(s);
}

TEST_F(Replicated_, AVolumeIsClonedIntoAReplicatedOneOnItsNode) {
  Up("node-a", 10 * kGiB);
  Up("node-b", 10 * kGiB);
  auto src = VolumeRequest("pvc-src", static_cast<int64_t>(2 * kGiB));
  *src.mutable_accessibility_requirements()->add_requisite() = NodeTopology("node-b");
  v1::Volume local = MustCreate(src);
  ASSERT_EQ(local.volume_id(), "v1:node-b:pvc-src");
  auto clone = Replicated("pvc-clone", 2);
  clone.mutable_volume_content_source()->mutable_volume()->set_volume_id(local.volume_id());
  v1::Volume made = MustCreate(clone);
  EXPECT_EQ(made.capacity_bytes(), static_cast<int64_t>(2 * kGiB));
  EXPECT_EQ(made.content_source().volume().volume_id(), "v1:node-b:pvc-src");
  EXPECT_EQ(store_.GetVolume("pvc-clone")->in_sync, (std::vector<std::string>{"node-b"}));
  EXPECT_EQ(Node("node-b").Volume("pvc-clone")->source(), "volume/pvc-src");
  EXPECT_EQ(Node("node-a").Volume("pvc-clone")->source(), "");
}

TEST_F(Replicated_, ARestoreWhoseSourceNodeCannotTakeTheFirstCopyIsRefused) {
  Up("node-b", 10 * kGiB);
  Up("node-c", 10 * kGiB);
  v1::CreateVolumeResponse resp;
  // A snapshot that does not exist: NOT_FOUND, and nothing made.
  Up("node-a", 10 * kGiB);
  grpc::Status s = Create(RestoredFrom(Replicated("pvc-r", 2), "s1:node-a:missing"), &resp);
  EXPECT_EQ(s.error_code(), StatusCode::NOT_FOUND) << Describe(s);
  EXPECT_FALSE(store_.GetVolume("pvc-r").ok());
  Node("node-a").PutSnapshot(PoolSnapshot("snap", "vol", kGiB));
  // Its node has no room left: RESOURCE_EXHAUSTED, though node-b and node-c have.
  cluster_.Heartbeat("node-a", kMiB);
  s = Create(RestoredFrom(Replicated("pvc-r", 2), "s1:node-a:snap"), &resp);
  EXPECT_EQ(s.error_code(), StatusCode::RESOURCE_EXHAUSTED) << Describe(s);
  EXPECT_NE(s.error_message().find("node-a"), std::string::npos) << s.error_message();
  EXPECT_TRUE(Holders("pvc-r", {"node-a", "node-b", "node-c"}).empty());
  EXPECT_FALSE(store_.GetVolume("pvc-r").ok());
  // Its node's lease ran out (it may come back): UNAVAILABLE.
  cluster_.Heartbeat("node-a", 10 * kGiB);
  ASSERT_TRUE(store_.RevokeLease(leases_["node-a"]).ok());
  s = Create(RestoredFrom(Replicated("pvc-r", 2), "s1:node-a:snap"), &resp);
  EXPECT_EQ(s.error_code(), StatusCode::UNAVAILABLE) << Describe(s);
  EXPECT_NE(s.error_message().find("node-a: not alive"), std::string::npos) << s.error_message();
  Alive("node-a");
  MustCreate(RestoredFrom(Replicated("pvc-r", 2), "s1:node-a:snap"));
  EXPECT_EQ(store_.GetVolume("pvc-r")->in_sync, (std::vector<std::string>{"node-a"}));
}

// ---- snapshots (controller/replicated.h: at one write boundary) ----

class ReplicatedSnapshots : public Replicated_ {
 protected:
  // pvc-1 on node-a and node-b (most room); node-c has no copy and may serve the target.
  void SetUp() override {
    Up("node-a", 10 * kGiB);
    Up("node-b", 9 * kGiB);
    Up("node-c", 2 * kGiB);
    MustCreate(Replicated("pvc-1", 2, static_cast<int64_t>(kGiB)));
    ASSERT_TRUE(Node("node-a").Volume("pvc-1"));
    ASSERT_TRUE(Node("node-b").Volume("pvc-1"));
  }
  // node-c opens the target (the claim in the cluster state, and its datapath serving it).
  void ServeOnC() {
    auto claimed = store_.ClaimTarget("pvc-1", "node-c", leases_["node-c"]);
    ASSERT_TRUE(claimed.ok()) << claimed.status().message();
    Node("node-c").ServeTarget("pvc-1", claimed->in_sync, claimed->epoch);
  }
  grpc::Status Snap(const std::string& name, v1::CreateSnapshotResponse* resp,
                    const std::string& source = "r1:pvc-1") {
    v1::CreateSnapshotRequest r;
    r.set_name(name);
    r.set_source_volume_id(source);
    return C().CreateSnapshot(nullptr, &r, resp);
  }
  std::vector<v1::Snapshot> List(const std::string& source, const std::string& snapshot_id = "") {
    v1::ListSnapshotsRequest r;
    r.set_source_volume_id(source);
    r.set_snapshot_id(snapshot_id);
    v1::ListSnapshotsResponse resp;
    grpc::Status s = C().ListSnapshots(nullptr, &r, &resp);
    EXPECT_TRUE(s.ok()) << Describe(s);
    std::vector<v1::Snapshot> out;
    for (const auto& e : resp.entries()) out.push_back(e.snapshot());
    return out;
  }
};

TEST_F(ReplicatedSnapshots, AServedVolumeIsSnapshottedOnOneReplicaWhileItsTargetIsFrozen) {
  ServeOnC();
  std::vector<int> frozen_during;
  for (const char* n : {"node-a", "node-b"}) {
    Node(n).SetHook([&](const std::string& method) {
      if (method == "CreateSnapshot") frozen_during.push_back(Node("node-c").Frozen("pvc-1"));
    });
  }
  v1::CreateSnapshotResponse resp;
  grpc::Status s = Snap("snap-1", &resp);
  ASSERT_TRUE(s.ok()) << Describe(s);
  EXPECT_EQ(frozen_during, std::vector<int>{1}) << "one replica, taken inside the freeze";
  EXPECT_EQ(Node("node-c").Frozen("pvc-1"), 0) << "thawed";
  EXPECT_EQ(Node("node-c").Count("ThawTarget"), 1);
  EXPECT_GT(Node("node-c").LastLiftAfter().count(), 0);
  EXPECT_LE(Node("node-c").LastLiftAfter(), std::chrono::milliseconds(60000));
  EXPECT_EQ(resp.snapshot().snapshot_id(), "s1:node-a:snap-1");
  EXPECT_EQ(resp.snapshot().source_volume_id(), "r1:pvc-1");
  EXPECT_EQ(resp.snapshot().size_bytes(), static_cast<int64_t>(kGiB));
  EXPECT_TRUE(resp.snapshot().ready_to_use());
  EXPECT_EQ(Node("node-b").Count("CreateSnapshot"), 0);

  // A retry finds it on the replica nodes, with no freeze and no fan-out to node-c's pool.
  const int gets_on_c = Node("node-c").Count("GetSnapshot");
  v1::CreateSnapshotResponse again;
  s = Snap("snap-1", &again);
  ASSERT_TRUE(s.ok()) << Describe(s);
  EXPECT_EQ(again.snapshot().snapshot_id(), resp.snapshot().snapshot_id());
  EXPECT_EQ(again.snapshot().source_volume_id(), "r1:pvc-1");
  EXPECT_EQ(Node("node-c").Count("FreezeTarget"), 1);
  EXPECT_EQ(Node("node-c").Count("GetSnapshot"), gets_on_c);
}

TEST_F(ReplicatedSnapshots, TheReplicaTakenIsOneTheFrozenTargetReportsInSync) {
  ServeOnC();
  // The target dropped node-a while draining (its write failed there): node-b is the one.
  Node("node-c").ServeTarget("pvc-1", {"node-b"}, store_.GetVolume("pvc-1")->epoch);
  v1::CreateSnapshotResponse resp;
  grpc::Status s = Snap("snap-1", &resp);
  ASSERT_TRUE(s.ok()) << Describe(s);
  EXPECT_EQ(resp.snapshot().snapshot_id(), "s1:node-b:snap-1");
  EXPECT_EQ(Node("node-a").Count("CreateSnapshot"), 0);
}

TEST_F(ReplicatedSnapshots, WithoutATargetAnInSyncReplicaIsSnapshottedWithoutAFreeze) {
  // node-a fell out of sync under an earlier target, which has closed since.
  auto claimed = store_.ClaimTarget("pvc-1", "node-c", leases_["node-c"]);
  ASSERT_TRUE(claimed.ok());
  ASSERT_TRUE(store_.SetInSync("pvc-1", "node-c", claimed->epoch, {"node-b"}).ok());
  ASSERT_TRUE(store_.ReleaseTarget("pvc-1", "node-c", claimed->epoch).ok());
  v1::CreateSnapshotResponse resp;
  grpc::Status s = Snap("snap-1", &resp);
  ASSERT_TRUE(s.ok()) << Describe(s);
  EXPECT_EQ(resp.snapshot().snapshot_id(), "s1:node-b:snap-1");
  EXPECT_EQ(Node("node-c").Count("FreezeTarget"), 0);
  EXPECT_EQ(Node("node-a").Count("CreateSnapshot"), 0) << "an out-of-sync copy is never used";
}

TEST_F(ReplicatedSnapshots, TheTargetIsThawedAlsoWhenTheSnapshotFails) {
  ServeOnC();
  Node("node-a").FailNext("CreateSnapshot", Error(ENOSPC, "pool full"));
  v1::CreateSnapshotResponse resp;
  grpc::Status s = Snap("snap-1", &resp);
  EXPECT_EQ(s.error_code(), StatusCode::RESOURCE_EXHAUSTED) << Describe(s);
  EXPECT_NE(s.error_message().find("node-a"), std::string::npos) << s.error_message();
  EXPECT_EQ(Node("node-c").Frozen("pvc-1"), 0);
  EXPECT_EQ(Node("node-c").Count("ThawTarget"), 1);
}

TEST_F(ReplicatedSnapshots, AnUnreachableReplicaLeavesTheSnapshotToTheNextInSyncOne) {
  ServeOnC();
  Node("node-a").FailNext("CreateSnapshot", Error(EAGAIN, "connection refused"));
  v1::CreateSnapshotResponse resp;
  grpc::Status s = Snap("snap-1", &resp);
  ASSERT_TRUE(s.ok()) << Describe(s);
  EXPECT_EQ(resp.snapshot().snapshot_id(), "s1:node-b:snap-1");
  EXPECT_EQ(Node("node-c").Count("FreezeTarget"), 1) << "both tries inside one freeze";
}

TEST_F(ReplicatedSnapshots, AFreezeThatLiftedItselfBeforeTheSnapshotVoidsIt) {
  ServeOnC();
  Node("node-a").SetHook([&](const std::string& method) {
    if (method == "CreateSnapshot") Node("node-c").LiftFreezes("pvc-1");
  });
  v1::CreateSnapshotResponse resp;
  grpc::Status s = Snap("snap-1", &resp);
  EXPECT_EQ(s.error_code(), StatusCode::UNAVAILABLE) << Describe(s);
  EXPECT_NE(s.error_message().find("lifted itself"), std::string::npos) << s.error_message();
  EXPECT_EQ(Node("node-a").Count("DeleteSnapshot"), 1) << "the image is not kept";
  EXPECT_TRUE(List("r1:pvc-1").empty());
}

TEST_F(ReplicatedSnapshots, ATargetOpenedDuringAnUnfrozenSnapshotVoidsItAndTheRetryFreezes) {
  bool opened = false;
  Node("node-a").SetHook([&](const std::string& method) {
    if (method != "CreateSnapshot" || opened) return;
    opened = true;
    ServeOnC();  // the epoch rises while the copy is taken
  });
  v1::CreateSnapshotResponse resp;
  grpc::Status s = Snap("snap-1", &resp);
  ASSERT_TRUE(s.ok()) << Describe(s);
  EXPECT_TRUE(opened);
  EXPECT_EQ(Node("node-a").Count("DeleteSnapshot"), 1) << "the first image was thrown away";
  EXPECT_EQ(Node("node-c").Count("FreezeTarget"), 1) << "the second was taken frozen";
  EXPECT_EQ(Node("node-c").Frozen("pvc-1"), 0);
  EXPECT_EQ(resp.snapshot().snapshot_id(), "s1:node-a:snap-1");
}

TEST_F(ReplicatedSnapshots, FreezeErrorsComeBackAsTheirCsiCodes) {
  ServeOnC();
  Node("node-c").FailNext("FreezeTarget", Error(ETIMEDOUT, "writes still in flight"));
  v1::CreateSnapshotResponse resp;
  grpc::Status s = Snap("snap-1", &resp);
  EXPECT_EQ(s.error_code(), StatusCode::DEADLINE_EXCEEDED) << Describe(s);
  EXPECT_NE(s.error_message().find("node-c"), std::string::npos) << s.error_message();
  Node("node-c").SetDown(Error(EAGAIN, "unreachable"));
  s = Snap("snap-1", &resp);
  EXPECT_EQ(s.error_code(), StatusCode::UNAVAILABLE) << Describe(s);
  Node("node-c").SetDown(Status::Ok());
  EXPECT_EQ(Node("node-a").Count("CreateSnapshot") + Node("node-b").Count("CreateSnapshot"), 0);
  // A target that closed meanwhile: read again; the copies are quiescent now.
  Node("node-c").CloseTarget("pvc-1");
  ASSERT_TRUE(store_.ReleaseTarget("pvc-1", "node-c", store_.GetVolume("pvc-1")->epoch).ok());
  s = Snap("snap-1", &resp);
  ASSERT_TRUE(s.ok()) << Describe(s);
  // Not found, and a name taken by a snapshot of another volume.
  EXPECT_EQ(Snap("snap-2", &resp, "r1:pvc-absent").error_code(), StatusCode::NOT_FOUND);
  dpv1::Snapshot other;
  other.set_name("snap-3");
  other.set_source_volume("pvc-other");
  other.set_ready(true);
  Node("node-b").PutSnapshot(other);
  EXPECT_EQ(Snap("snap-3", &resp).error_code(), StatusCode::ALREADY_EXISTS);
}

TEST_F(ReplicatedSnapshots, ListingsNameTheReplicatedSourceAndARestoreIsASingleNodeVolume) {
  v1::CreateSnapshotResponse resp;
  ASSERT_TRUE(Snap("snap-1", &resp).ok());
  const std::string id = resp.snapshot().snapshot_id();
  auto by_source = List("r1:pvc-1");
  ASSERT_EQ(by_source.size(), 1u);
  EXPECT_EQ(by_source[0].snapshot_id(), id);
  EXPECT_EQ(by_source[0].source_volume_id(), "r1:pvc-1");
  auto all = List("");
  ASSERT_EQ(all.size(), 1u);
  EXPECT_EQ(all[0].source_volume_id(), "r1:pvc-1");
  auto by_id = List("", id);
  ASSERT_EQ(by_id.size(), 1u);
  EXPECT_EQ(by_id[0].source_volume_id(), "r1:pvc-1");
  EXPECT_EQ(List("r1:pvc-1", id).size(), 1u);
  EXPECT_TRUE(List("r1:pvc-other", id).empty());
  EXPECT_TRUE(List("r1:pvc-other").empty());
  EXPECT_TRUE(List("r1:").empty());

  auto restore = VolumeRequest("pvc-restored", 0);
  restore.mutable_volume_content_source()->mutable_snapshot()->set_snapshot_id(id);
  v1::Volume v = MustCreate(restore);
  const std::string node = id.substr(3, id.rfind(':') - 3);
  EXPECT_EQ(v.volume_id(), "v1:" + node + ":pvc-restored");
  EXPECT_TRUE(Node(node).Volume("pvc-restored"));

  // Restored into a replicated volume: the first replica on the snapshot's node, in sync alone.
  auto into = Replicated("pvc-into", 2);
  into.mutable_volume_content_source()->mutable_snapshot()->set_snapshot_id(id);
  EXPECT_EQ(MustCreate(into).volume_id(), "r1:pvc-into");
  EXPECT_EQ(store_.GetVolume("pvc-into")->in_sync, (std::vector<std::string>{node}));

  v1::DeleteSnapshotRequest del;
  del.set_snapshot_id(id);
  v1::DeleteSnapshotResponse dr;
  ASSERT_TRUE(C().DeleteSnapshot(nullptr, &del, &dr).ok());
  EXPECT_TRUE(List("r1:pvc-1").empty());
}

}  // namespace
}  // namespace nbdcsi::controller
