// Acceptance suite for nbd-csi-controller (issue 4): a real controller and two real
// nbd-datapathd processes (node-a, node-b, 4 GiB pools on /tmp) registering over loopback TCP;
// every RPC is driven over real gRPC on the controller's unix CSI socket, and the results are
// checked in the pools through each datapath's own API socket (or nbdctl).
#include <signal.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <set>
#include <sstream>
#include <thread>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "common/volume_rules.h"
#include "csi/driver.h"
#include "test/controller/cluster.h"
#include "test/support/wait.h"

namespace nbdcsi::test {
namespace {

namespace v1 = ::csi::v1;
namespace dp = ::nbdcsi::datapath::v1;
using namespace std::chrono_literals;
using Mode = v1::VolumeCapability::AccessMode;
using grpc::StatusCode;

constexpr int64_t kMiB = 1 << 20;
constexpr int64_t kGiB = int64_t{1} << 30;

class ControllerTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    cluster_ = new Cluster();
    start_error_ = cluster_->Start();
  }
  static void TearDownTestSuite() {
    delete cluster_;
    cluster_ = nullptr;
  }
  void SetUp() override { ASSERT_EQ(start_error_, "") << start_error_; }
  void TearDown() override {
    // Leave the pools as we found them so capacity-sensitive tests see the same room.
    for (auto it = snaps_.rbegin(); it != snaps_.rend(); ++it) DeleteSnapshot(*it);
    for (auto it = vols_.rbegin(); it != vols_.rend(); ++it) DeleteVolume(*it);
    if (HasFailure()) {
      std::fprintf(stderr, "%s", cluster_->LogTail("controller", 40).c_str());
    }
  }

  v1::Controller::Stub& C() { return cluster_->controller(); }

  grpc::Status Create(const v1::CreateVolumeRequest& req, v1::CreateVolumeResponse* resp) {
    grpc::Status s = C().CreateVolume(Ctx().get(), req, resp);
    if (s.ok()) vols_.push_back(resp->volume().volume_id());
    return s;
  }
  v1::Volume MustCreate(const v1::CreateVolumeRequest& req) {
    v1::CreateVolumeResponse resp;
    grpc::Status s = Create(req, &resp);
    EXPECT_TRUE(s.ok()) << req.name() << ": " << s.error_code() << " " << s.error_message();
    return resp.volume();
  }
  grpc::Status DeleteVolume(const std::string& id) {
    v1::DeleteVolumeRequest r;
    r.set_volume_id(id);
    v1::DeleteVolumeResponse resp;
    return C().DeleteVolume(Ctx().get(), r, &resp);
  }
  grpc::Status DeleteSnapshot(const std::string& id) {
    v1::DeleteSnapshotRequest r;
    r.set_snapshot_id(id);
    v1::DeleteSnapshotResponse resp;
    return C().DeleteSnapshot(Ctx().get(), r, &resp);
  }
  grpc::Status Snapshot(const std::string& name, const std::string& src, v1::Snapshot* out) {
    v1::CreateSnapshotRequest r;
    r.set_name(name);
    r.set_source_volume_id(src);
    v1::CreateSnapshotResponse resp;
    grpc::Status s = C().CreateSnapshot(Ctx().get(), r, &resp);
    if (s.ok()) {
      snaps_.push_back(resp.snapshot().snapshot_id());
      *out = resp.snapshot();
    }
    return s;
  }
  // Copy snapshots (ext4 /tmp) fill in the background: wait for ready_to_use.
  bool WaitSnapshotReady(const std::string& id) {
    return WaitUntil(
        [&] {
          v1::ListSnapshotsRequest r;
          r.set_snapshot_id(id);
          v1::ListSnapshotsResponse resp;
          grpc::Status s = C().ListSnapshots(Ctx().get(), r, &resp);
          return s.ok() && resp.entries_size() == 1 && resp.entries(0).snapshot().ready_to_use();
        },
        10s, 20ms);
  }
  dp::Volume PoolVolume(const std::string& node, const std::string& name, grpc::Status* st) {
    dp::GetVolumeRequest r;
    r.set_name(name);
    dp::GetVolumeResponse resp;
    *st = cluster_->datapath(node).GetVolume(Ctx().get(), r, &resp);
    return resp.volume();
  }
  int64_t Capacity(const std::string& node) {
    v1::GetCapacityRequest r;
    if (!node.empty()) *r.mutable_accessible_topology() = NodeTopology(node);
    v1::GetCapacityResponse resp;
    EXPECT_TRUE(C().GetCapacity(Ctx().get(), r, &resp).ok());
    return resp.available_capacity();
  }
  // The pool name inside a v1:<node>:<name> id.
  static std::string PoolName(const std::string& id) { return id.substr(id.rfind(':') + 1); }
  // What the node's pool says may be provisioned now, as a heartbeat would report it.
  int64_t PoolProvisionable(const std::string& node) {
    dp::GetPoolInfoRequest r;
    dp::GetPoolInfoResponse resp;
    EXPECT_TRUE(cluster_->datapath(node).GetPoolInfo(Ctx().get(), r, &resp).ok()) << node;
    return static_cast<int64_t>(resp.provisionable_bytes() / kVolumeSizeAlignment *
                                kVolumeSizeAlignment);
  }
  // Heartbeats carry free space: wait until the registry's figure for every node is the one its
  // pool reports now, i.e. a heartbeat sent after the last change has arrived.
  void WaitHeartbeats() {
    for (const auto& node : cluster_->nodes()) {
      EXPECT_TRUE(WaitUntil([&] { return Capacity(node) == PoolProvisionable(node); }, 10s, 20ms))
          << node << ": the registry never saw the pool as it is";
    }
  }

  static Cluster* cluster_;
  static std::string start_error_;
  std::vector<std::string> vols_, snaps_;
};

Cluster* ControllerTest::cluster_ = nullptr;
std::string ControllerTest::start_error_;

// ---- CreateVolume: sizes ----

TEST_F(ControllerTest, CreateVolumeSizes) {
  // No capacity_range: the 1 GiB default.
  v1::Volume v = MustCreate(VolumeRequest("size-default", 0));
  EXPECT_EQ(v.capacity_bytes(), kGiB);
  // Rounded up to 4 KiB.
  v = MustCreate(VolumeRequest("size-odd", 5000));
  EXPECT_EQ(v.capacity_bytes(), 8192);
  grpc::Status st;
  EXPECT_EQ(PoolVolume(NodeOf(v), PoolName(v.volume_id()), &st).size_bytes(), 8192u);
  EXPECT_TRUE(st.ok()) << st.error_message();
  // Only a limit: the default, brought down to the limit.
  auto req = VolumeRequest("size-limit-only", 0);
  req.mutable_capacity_range()->set_limit_bytes(3 * kMiB + 100);
  v = MustCreate(req);
  EXPECT_EQ(v.capacity_bytes(), 3 * kMiB);
  // required == limit on a 4 KiB multiple is exact.
  req = VolumeRequest("size-exact", 2 * kMiB);
  req.mutable_capacity_range()->set_limit_bytes(2 * kMiB);
  EXPECT_EQ(MustCreate(req).capacity_bytes(), 2 * kMiB);
}

