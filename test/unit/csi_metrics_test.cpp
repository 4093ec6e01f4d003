// The metrics of nbd-csi-controller and nbd-csi-node, below the daemons: the gRPC interceptor on
// a real CSI server over loopback TCP (each call counted once, under its method and code, and
// timed), the bound on the method label, the controller's registry gauges under a fake clock and
// its placement refusals, and the node's step timings through the decorated OS and datapath seams
// under a real NodeStageVolume.
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <prometheus/collectable.h>
#include <prometheus/metric_family.h>
#include <prometheus/registry.h>
#include <spdlog/spdlog.h>
#include <sys/sysmacros.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "common/grpc_status.h"
#include "common/metrics/grpc_metrics.h"
#include "controller/metrics.h"
#include "controller/registry.h"
#include "csi/csi.grpc.pb.h"
#include "csi/identity.h"
#include "csi/server.h"
#include "node/metrics.h"
#include "node/node_service.h"
#include "test/support/free_port.h"
#include "test/unit/node_fakes.h"

namespace nbdcsi {
namespace {

namespace v1 = ::csi::v1;
using prometheus::ClientMetric;
using prometheus::MetricFamily;
using Labels = std::vector<std::pair<std::string, std::string>>;

std::vector<MetricFamily> Scrape(const std::vector<std::shared_ptr<prometheus::Collectable>>& cs) {
  std::vector<MetricFamily> out;
  for (const auto& c : cs) {
    for (auto& f : c->Collect()) out.push_back(std::move(f));
  }
  return out;
}

// The series of `family` whose labels are exactly `want`; nullptr if none.
const ClientMetric* Find(const std::vector<MetricFamily>& fams, const std::string& family,
                         const Labels& want) {
  for (const auto& f : fams) {
    if (f.name != family) continue;
    for (const auto& m : f.metric) {
      Labels have;
      for (const auto& l : m.label) have.emplace_back(l.name, l.value);
      if (have.size() != want.size()) continue;
      bool all = true;
      for (const auto& w : want) all = all && std::find(have.begin(), have.end(), w) != have.end();
      if (all) return &m;
    }
  }
  return nullptr;
}

size_t SeriesCount(const std::vector<MetricFamily>& fams, const std::string& family) {
  for (const auto& f : fams)
    if (f.name == family) return f.metric.size();
  return 0;
}

TEST(GrpcMethodLabel, KnownMethodsOnly) {
  EXPECT_EQ(GrpcMethodLabel("/csi.v1.Node/NodeStageVolume"), "NodeStageVolume");
  EXPECT_EQ(GrpcMethodLabel("/csi.v1.Controller/CreateVolume"), "CreateVolume");
  EXPECT_EQ(GrpcMethodLabel("/csi.v1.Identity/Probe"), "Probe");
  // Whatever a caller invents stays out of the label set.
  for (const char* bad : {"", "/", "//", "/csi.v1.Node/", "/csi.v1.Node/NoSuchMethod", "/x.Y/Probe",
                          "csi.v1.Identity/Probe", "/csi.v1.Identity"}) {
    EXPECT_EQ(GrpcMethodLabel(bad), "unknown") << bad;
  }
  EXPECT_EQ(GrpcMethodLabel(nullptr), "unknown");
}

// A real CSI server (Identity only) with the metrics interceptor, called over loopback TCP.
class RpcMetricsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    spdlog::set_level(spdlog::level::warn);
    csi::IdentityOptions io;
    io.ready = [this]() -> Status {
      return ready_.load() ? Status::Ok() : Error(EAGAIN, "not yet");
    };
    identity_ = csi::MakeIdentityService(io);
    const int port = test::FreeLoopbackPort();
    ASSERT_GT(port, 0);
    auto srv =
        csi::StartCsiServer({.endpoint = "tcp://127.0.0.1:" + std::to_string(port),
                             .services = {identity_.get()},
                             .interceptors = {[this] { return metrics_.InterceptorFactory(); }}});
    ASSERT_TRUE(srv.ok()) << srv.status().message();
    server_ = std::move(*srv);
    auto ch = grpc::CreateChannel("127.0.0.1:" + std::to_string(port),
                                  grpc::InsecureChannelCredentials());
    identity_stub_ = v1::Identity::NewStub(ch);
    controller_stub_ = v1::Controller::NewStub(ch);
  }

  grpc::StatusCode Probe() {
    grpc::ClientContext ctx;
    v1::ProbeRequest req;
    v1::ProbeResponse resp;
    return identity_stub_->Probe(&ctx, req, &resp).error_code();
  }

