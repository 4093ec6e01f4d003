// No secrets in logs: a full flow through the three real daemons (nbd-csi-controller and
// nbd-datapathd over mutual TLS, with their private keys on disk; nbd-csi-node staging and
// publishing through the datapath), every CSI call that carries `secrets` given a set of marker
// values, including calls that fail. Then every log the daemons wrote, and the /metrics of the
// controller and the node plugin scraped after the calls, are searched for the marker values and
// for private-key material (PEM markers, and each base64 line of every key file in use): zero
// hits. The logs are at debug level (the node plugin at trace), where requests are printed in
// full.
//
// Needs root and what nbd-csi-node needs to stage on this kernel (mkfs.ext4, and without
// nbd.ko /dev/fuse, /dev/loop-control and nbdfuse): exit 77 otherwise, unless CI=true.
#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>
#include <thread>

#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include "test/controller/cluster.h"
#include "test/support/certs.h"
#include "test/support/free_port.h"
#include "test/support/http_get.h"
#include "test/support/prerequisites.h"

namespace nbdcsi::test {
namespace {

namespace v1 = ::csi::v1;
namespace fs = std::filesystem;
using namespace std::chrono_literals;

std::string Marker(std::mt19937_64& rng, const char* tag) {
  char buf[64];
  snprintf(buf, sizeof buf, "%s-%016llx", tag, static_cast<unsigned long long>(rng()));
  return buf;
}

class SecretsLogTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::random_device rd;
    std::mt19937_64 rng((uint64_t{rd()} << 32) | rd());
    // Several keys, and values in map values, as the external-provisioner passes them.
    secrets_ = {{"password", Marker(rng, "pw")},
                {"token", Marker(rng, "tok")},
                {"csi.storage.k8s.io/provisioner-secret-name", Marker(rng, "name")}};
    ASSERT_TRUE(made_.ok) << "test/tls/make-certs.sh failed, see " << made_.log();
    certs_ = made_.path();
  }

  template <typename Req>
  void AddSecrets(Req* req) {
    for (const auto& [k, v] : secrets_) (*req->mutable_secrets())[k] = v;
  }

  std::map<std::string, std::string> secrets_;
  TestCerts made_{"nbdcsi-secrets", "node-a"};
  std::string certs_;
};