TEST_F(ControllerTest, CreateVolumeCapacityRangeErrors) {
  v1::CreateVolumeResponse resp;
  auto req = VolumeRequest("range-bad", 2 * kMiB);
  req.mutable_capacity_range()->set_limit_bytes(kMiB);
  EXPECT_EQ(Create(req, &resp).error_code(), StatusCode::INVALID_ARGUMENT);
  // No 4 KiB multiple in [5000, 6000].
  req = VolumeRequest("range-no-block", 5000);
  req.mutable_capacity_range()->set_limit_bytes(6000);
  grpc::Status s = Create(req, &resp);
  EXPECT_EQ(s.error_code(), StatusCode::OUT_OF_RANGE) << s.error_message();
  req = VolumeRequest("range-negative", -1);
  req.mutable_capacity_range()->set_required_bytes(-1);
  EXPECT_EQ(Create(req, &resp).error_code(), StatusCode::INVALID_ARGUMENT);
}

// ---- CreateVolume: idempotency ----

TEST_F(ControllerTest, CreateVolumeIdempotentByName) {
  auto req = VolumeRequest("idem-1", 4 * kMiB);
  (*req.mutable_parameters())["maxIops"] = "1000";
  v1::Volume a = MustCreate(req);
  v1::CreateVolumeResponse again;
  ASSERT_TRUE(C().CreateVolume(Ctx().get(), req, &again).ok());
  EXPECT_EQ(again.volume().volume_id(), a.volume_id());
  EXPECT_EQ(again.volume().capacity_bytes(), a.capacity_bytes());
  EXPECT_EQ(NodeOf(again.volume()), NodeOf(a));
  // A retry that prefers the other node still finds the first one (searched on every node).
  std::string other = NodeOf(a) == "node-a" ? "node-b" : "node-a";
  auto pref = req;
  *pref.mutable_accessibility_requirements()->add_preferred() = NodeTopology(other);
  ASSERT_TRUE(C().CreateVolume(Ctx().get(), pref, &again).ok());
  EXPECT_EQ(again.volume().volume_id(), a.volume_id());
  // ...but not one that requires the other node.
  auto reqd = req;
  *reqd.mutable_accessibility_requirements()->add_requisite() = NodeTopology(other);
  EXPECT_EQ(C().CreateVolume(Ctx().get(), reqd, &again).error_code(), StatusCode::ALREADY_EXISTS);
  // Same name, incompatible size.
  auto big = VolumeRequest("idem-1", 8 * kMiB);
  (*big.mutable_parameters())["maxIops"] = "1000";
  grpc::Status s = C().CreateVolume(Ctx().get(), big, &again);
  EXPECT_EQ(s.error_code(), StatusCode::ALREADY_EXISTS) << s.error_message();
  // Same name, other QoS.
  auto qos = req;
  (*qos.mutable_parameters())["maxIops"] = "2000";
  EXPECT_EQ(C().CreateVolume(Ctx().get(), qos, &again).error_code(), StatusCode::ALREADY_EXISTS);
  // A long CSI name (not a valid pool name) maps to a stable hashed pool name.
  std::string long_name(128, 'x');
  long_name[0] = 'P';
  long_name[5] = '/';
  auto ln = VolumeRequest(long_name, kMiB);
  v1::Volume l1 = MustCreate(ln);
  ASSERT_TRUE(C().CreateVolume(Ctx().get(), ln, &again).ok());
  EXPECT_EQ(again.volume().volume_id(), l1.volume_id());
  EXPECT_LE(l1.volume_id().size(), 128u);
}

// ---- CreateVolume: capabilities and parameters ----

TEST_F(ControllerTest, CreateVolumeAccessModesAndTypes) {
  int i = 0;
  for (Mode::Mode m : {Mode::SINGLE_NODE_WRITER, Mode::SINGLE_NODE_SINGLE_WRITER,
                       Mode::SINGLE_NODE_MULTI_WRITER, Mode::SINGLE_NODE_READER_ONLY}) {
    auto req = VolumeRequest("mode-ok-" + std::to_string(i++), kMiB);
    req.clear_volume_capabilities();
    *req.add_volume_capabilities() = MountCap(m, "xfs");
    *req.add_volume_capabilities() = BlockCap(m);
    MustCreate(req);
  }
  for (Mode::Mode m : {Mode::MULTI_NODE_READER_ONLY, Mode::MULTI_NODE_SINGLE_WRITER,
                       Mode::MULTI_NODE_MULTI_WRITER, Mode::UNKNOWN}) {
    auto req = VolumeRequest("mode-bad", kMiB);
    *req.add_volume_capabilities() = BlockCap(m);
    v1::CreateVolumeResponse resp;
    grpc::Status s = Create(req, &resp);
    EXPECT_EQ(s.error_code(), StatusCode::INVALID_ARGUMENT) << Mode::Mode_Name(m);
    if (m != Mode::UNKNOWN) {
      EXPECT_NE(s.error_message().find("MULTI_NODE"), std::string::npos);
    }
  }
  v1::CreateVolumeResponse resp;
  auto req = VolumeRequest("no-caps", kMiB);
  req.clear_volume_capabilities();
  EXPECT_EQ(Create(req, &resp).error_code(), StatusCode::INVALID_ARGUMENT);
  req = VolumeRequest("", kMiB);
  EXPECT_EQ(Create(req, &resp).error_code(), StatusCode::INVALID_ARGUMENT);
  req = VolumeRequest("bad-fs", kMiB);
  req.clear_volume_capabilities();
  *req.add_volume_capabilities() = MountCap(Mode::SINGLE_NODE_WRITER, "ntfs");
  EXPECT_EQ(Create(req, &resp).error_code(), StatusCode::INVALID_ARGUMENT);
  req = VolumeRequest("no-access-type", kMiB);
  req.mutable_volume_capabilities(0)->clear_mount();
  EXPECT_EQ(Create(req, &resp).error_code(), StatusCode::INVALID_ARGUMENT);
}