  std::vector<MetricFamily> Families() { return registry_->Collect(); }

  std::atomic<bool> ready_{true};
  std::shared_ptr<prometheus::Registry> registry_ = std::make_shared<prometheus::Registry>();
  GrpcServerMetrics metrics_{*registry_, "nbdcsi_csi"};
  std::unique_ptr<v1::Identity::Service> identity_;
  std::unique_ptr<csi::CsiServer> server_;
  std::unique_ptr<v1::Identity::Stub> identity_stub_;
  std::unique_ptr<v1::Controller::Stub> controller_stub_;
};

TEST_F(RpcMetricsTest, CountsEachCallUnderItsMethodAndCode) {
  for (int i = 0; i < 5; ++i) ASSERT_EQ(Probe(), grpc::StatusCode::OK);
  {
    grpc::ClientContext ctx;
    v1::GetPluginInfoResponse resp;
    ASSERT_TRUE(identity_stub_->GetPluginInfo(&ctx, {}, &resp).ok());
  }
  // A service this server does not have: gRPC answers UNIMPLEMENTED.
  for (int i = 0; i < 2; ++i) {
    grpc::ClientContext ctx;
    v1::CreateVolumeRequest req;
    v1::CreateVolumeResponse resp;
    ASSERT_EQ(controller_stub_->CreateVolume(&ctx, req, &resp).error_code(),
              grpc::StatusCode::UNIMPLEMENTED);
  }

  auto fams = Families();
  const ClientMetric* probe_ok =
      Find(fams, "nbdcsi_csi_rpcs_total", {{"method", "Probe"}, {"code", "OK"}});
  ASSERT_NE(probe_ok, nullptr);
  EXPECT_EQ(probe_ok->counter.value, 5);
  const ClientMetric* info =
      Find(fams, "nbdcsi_csi_rpcs_total", {{"method", "GetPluginInfo"}, {"code", "OK"}});
  ASSERT_NE(info, nullptr);
  EXPECT_EQ(info->counter.value, 1);
  const ClientMetric* h = Find(fams, "nbdcsi_csi_rpc_duration_seconds", {{"method", "Probe"}});
  ASSERT_NE(h, nullptr);
  EXPECT_EQ(h->histogram.sample_count, 5u);
  EXPECT_GT(h->histogram.sample_sum, 0);
  EXPECT_LT(h->histogram.sample_sum, 5.0) << "five loopback Probes took seconds?";
  ASSERT_FALSE(h->histogram.bucket.empty());
  EXPECT_EQ(h->histogram.bucket.back().cumulative_count, 5u);
  const ClientMetric* gauge = Find(fams, "nbdcsi_csi_rpcs_in_flight", {{"method", "Probe"}});
  ASSERT_NE(gauge, nullptr);
  EXPECT_EQ(gauge->gauge.value, 0) << "every call ended";

  // A method of a service this server lacks is answered UNIMPLEMENTED by gRPC itself, which
  // does not tell the interceptor the method's name: counted under "unknown".
  const ClientMetric* unimpl =
      Find(fams, "nbdcsi_csi_rpcs_total", {{"method", "unknown"}, {"code", "UNIMPLEMENTED"}});
  ASSERT_NE(unimpl, nullptr);
  EXPECT_EQ(unimpl->counter.value, 2);
  EXPECT_EQ(SeriesCount(fams, "nbdcsi_csi_rpcs_total"), 3u);
}

TEST_F(RpcMetricsTest, AnErrorIsCountedUnderItsCode) {
  // A request body the server cannot parse fails before the handler runs, with the code gRPC
  // chose; it is counted under that code and the method the caller named.
  auto ch =
      grpc::CreateChannel(server_->endpoint().GrpcTarget(), grpc::InsecureChannelCredentials());
  grpc::GenericStub generic(ch);
  grpc::ClientContext ctx;
  grpc::ByteBuffer reply;
  // Field 1 with wire type 7 (invalid): the server cannot parse it.
  const char junk[] = {0x0f, 0x01};
  grpc::Slice slice(junk, sizeof junk);
  grpc::ByteBuffer req(&slice, 1);
  std::mutex mu;
  std::condition_variable cv;
  bool done = false;
  grpc::Status st;
  generic.UnaryCall(&ctx, "/csi.v1.Identity/GetPluginInfo", grpc::StubOptions(), &req, &reply,
                    [&](grpc::Status s) {
                      std::lock_guard lk(mu);
                      st = s;
                      done = true;
                      cv.notify_one();
                    });
  {
    std::unique_lock lk(mu);
    ASSERT_TRUE(cv.wait_for(lk, std::chrono::seconds(10), [&] { return done; }));
  }
  ASSERT_FALSE(st.ok());
  auto fams = Families();
  const ClientMetric* bad =
      Find(fams, "nbdcsi_csi_rpcs_total",
           {{"method", "GetPluginInfo"}, {"code", GrpcCodeName(st.error_code())}});
  ASSERT_NE(bad, nullptr) << "code " << GrpcCodeName(st.error_code());
  EXPECT_EQ(bad->counter.value, 1);
  EXPECT_EQ(Find(fams, "nbdcsi_csi_rpcs_total", {{"method", "GetPluginInfo"}, {"code", "OK"}}),
            nullptr);
}

