// Node binding and certificate refusals between a real nbd-csi-controller and real nbd-datapathd
// processes, over gRPC on 127.0.0.1 with certificates from test/tls/make-certs.sh:
//  - node A's certificate cannot heartbeat as node B (PERMISSION_DENIED, B's registration intact)
//    and cannot serve as node B (the controller refuses a datapath at B's address presenting A's
//    certificate; nothing reaches it);
//  - another CA, an expired certificate and no client certificate are refused in both
//    directions: presented to the controller's Registry and to a datapath's API, and presented
//    by a "datapath" the controller dials and by a "controller" a datapath heartbeats to.
// The other ends are in-test gRPC clients and servers built from gRPC's own SSL credentials and
// the PEM files, independent of common/tls.
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <thread>

#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include "datapath/api/datapath.grpc.pb.h"
#include "datapath/api/registry.grpc.pb.h"
#include "test/controller/cluster.h"
#include "test/support/certs.h"
#include "test/support/free_port.h"

namespace nbdcsi::test {
namespace {

namespace v1 = ::csi::v1;
namespace dpv1 = ::nbdcsi::datapath::v1;
namespace fs = std::filesystem;
using namespace std::chrono_literals;
using grpc::StatusCode;

// A datapath stand-in that counts the calls that reach it.
class CountingDatapath final : public dpv1::Datapath::Service {
 public:
  grpc::Status ListVolumes(grpc::ServerContext*, const dpv1::ListVolumesRequest*,
                           dpv1::ListVolumesResponse*) override {
    ++calls;
    return grpc::Status::OK;
  }
  grpc::Status ListSnapshots(grpc::ServerContext*, const dpv1::ListSnapshotsRequest*,
                             dpv1::ListSnapshotsResponse*) override {
    ++calls;
    return grpc::Status::OK;
  }
  std::atomic<int> calls{0};
};

// A registry stand-in that counts heartbeats.
class CountingRegistry final : public dpv1::Registry::Service {
 public:
  grpc::Status Heartbeat(grpc::ServerContext*, const dpv1::HeartbeatRequest*,
                         dpv1::HeartbeatResponse* resp) override {
    ++beats;
    resp->set_interval_ms(200);
    return grpc::Status::OK;
  }
  std::atomic<int> beats{0};
};

class NodeIdentityTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() { certs_ = new TestCerts("nbdcsi-nodeid", "node-a node-b node-x"); }
  static void TearDownTestSuite() { delete certs_; }
  void SetUp() override {
    ASSERT_TRUE(certs_->ok) << "test/tls/make-certs.sh failed, see " << certs_->log();
  }

  static std::string Main() { return certs_->path(); }
  static std::string Other() { return (*certs_)("other"); }

  // One heartbeat to the controller's Registry, claiming `node` at `address`.
  static grpc::Status Beat(Cluster& c, const std::shared_ptr<grpc::ChannelCredentials>& creds,
                           const std::string& node, const std::string& address) {
    return Heartbeat(c.registry_port(), creds, node, address);
  }

  static grpc::Status CreateOn(Cluster& c, const std::string& node, const std::string& name) {
    auto req = VolumeRequest(name, 1 << 20);
    *req.mutable_accessibility_requirements()->add_requisite() = NodeTopology(node);
    v1::CreateVolumeResponse resp;
    return c.controller().CreateVolume(Ctx().get(), req, &resp);
  }

  static ClusterOptions Options(std::vector<std::string> nodes) {
    ClusterOptions o;
    o.nodes = std::move(nodes);
    o.tls = {Main(), Main()};
    // Registrations outlive the test's pauses; each test decides when a node goes away.
    o.controller_args = {"--heartbeat-ttl", "60000"};
    return o;
  }