TEST_F(ControllerTest, CreateVolumeStorageClassParameters) {
  auto req = VolumeRequest("qos-params", 2 * kGiB / 2);
  (*req.mutable_parameters())["maxReadIops"] = "700";
  (*req.mutable_parameters())["maxWriteBps"] = "10Mi";
  (*req.mutable_parameters())["iopsPerGiB"] = "50";
  (*req.mutable_parameters())["csi.storage.k8s.io/pvc/name"] = "ignored";
  v1::Volume v = MustCreate(req);
  grpc::Status st;
  dp::Volume pv = PoolVolume(NodeOf(v), PoolName(v.volume_id()), &st);
  ASSERT_TRUE(st.ok()) << st.error_message();
  EXPECT_EQ(pv.qos().max_read_iops(), 700u);
  EXPECT_EQ(pv.qos().max_write_bps(), 10u * kMiB);
  EXPECT_EQ(pv.qos().iops_per_gib(), 50u);
  EXPECT_EQ(pv.qos().max_iops(), 0u);

  v1::CreateVolumeResponse resp;
  auto bad = VolumeRequest("qos-bad-key", kMiB);
  (*bad.mutable_parameters())["maxIOPS"] = "5";
  grpc::Status s = Create(bad, &resp);
  EXPECT_EQ(s.error_code(), StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(s.error_message().find("maxIOPS"), std::string::npos) << s.error_message();
  EXPECT_NE(s.error_message().find("maxIops"), std::string::npos) << "lists the known keys";
  bad = VolumeRequest("qos-bad-value", kMiB);
  (*bad.mutable_parameters())["maxBps"] = "fast";
  s = Create(bad, &resp);
  EXPECT_EQ(s.error_code(), StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(s.error_message().find("fast"), std::string::npos) << s.error_message();
}

// ---- CreateVolume: topology and room ----

TEST_F(ControllerTest, TopologyPreferredBeforeRequisite) {
  for (const char* first : {"node-a", "node-b"}) {
    std::string other = std::string(first) == "node-a" ? "node-b" : "node-a";
    auto req = VolumeRequest(std::string("topo-pref-") + first, kMiB);
    auto* ar = req.mutable_accessibility_requirements();
    *ar->add_requisite() = NodeTopology(other);
    *ar->add_requisite() = NodeTopology(first);
    *ar->add_preferred() = NodeTopology(first);
    v1::Volume v = MustCreate(req);
    EXPECT_EQ(NodeOf(v), first);
    ASSERT_EQ(v.accessible_topology_size(), 1);
    EXPECT_EQ(v.accessible_topology(0).segments().at(csi::kTopologyKey), first);
    EXPECT_EQ(v.volume_id().rfind(std::string("v1:") + first + ":", 0), 0u) << v.volume_id();
  }
  // Requisite alone: its order decides.
  auto req = VolumeRequest("topo-req-order", kMiB);
  *req.mutable_accessibility_requirements()->add_requisite() = NodeTopology("node-b");
  *req.mutable_accessibility_requirements()->add_requisite() = NodeTopology("node-a");
  EXPECT_EQ(NodeOf(MustCreate(req)), "node-b");
  // Preferred alone: a preference, not a bound.
  req = VolumeRequest("topo-pref-only", kMiB);
  *req.mutable_accessibility_requirements()->add_preferred() = NodeTopology("node-a");
  EXPECT_EQ(NodeOf(MustCreate(req)), "node-a");
}

TEST_F(ControllerTest, TopologyErrors) {
  v1::CreateVolumeResponse resp;
  // The only allowed node never registered: UNAVAILABLE, so the provisioner retries.
  auto req = VolumeRequest("topo-ghost", kMiB);
  *req.mutable_accessibility_requirements()->add_requisite() = NodeTopology("node-z");
  grpc::Status s = Create(req, &resp);
  EXPECT_EQ(s.error_code(), StatusCode::UNAVAILABLE) << s.error_message();
  // A segment key that is not ours.
  req = VolumeRequest("topo-badkey", kMiB);
  v1::Topology t;
  (*t.mutable_segments())["kubernetes.io/hostname"] = "node-a";
  *req.mutable_accessibility_requirements()->add_requisite() = t;
  EXPECT_EQ(Create(req, &resp).error_code(), StatusCode::INVALID_ARGUMENT);
}

TEST_F(ControllerTest, ResourceExhaustedAndSpillOver) {
  v1::CreateVolumeResponse resp;
  // Bigger than any pool.
  grpc::Status s = Create(VolumeRequest("too-big", 5 * kGiB), &resp);
  EXPECT_EQ(s.error_code(), StatusCode::RESOURCE_EXHAUSTED) << s.error_message();
  // Fill node-a, then a volume bound to node-a does not fit while an unbound one lands on b.
  int64_t room = Capacity("node-a");
  ASSERT_GT(room, 2 * kGiB);
  auto fill = VolumeRequest("fill-a", room - 64 * kMiB);
  *fill.mutable_accessibility_requirements()->add_requisite() = NodeTopology("node-a");
  MustCreate(fill);
  auto bound = VolumeRequest("bound-a", 512 * kMiB);
  *bound.mutable_accessibility_requirements()->add_requisite() = NodeTopology("node-a");
  s = Create(bound, &resp);
  EXPECT_EQ(s.error_code(), StatusCode::RESOURCE_EXHAUSTED) << s.error_message();
  // Preferring a full node spills over to the other even before a heartbeat reports it full
  // (the datapath's own ENOSPC moves placement on).
  auto pref = VolumeRequest("pref-a", 512 * kMiB);
  *pref.mutable_accessibility_requirements()->add_preferred() = NodeTopology("node-a");
  EXPECT_EQ(NodeOf(MustCreate(pref)), "node-b");
  WaitHeartbeats();
  EXPECT_LT(Capacity("node-a"), 512 * kMiB);
}

TEST_F(ControllerTest, UnboundBurstSpreadsAcrossNodes) {
  WaitHeartbeats();  // both pools empty again, as the registry sees them
  // Six volumes well within one heartbeat: placement must not pile them on the node that looked
  // roomiest at the last heartbeat.
  std::map<std::string, int> per_node;
  for (int i = 0; i < 6; ++i) {
    per_node[NodeOf(MustCreate(VolumeRequest("burst-" + std::to_string(i), 64 * kMiB)))]++;
  }
  EXPECT_GE(per_node["node-a"], 2);
  EXPECT_GE(per_node["node-b"], 2);
}

// ---- DeleteVolume ----

TEST_F(ControllerTest, DeleteVolumeIdempotent) {
  v1::Volume v = MustCreate(VolumeRequest("del-1", kMiB));
  EXPECT_TRUE(DeleteVolume(v.volume_id()).ok());
  grpc::Status st;
  PoolVolume(NodeOf(v), PoolName(v.volume_id()), &st);
  EXPECT_EQ(st.error_code(), StatusCode::NOT_FOUND);
  EXPECT_TRUE(DeleteVolume(v.volume_id()).ok()) << "second delete";
  EXPECT_TRUE(DeleteVolume("not-an-id").ok()) << "malformed ids name nothing";
  EXPECT_EQ(DeleteVolume("").error_code(), StatusCode::INVALID_ARGUMENT);
  // A well-formed id on a node that is not registered: retry later, never "done".
  EXPECT_EQ(DeleteVolume("v1:node-z:pvc-1").error_code(), StatusCode::UNAVAILABLE);
}

// ---- ValidateVolumeCapabilities, GetVolume, Publish ----

TEST_F(ControllerTest, ValidateVolumeCapabilities) {
  v1::Volume v = MustCreate(VolumeRequest("validate-1", kMiB));
  v1::ValidateVolumeCapabilitiesRequest r;
  r.set_volume_id(v.volume_id());
  *r.add_volume_capabilities() = MountCap();
  *r.add_volume_capabilities() = BlockCap(Mode::SINGLE_NODE_READER_ONLY);
  (*r.mutable_parameters())["maxIops"] = "5";
  v1::ValidateVolumeCapabilitiesResponse resp;
  ASSERT_TRUE(C().ValidateVolumeCapabilities(Ctx().get(), r, &resp).ok());
  ASSERT_TRUE(resp.has_confirmed());
  EXPECT_EQ(resp.confirmed().volume_capabilities_size(), 2);
  EXPECT_EQ(resp.confirmed().parameters().at("maxIops"), "5");

  *r.add_volume_capabilities() = BlockCap(Mode::MULTI_NODE_MULTI_WRITER);
  resp.Clear();
  ASSERT_TRUE(C().ValidateVolumeCapabilities(Ctx().get(), r, &resp).ok());
  EXPECT_FALSE(resp.has_confirmed());
  EXPECT_NE(resp.message().find("MULTI_NODE_MULTI_WRITER"), std::string::npos);

  r.set_volume_id("v1:node-a:nope");
  EXPECT_EQ(C().ValidateVolumeCapabilities(Ctx().get(), r, &resp).error_code(),
            StatusCode::NOT_FOUND);
  r.set_volume_id("garbage");
  EXPECT_EQ(C().ValidateVolumeCapabilities(Ctx().get(), r, &resp).error_code(),
            StatusCode::NOT_FOUND);
  r.set_volume_id(v.volume_id());
  r.clear_volume_capabilities();
  EXPECT_EQ(C().ValidateVolumeCapabilities(Ctx().get(), r, &resp).error_code(),
            StatusCode::INVALID_ARGUMENT);
}

TEST_F(ControllerTest, ControllerGetVolumeAndCapabilities) {
  v1::Volume v = MustCreate(VolumeRequest("getvol-1", 3 * kMiB));
  v1::ControllerGetVolumeRequest r;
  r.set_volume_id(v.volume_id());
  v1::ControllerGetVolumeResponse resp;
  ASSERT_TRUE(C().ControllerGetVolume(Ctx().get(), r, &resp).ok());
  EXPECT_EQ(resp.volume().volume_id(), v.volume_id());
  EXPECT_EQ(resp.volume().capacity_bytes(), 3 * kMiB);
  EXPECT_FALSE(resp.status().volume_condition().abnormal());
  r.set_volume_id("v1:node-b:missing");
  EXPECT_EQ(C().ControllerGetVolume(Ctx().get(), r, &resp).error_code(), StatusCode::NOT_FOUND);
  r.set_volume_id("");
  EXPECT_EQ(C().ControllerGetVolume(Ctx().get(), r, &resp).error_code(),
            StatusCode::INVALID_ARGUMENT);

  v1::ControllerGetCapabilitiesResponse caps;
  ASSERT_TRUE(C().ControllerGetCapabilities(Ctx().get(), {}, &caps).ok());
  std::set<int> have;
  for (const auto& c : caps.capabilities()) have.insert(c.rpc().type());
  using T = v1::ControllerServiceCapability::RPC;
  for (auto t : {T::CREATE_DELETE_VOLUME, T::LIST_VOLUMES, T::GET_CAPACITY,
                 T::CREATE_DELETE_SNAPSHOT, T::LIST_SNAPSHOTS, T::CLONE_VOLUME, T::EXPAND_VOLUME,
                 T::VOLUME_CONDITION, T::GET_VOLUME, T::SINGLE_NODE_MULTI_WRITER,
                 T::MODIFY_VOLUME}) {
    EXPECT_TRUE(have.count(t)) << T::Type_Name(t);
  }
  EXPECT_FALSE(have.count(T::PUBLISH_UNPUBLISH_VOLUME));

  v1::ControllerPublishVolumeRequest pr;
  pr.set_volume_id(v.volume_id());
  pr.set_node_id("node-a");
  v1::ControllerPublishVolumeResponse presp;
  EXPECT_EQ(C().ControllerPublishVolume(Ctx().get(), pr, &presp).error_code(),
            StatusCode::UNIMPLEMENTED);
  v1::ControllerUnpublishVolumeRequest ur;
  v1::ControllerUnpublishVolumeResponse uresp;
  EXPECT_EQ(C().ControllerUnpublishVolume(Ctx().get(), ur, &uresp).error_code(),
            StatusCode::UNIMPLEMENTED);
}

// ---- ListVolumes ----

TEST_F(ControllerTest, ListVolumesPagination) {
  std::set<std::string> mine;
  for (int i = 0; i < 5; ++i) {
    auto req = VolumeRequest("page-" + std::to_string(i), kMiB);
    *req.mutable_accessibility_requirements()->add_requisite() =
        NodeTopology(i % 2 ? "node-a" : "node-b");
    mine.insert(MustCreate(req).volume_id());
  }
  v1::ListVolumesResponse all;
  ASSERT_TRUE(C().ListVolumes(Ctx().get(), {}, &all).ok());
  EXPECT_TRUE(all.next_token().empty());
  std::vector<std::string> ids;
  for (const auto& e : all.entries()) {
    ids.push_back(e.volume().volume_id());
    EXPECT_FALSE(e.status().volume_condition().abnormal());
  }
  EXPECT_TRUE(std::is_sorted(ids.begin(), ids.end()));
  for (const auto& id : mine) EXPECT_NE(std::find(ids.begin(), ids.end(), id), ids.end());

  // Pages of 2 walk the same list without loss or duplicates.
  std::vector<std::string> paged;
  std::string token;
  int pages = 0;
  do {
    v1::ListVolumesRequest r;
    r.set_max_entries(2);
    r.set_starting_token(token);
    v1::ListVolumesResponse resp;
    ASSERT_TRUE(C().ListVolumes(Ctx().get(), r, &resp).ok());
    ASSERT_LE(resp.entries_size(), 2);
    for (const auto& e : resp.entries()) paged.push_back(e.volume().volume_id());
    token = resp.next_token();
    ASSERT_LT(++pages, 100);
  } while (!token.empty());
  EXPECT_EQ(paged, ids);

  // A token stays valid when the last volume of its page is deleted.
  v1::ListVolumesRequest r;
  r.set_max_entries(2);
  v1::ListVolumesResponse first;
  ASSERT_TRUE(C().ListVolumes(Ctx().get(), r, &first).ok());
  ASSERT_FALSE(first.next_token().empty());
  std::string last = first.entries(1).volume().volume_id();
  if (mine.count(last)) {
    ASSERT_TRUE(DeleteVolume(last).ok());
    r.set_starting_token(first.next_token());
    r.set_max_entries(0);
    v1::ListVolumesResponse rest;
    ASSERT_TRUE(C().ListVolumes(Ctx().get(), r, &rest).ok());
    EXPECT_EQ(static_cast<size_t>(rest.entries_size()), ids.size() - 2);
  }

  v1::ListVolumesResponse resp;
  r.set_starting_token("invalid-token");
  EXPECT_EQ(C().ListVolumes(Ctx().get(), r, &resp).error_code(), StatusCode::ABORTED);
  r.set_starting_token("p1.zz");
  EXPECT_EQ(C().ListVolumes(Ctx().get(), r, &resp).error_code(), StatusCode::ABORTED);
  r.set_starting_token("");
  r.set_max_entries(-1);
  EXPECT_EQ(C().ListVolumes(Ctx().get(), r, &resp).error_code(), StatusCode::INVALID_ARGUMENT);
}

// ---- GetCapacity ----

TEST_F(ControllerTest, GetCapacity) {
  WaitHeartbeats();  // earlier tests' deletions reach the registry with the next heartbeat
  int64_t a = Capacity("node-a"), b = Capacity("node-b");
  EXPECT_GT(a, 3 * kGiB);
  EXPECT_LE(a, 4 * kGiB);
  EXPECT_EQ(Capacity(""), std::max(a, b)) << "no segment: the largest single node";
  EXPECT_EQ(Capacity("node-z"), 0);

  auto req = VolumeRequest("cap-1", 256 * kMiB);
  *req.mutable_accessibility_requirements()->add_requisite() = NodeTopology("node-b");
  MustCreate(req);
  WaitHeartbeats();
  EXPECT_EQ(Capacity("node-b"), b - 256 * kMiB);

  v1::GetCapacityRequest r;
  *r.mutable_accessible_topology() = NodeTopology("node-a");
  v1::GetCapacityResponse resp;
  ASSERT_TRUE(C().GetCapacity(Ctx().get(), r, &resp).ok());
  EXPECT_TRUE(resp.has_maximum_volume_size());
  EXPECT_EQ(resp.maximum_volume_size().value(), resp.available_capacity());
  *r.add_volume_capabilities() = BlockCap(Mode::MULTI_NODE_MULTI_WRITER);
  ASSERT_TRUE(C().GetCapacity(Ctx().get(), r, &resp).ok());
  EXPECT_EQ(resp.available_capacity(), 0);
  r.clear_volume_capabilities();
  (*r.mutable_parameters())["bogus"] = "1";
  EXPECT_EQ(C().GetCapacity(Ctx().get(), r, &resp).error_code(), StatusCode::INVALID_ARGUMENT);
}

// ---- Snapshots, restore, clone ----

// Writes `byte` over the first 64 KiB of a pool volume through the datapath's NBD socket.
bool WritePattern(const std::string& dir, const std::string& node, const std::string& vol,
                  char byte) {
  std::string cmd = "PATH=/usr/bin:/bin /usr/bin/nbdsh -u 'nbd+unix:///" + vol + "?socket=" + dir + "/" + node +
                    "-nbd.sock' -c 'h.pwrite(b\"" + std::string(1, byte) +
                    "\" * 65536, 0); h.flush()' 2>&1";
  return std::system(cmd.c_str()) == 0;
}
std::string ReadPattern(const std::string& dir, const std::string& node, const std::string& vol) {
  std::string cmd = "PATH=/usr/bin:/bin /usr/bin/nbdsh -u 'nbd+unix:///" + vol + "?socket=" + dir + "/" + node +
                    "-nbd.sock' -c 'b = h.pread(65536, 0); print(chr(b[0]) if b == b[:1] * "
                    "65536 else \"mixed\")' 2>&1";
  FILE* p = popen(cmd.c_str(), "r");
  if (!p) return "";
  char buf[256] = {};
  size_t n = fread(buf, 1, sizeof(buf) - 1, p);
  pclose(p);
  std::string s(buf, n);
  while (!s.empty() && s.back() == '\n') s.pop_back();
  return s;
}

TEST_F(ControllerTest, SnapshotRestoreClone) {
  auto req = VolumeRequest("snap-src", 4 * kMiB);
  *req.mutable_accessibility_requirements()->add_requisite() = NodeTopology("node-b");
  v1::Volume src = MustCreate(req);
  const std::string dir = cluster_->dir();
  ASSERT_TRUE(WritePattern(dir, "node-b", PoolName(src.volume_id()), 'A'));

  v1::Snapshot snap;
  grpc::Status s = Snapshot("snap-1", src.volume_id(), &snap);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(snap.source_volume_id(), src.volume_id());
  EXPECT_EQ(snap.size_bytes(), 4 * kMiB);
  EXPECT_GT(snap.creation_time().seconds(), 0);
  EXPECT_EQ(snap.snapshot_id().rfind("s1:node-b:", 0), 0u) << snap.snapshot_id();
  ASSERT_TRUE(WaitSnapshotReady(snap.snapshot_id()));
  // The snapshot holds 'A'; the volume moves on.
  ASSERT_TRUE(WritePattern(dir, "node-b", PoolName(src.volume_id()), 'B'));

  // Idempotent by name; the same name from another source is ALREADY_EXISTS.
  v1::Snapshot again;
  ASSERT_TRUE(Snapshot("snap-1", src.volume_id(), &again).ok());
  EXPECT_EQ(again.snapshot_id(), snap.snapshot_id());
  EXPECT_EQ(again.creation_time().seconds(), snap.creation_time().seconds());
  v1::Volume other = MustCreate(VolumeRequest("snap-other", kMiB));
  EXPECT_EQ(Snapshot("snap-1", other.volume_id(), &again).error_code(), StatusCode::ALREADY_EXISTS);
  EXPECT_EQ(Snapshot("snap-x", "v1:node-a:missing", &again).error_code(), StatusCode::NOT_FOUND);
  EXPECT_EQ(Snapshot("snap-x", "garbage", &again).error_code(), StatusCode::NOT_FOUND);
  EXPECT_EQ(Snapshot("", src.volume_id(), &again).error_code(), StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(Snapshot("snap-x", "", &again).error_code(), StatusCode::INVALID_ARGUMENT);

  // Restore: on the snapshot's node, bigger than the snapshot, content of the snapshot.
  auto rreq = VolumeRequest("restore-1", 8 * kMiB);
  rreq.mutable_volume_content_source()->mutable_snapshot()->set_snapshot_id(snap.snapshot_id());
  v1::Volume restored = MustCreate(rreq);
  EXPECT_EQ(NodeOf(restored), "node-b");
  EXPECT_EQ(restored.capacity_bytes(), 8 * kMiB);
  EXPECT_EQ(restored.content_source().snapshot().snapshot_id(), snap.snapshot_id());
  // Idempotent with its source.
  v1::CreateVolumeResponse cresp;
  ASSERT_TRUE(C().CreateVolume(Ctx().get(), rreq, &cresp).ok());
  EXPECT_EQ(cresp.volume().volume_id(), restored.volume_id());
  WaitUntil([&] {  // a copy restore becomes readable once filled
    grpc::Status st;
    return PoolVolume("node-b", PoolName(restored.volume_id()), &st).ready();
  });
  EXPECT_EQ(ReadPattern(dir, "node-b", PoolName(restored.volume_id())), "A");
  // Without a size: the snapshot's.
  auto r0 = VolumeRequest("restore-nosize", 0);
  r0.mutable_volume_content_source()->mutable_snapshot()->set_snapshot_id(snap.snapshot_id());
  EXPECT_EQ(MustCreate(r0).capacity_bytes(), 4 * kMiB);
  // Smaller than the source cannot hold it.
  auto rs = VolumeRequest("restore-small", kMiB);
  rs.mutable_capacity_range()->set_limit_bytes(kMiB);
  rs.mutable_volume_content_source()->mutable_snapshot()->set_snapshot_id(snap.snapshot_id());
  EXPECT_EQ(Create(rs, &cresp).error_code(), StatusCode::OUT_OF_RANGE);
  // Another node is refused with a clear message.
  auto rx = VolumeRequest("restore-elsewhere", 4 * kMiB);
  rx.mutable_volume_content_source()->mutable_snapshot()->set_snapshot_id(snap.snapshot_id());
  *rx.mutable_accessibility_requirements()->add_requisite() = NodeTopology("node-a");
  s = Create(rx, &cresp);
  EXPECT_EQ(s.error_code(), StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(s.error_message().find("node-b"), std::string::npos) << s.error_message();
  // Unknown snapshot.
  auto ru = VolumeRequest("restore-unknown", kMiB);
  ru.mutable_volume_content_source()->mutable_snapshot()->set_snapshot_id("s1:node-b:nope");
  EXPECT_EQ(Create(ru, &cresp).error_code(), StatusCode::NOT_FOUND);
  ru.mutable_volume_content_source()->mutable_snapshot()->set_snapshot_id("non-existing-id");
  EXPECT_EQ(Create(ru, &cresp).error_code(), StatusCode::NOT_FOUND);
  // The same name with another source is a different volume.
  auto rdiff = VolumeRequest("restore-1", 8 * kMiB);
  EXPECT_EQ(Create(rdiff, &cresp).error_code(), StatusCode::ALREADY_EXISTS);

  // Clone: the live volume's content now ('B').
  auto clreq = VolumeRequest("clone-1", 4 * kMiB);
  clreq.mutable_volume_content_source()->mutable_volume()->set_volume_id(src.volume_id());
  v1::Volume clone = MustCreate(clreq);
  EXPECT_EQ(NodeOf(clone), "node-b");
  WaitUntil([&] {
    grpc::Status st;
    return PoolVolume("node-b", PoolName(clone.volume_id()), &st).ready();
  });
  EXPECT_EQ(ReadPattern(dir, "node-b", PoolName(clone.volume_id())), "B");
  auto cu = VolumeRequest("clone-unknown", kMiB);
  cu.mutable_volume_content_source()->mutable_volume()->set_volume_id("v1:node-b:nope");
  EXPECT_EQ(Create(cu, &cresp).error_code(), StatusCode::NOT_FOUND);

  // ListSnapshots: by id, by source, everything, paginated.
  v1::Snapshot snap2;
  ASSERT_TRUE(Snapshot("snap-2", src.volume_id(), &snap2).ok());
  v1::Snapshot snap3;
  ASSERT_TRUE(Snapshot("snap-3", other.volume_id(), &snap3).ok());
  v1::ListSnapshotsRequest lr;
  v1::ListSnapshotsResponse lresp;
  lr.set_snapshot_id(snap2.snapshot_id());
  ASSERT_TRUE(C().ListSnapshots(Ctx().get(), lr, &lresp).ok());
  ASSERT_EQ(lresp.entries_size(), 1);
  EXPECT_EQ(lresp.entries(0).snapshot().snapshot_id(), snap2.snapshot_id());
  lr.Clear();
  lr.set_source_volume_id(src.volume_id());
  lresp.Clear();
  ASSERT_TRUE(C().ListSnapshots(Ctx().get(), lr, &lresp).ok());
  EXPECT_EQ(lresp.entries_size(), 2);
  for (const auto& e : lresp.entries()) {
    EXPECT_EQ(e.snapshot().source_volume_id(), src.volume_id());
  }
  lr.Clear();
  lr.set_source_volume_id(other.volume_id());
  lr.set_snapshot_id(snap2.snapshot_id());
  lresp.Clear();
  ASSERT_TRUE(C().ListSnapshots(Ctx().get(), lr, &lresp).ok());
  EXPECT_EQ(lresp.entries_size(), 0) << "both filters apply";
  for (const char* bad : {"none-exist-id", "s1:node-a:none"}) {
    lr.Clear();
    lr.set_snapshot_id(bad);
    lresp.Clear();
    ASSERT_TRUE(C().ListSnapshots(Ctx().get(), lr, &lresp).ok()) << bad;
    EXPECT_EQ(lresp.entries_size(), 0) << bad;
  }
  // A node nobody can ask: UNAVAILABLE (an empty list would read as "deleted").
  lr.Clear();
  lr.set_snapshot_id("s1:node-z:none");
  EXPECT_EQ(C().ListSnapshots(Ctx().get(), lr, &lresp).error_code(), StatusCode::UNAVAILABLE);
  lr.Clear();
  lr.set_source_volume_id("v1:node-z:vol");
  EXPECT_EQ(C().ListSnapshots(Ctx().get(), lr, &lresp).error_code(), StatusCode::UNAVAILABLE);
  lr.Clear();
  lr.set_max_entries(1);
  std::vector<std::string> paged;
  do {
    lresp.Clear();
    ASSERT_TRUE(C().ListSnapshots(Ctx().get(), lr, &lresp).ok());
    for (const auto& e : lresp.entries()) paged.push_back(e.snapshot().snapshot_id());
    lr.set_starting_token(lresp.next_token());
  } while (!lresp.next_token().empty());
  EXPECT_EQ(paged.size(), 3u);
  EXPECT_TRUE(std::is_sorted(paged.begin(), paged.end()));
  lr.set_starting_token("bad");
  EXPECT_EQ(C().ListSnapshots(Ctx().get(), lr, &lresp).error_code(), StatusCode::ABORTED);

  // DeleteSnapshot: idempotent; restored volumes outlive their snapshot.
  EXPECT_TRUE(DeleteSnapshot(snap.snapshot_id()).ok());
  EXPECT_TRUE(DeleteSnapshot(snap.snapshot_id()).ok());
  EXPECT_TRUE(DeleteSnapshot("reallyfakesnapshotid").ok());
  EXPECT_EQ(DeleteSnapshot("").error_code(), StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(DeleteSnapshot("s1:node-z:x").error_code(), StatusCode::UNAVAILABLE);
  EXPECT_EQ(ReadPattern(dir, "node-b", PoolName(restored.volume_id())), "A");
  // A retry of the restore after its snapshot is gone still finds the volume it made.
  cresp.Clear();
  s = C().CreateVolume(Ctx().get(), rreq, &cresp);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(cresp.volume().volume_id(), restored.volume_id());
  EXPECT_EQ(cresp.volume().content_source().snapshot().snapshot_id(), snap.snapshot_id());
  // A new restore from it is NOT_FOUND.
  auto gone = VolumeRequest("restore-gone", 4 * kMiB);
  gone.mutable_volume_content_source()->mutable_snapshot()->set_snapshot_id(snap.snapshot_id());
  EXPECT_EQ(Create(gone, &cresp).error_code(), StatusCode::NOT_FOUND);
}

// ---- Expand ----

TEST_F(ControllerTest, ControllerExpandVolume) {
  v1::Volume v = MustCreate(VolumeRequest("expand-1", 4 * kMiB));
  v1::ControllerExpandVolumeRequest r;
  r.set_volume_id(v.volume_id());
  r.mutable_capacity_range()->set_required_bytes(10 * kMiB + 1);
  v1::ControllerExpandVolumeResponse resp;
  ASSERT_TRUE(C().ControllerExpandVolume(Ctx().get(), r, &resp).ok());
  EXPECT_EQ(resp.capacity_bytes(), 10 * kMiB + 4096);
  EXPECT_TRUE(resp.node_expansion_required());
  grpc::Status st;
  EXPECT_EQ(PoolVolume(NodeOf(v), PoolName(v.volume_id()), &st).size_bytes(),
            static_cast<uint64_t>(10 * kMiB + 4096));
  // Block volumes too: the attached device learns its size on the node.
  *r.mutable_volume_capability() = BlockCap();
  ASSERT_TRUE(C().ControllerExpandVolume(Ctx().get(), r, &resp).ok());
  EXPECT_TRUE(resp.node_expansion_required());
  // Smaller than now: already satisfied, nothing shrinks.
  r.mutable_capacity_range()->set_required_bytes(kMiB);
  ASSERT_TRUE(C().ControllerExpandVolume(Ctx().get(), r, &resp).ok());
  EXPECT_EQ(resp.capacity_bytes(), 10 * kMiB + 4096);
  // Errors.
  r.mutable_capacity_range()->set_required_bytes(100 * kGiB);
  EXPECT_EQ(C().ControllerExpandVolume(Ctx().get(), r, &resp).error_code(),
            StatusCode::RESOURCE_EXHAUSTED);
  r.mutable_capacity_range()->set_required_bytes(20 * kMiB);
  r.mutable_capacity_range()->set_limit_bytes(10 * kMiB);
  EXPECT_EQ(C().ControllerExpandVolume(Ctx().get(), r, &resp).error_code(),
            StatusCode::INVALID_ARGUMENT);
  r.clear_capacity_range();
  EXPECT_EQ(C().ControllerExpandVolume(Ctx().get(), r, &resp).error_code(),
            StatusCode::INVALID_ARGUMENT);
  r.mutable_capacity_range()->set_required_bytes(20 * kMiB);
  r.set_volume_id("v1:node-a:nope");
  EXPECT_EQ(C().ControllerExpandVolume(Ctx().get(), r, &resp).error_code(), StatusCode::NOT_FOUND);
  r.set_volume_id("");
  EXPECT_EQ(C().ControllerExpandVolume(Ctx().get(), r, &resp).error_code(),
            StatusCode::INVALID_ARGUMENT);
}

// ---- Modify (live QoS) ----

TEST_F(ControllerTest, ControllerModifyVolumeChangesQosLive) {
  auto req = VolumeRequest("modify-1", 4 * kMiB);
  (*req.mutable_parameters())["maxIops"] = "1000";
  (*req.mutable_parameters())["maxReadBps"] = "1Mi";
  v1::Volume v = MustCreate(req);
  v1::ControllerModifyVolumeRequest r;
  r.set_volume_id(v.volume_id());
  (*r.mutable_mutable_parameters())["maxWriteIops"] = "1500";
  (*r.mutable_mutable_parameters())["maxIops"] = "0";
  v1::ControllerModifyVolumeResponse resp;
  grpc::Status s = C().ControllerModifyVolume(Ctx().get(), r, &resp);
  ASSERT_TRUE(s.ok()) << s.error_message();
  // What an operator sees: nbdctl volume inspect -o json on the node.
  bool ok = false;
  std::string out =
      cluster_->Nbdctl(NodeOf(v), {"-o", "json", "volume", "inspect", PoolName(v.volume_id())}, &ok);
  ASSERT_TRUE(ok) << out;
  auto j = nlohmann::json::parse(out, nullptr, false);
  ASSERT_FALSE(j.is_discarded()) << out;
  auto qos = j.contains("volume") ? j["volume"]["qos"] : j["qos"];
  EXPECT_EQ(qos["max_write_iops"], 1500) << out;
  EXPECT_EQ(qos["max_iops"], 0) << out;
  EXPECT_EQ(qos["max_read_bps"], kMiB) << "untouched keys keep their value: " << out;

  (*r.mutable_mutable_parameters())["maxIOPS"] = "1";
  s = C().ControllerModifyVolume(Ctx().get(), r, &resp);
  EXPECT_EQ(s.error_code(), StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(s.error_message().find("maxIOPS"), std::string::npos);
  r.clear_mutable_parameters();
  (*r.mutable_mutable_parameters())["maxIops"] = "10";
  r.set_volume_id("v1:node-a:nope");
  EXPECT_EQ(C().ControllerModifyVolume(Ctx().get(), r, &resp).error_code(), StatusCode::NOT_FOUND);
  r.set_volume_id("");
  EXPECT_EQ(C().ControllerModifyVolume(Ctx().get(), r, &resp).error_code(),
            StatusCode::INVALID_ARGUMENT);
}

// ---- concurrency: a second call on the same id is ABORTED ----

// Every thread of `pid` is in the stopped state ('T' in /proc/PID/task/TID/stat).
bool AllThreadsStopped(pid_t pid) {
  const std::string dir = "/proc/" + std::to_string(pid) + "/task";
  std::error_code ec;
  int threads = 0;
  for (const auto& t : std::filesystem::directory_iterator(dir, ec)) {
    std::ifstream in(t.path() / "stat");
    std::string stat((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    // The state follows the command name, which is in parentheses and may hold spaces.
    const size_t close = stat.rfind(')');
    if (close == std::string::npos || close + 2 >= stat.size()) return false;
    if (stat[close + 2] != 'T' && stat[close + 2] != 't') return false;
    ++threads;
  }
  return !ec && threads > 0;
}

// Bytes waiting unread on the established TCP connections whose local port is `port` (the
// rx_queue column of /proc/net/tcp and tcp6): what a stopped process has been sent there.
uint64_t UnreadBytesAt(int port) {
  uint64_t total = 0;
  for (const char* table : {"/proc/net/tcp", "/proc/net/tcp6"}) {
    std::ifstream in(table);
    std::string line;
    std::getline(in, line);  // the header
    while (std::getline(in, line)) {
      std::istringstream fields(line);
      std::string slot, local, remote, state, queues;
      if (!(fields >> slot >> local >> remote >> state >> queues)) continue;
      const size_t colon = local.rfind(':'), sep = queues.find(':');
      if (colon == std::string::npos || sep == std::string::npos || state != "01") continue;
      if (std::stoi(local.substr(colon + 1), nullptr, 16) != port) continue;
      total += std::stoull(queues.substr(sep + 1), nullptr, 16);
    }
  }
  return total;
}

TEST_F(ControllerTest, ConcurrentCallOnSameVolumeIsAborted) {
  auto req = VolumeRequest("busy-1", kMiB);
  *req.mutable_accessibility_requirements()->add_requisite() = NodeTopology("node-b");
  v1::Volume v = MustCreate(req);
  // Freeze node-b's datapath so the first call is parked inside the controller.
  pid_t dp = cluster_->datapath_pid(1);
  ASSERT_GT(dp, 0);
  ASSERT_EQ(kill(dp, SIGSTOP), 0);
  // kill() returns before every thread has stopped: one already running may still answer a call
  // (CI saw an expand answered 2 ms after the SIGSTOP). Wait until each thread is stopped.
  ASSERT_TRUE(WaitUntil([&] { return AllThreadsStopped(dp); }, 5s)) << "node-b did not stop";
  // Nothing else talks to node-b's API (the controller does not poll, and heartbeats go the other
  // way): what arrives there from now on is the first call's request.
  const int api_port = cluster_->api_port(1);
  const uint64_t unread_before = UnreadBytesAt(api_port);
  std::atomic<bool> done{false};
  grpc::Status first;
  std::thread t([&] {
    v1::ControllerExpandVolumeRequest r;
    r.set_volume_id(v.volume_id());
    r.mutable_capacity_range()->set_required_bytes(2 * kMiB);
    v1::ControllerExpandVolumeResponse resp;
    first = C().ControllerExpandVolume(Ctx().get(), r, &resp);
    done = true;
  });
  // The controller takes the volume's lock before it asks the node: once its request waits unread
  // in the frozen node's socket, the first call holds the lock.
  const bool asked = WaitUntil([&] { return UnreadBytesAt(api_port) > unread_before; }, 10s);
  grpc::Status second = DeleteVolume(v.volume_id());
  v1::ControllerModifyVolumeRequest mr;
  mr.set_volume_id(v.volume_id());
  v1::ControllerModifyVolumeResponse mresp;
  grpc::Status third = C().ControllerModifyVolume(Ctx().get(), mr, &mresp);
  // Another volume is not held up by the lock (only by the frozen node, so use node-a's).
  v1::CreateVolumeResponse cresp;
  auto other = VolumeRequest("busy-other", kMiB);
  *other.mutable_accessibility_requirements()->add_requisite() = NodeTopology("node-a");
  bool first_done_early = done.load();
  kill(dp, SIGCONT);
  t.join();
  ASSERT_TRUE(asked) << "the first call's request never reached node-b";
  EXPECT_FALSE(first_done_early);
  EXPECT_EQ(second.error_code(), StatusCode::ABORTED) << second.error_message();
  EXPECT_NE(second.error_message().find("already in progress"), std::string::npos);
  EXPECT_EQ(third.error_code(), StatusCode::ABORTED);
  EXPECT_TRUE(first.ok()) << first.error_message();
  // Once the first call finished the id is free again.
  EXPECT_TRUE(DeleteVolume(v.volume_id()).ok());
}

// ---- node loss and controller restart ----

TEST_F(ControllerTest, NodeLossIsUnavailableAndAbnormal) {
  auto req = VolumeRequest("loss-1", kMiB);
  *req.mutable_accessibility_requirements()->add_requisite() = NodeTopology("node-b");
  v1::Volume v = MustCreate(req);
  // The volume's entry in ListVolumes: what the health monitor sidecar reads.
  auto listed = [&](v1::ListVolumesResponse::Entry* out) {
    v1::ListVolumesResponse all;
    grpc::Status st = C().ListVolumes(Ctx().get(), {}, &all);
    EXPECT_TRUE(st.ok()) << st.error_message();
    for (const auto& e : all.entries()) {
      if (e.volume().volume_id() == v.volume_id()) {
        *out = e;
        return true;
      }
    }
    return false;
  };
  v1::ListVolumesResponse::Entry e;
  ASSERT_TRUE(listed(&e));  // the listing the controller keeps of node-b
  EXPECT_FALSE(e.status().volume_condition().abnormal()) << e.status().volume_condition().message();
  cluster_->StopDatapath(1, /*kill9=*/true);
  // Still registered (within its ttl) but not answering: listed, abnormal, from node-b's last
  // listing.
  ASSERT_TRUE(listed(&e));
  EXPECT_TRUE(e.status().volume_condition().abnormal());
  EXPECT_EQ(e.volume().capacity_bytes(), kMiB);
  EXPECT_EQ(e.status().volume_condition().message().rfind("node node-b unreachable: ", 0), 0u)
      << e.status().volume_condition().message();
  // The registry forgets node-b after its ttl (3 heartbeats): GetCapacity then has nothing for it.
  EXPECT_TRUE(WaitUntil([&] { return Capacity("node-b") == 0; }, 10s, 20ms));
  e.Clear();
  ASSERT_TRUE(listed(&e));
  EXPECT_TRUE(e.status().volume_condition().abnormal());
  EXPECT_EQ(e.status().volume_condition().message().rfind("node node-b unreachable: ", 0), 0u)
      << e.status().volume_condition().message();
  v1::CreateVolumeResponse cresp;
  auto again = VolumeRequest("loss-2", kMiB);
  *again.mutable_accessibility_requirements()->add_requisite() = NodeTopology("node-b");
  grpc::Status s = C().CreateVolume(Ctx().get(), again, &cresp);
  EXPECT_EQ(s.error_code(), StatusCode::UNAVAILABLE) << s.error_message();
  v1::ControllerGetVolumeRequest gr;
  gr.set_volume_id(v.volume_id());
  v1::ControllerGetVolumeResponse gresp;
  ASSERT_TRUE(C().ControllerGetVolume(Ctx().get(), gr, &gresp).ok());
  EXPECT_TRUE(gresp.status().volume_condition().abnormal());
  EXPECT_EQ(gresp.status().volume_condition().message().rfind("node node-b unreachable: ", 0), 0u)
      << gresp.status().volume_condition().message();
  EXPECT_EQ(gresp.volume().capacity_bytes(), kMiB);
  EXPECT_EQ(DeleteVolume(v.volume_id()).error_code(), StatusCode::UNAVAILABLE);
  EXPECT_EQ(Capacity("node-b"), 0);
  // Unbound volumes still find node-a.
  EXPECT_EQ(NodeOf(MustCreate(VolumeRequest("loss-3", kMiB))), "node-a");

  ASSERT_EQ(cluster_->StartDatapath(1), "");
  ASSERT_TRUE(cluster_->WaitRegistered("node-b", 5s)) << cluster_->LogTail("node-b");
  gresp.Clear();
  ASSERT_TRUE(C().ControllerGetVolume(Ctx().get(), gr, &gresp).ok());
  EXPECT_FALSE(gresp.status().volume_condition().abnormal())
      << gresp.status().volume_condition().message();
  e.Clear();
  ASSERT_TRUE(listed(&e));
  EXPECT_FALSE(e.status().volume_condition().abnormal()) << e.status().volume_condition().message();
}

TEST_F(ControllerTest, RegistryRebuildsAfterControllerRestart) {
  auto req = VolumeRequest("restart-1", 2 * kMiB);
  *req.mutable_accessibility_requirements()->add_requisite() = NodeTopology("node-a");
  v1::Volume v = MustCreate(req);
  cluster_->StopController(/*kill9=*/true);
  auto t0 = std::chrono::steady_clock::now();
  ASSERT_EQ(cluster_->StartController(), "");
  // Nothing persisted: the nodes come back with their next heartbeat (200 ms here).
  ASSERT_TRUE(cluster_->WaitRegistered("node-a", 3s));
  ASSERT_TRUE(cluster_->WaitRegistered("node-b", 3s));
  auto took = std::chrono::steady_clock::now() - t0;
  EXPECT_LT(took, 2000ms) << "start + one heartbeat (+ the datapaths' reconnect) should do";
  // Existing volumes are found (idempotent create, list, get).
  v1::CreateVolumeResponse again;
  ASSERT_TRUE(C().CreateVolume(Ctx().get(), req, &again).ok());
  EXPECT_EQ(again.volume().volume_id(), v.volume_id());
  v1::ListVolumesResponse all;
  ASSERT_TRUE(C().ListVolumes(Ctx().get(), {}, &all).ok());
  bool found = false;
  for (const auto& e : all.entries()) found |= e.volume().volume_id() == v.volume_id();
  EXPECT_TRUE(found);
  // And new ones can be made.
  MustCreate(VolumeRequest("restart-2", kMiB));
}

TEST_F(ControllerTest, IdentityOnTheControllerSocket) {
  v1::GetPluginInfoResponse info;
  ASSERT_TRUE(cluster_->identity().GetPluginInfo(Ctx().get(), {}, &info).ok());
  EXPECT_EQ(info.name(), "nbd.csi.io");
  EXPECT_FALSE(info.vendor_version().empty());
  v1::GetPluginCapabilitiesResponse caps;
  ASSERT_TRUE(cluster_->identity().GetPluginCapabilities(Ctx().get(), {}, &caps).ok());
  bool controller = false, topo = false, online = false;
  for (const auto& c : caps.capabilities()) {
    controller |= c.service().type() == v1::PluginCapability::Service::CONTROLLER_SERVICE;
    topo |= c.service().type() ==
            v1::PluginCapability::Service::VOLUME_ACCESSIBILITY_CONSTRAINTS;
    online |= c.volume_expansion().type() == v1::PluginCapability::VolumeExpansion::ONLINE;
  }
  EXPECT_TRUE(controller && topo && online);
  v1::ProbeResponse probe;
  ASSERT_TRUE(cluster_->identity().Probe(Ctx().get(), {}, &probe).ok());
  EXPECT_TRUE(probe.ready().value());
}

}  // namespace
}  // namespace nbdcsi::test
