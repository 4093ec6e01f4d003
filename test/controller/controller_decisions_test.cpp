// Every decision listed in controller/controller_service.h, one test each (named after it), run
// in-process: the real Controller service (the ABORTED guard and the errno -> CSI code edge) over
// the real ControllerImpl and NodeRegistry, with a FakeDatapath per node and a clock the test
// moves. No child process and no sleep: a call that must wait is parked by a hook, and heartbeat
// expiry is a clock step.
#include <atomic>
#include <condition_variable>
#include <mutex>
#include <set>
#include <thread>

#include <gtest/gtest.h>

#include "common/grpc_status.h"
#include "controller/csi_status.h"
#include "test/controller/csi_requests.h"
#include "test/controller/fake_datapath.h"
#include "test/controller/gate.h"

namespace nbdcsi::controller {
namespace {

namespace v1 = ::csi::v1;
using grpc::StatusCode;
using nbdcsi::test::BlockCap;
using nbdcsi::test::Gate;
using nbdcsi::test::NodeOf;
using nbdcsi::test::NodeTopology;
using nbdcsi::test::VolumeRequest;
using testing::FakeCluster;
using testing::FakeDatapath;
using testing::PoolSnapshot;
using testing::PoolVolume;

constexpr uint64_t kKiB = 1024;
constexpr uint64_t kMiB = uint64_t{1} << 20;
constexpr uint64_t kGiB = uint64_t{1} << 30;

// Lets `n` callers in at once: each waits (bounded) until all have arrived. Calls made one after
// another never all arrive, so the first one's wait runs out and says so.
class Rendezvous {
 public:
  explicit Rendezvous(int n) : n_(n) {}
  void Arrive() {
    std::unique_lock lock(mu_);
    if (++arrived_ >= n_) cv_.notify_all();
    if (!cv_.wait_for(lock, std::chrono::seconds(5), [&] { return arrived_ >= n_; })) ++missed_;
  }
  int missed() {
    std::lock_guard lock(mu_);
    return missed_;
  }

 private:
  const int n_;
  std::mutex mu_;
  std::condition_variable cv_;
  int arrived_ = 0, missed_ = 0;
};

class Decisions : public ::testing::Test {
 protected:
  v1::Controller::Service& C() { return cluster_.csi(); }
  FakeDatapath& Node(const std::string& id) { return cluster_.Node(id); }

  grpc::Status Create(const v1::CreateVolumeRequest& req, v1::CreateVolumeResponse* resp) {
    return C().CreateVolume(nullptr, &req, resp);
  }
  v1::Volume MustCreate(const v1::CreateVolumeRequest& req) {
    v1::CreateVolumeResponse resp;
    grpc::Status s = Create(req, &resp);
    EXPECT_TRUE(s.ok()) << req.name() << ": " << GrpcCodeName(s.error_code()) << " "
                        << s.error_message();
    return resp.volume();
  }
  grpc::Status DeleteVolume(const std::string& id) {
    v1::DeleteVolumeRequest r;
    r.set_volume_id(id);
    v1::DeleteVolumeResponse resp;
    return C().DeleteVolume(nullptr, &r, &resp);
  }
  grpc::Status DeleteSnapshot(const std::string& id) {
    v1::DeleteSnapshotRequest r;
    r.set_snapshot_id(id);
    v1::DeleteSnapshotResponse resp;
    return C().DeleteSnapshot(nullptr, &r, &resp);
  }
  grpc::Status GetVolume(const std::string& id, v1::ControllerGetVolumeResponse* resp) {
    v1::ControllerGetVolumeRequest r;
    r.set_volume_id(id);
    return C().ControllerGetVolume(nullptr, &r, resp);
  }
  grpc::Status Expand(const std::string& id, int64_t bytes,
                      v1::ControllerExpandVolumeResponse* resp) {
    v1::ControllerExpandVolumeRequest r;
    r.set_volume_id(id);
    r.mutable_capacity_range()->set_required_bytes(bytes);
    return C().ControllerExpandVolume(nullptr, &r, resp);
  }
  grpc::Status Modify(const std::string& id, const std::map<std::string, std::string>& params) {
    v1::ControllerModifyVolumeRequest r;
    r.set_volume_id(id);
    for (const auto& [k, v] : params) (*r.mutable_mutable_parameters())[k] = v;
    v1::ControllerModifyVolumeResponse resp;
    return C().ControllerModifyVolume(nullptr, &r, &resp);
  }
  grpc::Status Validate(const std::string& id) {
    v1::ValidateVolumeCapabilitiesRequest r;
    r.set_volume_id(id);
    *r.add_volume_capabilities() = BlockCap();
    v1::ValidateVolumeCapabilitiesResponse resp;
    return C().ValidateVolumeCapabilities(nullptr, &r, &resp);
  }
  grpc::Status ListSnapshots(const v1::ListSnapshotsRequest& r, v1::ListSnapshotsResponse* resp) {
    return C().ListSnapshots(nullptr, &r, resp);
  }
  grpc::Status ListVolumes(int32_t max, const std::string& token, v1::ListVolumesResponse* resp) {
    v1::ListVolumesRequest r;
    r.set_max_entries(max);
    r.set_starting_token(token);
    return C().ListVolumes(nullptr, &r, resp);
  }
  grpc::Status Capacity(const std::string& node, v1::GetCapacityResponse* resp) {
    v1::GetCapacityRequest r;
    if (!node.empty()) *r.mutable_accessible_topology() = NodeTopology(node);
    return C().GetCapacity(nullptr, &r, resp);
  }
  // Calls of `method` on every node the test made.
  int Calls(const std::string& method, const std::vector<std::string>& nodes) {
    int n = 0;
    for (const auto& id : nodes) n += Node(id).Count(method);
    return n;
  }