  static TestCerts* certs_;
};

TestCerts* NodeIdentityTest::certs_ = nullptr;

TEST_F(NodeIdentityTest, NodeACertificateCannotHeartbeatAsNodeB) {
  Cluster c(Options({"node-a", "node-b"}));
  ASSERT_EQ(c.Start(), "");
  const int trap_port = FreeLoopbackPort();

  // Node A tries to move node B's registration to an address of its own.
  grpc::Status st = Beat(c, SslClient(Main(), "node-node-a", Main()), "node-b",
                         "127.0.0.1:" + std::to_string(trap_port));
  EXPECT_EQ(st.error_code(), StatusCode::PERMISSION_DENIED) << st.error_message();
  EXPECT_NE(st.error_message().find("cannot speak for node node-b"), std::string::npos)
      << st.error_message();
  // The controller's own certificate is no node's either.
  st = Beat(c, SslClient(Main(), "server", Main()), "node-b", "127.0.0.1:1");
  EXPECT_EQ(st.error_code(), StatusCode::PERMISSION_DENIED) << st.error_message();
  // Nor does it register a node nobody runs.
  st = Beat(c, SslClient(Main(), "node-node-a", Main()), "node-x", "127.0.0.1:1");
  EXPECT_EQ(st.error_code(), StatusCode::PERMISSION_DENIED) << st.error_message();
  EXPECT_FALSE(c.WaitRegistered("node-x", 500ms));

  // Node B is where it was: a volume bound to it lands in its own pool.
  ASSERT_TRUE(CreateOn(c, "node-b", "bound-b").ok()) << c.LogTail("controller");
  dpv1::ListVolumesResponse vols;
  ASSERT_TRUE(c.datapath("node-b").ListVolumes(Ctx().get(), {}, &vols).ok());
  EXPECT_EQ(vols.volumes_size(), 1);
  EXPECT_NE(c.LogTail("controller", 200).find("cannot speak for node node-b"), std::string::npos);
}

TEST_F(NodeIdentityTest, ControllerRefusesADatapathAtNodeBsAddressWithNodeAsCertificate) {
  Cluster c(Options({"node-a", "node-b"}));
  ASSERT_EQ(c.Start(), "");
  ASSERT_TRUE(CreateOn(c, "node-b", "before").ok()) << c.LogTail("controller");

  // Node B's datapath goes away (its registration stays for the ttl) and a datapath holding
  // node A's certificate takes over B's port.
  c.StopDatapath(1);
  const std::string rogue_dir = c.dir() + "/rogue";
  fs::create_directories(rogue_dir + "/pool");
  Process rogue;
  ASSERT_TRUE(rogue.Start({Cluster::Bin("nbd-datapathd"), "--pool", rogue_dir + "/pool", "--api",
                           "unix://" + rogue_dir + "/api.sock", "--nbd-listen",
                           "unix://" + rogue_dir + "/nbd.sock", "--workers", "1", "--capacity",
                           "4Gi", "--api-tcp-listen",
                           "127.0.0.1:" + std::to_string(c.api_port(1)), "--tls-cert",
                           Main() + "/node-node-a.crt", "--tls-key", Main() + "/node-node-a.key",
                           "--tls-ca", Main() + "/ca.crt"},
                          rogue_dir + "/rogue.log"));
  for (int i = 0; i < 500 && !fs::exists(rogue_dir + "/api.sock"); ++i) {
    ASSERT_TRUE(rogue.Running()) << ReadWholeFile(rogue_dir + "/rogue.log");
    std::this_thread::sleep_for(20ms);  // the poll of a bounded wait
  }
  // The rogue is really there and serving: a controller-like client dialling it by address
  // gets an answer (host name verification passes: the certificate carries IP:127.0.0.1).
  {
    auto stub = dpv1::Datapath::NewStub(grpc::CreateChannel(
        "127.0.0.1:" + std::to_string(c.api_port(1)), SslClient(Main(), "server", Main())));
    dpv1::GetPoolInfoResponse info;
    grpc::Status st = stub->GetPoolInfo(Ctx().get(), {}, &info);
    ASSERT_TRUE(st.ok()) << st.error_message() << ReadWholeFile(rogue_dir + "/rogue.log");
  }

  grpc::Status st = CreateOn(c, "node-b", "after");
  EXPECT_EQ(st.error_code(), StatusCode::UNAVAILABLE) << st.error_message();
  EXPECT_NE(c.LogTail("controller", 400).find("not for node node-b"), std::string::npos)
      << c.LogTail("controller");
  // Nothing reached the impostor's pool.
  {
    auto local = dpv1::Datapath::NewStub(
        grpc::CreateChannel("unix://" + rogue_dir + "/api.sock", grpc::InsecureChannelCredentials()));
    dpv1::ListVolumesResponse vols;
    ASSERT_TRUE(local->ListVolumes(Ctx().get(), {}, &vols).ok());
    EXPECT_EQ(vols.volumes_size(), 0);
  }
  rogue.Stop();

  // The genuine node B back on its port: served again (the channel reconnects after back-off).
  ASSERT_EQ(c.StartDatapath(1), "");
  grpc::Status again;
  for (int i = 0; i < 40; ++i) {
    again = CreateOn(c, "node-b", "after");
    if (again.ok()) break;
    std::this_thread::sleep_for(250ms);  // bounded retry while the channel reconnects
  }
  EXPECT_TRUE(again.ok()) << again.error_message() << c.LogTail("controller");
}

// Clients presenting bad certificates to the controller's Registry and to a datapath's TCP API.
TEST_F(NodeIdentityTest, BadClientCertificatesAreRefusedByControllerAndDatapath) {
  Cluster c(Options({"node-a"}));
  ASSERT_EQ(c.Start(), "");
  struct Case {
    const char* what;
    std::string dir, who;
  } cases[] = {
      {"another CA", Other(), "node-node-a"},
      {"expired", Main(), "node-node-a-expired"},
      {"no client certificate", "", ""},
  };
  const std::string api = "127.0.0.1:" + std::to_string(c.api_port(0));
  for (const auto& k : cases) {
    auto creds = SslClient(k.dir, k.who, Main());
    // Registry: refused in the handshake, so the status is UNAVAILABLE, never a handler's.
    grpc::Status st = Beat(c, creds, "node-a", "127.0.0.1:1");
    EXPECT_EQ(st.error_code(), StatusCode::UNAVAILABLE) << k.what << ": " << st.error_message();
    auto stub = dpv1::Datapath::NewStub(grpc::CreateChannel(api, creds));
    dpv1::GetPoolInfoResponse info;
    st = stub->GetPoolInfo(Ctx().get(), {}, &info);
    EXPECT_EQ(st.error_code(), StatusCode::UNAVAILABLE) << k.what << ": " << st.error_message();
  }
  // node-a's registration was not moved to 127.0.0.1:1 by any of them.
  ASSERT_TRUE(CreateOn(c, "node-a", "still-a").ok()) << c.LogTail("controller");

  // A datapath's API is the controller's: another node's certificate is refused by the daemon.
  auto as_b =
      dpv1::Datapath::NewStub(grpc::CreateChannel(api, SslClient(Main(), "node-node-b", Main())));
  dpv1::ListVolumesResponse vols;
  grpc::Status st = as_b->ListVolumes(Ctx().get(), {}, &vols);
  EXPECT_EQ(st.error_code(), StatusCode::PERMISSION_DENIED) << st.error_message();
  auto as_ctl =
      dpv1::Datapath::NewStub(grpc::CreateChannel(api, SslClient(Main(), "server", Main())));
  st = as_ctl->ListVolumes(Ctx().get(), {}, &vols);
  ASSERT_TRUE(st.ok()) << st.error_message();
  EXPECT_EQ(vols.volumes_size(), 1);
}

// Servers presenting bad certificates: a "datapath" the controller dials, a "controller" that a
// datapath heartbeats to. In each case a good certificate on the same server is served, so the
// refusal is the certificate's.
TEST_F(NodeIdentityTest, BadServerCertificatesAreRefusedByControllerAndDatapath) {
  Cluster c(Options({"node-a"}));
  ASSERT_EQ(c.Start(), "");
  struct Case {
    const char* what;
    std::string dir, who;
    bool served;
  } cases[] = {
      {"another CA", Other(), "node-node-x", false},
      {"expired", Main(), "node-node-x-expired", false},
      {"node A's certificate", Main(), "node-node-a", false},
      {"node X's own certificate", Main(), "node-node-x", true},
  };
  for (const auto& k : cases) {
    SCOPED_TRACE(k.what);
    CountingDatapath fake;
    grpc::ServerBuilder b;
    int port = 0;
    b.AddListeningPort("127.0.0.1:0", SslServer(k.dir, k.who, Main()), &port);
    b.RegisterService(&fake);
    auto server = b.BuildAndStart();
    ASSERT_NE(server, nullptr);
    // node-x registers (with its genuine certificate) at the fake's address.
    grpc::Status st = Beat(c, SslClient(Main(), "node-node-x", Main()), "node-x",
                           "127.0.0.1:" + std::to_string(port));
    ASSERT_TRUE(st.ok()) << st.error_message();
    // The snapshots of a volume on node-x: only node-x can answer, so a refused handshake is
    // the call's status (a full ListVolumes would skip the node and succeed).
    v1::ListSnapshotsRequest req;
    req.set_source_volume_id("v1:node-x:pvc-1");
    v1::ListSnapshotsResponse list;
    st = c.controller().ListSnapshots(Ctx().get(), req, &list);
    if (k.served) {
      EXPECT_TRUE(st.ok()) << st.error_message();
      EXPECT_GT(fake.calls.load(), 0);
    } else {
      EXPECT_EQ(st.error_code(), StatusCode::UNAVAILABLE) << st.error_message();
      EXPECT_EQ(fake.calls.load(), 0);
    }
    server->Shutdown(std::chrono::system_clock::now() + 1s);
  }

  // The datapath's side: a registry presenting an expired or foreign certificate never hears a
  // heartbeat; one presenting a good certificate does.
  struct Reg {
    const char* what;
    std::string dir, who;
    bool heard;
  } regs[] = {
      {"expired", Main(), "node-node-x-expired", false},
      {"another CA", Other(), "server", false},
      {"good", Main(), "server", true},
  };
  for (const auto& r : regs) {
    SCOPED_TRACE(r.what);
    CountingRegistry fake;
    grpc::ServerBuilder b;
    int port = 0;
    b.AddListeningPort("127.0.0.1:0", SslServer(r.dir, r.who, Main()), &port);
    b.RegisterService(&fake);
    auto server = b.BuildAndStart();
    ASSERT_NE(server, nullptr);
    const std::string dir = c.dir() + "/hb-" + std::to_string(port);
    fs::create_directories(dir + "/pool");
    Process d;
    ASSERT_TRUE(d.Start({Cluster::Bin("nbd-datapathd"), "--pool", dir + "/pool", "--api",
                         "unix://" + dir + "/api.sock", "--nbd-listen",
                         "unix://" + dir + "/nbd.sock", "--workers", "1", "--capacity", "1Gi",
                         "--node-id", "node-a", "--advertise",
                         "127.0.0.1:" + std::to_string(FreeLoopbackPort()), "--controller",
                         "127.0.0.1:" + std::to_string(port), "--heartbeat-interval", "200",
                         "--tls-cert", Main() + "/node-node-a.crt", "--tls-key",
                         Main() + "/node-node-a.key", "--tls-ca", Main() + "/ca.crt"},
                        dir + "/d.log"));
    // Bounded poll for the first beat; when none may come (r.heard false) it is the window in
    // which a wrongly accepted registry would have heard one (15 heartbeat intervals).
    for (int i = 0; i < 30 && fake.beats.load() == 0; ++i) std::this_thread::sleep_for(100ms);
    EXPECT_EQ(fake.beats.load() > 0, r.heard) << ReadWholeFile(dir + "/d.log");
    EXPECT_EQ(d.Stop(), 0) << ReadWholeFile(dir + "/d.log");
    server->Shutdown(std::chrono::system_clock::now() + 1s);
  }
}

}  // namespace
}  // namespace nbdcsi::test