// ---- the controller's registry gauges ----------------------------------------------------

datapath::v1::HeartbeatRequest Beat(const std::string& node) {
  datapath::v1::HeartbeatRequest r;
  r.set_node_id(node);
  r.set_api_address("127.0.0.1:9");
  r.set_version("t");
  return r;
}

TEST(ControllerMetrics, NodesAgesAndRefusals) {
  auto now = std::chrono::steady_clock::time_point{} + std::chrono::hours(1);
  controller::NodeRegistry reg(
      [](const std::string&, const std::string&) -> std::shared_ptr<controller::NodeDatapath> {
        return nullptr;
      },
      std::chrono::seconds(6), std::chrono::seconds(2), [&] { return now; });
  controller::ControllerMetrics m(reg, "1.2.3");
  auto fams = Scrape(m.Collectables());
  EXPECT_EQ(Find(fams, "nbdcsi_controller_nodes", {{"state", "live"}})->gauge.value, 0);
  EXPECT_EQ(SeriesCount(fams, "nbdcsi_controller_node_heartbeat_age_seconds"), 0u);
  // Every Identity and Controller method has its series before its first call.
  for (const char* method : {"Probe", "CreateVolume", "ControllerModifyVolume"}) {
    const ClientMetric* c =
        Find(fams, "nbdcsi_csi_rpcs_total", {{"method", method}, {"code", "OK"}});
    ASSERT_NE(c, nullptr) << method;
    EXPECT_EQ(c->counter.value, 0);
    ASSERT_NE(Find(fams, "nbdcsi_csi_rpc_duration_seconds", {{"method", method}}), nullptr);
  }
  EXPECT_EQ(Find(fams, "nbdcsi_csi_rpcs_total", {{"method", "NodeStageVolume"}, {"code", "OK"}}),
            nullptr)
      << "the controller serves no Node method";
  EXPECT_EQ(Find(fams, "nbdcsi_controller_heartbeat_interval_seconds", {})->gauge.value, 2);
  EXPECT_EQ(Find(fams, "nbdcsi_controller_heartbeat_ttl_seconds", {})->gauge.value, 6);
  EXPECT_EQ(Find(fams, "nbdcsi_controller_build_info", {{"version", "1.2.3"}})->gauge.value, 1);
  EXPECT_EQ(Find(fams, "nbdcsi_controller_placement_refusals_total", {{"reason", "no_room"}})
                ->counter.value,
            0)
      << "both reasons exist from the start";

  ASSERT_TRUE(reg.Heartbeat(Beat("node-a")).ok());
  now += std::chrono::milliseconds(1500);
  ASSERT_TRUE(reg.Heartbeat(Beat("node-b")).ok());
  now += std::chrono::milliseconds(500);
  fams = Scrape(m.Collectables());
  EXPECT_EQ(Find(fams, "nbdcsi_controller_nodes", {{"state", "live"}})->gauge.value, 2);
  EXPECT_EQ(Find(fams, "nbdcsi_controller_nodes", {{"state", "expired"}})->gauge.value, 0);
  EXPECT_DOUBLE_EQ(
      Find(fams, "nbdcsi_controller_node_heartbeat_age_seconds", {{"node", "node-a"}})->gauge.value,
      2.0);
  EXPECT_DOUBLE_EQ(
      Find(fams, "nbdcsi_controller_node_heartbeat_age_seconds", {{"node", "node-b"}})->gauge.value,
      0.5);

  // node-a falls silent past the ttl: still shown, as expired, with its growing age.
  now += std::chrono::seconds(5);
  ASSERT_TRUE(reg.Heartbeat(Beat("node-b")).ok());
  fams = Scrape(m.Collectables());
  EXPECT_EQ(Find(fams, "nbdcsi_controller_nodes", {{"state", "live"}})->gauge.value, 1);
  EXPECT_EQ(Find(fams, "nbdcsi_controller_nodes", {{"state", "expired"}})->gauge.value, 1);
  EXPECT_EQ(Find(fams, "nbdcsi_controller_node_up", {{"node", "node-a"}})->gauge.value, 0);
  EXPECT_EQ(Find(fams, "nbdcsi_controller_node_up", {{"node", "node-b"}})->gauge.value, 1);
  EXPECT_DOUBLE_EQ(
      Find(fams, "nbdcsi_controller_node_heartbeat_age_seconds", {{"node", "node-a"}})->gauge.value,
      7.0);

  m.PlacementRefused(controller::ControllerOptions::Refusal::kNoRoom);
  m.PlacementRefused(controller::ControllerOptions::Refusal::kNoRoom);
  m.PlacementRefused(controller::ControllerOptions::Refusal::kNodeMissing);
  fams = Scrape(m.Collectables());
  EXPECT_EQ(Find(fams, "nbdcsi_controller_placement_refusals_total", {{"reason", "no_room"}})
                ->counter.value,
            2);
  EXPECT_EQ(Find(fams, "nbdcsi_controller_placement_refusals_total", {{"reason", "node_missing"}})
                ->counter.value,
            1);
}