  FakeCluster cluster_;
};

v1::CreateVolumeRequest WithTopology(v1::CreateVolumeRequest r,
                                     const std::vector<std::string>& requisite,
                                     const std::vector<std::string>& preferred = {}) {
  auto* ar = r.mutable_accessibility_requirements();
  for (const auto& n : requisite) *ar->add_requisite() = NodeTopology(n);
  for (const auto& n : preferred) *ar->add_preferred() = NodeTopology(n);
  return r;
}

v1::CreateVolumeRequest FromSnapshot(v1::CreateVolumeRequest r, const std::string& snapshot_id) {
  r.mutable_volume_content_source()->mutable_snapshot()->set_snapshot_id(snapshot_id);
  return r;
}

// ---- ids ----

TEST_F(Decisions, MalformedIdsNameNothingDeletesSucceedLookupsAreNotFoundFiltersAreEmpty) {
  cluster_.Heartbeat("node-a", 10 * kGiB);
  for (const char* id : {"garbage", "v2:node-a:x", "v1:Node_A:x", "s1:node-a:x"}) {
    SCOPED_TRACE(id);
    EXPECT_TRUE(DeleteVolume(id).ok());
    v1::ControllerGetVolumeResponse g;
    EXPECT_EQ(GetVolume(id, &g).error_code(), StatusCode::NOT_FOUND);
    v1::ControllerExpandVolumeResponse e;
    EXPECT_EQ(Expand(id, kMiB, &e).error_code(), StatusCode::NOT_FOUND);
    EXPECT_EQ(Modify(id, {{"maxIops", "10"}}).error_code(), StatusCode::NOT_FOUND);
    EXPECT_EQ(Validate(id).error_code(), StatusCode::NOT_FOUND);
    v1::ListSnapshotsRequest by_source;
    by_source.set_source_volume_id(id);
    v1::ListSnapshotsResponse l;
    ASSERT_TRUE(ListSnapshots(by_source, &l).ok());
    EXPECT_EQ(l.entries_size(), 0);
  }
  for (const char* id : {"garbage", "s2:node-a:x", "v1:node-a:x"}) {
    SCOPED_TRACE(id);
    EXPECT_TRUE(DeleteSnapshot(id).ok());
    v1::ListSnapshotsRequest by_id;
    by_id.set_snapshot_id(id);
    v1::ListSnapshotsResponse l;
    ASSERT_TRUE(ListSnapshots(by_id, &l).ok());
    EXPECT_EQ(l.entries_size(), 0);
    v1::CreateVolumeResponse cresp;
    EXPECT_EQ(Create(FromSnapshot(VolumeRequest("restore", 0), id), &cresp).error_code(),
              StatusCode::NOT_FOUND);
  }
  // A malformed id never reaches a node.
  EXPECT_EQ(Node("node-a").Calls().size(), 0u);
}

TEST_F(Decisions, WellFormedIdOnAnUnregisteredNodeIsUnavailableNeverDoneOrNotFound) {
  cluster_.Heartbeat("node-a", 10 * kGiB);
  EXPECT_EQ(DeleteVolume("v1:node-z:pvc-1").error_code(), StatusCode::UNAVAILABLE);
  EXPECT_EQ(DeleteSnapshot("s1:node-z:snap-1").error_code(), StatusCode::UNAVAILABLE);
  v1::ControllerExpandVolumeResponse e;
  EXPECT_EQ(Expand("v1:node-z:pvc-1", kMiB, &e).error_code(), StatusCode::UNAVAILABLE);
  EXPECT_EQ(Modify("v1:node-z:pvc-1", {{"maxIops", "10"}}).error_code(), StatusCode::UNAVAILABLE);
  EXPECT_EQ(Validate("v1:node-z:pvc-1").error_code(), StatusCode::UNAVAILABLE);

  // A node whose heartbeats stopped is the same: its volume is not "gone".
  cluster_.Heartbeat("node-b", 10 * kGiB);
  Node("node-b").PutVolume(PoolVolume("pvc-2", kMiB));
  cluster_.Advance(FakeCluster::kTtl + std::chrono::milliseconds(1));
  cluster_.Heartbeat("node-a", 10 * kGiB);
  grpc::Status s = DeleteVolume("v1:node-b:pvc-2");
  EXPECT_EQ(s.error_code(), StatusCode::UNAVAILABLE) << s.error_message();
  EXPECT_NE(s.error_message().find("node-b"), std::string::npos) << s.error_message();
  EXPECT_EQ(Node("node-b").Count("DeleteVolume"), 0);
  EXPECT_TRUE(Node("node-b").Volume("pvc-2").has_value());
}

// ---- CreateVolume: sizes ----

TEST_F(Decisions, CreateVolumeWithoutASizeGetsTheDefaultOneGiB) {
  cluster_.Heartbeat("node-a", 10 * kGiB);
  v1::Volume v = MustCreate(VolumeRequest("pvc-default", 0));
  EXPECT_EQ(v.capacity_bytes(), static_cast<int64_t>(kGiB));
  EXPECT_EQ(v.volume_id(), "v1:node-a:pvc-default");
  EXPECT_EQ(Node("node-a").Volume("pvc-default")->size_bytes(), kGiB);
}

TEST_F(Decisions, OnlyTheFileSystemsTheNodeCanMakeAreAccepted) {
  // ext3 was accepted here and refused by every NodeStageVolume: a bound PVC no pod could use.
  cluster_.Heartbeat("node-a", 10 * kGiB);
  for (const char* fs : {"ext3", "btrfs", "vfat"}) {
    v1::CreateVolumeRequest r = VolumeRequest(std::string("pvc-") + fs, 0);
    r.mutable_volume_capabilities(0)->mutable_mount()->set_fs_type(fs);
    v1::CreateVolumeResponse resp;
    grpc::Status st = Create(r, &resp);
    EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << fs;
    EXPECT_NE(st.error_message().find("ext4 or xfs"), std::string::npos) << st.error_message();
  }
  for (const char* fs : {"", "ext4", "xfs"}) {
    v1::CreateVolumeRequest r = VolumeRequest(std::string("pvc-ok-") + (*fs ? fs : "default"), 0);
    r.mutable_volume_capabilities(0)->mutable_mount()->set_fs_type(fs);
    MustCreate(r);
  }
  EXPECT_EQ(Calls("CreateVolume", {"node-a"}), 3);
}

TEST_F(Decisions, CreateVolumeRoundsSizesUpToFourKiB) {
  cluster_.Heartbeat("node-a", 10 * kGiB);
  v1::Volume v = MustCreate(VolumeRequest("pvc-odd", 5000));
  EXPECT_EQ(v.capacity_bytes(), 8192);
  EXPECT_EQ(Node("node-a").Volume("pvc-odd")->size_bytes(), 8192u);
}

TEST_F(Decisions, CreateVolumeIsOutOfRangeWhenNoAlignedSizeFitsTheRange) {
  cluster_.Heartbeat("node-a", 10 * kGiB);
  auto req = VolumeRequest("pvc-narrow", 5000);
  req.mutable_capacity_range()->set_limit_bytes(6000);
  v1::CreateVolumeResponse resp;
  grpc::Status s = Create(req, &resp);
  EXPECT_EQ(s.error_code(), StatusCode::OUT_OF_RANGE) << s.error_message();
  // A malformed range is INVALID_ARGUMENT, and neither asks the datapath to create anything.
  req.mutable_capacity_range()->set_limit_bytes(4096);
  EXPECT_EQ(Create(req, &resp).error_code(), StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(Node("node-a").Count("CreateVolume"), 0);
}

TEST_F(Decisions, RestoreOrCloneWithoutASizeTakesItsSourcesSizeNeverLess) {
  cluster_.Heartbeat("node-a", 10 * kGiB);
  Node("node-a").PutVolume(PoolVolume("src", 3 * kMiB));
  Node("node-a").PutSnapshot(PoolSnapshot("snap", "src", 3 * kMiB));
  v1::Volume restored = MustCreate(FromSnapshot(VolumeRequest("restored", 0), "s1:node-a:snap"));
  EXPECT_EQ(restored.capacity_bytes(), static_cast<int64_t>(3 * kMiB));
  EXPECT_EQ(restored.content_source().snapshot().snapshot_id(), "s1:node-a:snap");
  auto clone = VolumeRequest("clone", static_cast<int64_t>(kMiB));  // smaller than its source
  clone.mutable_volume_content_source()->mutable_volume()->set_volume_id("v1:node-a:src");
  EXPECT_EQ(MustCreate(clone).capacity_bytes(), static_cast<int64_t>(3 * kMiB));
  EXPECT_EQ(Node("node-a").Volume("clone")->source(), "volume/src");
}

// ---- CreateVolume: placement ----

TEST_F(Decisions, PlacementTriesPreferredInOrderFirst) {
  for (const char* n : {"node-a", "node-b", "node-c"}) cluster_.Heartbeat(n, 10 * kGiB);
  auto req = WithTopology(VolumeRequest("pvc-pref", kMiB), {"node-a", "node-b", "node-c"},
                          {"node-c", "node-b"});
  EXPECT_EQ(NodeOf(MustCreate(req)), "node-c");
  // The first preferred node has no room: the next preferred one, before any requisite.
  cluster_.Heartbeat("node-c", 0);
  req.set_name("pvc-pref-2");
  EXPECT_EQ(NodeOf(MustCreate(req)), "node-b");
}

TEST_F(Decisions, PlacementThenRequisiteInOrderAndNeverOutsideIt) {
  for (const char* n : {"node-a", "node-b", "node-c"}) cluster_.Heartbeat(n, 10 * kGiB);
  cluster_.Heartbeat("node-c", 100 * kGiB);  // the roomiest, but not allowed
  // A preferred node outside requisite is ignored; requisite is tried in its order.
  auto req = WithTopology(VolumeRequest("pvc-req", kMiB), {"node-b", "node-a"}, {"node-c"});
  EXPECT_EQ(NodeOf(MustCreate(req)), "node-b");
  cluster_.Heartbeat("node-b", 0);
  req.set_name("pvc-req-2");
  EXPECT_EQ(NodeOf(MustCreate(req)), "node-a");
  EXPECT_EQ(Node("node-c").Count("CreateVolume"), 0);
}

TEST_F(Decisions, PlacementWithoutRequirementsTakesTheNodeWithTheMostRoom) {
  cluster_.Heartbeat("node-a", 5 * kGiB);
  cluster_.Heartbeat("node-b", 8 * kGiB);
  cluster_.Heartbeat("node-c", 6 * kGiB);
  EXPECT_EQ(NodeOf(MustCreate(VolumeRequest("pvc-room", kMiB))), "node-b");
}

TEST_F(Decisions, PlacementLedgerSpreadsABurstBetweenTwoHeartbeats) {
  cluster_.Heartbeat("node-a", 10 * kGiB);
  cluster_.Heartbeat("node-b", 10 * kGiB);
  // The heartbeats do not move between these calls; what this controller placed does.
  std::vector<std::string> where;
  for (const char* name : {"burst-1", "burst-2", "burst-3"}) {
    where.push_back(NodeOf(MustCreate(VolumeRequest(name, static_cast<int64_t>(4 * kGiB)))));
  }
  EXPECT_EQ(where, (std::vector<std::string>{"node-a", "node-b", "node-a"}));
  // A newer heartbeat carries the node's own figure: what was placed before it no longer counts
  // (with the ledger's 8 and 4 GiB still counted, node-b would look roomier).
  cluster_.Advance(FakeCluster::kInterval);
  cluster_.Heartbeat("node-a", 10 * kGiB);
  cluster_.Heartbeat("node-b", 9 * kGiB);
  EXPECT_EQ(NodeOf(MustCreate(VolumeRequest("burst-4", static_cast<int64_t>(kGiB)))), "node-a");
}

TEST_F(Decisions, ContentSourcePinsTheNode) {
  cluster_.Heartbeat("node-a", 100 * kGiB);
  cluster_.Heartbeat("node-b", kGiB);
  Node("node-b").PutVolume(PoolVolume("src", 4 * kMiB));
  Node("node-b").PutSnapshot(PoolSnapshot("snap", "src", 4 * kMiB));
  // node-a has more room and is preferred; the snapshot lives on node-b.
  auto req = WithTopology(FromSnapshot(VolumeRequest("pinned", 0), "s1:node-b:snap"),
                          {"node-a", "node-b"}, {"node-a"});
  EXPECT_EQ(NodeOf(MustCreate(req)), "node-b");
  EXPECT_EQ(Node("node-a").Count("CreateVolume"), 0);
}

// A source node that advertises no NBD endpoint cannot be copied from: the request cannot be
// met as asked (INVALID_ARGUMENT), and nothing is made anywhere.
TEST_F(Decisions, ContentSourceOutsideTheAllowedTopologyWithoutAnNbdEndpointIsInvalidArgument) {
  cluster_.Heartbeat("node-a", 10 * kGiB);
  cluster_.Heartbeat("node-b", 10 * kGiB);
  Node("node-b").PutVolume(PoolVolume("src", 4 * kMiB));
  Node("node-b").PutSnapshot(PoolSnapshot("snap", "src", 4 * kMiB));
  auto req =
      WithTopology(FromSnapshot(VolumeRequest("elsewhere", 0), "s1:node-b:snap"), {"node-a"});
  v1::CreateVolumeResponse resp;
  grpc::Status s = Create(req, &resp);
  EXPECT_EQ(s.error_code(), StatusCode::INVALID_ARGUMENT) << s.error_message();
  EXPECT_EQ(Calls("CreateVolume", {"node-a", "node-b"}), 0);
}

// ---- CreateVolume: restores and clones across nodes (issue 16) ----

constexpr char kEndpointB[] = "tcp://127.0.0.3:10809";

TEST_F(Decisions, CrossNodeRestoreCopiesFromATemporaryCloneAndIsAbortedUntilTheCopyEnds) {
  cluster_.Heartbeat("node-a", 10 * kGiB);
  cluster_.Heartbeat("node-b", 10 * kGiB, kEndpointB);
  Node("node-b").PutVolume(PoolVolume("src", 4 * kMiB));
  Node("node-b").PutSnapshot(PoolSnapshot("snap", "src", 4 * kMiB));
  Node("node-a").HoldJobs(true);
  auto req = WithTopology(FromSnapshot(VolumeRequest("pvc-x", 0), "s1:node-b:snap"), {"node-a"});
  v1::CreateVolumeResponse resp;
  grpc::Status s = Create(req, &resp);
  EXPECT_EQ(s.error_code(), StatusCode::ABORTED) << s.error_message();
  EXPECT_NE(s.error_message().find("being copied from node node-b to node node-a"),
            std::string::npos)
      << s.error_message();
  // The temporary clone on the source's node, and the copy job reading it.
  auto temp = Node("node-b").Volume("xfer-pvc-x");
  ASSERT_TRUE(temp.has_value());
  EXPECT_EQ(temp->source(), "snapshot/snap");
  EXPECT_TRUE(temp->read_only());
  auto copy = Node("node-a").LastCopy();
  ASSERT_TRUE(copy.has_value());
  EXPECT_EQ(copy->volume(), "pvc-x");
  EXPECT_EQ(copy->size_bytes(), 4 * kMiB);
  EXPECT_EQ(copy->endpoint(), kEndpointB);
  EXPECT_EQ(copy->export_name(), "xfer-pvc-x");
  EXPECT_EQ(copy->source_node(), "node-b");
  EXPECT_FALSE(Node("node-b").Volume("pvc-x").has_value());
  // A retry while it runs: the same answer, no second copy.
  EXPECT_EQ(Create(req, &resp).error_code(), StatusCode::ABORTED);
  EXPECT_EQ(Node("node-a").Count("CopyVolume"), 1);
  Node("node-a").FinishJobs();
  v1::Volume v = MustCreate(req);
  EXPECT_EQ(NodeOf(v), "node-a");
  EXPECT_EQ(v.volume_id(), "v1:node-a:pvc-x");
  EXPECT_EQ(v.capacity_bytes(), static_cast<int64_t>(4 * kMiB));
  EXPECT_EQ(v.content_source().snapshot().snapshot_id(), "s1:node-b:snap");
  EXPECT_FALSE(Node("node-b").Volume("xfer-pvc-x").has_value()) << "the temporary clone stays";
  // Idempotent once done (the clone already gone is no error).
  EXPECT_EQ(MustCreate(req).volume_id(), "v1:node-a:pvc-x");
  EXPECT_EQ(Node("node-a").Count("CopyVolume"), 1);
  EXPECT_EQ(Node("node-b").VolumeCount(), 1u);  // src only
}

TEST_F(Decisions, CrossNodeCloneOfAVolumeGrowsToTheRequestedSize) {
  cluster_.Heartbeat("node-a", 10 * kGiB);
  cluster_.Heartbeat("node-b", 10 * kGiB, kEndpointB);
  Node("node-b").PutVolume(PoolVolume("src", 4 * kMiB));
  auto req = WithTopology(VolumeRequest("pvc-c", static_cast<int64_t>(8 * kMiB)), {"node-a"});
  req.mutable_volume_content_source()->mutable_volume()->set_volume_id("v1:node-b:src");
  v1::Volume v = MustCreate(req);  // jobs end within the call
  EXPECT_EQ(NodeOf(v), "node-a");
  EXPECT_EQ(v.capacity_bytes(), static_cast<int64_t>(8 * kMiB));
  EXPECT_EQ(v.content_source().volume().volume_id(), "v1:node-b:src");
  EXPECT_EQ(Node("node-a").LastCopy()->size_bytes(), 8 * kMiB);
  EXPECT_EQ(Node("node-b").Volume("xfer-pvc-c"), std::nullopt);
}

// The temporary clone takes the source's size on its node, so this helps a restore or clone
// asked larger than its source: room for the clone there, not for the new volume.
TEST_F(Decisions, ASourceNodeWithoutRoomIsCopiedFromToAnAllowedNodeWithRoom) {
  cluster_.Heartbeat("node-a", 10 * kGiB);
  cluster_.Heartbeat("node-b", 6 * kMiB, kEndpointB);
  Node("node-b").SetRoom(10 * kMiB);  // src and the 4 MiB clone fit, not an 8 MiB volume
  Node("node-b").PutVolume(PoolVolume("src", 4 * kMiB));
  Node("node-b").PutSnapshot(PoolSnapshot("snap", "src", 4 * kMiB));
  auto req = WithTopology(
      FromSnapshot(VolumeRequest("pvc-room", static_cast<int64_t>(8 * kMiB)), "s1:node-b:snap"),
      {"node-b", "node-a"}, {"node-b"});
  EXPECT_EQ(NodeOf(MustCreate(req)), "node-a");
  EXPECT_EQ(Node("node-a").Count("CopyVolume"), 1);
  EXPECT_EQ(Node("node-a").LastCopy()->size_bytes(), 8 * kMiB);
  EXPECT_FALSE(Node("node-b").Volume("xfer-pvc-room").has_value());
  Node("node-b").SetRoom(uint64_t{1} << 40);
  // Room on the source's node again: the fast path, no copy.
  cluster_.Heartbeat("node-b", 10 * kGiB, kEndpointB);
  req.set_name("pvc-room-2");
  EXPECT_EQ(NodeOf(MustCreate(req)), "node-b");
  EXPECT_EQ(Node("node-a").Count("CopyVolume"), 1);
  EXPECT_EQ(Node("node-b").Volume("pvc-room-2")->source(), "snapshot/snap");
}

TEST_F(Decisions, AFailedCrossNodeCopyIsReportedOnceAndLeavesNothingBehind) {
  cluster_.Heartbeat("node-a", 10 * kGiB);
  cluster_.Heartbeat("node-b", 10 * kGiB, kEndpointB);
  Node("node-b").PutVolume(PoolVolume("src", 4 * kMiB));
  Node("node-b").PutSnapshot(PoolSnapshot("snap", "src", 4 * kMiB));
  Node("node-a").HoldJobs(true);
  auto req = WithTopology(FromSnapshot(VolumeRequest("pvc-f", 0), "s1:node-b:snap"), {"node-a"});
  v1::CreateVolumeResponse resp;
  EXPECT_EQ(Create(req, &resp).error_code(), StatusCode::ABORTED);
  // The connection to the source drops mid-copy: the datapath removes the half-copied volume.
  Node("node-a").FinishJobs(Error(ECONNRESET, "connection reset by peer"));
  grpc::Status s = Create(req, &resp);
  EXPECT_EQ(s.error_code(), StatusCode::UNAVAILABLE) << s.error_message();
  EXPECT_NE(s.error_message().find("connection reset"), std::string::npos) << s.error_message();
  EXPECT_FALSE(Node("node-a").Volume("pvc-f").has_value());
  EXPECT_FALSE(Node("node-b").Volume("xfer-pvc-f").has_value());
  // The provisioner's next retry starts over.
  EXPECT_EQ(Create(req, &resp).error_code(), StatusCode::ABORTED);
  EXPECT_EQ(Node("node-a").Count("CopyVolume"), 2);
  // A local failure (a full disk) keeps its code.
  Node("node-a").FinishJobs(Error(ENOSPC, "no space left on device"));
  EXPECT_EQ(Create(req, &resp).error_code(), StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_FALSE(Node("node-b").Volume("xfer-pvc-f").has_value());
}

TEST_F(Decisions, ACrossNodeCopyWhoseSourceNodeIsUnreachableIsUnavailableAndMakesNothing) {
  cluster_.Heartbeat("node-a", 10 * kGiB);
  cluster_.Heartbeat("node-b", 10 * kGiB, kEndpointB);
  Node("node-b").PutVolume(PoolVolume("src", 4 * kMiB));
  Node("node-b").PutSnapshot(PoolSnapshot("snap", "src", 4 * kMiB));
  auto req = WithTopology(FromSnapshot(VolumeRequest("pvc-u", 0), "s1:node-b:snap"), {"node-a"});
  Node("node-b").SetDown(Error(EAGAIN, "connection refused"));
  v1::CreateVolumeResponse resp;
  EXPECT_EQ(Create(req, &resp).error_code(), StatusCode::UNAVAILABLE);
  // The copy job cannot reach the peer's NBD listener: refused at its start, the clone removed.
  Node("node-b").SetDown(Status::Ok());
  Node("node-a").FailNext("CopyVolume", Error(EAGAIN, "cannot read xfer-pvc-u: refused"));
  grpc::Status s = Create(req, &resp);
  EXPECT_EQ(s.error_code(), StatusCode::UNAVAILABLE) << s.error_message();
  EXPECT_EQ(Node("node-a").VolumeCount(), 0u);
  EXPECT_FALSE(Node("node-b").Volume("xfer-pvc-u").has_value());
  // Its heartbeats stopped: UNAVAILABLE too, naming the node.
  cluster_.Advance(FakeCluster::kTtl + std::chrono::seconds(1));
  cluster_.Heartbeat("node-a", 10 * kGiB);
  s = Create(req, &resp);
  EXPECT_EQ(s.error_code(), StatusCode::UNAVAILABLE) << s.error_message();
  EXPECT_EQ(Node("node-a").VolumeCount(), 0u);
}

TEST_F(Decisions, ACrossNodeRestoreOfAMissingSnapshotIsNotFoundAndMakesNothing) {
  cluster_.Heartbeat("node-a", 10 * kGiB);
  cluster_.Heartbeat("node-b", 10 * kGiB, kEndpointB);
  auto req = WithTopology(FromSnapshot(VolumeRequest("pvc-m", 0), "s1:node-b:gone"), {"node-a"});
  v1::CreateVolumeResponse resp;
  grpc::Status s = Create(req, &resp);
  EXPECT_EQ(s.error_code(), StatusCode::NOT_FOUND) << s.error_message();
  EXPECT_EQ(Calls("CreateVolume", {"node-a", "node-b"}), 0);
  EXPECT_EQ(Node("node-a").Count("CopyVolume"), 0);
}

TEST_F(Decisions, ACrossNodeCopyWithNoRoomOnAnyAllowedNodeIsResourceExhausted) {
  cluster_.Heartbeat("node-a", kMiB);
  cluster_.Heartbeat("node-b", 10 * kGiB, kEndpointB);
  Node("node-b").PutVolume(PoolVolume("src", 4 * kMiB));
  Node("node-b").PutSnapshot(PoolSnapshot("snap", "src", 4 * kMiB));
  auto req = WithTopology(FromSnapshot(VolumeRequest("pvc-n", 0), "s1:node-b:snap"), {"node-a"});
  v1::CreateVolumeResponse resp;
  grpc::Status s = Create(req, &resp);
  EXPECT_EQ(s.error_code(), StatusCode::RESOURCE_EXHAUSTED) << s.error_message();
  EXPECT_FALSE(Node("node-b").Volume("xfer-pvc-n").has_value());
  EXPECT_EQ(Node("node-a").Count("CopyVolume"), 0);
}

// ---- CreateVolume: idempotency ----

TEST_F(Decisions, IdempotencyFindsAnEarlierAttemptOnAnyNode) {
  cluster_.Heartbeat("node-a", 10 * kGiB);
  cluster_.Heartbeat("node-b", 5 * kGiB);
  auto req = VolumeRequest("pvc-again", static_cast<int64_t>(kMiB));
  (*req.mutable_parameters())["maxIops"] = "100";
  v1::Volume first = MustCreate(req);
  EXPECT_EQ(NodeOf(first), "node-a");
  // node-b is now the roomier one; the retry must still find the volume on node-a.
  cluster_.Advance(FakeCluster::kInterval);
  cluster_.Heartbeat("node-a", kGiB);
  cluster_.Heartbeat("node-b", 50 * kGiB);
  v1::Volume again = MustCreate(req);
  EXPECT_EQ(again.volume_id(), first.volume_id());
  EXPECT_EQ(Calls("CreateVolume", {"node-a", "node-b"}), 1);
  // The same name asking for something else is ALREADY_EXISTS, wherever it lives.
  v1::CreateVolumeResponse resp;
  auto bigger = req;
  bigger.mutable_capacity_range()->set_required_bytes(static_cast<int64_t>(2 * kMiB));
  EXPECT_EQ(Create(bigger, &resp).error_code(), StatusCode::ALREADY_EXISTS);
  auto other_qos = req;
  (*other_qos.mutable_parameters())["maxIops"] = "200";
  EXPECT_EQ(Create(other_qos, &resp).error_code(), StatusCode::ALREADY_EXISTS);
  EXPECT_EQ(Create(WithTopology(req, {"node-b"}), &resp).error_code(), StatusCode::ALREADY_EXISTS);
  EXPECT_EQ(Calls("CreateVolume", {"node-a", "node-b"}), 1);
}

// Schedules (issue 18): the parsed StorageClass keys reach the datapath's CreateVolumeRequest,
// and a retry with another schedule is ALREADY_EXISTS; bad keys never reach a node.
TEST_F(Decisions, CreateVolumePassesTheSchedule) {
  cluster_.Heartbeat("node-a", 10 * kGiB);
  auto req = VolumeRequest("pvc-sched", static_cast<int64_t>(kMiB));
  (*req.mutable_parameters())["snapshotSchedule"] = "*/30 * * * *";
  (*req.mutable_parameters())["snapshotRetain"] = "3";
  (*req.mutable_parameters())["backupSchedule"] = "0 2 * * *";
  (*req.mutable_parameters())["backupTarget"] = "s3://bucket/nightly";
  v1::Volume first = MustCreate(req);
  const std::string id = first.volume_id();
  const std::string pool_name = id.substr(id.rfind(':') + 1);
  auto stored = Node("node-a").Volume(pool_name);
  ASSERT_TRUE(stored.has_value()) << id;
  EXPECT_EQ(stored->schedule().snapshot_cron(), "*/30 * * * *");
  EXPECT_EQ(stored->schedule().snapshot_retain(), 3u);
  EXPECT_EQ(stored->schedule().backup_cron(), "0 2 * * *");
  EXPECT_EQ(stored->schedule().backup_retain(), 7u);  // the default, spelled out
  EXPECT_EQ(stored->schedule().backup_target(), "s3://bucket/nightly");
  EXPECT_EQ(MustCreate(req).volume_id(), id);  // the same request again: the same volume
  v1::CreateVolumeResponse resp;
  auto other = req;
  (*other.mutable_parameters())["snapshotRetain"] = "4";
  grpc::Status s = Create(other, &resp);
  EXPECT_EQ(s.error_code(), StatusCode::ALREADY_EXISTS) << s.error_message();
  EXPECT_NE(s.error_message().find("another schedule"), std::string::npos) << s.error_message();
  auto none = req;
  none.mutable_parameters()->clear();
  EXPECT_EQ(Create(none, &resp).error_code(), StatusCode::ALREADY_EXISTS);
  // A plain volume carries no schedule.
  v1::Volume plain = MustCreate(VolumeRequest("pvc-plain", static_cast<int64_t>(kMiB)));
  const std::string plain_id = plain.volume_id();
  auto plain_stored = Node("node-a").Volume(plain_id.substr(plain_id.rfind(':') + 1));
  ASSERT_TRUE(plain_stored.has_value());
  EXPECT_FALSE(plain_stored->has_schedule());
  // Refused by the parameters' rules, before any node is asked.
  const int creates = Calls("CreateVolume", {"node-a"});
  auto bad = VolumeRequest("pvc-bad", static_cast<int64_t>(kMiB));
  (*bad.mutable_parameters())["backupSchedule"] = "@daily";
  s = Create(bad, &resp);
  EXPECT_EQ(s.error_code(), StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(s.error_message().find("backupTarget"), std::string::npos) << s.error_message();
  (*bad.mutable_parameters())["backupTarget"] = "s3://b";
  (*bad.mutable_parameters())["replicas"] = "2";
  s = Create(bad, &resp);
  EXPECT_EQ(s.error_code(), StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(s.error_message().find("not supported for replicated volumes"), std::string::npos)
      << s.error_message();
  EXPECT_EQ(Calls("CreateVolume", {"node-a"}), creates);
}

// A VolumeAttributesClass sets the schedule too: at creation over the StorageClass's, and later
// through ControllerModifyVolume (SetSchedule on the volume's node); a class without schedule
// keys leaves it alone; replicated volumes refuse it.
TEST_F(Decisions, AttributesClassSchedules) {
  cluster_.Heartbeat("node-a", 10 * kGiB);
  auto req = VolumeRequest("pvc-vac", static_cast<int64_t>(kMiB));
  (*req.mutable_parameters())["snapshotSchedule"] = "@daily";
  (*req.mutable_mutable_parameters())["snapshotSchedule"] = "@hourly";
  (*req.mutable_mutable_parameters())["snapshotRetain"] = "24";
  const std::string id = MustCreate(req).volume_id();
  const std::string pool_name = id.substr(id.rfind(':') + 1);
  EXPECT_EQ(Node("node-a").Volume(pool_name)->schedule().snapshot_cron(), "@hourly");
  EXPECT_EQ(Node("node-a").Volume(pool_name)->schedule().snapshot_retain(), 24u);

  v1::ControllerModifyVolumeRequest m;
  m.set_volume_id(id);
  (*m.mutable_mutable_parameters())["backupSchedule"] = "0 1 * * *";
  (*m.mutable_mutable_parameters())["backupTarget"] = "s3://bucket/x";
  v1::ControllerModifyVolumeResponse mr;
  grpc::Status s = C().ControllerModifyVolume(nullptr, &m, &mr);
  ASSERT_TRUE(s.ok()) << s.error_message();
  auto stored = Node("node-a").Volume(pool_name);
  EXPECT_EQ(stored->schedule().backup_cron(), "0 1 * * *");
  EXPECT_EQ(stored->schedule().snapshot_cron(), "");  // the class's schedule is the whole one
  // QoS only: the schedule stays.
  m.mutable_mutable_parameters()->clear();
  (*m.mutable_mutable_parameters())["maxIops"] = "300";
  ASSERT_TRUE(C().ControllerModifyVolume(nullptr, &m, &mr).ok());
  stored = Node("node-a").Volume(pool_name);
  EXPECT_EQ(stored->schedule().backup_cron(), "0 1 * * *");
  EXPECT_EQ(stored->qos().max_iops(), 300u);
  // A bad one reaches no node.
  const int sets = Calls("SetSchedule", {"node-a"});
  m.mutable_mutable_parameters()->clear();
  (*m.mutable_mutable_parameters())["backupSchedule"] = "@daily";
  s = C().ControllerModifyVolume(nullptr, &m, &mr);
  EXPECT_EQ(s.error_code(), StatusCode::INVALID_ARGUMENT) << s.error_message();
  EXPECT_NE(s.error_message().find("backupTarget"), std::string::npos) << s.error_message();
  EXPECT_EQ(Calls("SetSchedule", {"node-a"}), sets);
  // Replicated volumes: not yet.
  m.set_volume_id("r1:pvc-x");
  m.mutable_mutable_parameters()->clear();
  (*m.mutable_mutable_parameters())["snapshotSchedule"] = "@daily";
  s = C().ControllerModifyVolume(nullptr, &m, &mr);
  EXPECT_EQ(s.error_code(), StatusCode::INVALID_ARGUMENT) << s.error_message();
}

TEST_F(Decisions, IdempotencyAsksEveryLiveNodeAtOnce) {
  const std::vector<std::string> nodes = {"node-a", "node-b", "node-c"};
  Rendezvous all(static_cast<int>(nodes.size()));
  for (const auto& n : nodes) {
    cluster_.Heartbeat(n, 10 * kGiB);
    Node(n).SetHook([&all](const std::string& method) {
      if (method == "GetVolume") all.Arrive();
    });
  }
  MustCreate(VolumeRequest("pvc-parallel", static_cast<int64_t>(kMiB)));
  EXPECT_EQ(Calls("GetVolume", nodes), 3);
  EXPECT_EQ(all.missed(), 0) << "the nodes were asked one after another";
}

TEST_F(Decisions, IdempotencyFailsWhenALiveNodeCannotAnswer) {
  cluster_.Heartbeat("node-a", 10 * kGiB);
  cluster_.Heartbeat("node-b", 10 * kGiB);
  Node("node-b").SetDown(Error(EAGAIN, "connection refused"));
  // node-b might hold an earlier attempt: no second copy on node-a.
  v1::CreateVolumeResponse resp;
  grpc::Status s = Create(VolumeRequest("pvc-unsure", static_cast<int64_t>(kMiB)), &resp);
  EXPECT_EQ(s.error_code(), StatusCode::UNAVAILABLE) << s.error_message();
  EXPECT_NE(s.error_message().find("node-b"), std::string::npos) << s.error_message();
  EXPECT_EQ(Calls("CreateVolume", {"node-a", "node-b"}), 0);
  // Once it answers, the call goes through.
  Node("node-b").SetDown(Status::Ok());
  MustCreate(VolumeRequest("pvc-unsure", static_cast<int64_t>(kMiB)));
}

// ---- CreateVolume: no room ----

TEST_F(Decisions, NoRoomOnAnyAllowedNodeIsResourceExhausted) {
  cluster_.Heartbeat("node-a", kMiB);
  cluster_.Heartbeat("node-b", 2 * kMiB);
  v1::CreateVolumeResponse resp;
  grpc::Status s = Create(VolumeRequest("pvc-huge", static_cast<int64_t>(kGiB)), &resp);
  EXPECT_EQ(s.error_code(), StatusCode::RESOURCE_EXHAUSTED) << s.error_message();
  EXPECT_EQ(Calls("CreateVolume", {"node-a", "node-b"}), 0);
}

TEST_F(Decisions, NoRoomButAnAllowedNodeIsNotRegisteredIsUnavailable) {
  v1::CreateVolumeResponse resp;
  // No node at all yet: the first heartbeat may be seconds away.
  EXPECT_EQ(Create(VolumeRequest("pvc-early", static_cast<int64_t>(kMiB)), &resp).error_code(),
            StatusCode::UNAVAILABLE);
  cluster_.Heartbeat("node-a", kMiB);
  auto req =
      WithTopology(VolumeRequest("pvc-wait", static_cast<int64_t>(kGiB)), {"node-a", "node-z"});
  grpc::Status s = Create(req, &resp);
  EXPECT_EQ(s.error_code(), StatusCode::UNAVAILABLE) << s.error_message();
  EXPECT_NE(s.error_message().find("node-z: not registered"), std::string::npos);
}

TEST_F(Decisions, NoRoomInTheDatapathMovesOnToTheNextNode) {
  // The heartbeat says node-a has the most room; its pool disagrees (the figure is old).
  cluster_.Heartbeat("node-a", 10 * kGiB);
  cluster_.Heartbeat("node-b", 5 * kGiB);
  Node("node-a").SetRoom(kMiB);
  EXPECT_EQ(NodeOf(MustCreate(VolumeRequest("pvc-spill", static_cast<int64_t>(kGiB)))), "node-b");
  EXPECT_EQ(Node("node-a").Count("CreateVolume"), 1);
  // Everyone refuses: RESOURCE_EXHAUSTED with each node's reason.
  Node("node-b").SetRoom(kGiB);
  v1::CreateVolumeResponse resp;
  grpc::Status s = Create(VolumeRequest("pvc-spill-2", static_cast<int64_t>(kGiB)), &resp);
  EXPECT_EQ(s.error_code(), StatusCode::RESOURCE_EXHAUSTED) << s.error_message();
  EXPECT_NE(s.error_message().find("pool full"), std::string::npos) << s.error_message();
}

// ---- GetCapacity ----

TEST_F(Decisions, GetCapacityWithASegmentIsThatNodesProvisionableBytes) {
  cluster_.Heartbeat("node-a", 5 * kGiB + 100);
  cluster_.Heartbeat("node-b", 8 * kGiB);
  v1::GetCapacityResponse resp;
  ASSERT_TRUE(Capacity("node-a", &resp).ok());
  EXPECT_EQ(resp.available_capacity(), static_cast<int64_t>(5 * kGiB));  // whole 4 KiB blocks
  EXPECT_EQ(resp.maximum_volume_size().value(), resp.available_capacity());
  ASSERT_TRUE(Capacity("node-z", &resp).ok());  // unknown: 0, not an error
  EXPECT_EQ(resp.available_capacity(), 0);
  EXPECT_EQ(resp.maximum_volume_size().value(), 0);
  v1::GetCapacityRequest foreign;
  (*foreign.mutable_accessible_topology()->mutable_segments())["zone"] = "z1";
  EXPECT_EQ(C().GetCapacity(nullptr, &foreign, &resp).error_code(), StatusCode::INVALID_ARGUMENT);
}

TEST_F(Decisions, GetCapacityWithoutASegmentIsTheLargestSingleNodeNotTheSum) {
  cluster_.Heartbeat("node-a", 5 * kGiB);
  cluster_.Heartbeat("node-b", 8 * kGiB);
  v1::GetCapacityResponse resp;
  ASSERT_TRUE(Capacity("", &resp).ok());
  EXPECT_EQ(resp.available_capacity(), static_cast<int64_t>(8 * kGiB));
  EXPECT_EQ(resp.maximum_volume_size().value(), static_cast<int64_t>(8 * kGiB));
  // A capability that cannot be served: nothing can be provisioned with it.
  v1::GetCapacityRequest multi;
  *multi.add_volume_capabilities() =
      BlockCap(v1::VolumeCapability::AccessMode::MULTI_NODE_MULTI_WRITER);
  ASSERT_TRUE(C().GetCapacity(nullptr, &multi, &resp).ok());
  EXPECT_EQ(resp.available_capacity(), 0);
}

// ---- ControllerGetVolume ----

TEST_F(Decisions, ControllerGetVolumeOnAGoneNodeIsAbnormalWithTheCause) {
  cluster_.Heartbeat("node-b", 10 * kGiB);
  Node("node-b").PutVolume(PoolVolume("pvc-1", kMiB));
  cluster_.Advance(FakeCluster::kTtl + std::chrono::milliseconds(1));
  v1::ControllerGetVolumeResponse resp;
  ASSERT_TRUE(GetVolume("v1:node-b:pvc-1", &resp).ok());
  EXPECT_EQ(resp.volume().volume_id(), "v1:node-b:pvc-1");
  EXPECT_EQ(NodeOf(resp.volume()), "node-b");
  EXPECT_TRUE(resp.status().volume_condition().abnormal());
  EXPECT_NE(resp.status().volume_condition().message().find("node-b"), std::string::npos);
  // Back with its next heartbeat: healthy again.
  cluster_.Heartbeat("node-b", 10 * kGiB);
  resp.Clear();
  ASSERT_TRUE(GetVolume("v1:node-b:pvc-1", &resp).ok());
  EXPECT_FALSE(resp.status().volume_condition().abnormal())
      << resp.status().volume_condition().message();
}

TEST_F(Decisions, ControllerGetVolumeOfAVolumeItsNodeCannotServeIsAbnormal) {
  cluster_.Heartbeat("node-a", 10 * kGiB);
  Node("node-a").FailNext("GetVolume", Error(EIO, "volume pvc-1 is broken: bad metadata"));
  v1::ControllerGetVolumeResponse resp;
  ASSERT_TRUE(GetVolume("v1:node-a:pvc-1", &resp).ok());
  EXPECT_TRUE(resp.status().volume_condition().abnormal());
  EXPECT_NE(resp.status().volume_condition().message().find("bad metadata"), std::string::npos);
  // A volume the node says does not exist is NOT_FOUND, not abnormal.
  EXPECT_EQ(GetVolume("v1:node-a:pvc-1", &resp).error_code(), StatusCode::NOT_FOUND);
}

TEST_F(Decisions, ControllerGetVolumeOfAnUnfilledRestoreIsAbnormalUntilItsCopyEnds) {
  cluster_.Heartbeat("node-a", 10 * kGiB);
  Node("node-a").PutVolume(PoolVolume("src", 4 * kMiB));
  Node("node-a").PutSnapshot(PoolSnapshot("snap", "src", 4 * kMiB));
  Node("node-a").SetCopiesStartUnfilled(true);
  v1::Volume v = MustCreate(FromSnapshot(VolumeRequest("copying", 0), "s1:node-a:snap"));
  v1::ControllerGetVolumeResponse resp;
  ASSERT_TRUE(GetVolume(v.volume_id(), &resp).ok());
  EXPECT_TRUE(resp.status().volume_condition().abnormal());
  EXPECT_NE(resp.status().volume_condition().message().find("copied"), std::string::npos);
  dpv1::Volume filled = *Node("node-a").Volume("copying");
  filled.set_ready(true);
  Node("node-a").PutVolume(filled);
  resp.Clear();
  ASSERT_TRUE(GetVolume(v.volume_id(), &resp).ok());
  EXPECT_FALSE(resp.status().volume_condition().abnormal());
}

// ---- listings ----

TEST_F(Decisions, ListingsAreSortedByIdAndPagedByTheLastIdReturned) {
  cluster_.Heartbeat("node-a", 10 * kGiB);
  cluster_.Heartbeat("node-b", 10 * kGiB);
  for (const char* n : {"v3", "v1"}) Node("node-b").PutVolume(PoolVolume(n, kMiB));
  for (const char* n : {"v4", "v2"}) Node("node-a").PutVolume(PoolVolume(n, kMiB));
  v1::ListVolumesResponse page;
  ASSERT_TRUE(ListVolumes(2, "", &page).ok());
  ASSERT_EQ(page.entries_size(), 2);
  EXPECT_EQ(page.entries(0).volume().volume_id(), "v1:node-a:v2");
  EXPECT_EQ(page.entries(1).volume().volume_id(), "v1:node-a:v4");
  ASSERT_FALSE(page.next_token().empty());
  // The last one returned is deleted before the next page: the boundary holds.
  ASSERT_TRUE(DeleteVolume("v1:node-a:v4").ok());
  v1::ListVolumesResponse rest;
  ASSERT_TRUE(ListVolumes(2, page.next_token(), &rest).ok());
  ASSERT_EQ(rest.entries_size(), 2);
  EXPECT_EQ(rest.entries(0).volume().volume_id(), "v1:node-b:v1");
  EXPECT_EQ(rest.entries(1).volume().volume_id(), "v1:node-b:v3");
  EXPECT_TRUE(rest.next_token().empty());
}

TEST_F(Decisions, AForeignPageTokenIsAborted) {
  cluster_.Heartbeat("node-a", 10 * kGiB);
  v1::ListVolumesResponse vr;
  EXPECT_EQ(ListVolumes(0, "not-a-token", &vr).error_code(), StatusCode::ABORTED);
  v1::ListSnapshotsRequest sr;
  sr.set_starting_token("p1.zz");
  v1::ListSnapshotsResponse sresp;
  EXPECT_EQ(ListSnapshots(sr, &sresp).error_code(), StatusCode::ABORTED);
  EXPECT_EQ(ListVolumes(-1, "", &vr).error_code(), StatusCode::INVALID_ARGUMENT);
}

// The health monitor records an event only for a volume it is told is abnormal: a silent node's
// volumes are listed from its last listing, abnormal, with the cause. Snapshots have no
// condition: a full ListSnapshots skips that node.
TEST_F(Decisions, ANodeThatDoesNotAnswerIsListedAbnormalFromItsLastListing) {
  cluster_.Heartbeat("node-a", 10 * kGiB);
  cluster_.Heartbeat("node-b", 10 * kGiB);
  Node("node-a").PutVolume(PoolVolume("va", kMiB));
  Node("node-a").PutSnapshot(PoolSnapshot("sa", "va", kMiB));
  Node("node-b").PutVolume(PoolVolume("vb", 2 * kMiB));
  v1::ListVolumesResponse vr;
  ASSERT_TRUE(ListVolumes(0, "", &vr).ok());  // the listing the controller keeps
  ASSERT_EQ(vr.entries_size(), 2);
  Node("node-b").SetDown(Error(ETIMEDOUT, "deadline exceeded"));
  vr.Clear();
  ASSERT_TRUE(ListVolumes(0, "", &vr).ok());
  ASSERT_EQ(vr.entries_size(), 2);
  EXPECT_EQ(vr.entries(0).volume().volume_id(), "v1:node-a:va");
  EXPECT_FALSE(vr.entries(0).status().volume_condition().abnormal());
  const auto& b = vr.entries(1);
  EXPECT_EQ(b.volume().volume_id(), "v1:node-b:vb");
  EXPECT_EQ(b.volume().capacity_bytes(), static_cast<int64_t>(2 * kMiB));
  EXPECT_EQ(NodeOf(b.volume()), "node-b");
  EXPECT_TRUE(b.status().volume_condition().abnormal());
  const std::string& why = b.status().volume_condition().message();
  EXPECT_EQ(why.rfind("node node-b unreachable: ", 0), 0u) << why;
  EXPECT_NE(why.find("deadline exceeded"), std::string::npos) << why;
  // ControllerGetVolume says the same, with the size of the last listing.
  v1::ControllerGetVolumeResponse g;
  ASSERT_TRUE(GetVolume("v1:node-b:vb", &g).ok());
  EXPECT_EQ(g.volume().capacity_bytes(), static_cast<int64_t>(2 * kMiB));
  EXPECT_TRUE(g.status().volume_condition().abnormal());
  EXPECT_EQ(g.status().volume_condition().message().rfind("node node-b unreachable: ", 0), 0u)
      << g.status().volume_condition().message();
  v1::ListSnapshotsResponse sr;
  ASSERT_TRUE(ListSnapshots({}, &sr).ok());
  ASSERT_EQ(sr.entries_size(), 1);
  EXPECT_EQ(sr.entries(0).snapshot().snapshot_id(), "s1:node-a:sa");
  // Answering again: healthy, from its own answer.
  Node("node-b").SetDown(Status::Ok());
  vr.Clear();
  ASSERT_TRUE(ListVolumes(0, "", &vr).ok());
  ASSERT_EQ(vr.entries_size(), 2);
  EXPECT_FALSE(vr.entries(1).status().volume_condition().abnormal())
      << vr.entries(1).status().volume_condition().message();
}

TEST_F(Decisions, ANodeWhoseHeartbeatsStoppedIsListedAbnormalUntilItIsBack) {
  cluster_.Heartbeat("node-a", 10 * kGiB);
  cluster_.Heartbeat("node-b", 10 * kGiB);
  Node("node-b").PutVolume(PoolVolume("vb", kMiB));
  v1::ListVolumesResponse vr;
  ASSERT_TRUE(ListVolumes(0, "", &vr).ok());
  ASSERT_EQ(vr.entries_size(), 1);
  cluster_.Advance(FakeCluster::kTtl + std::chrono::milliseconds(1));
  cluster_.Heartbeat("node-a", 10 * kGiB);  // node-b stays silent: expired, not asked
  const int asked = Node("node-b").Count("ListVolumes");
  std::string first_message;
  for (int round = 0; round < 2; ++round) {  // the same answer twice: events fold when repeated
    vr.Clear();
    ASSERT_TRUE(ListVolumes(0, "", &vr).ok());
    ASSERT_EQ(vr.entries_size(), 1);
    EXPECT_EQ(vr.entries(0).volume().volume_id(), "v1:node-b:vb");
    EXPECT_TRUE(vr.entries(0).status().volume_condition().abnormal());
    EXPECT_EQ(vr.entries(0).status().volume_condition().message().rfind(
                  "node node-b unreachable: ", 0),
              0u)
        << vr.entries(0).status().volume_condition().message();
    v1::ControllerGetVolumeResponse g;
    ASSERT_TRUE(GetVolume("v1:node-b:vb", &g).ok());
    EXPECT_TRUE(g.status().volume_condition().abnormal());
    EXPECT_EQ(g.status().volume_condition().message(),
              vr.entries(0).status().volume_condition().message());
    if (round == 0) first_message = g.status().volume_condition().message();
    EXPECT_EQ(g.status().volume_condition().message(), first_message);
    cluster_.Advance(std::chrono::milliseconds(1500));
  }
  EXPECT_EQ(Node("node-b").Count("ListVolumes"), asked);
  cluster_.Heartbeat("node-b", 10 * kGiB);
  vr.Clear();
  ASSERT_TRUE(ListVolumes(0, "", &vr).ok());
  ASSERT_EQ(vr.entries_size(), 1);
  EXPECT_FALSE(vr.entries(0).status().volume_condition().abnormal());
}

// The documented limit: the listings are in memory, so a node silent since the controller started
// has nothing to list its volumes from.
TEST_F(Decisions, ANodeSilentSinceTheControllerStartedIsLeftOut) {
  cluster_.Heartbeat("node-a", 10 * kGiB);
  cluster_.Heartbeat("node-b", 10 * kGiB);
  Node("node-a").PutVolume(PoolVolume("va", kMiB));
  Node("node-b").PutVolume(PoolVolume("vb", kMiB));
  Node("node-b").SetDown(Error(EAGAIN, "connection refused"));
  v1::ListVolumesResponse vr;
  ASSERT_TRUE(ListVolumes(0, "", &vr).ok());
  ASSERT_EQ(vr.entries_size(), 1);
  EXPECT_EQ(vr.entries(0).volume().volume_id(), "v1:node-a:va");
}

TEST_F(Decisions, ListedFromTheLastListingPagesTheSameAndForgetsDeletedVolumes) {
  cluster_.Heartbeat("node-a", 10 * kGiB);
  cluster_.Heartbeat("node-b", 10 * kGiB);
  for (const char* n : {"v1", "v3", "v5"}) Node("node-b").PutVolume(PoolVolume(n, kMiB));
  for (const char* n : {"v2", "v4"}) Node("node-a").PutVolume(PoolVolume(n, kMiB));
  auto pages = [&](std::vector<std::string>* ids, int* abnormal) {
    std::string token;
    for (int i = 0; i < 10; ++i) {
      v1::ListVolumesResponse page;
      ASSERT_TRUE(ListVolumes(2, token, &page).ok());
      ASSERT_LE(page.entries_size(), 2);
      for (const auto& e : page.entries()) {
        ids->push_back(e.volume().volume_id());
        *abnormal += e.status().volume_condition().abnormal();
      }
      token = page.next_token();
      if (token.empty()) return;
    }
    FAIL() << "more than 10 pages";
  };
  std::vector<std::string> up, down;
  int up_abnormal = 0, down_abnormal = 0;
  pages(&up, &up_abnormal);
  ASSERT_TRUE(DeleteVolume("v1:node-b:v3").ok());
  Node("node-b").SetDown(Error(EAGAIN, "connection refused"));
  pages(&down, &down_abnormal);
  EXPECT_EQ(up, (std::vector<std::string>{"v1:node-a:v2", "v1:node-a:v4", "v1:node-b:v1",
                                          "v1:node-b:v3", "v1:node-b:v5"}));
  EXPECT_EQ(up_abnormal, 0);
  EXPECT_EQ(down, (std::vector<std::string>{"v1:node-a:v2", "v1:node-a:v4", "v1:node-b:v1",
                                            "v1:node-b:v5"}));
  EXPECT_EQ(down_abnormal, 2);
  // A page boundary made while the node answered holds while it does not.
  v1::ListVolumesResponse first;
  Node("node-b").SetDown(Status::Ok());
  ASSERT_TRUE(ListVolumes(3, "", &first).ok());
  ASSERT_EQ(first.entries_size(), 3);
  Node("node-b").SetDown(Error(EAGAIN, "connection refused"));
  v1::ListVolumesResponse rest;
  ASSERT_TRUE(ListVolumes(3, first.next_token(), &rest).ok());
  ASSERT_EQ(rest.entries_size(), 1);
  EXPECT_EQ(rest.entries(0).volume().volume_id(), "v1:node-b:v5");
  EXPECT_TRUE(rest.entries(0).status().volume_condition().abnormal());
}

// The race of issue 13: the node answered (with the volume) before DeleteVolume, the controller
// keeps that answer after it. Without the deletion's tombstone the kept listing has the deleted
// volume again, and lists it (abnormal) once the node stops answering.
TEST_F(Decisions, AVolumeDeletedWhileAListingIsInFlightIsNotKeptFromThatListing) {
  cluster_.Heartbeat("node-a", 10 * kGiB);
  Node("node-a").PutVolume(PoolVolume("keep", kMiB));
  Node("node-a").PutVolume(PoolVolume("gone", kMiB));
  Gate gate;
  gate.Close();
  Node("node-a").SetAnsweredHook([&gate](const std::string& method) {
    if (method == "ListVolumes") gate.Pass();
  });
  grpc::Status listed;
  v1::ListVolumesResponse in_flight;
  std::thread t([&] { listed = ListVolumes(0, "", &in_flight); });
  const bool parked = gate.WaitForCaller();  // node-a has answered; nothing is kept yet
  const grpc::Status deleted = parked ? DeleteVolume("v1:node-a:gone") : grpc::Status::OK;
  gate.Open();
  t.join();
  ASSERT_TRUE(parked) << "the listing never reached node-a";
  ASSERT_TRUE(deleted.ok()) << deleted.error_message();
  ASSERT_TRUE(listed.ok()) << listed.error_message();
  EXPECT_EQ(in_flight.entries_size(), 2) << "the listing answers what the node said";
  Node("node-a").SetAnsweredHook(nullptr);
  Node("node-a").SetDown(Error(EAGAIN, "connection refused"));
  v1::ListVolumesResponse vr;
  ASSERT_TRUE(ListVolumes(0, "", &vr).ok());
  ASSERT_EQ(vr.entries_size(), 1) << vr.DebugString();
  EXPECT_EQ(vr.entries(0).volume().volume_id(), "v1:node-a:keep");
  EXPECT_TRUE(vr.entries(0).status().volume_condition().abnormal());
}

// The same race through ControllerGetVolume, which refreshes one volume of the kept listing.
TEST_F(Decisions, AVolumeDeletedWhileControllerGetVolumeIsInFlightIsNotKept) {
  cluster_.Heartbeat("node-a", 10 * kGiB);
  Node("node-a").PutVolume(PoolVolume("keep", kMiB));
  v1::ListVolumesResponse vr;
  ASSERT_TRUE(ListVolumes(0, "", &vr).ok());           // node-a listed: single answers are kept now
  Node("node-a").PutVolume(PoolVolume("gone", kMiB));  // created after that listing
  Gate gate;
  gate.Close();
  Node("node-a").SetAnsweredHook([&gate](const std::string& method) {
    if (method == "GetVolume") gate.Pass();
  });
  grpc::Status got;
  std::thread t([&] {
    v1::ControllerGetVolumeResponse resp;
    got = GetVolume("v1:node-a:gone", &resp);
  });
  const bool parked = gate.WaitForCaller();
  const grpc::Status deleted = parked ? DeleteVolume("v1:node-a:gone") : grpc::Status::OK;
  gate.Open();
  t.join();
  ASSERT_TRUE(parked) << "ControllerGetVolume never reached node-a";
  ASSERT_TRUE(deleted.ok()) << deleted.error_message();
  ASSERT_TRUE(got.ok()) << got.error_message();
  Node("node-a").SetAnsweredHook(nullptr);
  Node("node-a").SetDown(Error(EAGAIN, "connection refused"));
  vr.Clear();
  ASSERT_TRUE(ListVolumes(0, "", &vr).ok());
  ASSERT_EQ(vr.entries_size(), 1) << vr.DebugString();
  EXPECT_EQ(vr.entries(0).volume().volume_id(), "v1:node-a:keep");
}

TEST_F(Decisions, ANodeThatDoesNotAnswerFailsAListingFilteredToIt) {
  cluster_.Heartbeat("node-b", 10 * kGiB);
  Node("node-b").SetDown(Error(EAGAIN, "connection refused"));
  v1::ListSnapshotsResponse resp;
  v1::ListSnapshotsRequest by_source;
  by_source.set_source_volume_id("v1:node-b:vb");
  EXPECT_EQ(ListSnapshots(by_source, &resp).error_code(), StatusCode::UNAVAILABLE);
  v1::ListSnapshotsRequest by_id;
  by_id.set_snapshot_id("s1:node-b:sb");
  EXPECT_EQ(ListSnapshots(by_id, &resp).error_code(), StatusCode::UNAVAILABLE);
  // Answering again, a snapshot that is not there is an empty list.
  Node("node-b").SetDown(Status::Ok());
  ASSERT_TRUE(ListSnapshots(by_id, &resp).ok());
  EXPECT_EQ(resp.entries_size(), 0);
}

// ---- ControllerExpandVolume ----

TEST_F(Decisions, ExpandGrowsOnlyAndAlwaysAsksForNodeExpansion) {
  cluster_.Heartbeat("node-a", 10 * kGiB);
  Node("node-a").PutVolume(PoolVolume("pvc-x", 8 * kMiB));
  v1::ControllerExpandVolumeResponse resp;
  // Smaller than it is: already satisfied, nothing resized.
  ASSERT_TRUE(Expand("v1:node-a:pvc-x", static_cast<int64_t>(4 * kMiB), &resp).ok());
  EXPECT_EQ(resp.capacity_bytes(), static_cast<int64_t>(8 * kMiB));
  EXPECT_TRUE(resp.node_expansion_required());
  EXPECT_EQ(Node("node-a").Count("ResizeVolume"), 0);
  // Larger: grown, rounded up to 4 KiB; a block volume needs the node's step too.
  v1::ControllerExpandVolumeRequest grow;
  grow.set_volume_id("v1:node-a:pvc-x");
  grow.mutable_capacity_range()->set_required_bytes(static_cast<int64_t>(16 * kMiB + 1));
  *grow.mutable_volume_capability() = BlockCap();
  ASSERT_TRUE(C().ControllerExpandVolume(nullptr, &grow, &resp).ok());
  EXPECT_EQ(resp.capacity_bytes(), static_cast<int64_t>(16 * kMiB + 4 * kKiB));
  EXPECT_TRUE(resp.node_expansion_required());
  EXPECT_EQ(Node("node-a").Volume("pvc-x")->size_bytes(), 16 * kMiB + 4 * kKiB);
  EXPECT_EQ(Expand("v1:node-a:pvc-x", 0, &resp).error_code(), StatusCode::INVALID_ARGUMENT);
}

// ---- ControllerModifyVolume ----

TEST_F(Decisions, ModifyVolumeIsAQosPatchZeroRemovesAKeyOthersKeepTheirValues) {
  cluster_.Heartbeat("node-a", 10 * kGiB);
  dpv1::Volume v = PoolVolume("pvc-q", kMiB);
  v.mutable_qos()->set_max_iops(100);
  v.mutable_qos()->set_max_bps(1000000);
  Node("node-a").PutVolume(v);
  ASSERT_TRUE(Modify("v1:node-a:pvc-q", {{"maxIops", "0"}, {"maxReadIops", "50"}}).ok());
  dpv1::QosLimits q = Node("node-a").Volume("pvc-q")->qos();
  EXPECT_EQ(q.max_iops(), 0u);
  EXPECT_EQ(q.max_read_iops(), 50u);
  EXPECT_EQ(q.max_bps(), 1000000u);
  // Nothing to change: only whether the volume exists.
  ASSERT_TRUE(Modify("v1:node-a:pvc-q", {}).ok());
  EXPECT_EQ(Node("node-a").Count("SetQos"), 1);
  EXPECT_EQ(Modify("v1:node-a:missing", {}).error_code(), StatusCode::NOT_FOUND);
  EXPECT_EQ(Modify("v1:node-a:pvc-q", {{"maxIOPS", "1"}}).error_code(),
            StatusCode::INVALID_ARGUMENT);
}

// ---- the edge: in-flight guard and error mapping ----

TEST_F(Decisions, ASecondCallOnTheSameIdWhileOneIsInFlightIsAborted) {
  cluster_.Heartbeat("node-a", 10 * kGiB);
  Node("node-a").PutVolume(PoolVolume("busy", kMiB));
  Node("node-a").PutVolume(PoolVolume("free", kMiB));
  Gate gate;
  gate.Close();
  Node("node-a").SetHook([&gate](const std::string& method) {
    if (method == "ResizeVolume") gate.Pass();
  });
  grpc::Status first;
  std::thread t([&] {
    v1::ControllerExpandVolumeResponse resp;
    first = Expand("v1:node-a:busy", static_cast<int64_t>(2 * kMiB), &resp);
  });
  ASSERT_TRUE(gate.WaitForCaller());
  grpc::Status second = DeleteVolume("v1:node-a:busy");
  grpc::Status third = Modify("v1:node-a:busy", {{"maxIops", "5"}});
  grpc::Status other = DeleteVolume("v1:node-a:free");  // another id is not held up
  gate.Open();
  t.join();
  EXPECT_EQ(second.error_code(), StatusCode::ABORTED) << second.error_message();
  EXPECT_NE(second.error_message().find("already in progress"), std::string::npos);
  EXPECT_EQ(third.error_code(), StatusCode::ABORTED);
  EXPECT_TRUE(other.ok()) << other.error_message();
  EXPECT_TRUE(first.ok()) << first.error_message();
  EXPECT_TRUE(DeleteVolume("v1:node-a:busy").ok()) << "the id is free again";
}

TEST_F(Decisions, DatapathErrorsReachTheSidecarWithTheirCodeAndMessage) {
  cluster_.Heartbeat("node-a", 10 * kGiB);
  const std::pair<int, StatusCode> cases[] = {
      {ENOENT, StatusCode::NOT_FOUND},
      {EEXIST, StatusCode::ALREADY_EXISTS},
      {EINVAL, StatusCode::INVALID_ARGUMENT},
      {ENOSPC, StatusCode::RESOURCE_EXHAUSTED},
      {EBUSY, StatusCode::FAILED_PRECONDITION},
      {EAGAIN, StatusCode::UNAVAILABLE},
      {EALREADY, StatusCode::ABORTED},
      {ETIMEDOUT, StatusCode::DEADLINE_EXCEEDED},
      {ERANGE, StatusCode::OUT_OF_RANGE},
      {EACCES, StatusCode::PERMISSION_DENIED},
      {EIO, StatusCode::INTERNAL},
      {ECANCELED, StatusCode::CANCELLED},
  };
  for (const auto& [err, code] : cases) {
    SCOPED_TRACE(GrpcCodeName(code));
    Node("node-a").FailNext("DeleteVolume", Error(err, "the pool's own words"));
    grpc::Status s = DeleteVolume("v1:node-a:pvc-e");
    if (err == ENOENT) {
      EXPECT_TRUE(s.ok()) << "deleting what is not there is done";
      continue;
    }
    EXPECT_EQ(s.error_code(), code);
    EXPECT_NE(s.error_message().find("the pool's own words"), std::string::npos);
    EXPECT_NE(s.error_message().find("node-a"), std::string::npos);
  }
  // The one spec code with no errno of its own.
  EXPECT_EQ(ToCsiStatus(Error(kForeignPageToken, "x")).error_code(), StatusCode::ABORTED);
  EXPECT_TRUE(ToCsiStatus(Status::Ok()).ok());
}

TEST_F(Decisions, SnapshotNamesAreUniqueAcrossNodes) {
  cluster_.Heartbeat("node-a", 10 * kGiB);
  cluster_.Heartbeat("node-b", 10 * kGiB);
  Node("node-a").PutVolume(PoolVolume("va", kMiB));
  Node("node-b").PutVolume(PoolVolume("vb", kMiB));
  v1::CreateSnapshotRequest r;
  r.set_name("snap-1");
  r.set_source_volume_id("v1:node-b:vb");
  v1::CreateSnapshotResponse resp;
  ASSERT_TRUE(C().CreateSnapshot(nullptr, &r, &resp).ok());
  EXPECT_EQ(resp.snapshot().snapshot_id(), "s1:node-b:snap-1");
  EXPECT_EQ(resp.snapshot().source_volume_id(), "v1:node-b:vb");
  ASSERT_TRUE(C().CreateSnapshot(nullptr, &r, &resp).ok());  // a retry finds it
  EXPECT_EQ(Node("node-b").Count("CreateSnapshot"), 1);
  r.set_source_volume_id("v1:node-a:va");
  EXPECT_EQ(C().CreateSnapshot(nullptr, &r, &resp).error_code(), StatusCode::ALREADY_EXISTS);
  EXPECT_EQ(Node("node-a").Count("CreateSnapshot"), 0);
}

}  // namespace
}  // namespace nbdcsi::controller
