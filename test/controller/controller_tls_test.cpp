// Mutual TLS between nbd-csi-controller and nbd-datapathd, with certificates made by
// test/tls/make-certs.sh: both ends on CA-1 work end to end (registration and Datapath calls);
// a datapath holding certificates of an unrelated CA-2, or speaking plaintext, never becomes a
// usable node, and neither does a plaintext controller for a TLS datapath.
#include <signal.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <thread>

#include <gtest/gtest.h>

#include "test/controller/cluster.h"
#include "test/support/certs.h"
#include "test/support/wait.h"

namespace nbdcsi::test {
namespace {

namespace v1 = ::csi::v1;
using namespace std::chrono_literals;
using grpc::StatusCode;

class TlsTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() { certs_ = new TestCerts("nbdcsi-certs", "node-a"); }
  static void TearDownTestSuite() { delete certs_; }
  void SetUp() override {
    ASSERT_TRUE(certs_->ok) << "test/tls/make-certs.sh failed (openssl missing? NBDCSI_SRC "
                               "unset?), see "
                            << certs_->log();
  }
  static std::string Ca1() { return certs_->path(); }
  static std::string Ca2() { return (*certs_)("other"); }

  // CreateVolume bound to node-a: the full path controller -> datapath over the node's TLS API.
  static grpc::Status CreateOnNodeA(Cluster& c, const std::string& name) {
    auto req = VolumeRequest(name, 1 << 20);
    *req.mutable_accessibility_requirements()->add_requisite() = NodeTopology("node-a");
    v1::CreateVolumeResponse resp;
    return c.controller().CreateVolume(Ctx().get(), req, &resp);
  }

  // The refusal must come from the handshake, not from a datapath that never started.
  static void AssertAlive(Cluster& c) {
    EXPECT_GT(c.datapath_pid(0), 0);
    EXPECT_EQ(kill(c.datapath_pid(0), 0), 0) << c.LogTail("node-a");
  }

  // One end speaks plaintext: the node never registers, and a volume bound to it is UNAVAILABLE.
  static void ExpectPlaintextRefused(const TlsDirs& tls, const std::string& volume) {
    ClusterOptions o;
    o.nodes = {"node-a"};
    o.tls = tls;
    o.wait_registered = false;
    Cluster c(o);
    ASSERT_EQ(c.Start(), "");
    EXPECT_FALSE(c.WaitRegistered("node-a", 2s));
    AssertAlive(c);
    EXPECT_EQ(CreateOnNodeA(c, volume).error_code(), StatusCode::UNAVAILABLE);
  }

  static TestCerts* certs_;
};

TestCerts* TlsTest::certs_ = nullptr;

TEST_F(TlsTest, SameCaWorksEndToEnd) {
  ClusterOptions o;
  o.nodes = {"node-a"};
  o.tls = {Ca1(), Ca1()};
  Cluster c(o);
  ASSERT_EQ(c.Start(), "");
  grpc::Status s = CreateOnNodeA(c, "tls-good");
  ASSERT_TRUE(s.ok()) << s.error_message() << c.LogTail("controller");
  v1::ListVolumesResponse list;
  ASSERT_TRUE(c.controller().ListVolumes(Ctx().get(), {}, &list).ok());
  EXPECT_EQ(list.entries_size(), 1);
}

TEST_F(TlsTest, DatapathWithOtherCaIsNeverUsable) {
  ClusterOptions o;
  o.nodes = {"node-a"};
  o.tls = {Ca1(), Ca2()};
  o.wait_registered = false;
  Cluster c(o);
  ASSERT_EQ(c.Start(), "");
  EXPECT_FALSE(c.WaitRegistered("node-a", 2s)) << "a CA-2 datapath must not register";
  AssertAlive(c);
  grpc::Status s = CreateOnNodeA(c, "tls-bad");
  EXPECT_EQ(s.error_code(), StatusCode::UNAVAILABLE) << s.error_message();
}

TEST_F(TlsTest, PlaintextDatapathIsRefusedByTlsController) {
  ExpectPlaintextRefused({Ca1(), ""}, "tls-plain");
}

TEST_F(TlsTest, PlaintextControllerIsRefusedByTlsDatapath) {
  ExpectPlaintextRefused({"", Ca1()}, "tls-plain2");
}

// One certificate shared by every datapath cannot list every node's IP: the controller then checks
// a fixed name (--datapath-server-name) while dialling the advertised address. The test
// certificates carry DNS:localhost and IP:127.0.0.1, and datapaths advertise 127.0.0.1.
TEST_F(TlsTest, DatapathServerNameIsWhatTheControllerVerifies) {
  {
    ClusterOptions o;
    o.nodes = {"node-a"};
    o.tls = {Ca1(), Ca1()};
    o.controller_args = {"--datapath-server-name", "localhost"};
    Cluster c(o);
    ASSERT_EQ(c.Start(), "");
    grpc::Status s = CreateOnNodeA(c, "tls-name-good");
    EXPECT_TRUE(s.ok()) << s.error_message() << c.LogTail("controller");
  }
  {
    ClusterOptions o;
    o.nodes = {"node-a"};
    o.tls = {Ca1(), Ca1()};
    o.controller_args = {"--datapath-server-name", "not-the-datapath.example"};
    Cluster c(o);
    // Heartbeats (datapath -> controller) are unaffected: the node registers ...
    ASSERT_EQ(c.Start(), "");
    AssertAlive(c);
    // ... but the controller's calls to it fail the name check.
    grpc::Status s = CreateOnNodeA(c, "tls-name-bad");
    EXPECT_EQ(s.error_code(), StatusCode::UNAVAILABLE) << s.error_message();
  }
}

TEST_F(TlsTest, ControllerRefusesIncompleteTlsFlags) {
  // Neither certificates nor --insecure: the controller must not start in plaintext.
  Process p;
  std::string log = (std::filesystem::temp_directory_path() /
                     ("nbdcsi-tlsflags-" + std::to_string(getpid()) + ".log"))
                        .string();
  ASSERT_TRUE(p.Start({Cluster::Bin("nbd-csi-controller"), "--csi-endpoint",
                       "unix:///tmp/nbdcsi-tlsflags-" + std::to_string(getpid()) + ".sock",
                       "--registry-listen", "127.0.0.1:0", "--tls-cert", Ca1() + "/server.crt"},
                      log));
  WaitUntil([&] { return !p.Running(); }, 2s);
  EXPECT_FALSE(p.Running()) << "started with half the TLS flags";
  std::filesystem::remove(log);
}

}  // namespace
}  // namespace nbdcsi::test