TEST_F(SecretsLogTest, NoSecretValueOrKeyMaterialReachesAnyLog) {
  // Their /metrics too: scraped after every call, saved beside the logs and searched with them.
  const int ctl_metrics = FreeLoopbackPort(), node_metrics = FreeLoopbackPort();
  ASSERT_GT(ctl_metrics, 0);
  ASSERT_GT(node_metrics, 0);
  ASSERT_NE(ctl_metrics, node_metrics);
  ClusterOptions o;
  o.nodes = {"node-a"};
  o.tls = {certs_, certs_};
  o.controller_args = {"--metrics-listen", "127.0.0.1:" + std::to_string(ctl_metrics)};
  Cluster c(o);
  ASSERT_EQ(c.Start(), "");
  const std::string root = c.dir() + "/kubelet";
  fs::create_directories(root);
  Process node;
  ASSERT_TRUE(node.Start({Cluster::Bin("nbd-csi-node"), "--csi-endpoint",
                          "unix://" + c.dir() + "/node-csi.sock", "--node-id", "node-a",
                          "--datapath", "unix://" + c.dir() + "/node-a-api.sock",
                          "--kubelet-root", root, "--log-level", "trace", "--metrics-listen",
                          "127.0.0.1:" + std::to_string(node_metrics)},
                         c.dir() + "/node.log"));
  for (int i = 0; i < 500 && !fs::exists(c.dir() + "/node-csi.sock"); ++i) {
    ASSERT_TRUE(node.Running()) << ReadWholeFile(c.dir() + "/node.log");
    std::this_thread::sleep_for(20ms);  // the poll of a bounded wait
  }
  auto node_stub = v1::Node::NewStub(grpc::CreateChannel("unix://" + c.dir() + "/node-csi.sock",
                                                         grpc::InsecureChannelCredentials()));
  auto& ctl = c.controller();
  auto ok = [](const grpc::Status& st, const char* what) {
    EXPECT_TRUE(st.ok()) << what << ": " << st.error_message();
  };

  // Controller calls with secrets.
  auto creq = VolumeRequest("pvc-secret", 64 << 20);
  AddSecrets(&creq);
  *creq.mutable_accessibility_requirements()->add_requisite() = NodeTopology("node-a");
  v1::CreateVolumeResponse cresp;
  ok(ctl.CreateVolume(Ctx().get(), creq, &cresp), "CreateVolume");
  const std::string id = cresp.volume().volume_id();
  {
    auto bad = creq;  // refused (unknown parameter): the error path logs too
    (*bad.mutable_parameters())["noSuchKey"] = "1";
    bad.set_name("pvc-secret-bad");
    v1::CreateVolumeResponse r;
    EXPECT_EQ(ctl.CreateVolume(Ctx().get(), bad, &r).error_code(),
              grpc::StatusCode::INVALID_ARGUMENT);
  }
  {
    v1::ValidateVolumeCapabilitiesRequest r;
    r.set_volume_id(id);
    *r.add_volume_capabilities() = MountCap();
    AddSecrets(&r);
    v1::ValidateVolumeCapabilitiesResponse resp;
    ok(ctl.ValidateVolumeCapabilities(Ctx().get(), r, &resp), "ValidateVolumeCapabilities");
  }
  {
    v1::ControllerExpandVolumeRequest r;
    r.set_volume_id(id);
    r.mutable_capacity_range()->set_required_bytes(128 << 20);
    AddSecrets(&r);
    v1::ControllerExpandVolumeResponse resp;
    ok(ctl.ControllerExpandVolume(Ctx().get(), r, &resp), "ControllerExpandVolume");
  }
  {
    v1::ControllerModifyVolumeRequest r;
    r.set_volume_id(id);
    (*r.mutable_mutable_parameters())["maxIops"] = "500";
    AddSecrets(&r);
    v1::ControllerModifyVolumeResponse resp;
    ok(ctl.ControllerModifyVolume(Ctx().get(), r, &resp), "ControllerModifyVolume");
  }
  std::string snap_id;
  {
    v1::CreateSnapshotRequest r;
    r.set_name("snap-secret");
    r.set_source_volume_id(id);
    AddSecrets(&r);
    v1::CreateSnapshotResponse resp;
    ok(ctl.CreateSnapshot(Ctx().get(), r, &resp), "CreateSnapshot");
    snap_id = resp.snapshot().snapshot_id();
    v1::ListSnapshotsRequest l;
    AddSecrets(&l);
    v1::ListSnapshotsResponse lresp;
    ok(ctl.ListSnapshots(Ctx().get(), l, &lresp), "ListSnapshots");
  }

  // Node calls with secrets: stage, publish, expand, then tear down.
  const std::string staging = root + "/plugins/kubernetes.io/csi/nbd.csi.io/x/globalmount";
  const std::string target = root + "/pods/uid/volumes/kubernetes.io~csi/pvc-secret/mount";
  fs::create_directories(staging);
  {
    v1::NodeStageVolumeRequest r;
    r.set_volume_id(id);
    r.set_staging_target_path(staging);
    *r.mutable_volume_capability() = MountCap();
    AddSecrets(&r);
    v1::NodeStageVolumeResponse resp;
    ok(node_stub->NodeStageVolume(Ctx().get(), r, &resp), "NodeStageVolume");
  }
  {
    v1::NodePublishVolumeRequest r;
    r.set_volume_id(id);
    r.set_staging_target_path(staging);
    r.set_target_path(target);
    *r.mutable_volume_capability() = MountCap();
    AddSecrets(&r);
    v1::NodePublishVolumeResponse resp;
    ok(node_stub->NodePublishVolume(Ctx().get(), r, &resp), "NodePublishVolume");
    auto bad = r;  // refused: a target outside the kubelet root
    bad.set_target_path(c.dir() + "/elsewhere/mount");
    EXPECT_EQ(node_stub->NodePublishVolume(Ctx().get(), bad, &resp).error_code(),
              grpc::StatusCode::INVALID_ARGUMENT);
  }
  {
    v1::NodeExpandVolumeRequest r;
    r.set_volume_id(id);
    r.set_volume_path(target);
    r.set_staging_target_path(staging);
    r.mutable_capacity_range()->set_required_bytes(128 << 20);
    *r.mutable_volume_capability() = MountCap();
    AddSecrets(&r);
    v1::NodeExpandVolumeResponse resp;
    // ext4 grows online only with CAP_SYS_RESOURCE: the call is what matters here, not its
    // outcome.
    (void)node_stub->NodeExpandVolume(Ctx().get(), r, &resp);
  }
  {
    v1::NodeUnpublishVolumeRequest r;
    r.set_volume_id(id);
    r.set_target_path(target);
    v1::NodeUnpublishVolumeResponse resp;
    ok(node_stub->NodeUnpublishVolume(Ctx().get(), r, &resp), "NodeUnpublishVolume");
    v1::NodeUnstageVolumeRequest u;
    u.set_volume_id(id);
    u.set_staging_target_path(staging);
    v1::NodeUnstageVolumeResponse uresp;
    ok(node_stub->NodeUnstageVolume(Ctx().get(), u, &uresp), "NodeUnstageVolume");
  }
  {
    v1::DeleteSnapshotRequest r;
    r.set_snapshot_id(snap_id);
    AddSecrets(&r);
    v1::DeleteSnapshotResponse resp;
    ok(ctl.DeleteSnapshot(Ctx().get(), r, &resp), "DeleteSnapshot");
    v1::DeleteVolumeRequest d;
    d.set_volume_id(id);
    AddSecrets(&d);
    v1::DeleteVolumeResponse dresp;
    ok(ctl.DeleteVolume(Ctx().get(), d, &dresp), "DeleteVolume");
  }
  for (const auto& [port, name] : {std::pair{ctl_metrics, "controller"}, {node_metrics, "node"}}) {
    auto [code, body] = HttpGet(port, "/metrics");
    ASSERT_EQ(code, 200) << name;
    // The calls with secrets were counted (so the search looks at something real).
    const std::string series =
        std::string("nbdcsi_csi_rpcs_total{code=\"OK\",method=\"") +
        (name == std::string("node") ? "NodeStageVolume" : "CreateVolume") + "\"} ";
    const size_t at = body.find(series);
    ASSERT_NE(at, std::string::npos) << name << ":\n" << body;
    EXPECT_NE(body.compare(at + series.size(), 2, "0\n"), 0) << name << ": " << series << "0";
    std::ofstream(c.dir() + "/" + name + "-metrics.log") << body;
  }
  // Its log says where a slow stop spent its time (a status of 9: killed after the grace).
  EXPECT_EQ(node.Stop(), 0) << ReadWholeFile(c.dir() + "/node.log");
  c.StopDatapath(0);
  c.StopController();

  // What must never appear: the secret values, PEM private-key markers, and every base64 line
  // of the private keys the daemons loaded.
  std::vector<std::string> needles;
  for (const auto& [k, v] : secrets_) needles.push_back(v);
  needles.push_back("PRIVATE KEY");
  for (const char* key : {"/server.key", "/node-node-a.key"}) {
    std::istringstream lines(ReadWholeFile(certs_ + key));
    for (std::string l; std::getline(lines, l);) {
      if (l.size() >= 16 && l.find("-----") == std::string::npos) needles.push_back(l);
    }
  }
  ASSERT_GE(needles.size(), 6u);
  size_t logs = 0, bytes = 0;
  for (const auto& e : fs::recursive_directory_iterator(c.dir())) {
    if (!e.is_regular_file() || e.path().extension() != ".log") continue;
    const std::string text = ReadWholeFile(e.path().string());
    ++logs;
    bytes += text.size();
    for (const auto& n : needles) {
      EXPECT_EQ(text.find(n), std::string::npos) << e.path() << " contains \"" << n << "\"";
    }
  }
  // The daemons did log the calls (so the search looked at something real).
  EXPECT_GE(logs, 5u) << "three daemons' logs and two /metrics scrapes";
  const std::string ctl_log = ReadWholeFile(c.dir() + "/controller.log");
  EXPECT_NE(ctl_log.find("CreateVolume <- "), std::string::npos);
  EXPECT_NE(ctl_log.find("***stripped***"), std::string::npos);
  EXPECT_NE(ReadWholeFile(c.dir() + "/node.log").find("NodeStageVolume <- "), std::string::npos);
  RecordProperty("log_bytes_searched", static_cast<int>(bytes));
}

bool Prerequisites(std::string* why) {
  if (geteuid() != 0) {
    *why = "needs root";
    return false;
  }
  const bool kernel_nbd = access("/sys/module/nbd", F_OK) == 0;
  std::vector<std::string> tools = {"mkfs.ext4"};
  if (!kernel_nbd) {
    tools.push_back("nbdfuse");
    for (const char* p : {"/dev/fuse", "/dev/loop-control"}) {
      if (access(p, R_OK | W_OK) != 0) {
        *why = std::string("needs ") + p;
        return false;
      }
    }
  }
  for (const auto& t : tools) {
    std::string cmd = "PATH=/usr/sbin:/sbin:/usr/bin:/bin:$PATH command -v " + t + " >/dev/null";
    if (std::system(cmd.c_str()) != 0) {
      *why = "needs " + t;
      return false;
    }
  }
  return true;
}

}  // namespace
}  // namespace nbdcsi::test

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  std::string why;
  if (!nbdcsi::test::Prerequisites(&why)) return nbdcsi::test::MissingPrerequisite(why);
  return RUN_ALL_TESTS();
}