// ---- the node's steps --------------------------------------------------------------------

TEST(NodeMetrics, StageStepsAreTimedByResult) {
  spdlog::set_level(spdlog::level::warn);
  node::testing::FakeOs os;
  node::testing::FakeDatapath dp(os);
  dp.AddVolume("pvc-1", 1 << 30, "/dev/loop3", makedev(7, 3));
  const std::string staging = "/var/lib/kubelet/plugins/kubernetes.io/csi/nbd.csi.io/a/globalmount";
  os.paths[staging] = node::PathKind::kDirectory;
  node::NodeMetrics m("t");
  auto mos = node::MeasuredOs(os, m);
  auto mdp = node::MeasuredDatapath(dp, m);
  auto svc = node::MakeNodeService({.node_id = "node-a"}, *mos, *mdp);
  {
    auto before = Scrape(m.Collectables());
    EXPECT_EQ(SeriesCount(before, "nbdcsi_node_operation_duration_seconds"), 20u)
        << "10 operations (the target's three included) x ok/error, at zero from the start";
    ASSERT_NE(
        Find(before, "nbdcsi_csi_rpcs_total", {{"method", "NodeStageVolume"}, {"code", "OK"}}),
        nullptr);
  }

  v1::NodeStageVolumeRequest req;
  req.set_volume_id("v1:node-a:pvc-1");
  req.set_staging_target_path(staging);
  req.mutable_volume_capability()->mutable_mount()->set_fs_type("ext4");
  req.mutable_volume_capability()->mutable_access_mode()->set_mode(
      v1::VolumeCapability::AccessMode::SINGLE_NODE_WRITER);
  v1::NodeStageVolumeResponse resp;
  // The first mkfs fails (the tool's error), the retry succeeds.
  os.fail_next["mkfs"] = Error(EIO, "mkfs.ext4: boom");
  EXPECT_FALSE(svc->NodeStageVolume(nullptr, &req, &resp).ok());
  ASSERT_TRUE(svc->NodeStageVolume(nullptr, &req, &resp).ok());

  auto fams = Scrape(m.Collectables());
  auto count = [&](const char* op, const char* result) -> uint64_t {
    const ClientMetric* c = Find(fams, "nbdcsi_node_operation_duration_seconds",
                                 {{"operation", op}, {"result", result}});
    return c ? c->histogram.sample_count : 0;
  };
  EXPECT_EQ(count("mkfs", "error"), 1u);
  EXPECT_EQ(count("mkfs", "ok"), 1u);
  EXPECT_EQ(count("attach", "ok"), 2u) << "each try attaches (idempotent on the datapath)";
  EXPECT_EQ(count("mount", "ok"), 1u);
  EXPECT_EQ(count("unmount", "ok"), 0u);
  EXPECT_EQ(os.Count("mkfs"), 2) << "the decorator passes every call through";
  EXPECT_EQ(Find(fams, "nbdcsi_node_build_info", {{"version", "t"}})->gauge.value, 1);
}

}  // namespace
}  // namespace nbdcsi
