// TLS credentials (common/tls.h), node ids (common/node_id.h), and the API server's TCP listener
// with mutual TLS: the good certificate gets in, a certificate from another CA, no certificate
// and plaintext do not, and the TCP side serves the Datapath service only. Node identity (a
// node certificate's URI SAN, checked when dialling a node and refused on the datapath API),
// and reloading: a bad or half-written set never replaces the one in force, a Kubernetes-style
// secret swap to another CA is served to new connections while an open one keeps working.
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>
#include <thread>

#include <gtest/gtest.h>
#include <grpcpp/grpcpp.h>

#include "common/node_id.h"
#include "common/tls.h"
#include "datapath/api/attach.grpc.pb.h"
#include "datapath/api/datapath.grpc.pb.h"
#include "datapath/api/service.h"
#include "test/support/secret_dir.h"
#include "test/support/certs.h"
#include "test/support/grpc_call.h"

namespace fs = std::filesystem;
using namespace nbdcsi;
using namespace nbdcsi::datapath;
namespace v1 = ::nbdcsi::datapath::v1;

namespace {

using test::ReadWholeFile;
using test::SslClient;

// Runs test/tls/make-certs.sh into dir (node certificates for node-a and node-b), its output
// into dir.log.
bool MakeCerts(const std::string& dir) {
  return test::MakeCerts(dir, dir + ".log", "node-a node-b");
}

// One certificate set for the whole binary (each run of the script costs a few hundred ms);
// removed at exit. Tests that modify certificates make their own.
const test::TestCerts& SharedCerts() {
  static test::TestCerts d("tls_certs", "node-a node-b");
  return d;
}

TlsFiles Files(const std::string& dir, const std::string& who) {
  return TlsFiles{dir + "/" + who + ".crt", dir + "/" + who + ".key", dir + "/ca.crt", false};
}

void WriteFile(const std::string& path, const std::string& data) {
  std::ofstream(path) << data;
}

template <typename F>
bool Eventually(F ok, std::chrono::milliseconds timeout) {
  auto end = std::chrono::steady_clock::now() + timeout;
  while (std::chrono::steady_clock::now() < end) {
    if (ok()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));  // the poll of a bounded wait
  }
  return ok();
}

}  // namespace

TEST(NodeId, AcceptsKubernetesNodeNames) {
  for (const char* id : {"a", "0", "node-1", "node-1.example.com", "ip-10-0-0-1.ec2.internal"}) {
    EXPECT_TRUE(ValidateNodeId(id).ok()) << id;
  }
  EXPECT_TRUE(ValidateNodeId(std::string(253, 'a')).ok());
}

TEST(NodeId, RefusesOthersWithTheReason) {
  struct Case {
    std::string id;
    const char* why;
  } cases[] = {
      {"", "empty"},
      {std::string(254, 'a'), "at most 253"},
      {"Node1", "'N' is not allowed"},
      {"node_1", "'_' is not allowed"},
      {"node 1", "' ' is not allowed"},
      {"node/1", "'/' is not allowed"},
      {"-node", "start and end"},
      {"node.", "start and end"},
  };
  for (const auto& c : cases) {
    Status s = ValidateNodeId(c.id);
    EXPECT_EQ(s.code(), EINVAL) << c.id;
    EXPECT_NE(s.message().find(c.why), std::string::npos) << c.id << ": " << s.message();
  }
}

TEST(HostPort, ParsesLikeAGrpcTarget) {
  for (const char* a : {"127.0.0.1:9820", "localhost:1", "[::1]:9820", "node-1.svc:65535"}) {
    EXPECT_TRUE(ValidateHostPort(a).ok()) << a;
  }
  for (const char* a : {"", "host", "host:", ":80", "host:0", "host:65536", "tcp://host:80",
                        "::1:80", "bad host:80"}) {
    Status s = ValidateHostPort(a);
    EXPECT_EQ(s.code(), EINVAL) << a;
    EXPECT_NE(s.message().find(std::string("\"") + a + "\""), std::string::npos) << s.message();
  }
}

TEST(HostPort, DialAddressesAreNotWildcards) {
  EXPECT_TRUE(ValidateHostPort("0.0.0.0:9820").ok());  // fine to listen on
  for (const char* a : {"0.0.0.0:9820", "[::]:9820"}) {
    Status s = ValidateDialAddress(a);
    EXPECT_EQ(s.code(), EINVAL) << a;
    EXPECT_NE(s.message().find("wildcard"), std::string::npos) << s.message();
  }
  EXPECT_TRUE(ValidateDialAddress("10.0.0.1:9820").ok());
  EXPECT_EQ(ValidateDialAddress("host").code(), EINVAL);
}

TEST(NodeIdentity, OnlyUrisUnderTheNodePrefixNameNodes) {
  EXPECT_EQ(NodeIdentityUri("node-a"), "spiffe://nbd.csi.io/node/node-a");
  EXPECT_EQ(NodeIdsInUris({"spiffe://nbd.csi.io/node/b", "https://nbd.csi.io/node/x",
                           "spiffe://nbd.csi.io/node/", "spiffe://nbd.csi.io/nodes/y",
                           "spiffe://other.io/node/z", "spiffe://nbd.csi.io/node/a",
                           "spiffe://nbd.csi.io/node/b"}),
            (std::vector<std::string>{"a", "b"}));
  EXPECT_TRUE(NodeIdsInUris({}).empty());
}

TEST(TlsFiles, ValidateNamesWhatIsMissingOrConflicting) {
  EXPECT_TRUE((TlsFiles{"c", "k", "a", false}).Validate().ok());
  EXPECT_TRUE((TlsFiles{"", "", "", true}).Validate().ok());
  Status none = TlsFiles{}.Validate();
  EXPECT_EQ(none.code(), EINVAL);
  EXPECT_NE(none.message().find("--insecure"), std::string::npos) << none.message();
  Status part = TlsFiles{"c", "", "", false}.Validate();
  EXPECT_EQ(part.code(), EINVAL);
  EXPECT_NE(part.message().find("missing --tls-key, --tls-ca"), std::string::npos)
      << part.message();
  Status both = TlsFiles{"c", "k", "a", true}.Validate();
  EXPECT_EQ(both.code(), EINVAL);
  EXPECT_NE(both.message().find("cannot be combined"), std::string::npos) << both.message();
}

class TlsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(tmp_.Create("tls_test")) << tmp_.error();
    dir_ = tmp_.path();
    ASSERT_TRUE(SharedCerts().ok) << "make-certs.sh failed, see " << SharedCerts().log();
    certs_ = SharedCerts().path();
  }
  void TearDown() override { tmp_.Remove(); }
  test::TempDir tmp_;
  std::string dir_, certs_;
};

TEST_F(TlsTest, CertScriptIsIdempotentAndKeepsKeysPrivate) {
  certs_ = dir_ + "/own";  // this test rewrites files
  ASSERT_TRUE(MakeCerts(certs_));
  auto mtime = fs::last_write_time(certs_ + "/server.crt");
  ASSERT_TRUE(MakeCerts(certs_));
  EXPECT_EQ(fs::last_write_time(certs_ + "/server.crt"), mtime) << "a complete set was redone";
  for (const char* k : {"/ca.key", "/server.key", "/client.key", "/other/client.key",
                        "/node-node-a.key", "/node-node-a-expired.key", "/other/node-node-b.key"}) {
    struct stat st{};
    ASSERT_EQ(stat((certs_ + k).c_str(), &st), 0) << k;
    EXPECT_EQ(st.st_mode & 0777, 0600u) << k;
  }
  // A partial set (an interrupted run) is made again.
  fs::remove(certs_ + "/other/server.key");
  ASSERT_TRUE(MakeCerts(certs_));
  EXPECT_TRUE(fs::exists(certs_ + "/other/server.key"));
  // A missing node certificate is added to a complete set, signed by the same CA.
  fs::remove(certs_ + "/node-node-b.crt");
  const std::string ca = ReadWholeFile(certs_ + "/ca.crt");
  ASSERT_TRUE(MakeCerts(certs_));
  EXPECT_EQ(ReadWholeFile(certs_ + "/ca.crt"), ca);
  auto b = TlsCredentials::Load(Files(certs_, "node-node-b"));
  ASSERT_TRUE(b.ok()) << b.status().message();
  EXPECT_EQ((*b)->NodeIds(), std::vector<std::string>{"node-b"});
  fs::remove(certs_ + ".log");
}

TEST_F(TlsTest, LoadChecksTheMaterialAndReadsTheNodeIdentity) {
  auto node = TlsCredentials::Load(Files(certs_, "node-node-a"));
  ASSERT_TRUE(node.ok()) << node.status().message();
  EXPECT_EQ((*node)->NodeIds(), std::vector<std::string>{"node-a"});
  auto plain = TlsCredentials::Load(Files(certs_, "server"));
  ASSERT_TRUE(plain.ok());
  EXPECT_TRUE((*plain)->NodeIds().empty());

  TlsFiles t = Files(certs_, "node-node-a");
  t.key = certs_ + "/node-node-b.key";
  auto mismatch = TlsCredentials::Load(t);
  ASSERT_FALSE(mismatch.ok());
  EXPECT_EQ(mismatch.status().code(), EINVAL);
  EXPECT_NE(mismatch.status().message().find("does not belong to --tls-cert"), std::string::npos)
      << mismatch.status().message();

  auto expired = TlsCredentials::Load(Files(certs_, "node-node-a-expired"));
  ASSERT_FALSE(expired.ok());
  EXPECT_NE(expired.status().message().find("expired on"), std::string::npos)
      << expired.status().message();

  const std::string cert = ReadWholeFile(certs_ + "/server.crt");
  WriteFile(dir_ + "/half.crt", cert.substr(0, cert.size() / 2));
  t = Files(certs_, "server");
  t.cert = dir_ + "/half.crt";
  auto half = TlsCredentials::Load(t);
  ASSERT_FALSE(half.ok());
  EXPECT_NE(half.status().message().find("--tls-cert"), std::string::npos)
      << half.status().message();

  EXPECT_EQ(TlsCredentials::Load(TlsFiles{"", "", "", true}).status().code(), EINVAL);
}

TEST_F(TlsTest, CredentialErrorsNameTheFlagAndPath) {
  TlsFiles t = Files(certs_, "server");
  t.key = dir_ + "/missing.key";
  auto s = MakeServerCredentials(t);
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.status().code(), ENOENT);
  EXPECT_NE(s.status().message().find("--tls-key"), std::string::npos) << s.status().message();
  EXPECT_NE(s.status().message().find("missing.key"), std::string::npos) << s.status().message();

  // Key and certificate swapped: caught before gRPC sees them.
  t = Files(certs_, "server");
  std::swap(t.cert, t.key);
  auto c = MakeChannelCredentials(t);
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), EINVAL);
  EXPECT_NE(c.status().message().find("--tls-cert"), std::string::npos) << c.status().message();

  WriteFile(dir_ + "/junk.pem", "not a certificate\n");
  t = Files(certs_, "server");
  t.ca = dir_ + "/junk.pem";
  auto j = MakeServerCredentials(t);
  ASSERT_FALSE(j.ok());
  EXPECT_EQ(j.status().code(), EINVAL);
  EXPECT_NE(j.status().message().find("--tls-ca"), std::string::npos) << j.status().message();
  EXPECT_NE(j.status().message().find("not a PEM file"), std::string::npos);

  EXPECT_EQ(MakeServerCredentials(TlsFiles{}).status().code(), EINVAL);
  EXPECT_TRUE(MakeServerCredentials(TlsFiles{"", "", "", true}).ok());
  EXPECT_TRUE(MakeChannelCredentials(Files(certs_, "client")).ok());
}

// Counts ListAttachments calls, to tell where the extra services are served.
class FakeAttachments final : public v1::Attachments::Service {
 public:
  grpc::Status ListAttachments(grpc::ServerContext*, const v1::ListAttachmentsRequest*,
                               v1::ListAttachmentsResponse*) override {
    return grpc::Status::OK;
  }
};

class ApiTlsTest : public TlsTest {
 protected:
  void SetUp() override {
    TlsTest::SetUp();
    if (HasFatalFailure()) return;
    PoolOptions opts;
    opts.dir = dir_ + "/pool";
    opts.capacity_bytes = uint64_t{1} << 30;
    auto pool = Pool::Open(opts);
    ASSERT_TRUE(pool.ok()) << pool.status().message();
    pool_ = std::move(*pool);
    sock_ = dir_ + "/api.sock";
  }
  void TearDown() override {
    server_.reset();
    pool_.reset();
    TlsTest::TearDown();
  }

  // unix + mTLS tcp on a free port (retried on a port race).
  void Start() {
    auto creds = MakeServerCredentials(Files(certs_, "server"));
    ASSERT_TRUE(creds.ok()) << creds.status().message();
    StartWith(*creds);
  }
  void StartWith(const std::shared_ptr<grpc::ServerCredentials>& creds) {
    for (int port = 43000 + getpid() % 1000, tries = 0; tries < 20 && !server_; ++port, ++tries) {
      std::vector<ApiListen> l(2);
      l[0].endpoint = "unix://" + sock_;
      l[1].endpoint = "tcp://127.0.0.1:" + std::to_string(port);
      l[1].creds = creds;
      auto s = StartApiServer(*pool_, l, {&attach_});
      if (s.ok()) server_ = std::move(*s);
    }
    ASSERT_NE(server_, nullptr);
    ASSERT_EQ(server_->ports().size(), 2u);
    target_ = "127.0.0.1:" + std::to_string(server_->ports()[1]);
  }

  static std::unique_ptr<grpc::ClientContext> Ctx() {
    return test::CallContext(std::chrono::seconds(5));
  }

  grpc::Status PoolInfo(const std::shared_ptr<grpc::ChannelCredentials>& creds,
                        const std::string& target) {
    auto stub = v1::Datapath::NewStub(grpc::CreateChannel(target, creds));
    v1::GetPoolInfoResponse info;
    return stub->GetPoolInfo(Ctx().get(), {}, &info);
  }

  std::shared_ptr<grpc::ChannelCredentials> Client(const std::string& dir, const char* who) {
    auto c = MakeChannelCredentials(Files(dir, who));
    EXPECT_TRUE(c.ok()) << c.status().message();
    return c.ok() ? *c : nullptr;
  }

  std::unique_ptr<Pool> pool_;
  std::unique_ptr<ApiServer> server_;
  FakeAttachments attach_;
  std::string sock_, target_;
};

TEST_F(ApiTlsTest, GoodClientCertificateIsServed) {
  ASSERT_NO_FATAL_FAILURE(Start());
  grpc::Status st = PoolInfo(Client(certs_, "client"), target_);
  EXPECT_TRUE(st.ok()) << st.error_message();
  // By name too: the server certificate carries DNS:localhost.
  st = PoolInfo(Client(certs_, "client"), "localhost:" + std::to_string(server_->ports()[1]));
  EXPECT_TRUE(st.ok()) << st.error_message();
  // The unix socket still works, without TLS.
  EXPECT_TRUE(PoolInfo(grpc::InsecureChannelCredentials(), "unix://" + sock_).ok());
  struct stat sst{};
  ASSERT_EQ(stat(sock_.c_str(), &sst), 0);
  EXPECT_EQ(sst.st_mode & 07777, 0600u);
}

TEST_F(ApiTlsTest, OtherCaPlaintextAndNoCertificateAreRefused) {
  ASSERT_NO_FATAL_FAILURE(Start());
  // A client certificate from another CA: the server refuses the handshake.
  grpc::Status other = PoolInfo(Client(certs_ + "/other", "client"), target_);
  EXPECT_EQ(other.error_code(), grpc::StatusCode::UNAVAILABLE) << other.error_message();
  // A client that trusts our CA but presents no certificate.
  grpc::SslCredentialsOptions anon;
  std::ifstream ca(certs_ + "/ca.crt");
  anon.pem_root_certs.assign(std::istreambuf_iterator<char>(ca), {});
  grpc::Status nocert = PoolInfo(grpc::SslCredentials(anon), target_);
  EXPECT_EQ(nocert.error_code(), grpc::StatusCode::UNAVAILABLE) << nocert.error_message();
  // The client refuses a server whose certificate another CA signed (its own CA is "other").
  TlsFiles mixed = Files(certs_, "client");
  mixed.ca = certs_ + "/other/ca.crt";
  auto mixed_creds = MakeChannelCredentials(mixed);
  ASSERT_TRUE(mixed_creds.ok());
  grpc::Status untrusted = PoolInfo(*mixed_creds, target_);
  EXPECT_EQ(untrusted.error_code(), grpc::StatusCode::UNAVAILABLE) << untrusted.error_message();
  // Plaintext against the TLS port.
  grpc::Status plain = PoolInfo(grpc::InsecureChannelCredentials(), target_);
  EXPECT_EQ(plain.error_code(), grpc::StatusCode::UNAVAILABLE) << plain.error_message();
  // And the good one still works after all that.
  EXPECT_TRUE(PoolInfo(Client(certs_, "client"), target_).ok());
}

TEST_F(ApiTlsTest, ABusyTcpPortFailsTheStartAndLeavesNoSocket) {
  ASSERT_NO_FATAL_FAILURE(Start());
  auto creds = MakeServerCredentials(Files(certs_, "server"));
  ASSERT_TRUE(creds.ok());
  std::string sock2 = dir_ + "/api2.sock";
  std::vector<ApiListen> l(2);
  l[0].endpoint = "unix://" + sock2;
  l[1].endpoint = "tcp://" + target_;  // already served by the first server
  l[1].creds = *creds;
  auto second = StartApiServer(*pool_, l);
  ASSERT_FALSE(second.ok()) << "two servers share " << target_ << " (SO_REUSEPORT)";
  EXPECT_EQ(second.status().code(), EADDRNOTAVAIL);
  EXPECT_NE(second.status().message().find(target_), std::string::npos);
  EXPECT_FALSE(fs::exists(sock2));
  // The first one is untouched.
  EXPECT_TRUE(PoolInfo(Client(certs_, "client"), target_).ok());
}

TEST_F(ApiTlsTest, TcpServesTheDatapathServiceOnly) {
  ASSERT_NO_FATAL_FAILURE(Start());
  v1::ListAttachmentsResponse resp;
  auto local = v1::Attachments::NewStub(
      grpc::CreateChannel("unix://" + sock_, grpc::InsecureChannelCredentials()));
  EXPECT_TRUE(local->ListAttachments(Ctx().get(), {}, &resp).ok());
  auto remote = v1::Attachments::NewStub(grpc::CreateChannel(target_, Client(certs_, "client")));
  EXPECT_EQ(remote->ListAttachments(Ctx().get(), {}, &resp).error_code(),
            grpc::StatusCode::UNIMPLEMENTED);
}

TEST_F(ApiTlsTest, ListenerRulesAreCheckedBeforeAnythingBinds) {
  std::vector<ApiListen> l(2);
  l[0].endpoint = "unix://" + sock_;
  l[1].endpoint = "tcp://127.0.0.1:43999";
  auto plain = StartApiServer(*pool_, l);
  ASSERT_FALSE(plain.ok());
  EXPECT_EQ(plain.status().code(), EINVAL);
  EXPECT_NE(plain.status().message().find("plaintext"), std::string::npos);
  EXPECT_FALSE(fs::exists(sock_)) << "the unix socket was bound although the TCP one was refused";

  std::vector<ApiListen> u(1);
  u[0].endpoint = "unix://" + sock_;
  auto creds = MakeServerCredentials(Files(certs_, "server"));
  ASSERT_TRUE(creds.ok());
  u[0].creds = *creds;
  EXPECT_EQ(StartApiServer(*pool_, u).status().code(), EINVAL);
  EXPECT_EQ(StartApiServer(*pool_, std::vector<ApiListen>{}).status().code(), EINVAL);

  // Plaintext TCP when asked for explicitly (loopback tests).
  std::unique_ptr<ApiServer> server;
  for (int port = 44000 + getpid() % 1000, tries = 0; tries < 20 && !server; ++port, ++tries) {
    std::vector<ApiListen> i(1);
    i[0].endpoint = "tcp://127.0.0.1:" + std::to_string(port);
    i[0].insecure = true;
    auto s = StartApiServer(*pool_, i);
    if (s.ok()) server = std::move(*s);
  }
  ASSERT_NE(server, nullptr);
  EXPECT_TRUE(PoolInfo(grpc::InsecureChannelCredentials(),
                       "127.0.0.1:" + std::to_string(server->port())).ok());
}

TEST_F(ApiTlsTest, ExpiredAndMissingClientCertificatesAreRefused) {
  ASSERT_NO_FATAL_FAILURE(Start());
  grpc::Status expired = PoolInfo(SslClient(certs_, "client-expired", certs_), target_);
  EXPECT_EQ(expired.error_code(), grpc::StatusCode::UNAVAILABLE) << expired.error_message();
  grpc::Status none = PoolInfo(SslClient(certs_, "", certs_), target_);
  EXPECT_EQ(none.error_code(), grpc::StatusCode::UNAVAILABLE) << none.error_message();
  EXPECT_TRUE(PoolInfo(SslClient(certs_, "client", certs_), target_).ok());
}

// Dialling node N accepts only a certificate that names N: the address alone proves nothing.
TEST_F(ApiTlsTest, ChannelToNodeAcceptsOnlyThatNodesCertificate) {
  auto a = TlsCredentials::Load(Files(certs_, "node-node-a"));
  ASSERT_TRUE(a.ok()) << a.status().message();
  ASSERT_NO_FATAL_FAILURE(StartWith((*a)->Server()));
  auto controller = TlsCredentials::Load(Files(certs_, "client"));
  ASSERT_TRUE(controller.ok());
  grpc::Status right = PoolInfo((*controller)->ChannelToNode("node-a"), target_);
  EXPECT_TRUE(right.ok()) << right.error_message();
  grpc::Status wrong = PoolInfo((*controller)->ChannelToNode("node-b"), target_);
  EXPECT_EQ(wrong.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_NE(wrong.error_message().find("for node node-a, not for node node-b"), std::string::npos)
      << wrong.error_message();
}

TEST_F(ApiTlsTest, ChannelToNodeRefusesACertificateWithoutNodeIdentity) {
  ASSERT_NO_FATAL_FAILURE(Start());  // server.crt: the CA signed it, it names no node
  auto controller = TlsCredentials::Load(Files(certs_, "client"));
  ASSERT_TRUE(controller.ok());
  grpc::Status st = PoolInfo((*controller)->ChannelToNode("node-a"), target_);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_NE(st.error_message().find("for no node"), std::string::npos) << st.error_message();
  // By host name it is fine: that is what --datapath-server-name setups rely on.
  EXPECT_TRUE(PoolInfo((*controller)->Channel(), target_).ok());
}

// The datapath's TCP API is the controller's: a node's certificate must not drive another node.
TEST_F(ApiTlsTest, NotNodesServerRefusesNodeCertificates) {
  auto server = TlsCredentials::Load(Files(certs_, "node-node-a"));
  ASSERT_TRUE(server.ok());
  ASSERT_NO_FATAL_FAILURE(StartWith((*server)->Server(TlsPeers::kNotNodes)));
  grpc::Status b = PoolInfo(Client(certs_, "node-node-b"), target_);
  EXPECT_EQ(b.error_code(), grpc::StatusCode::PERMISSION_DENIED) << b.error_message();
  EXPECT_NE(b.error_message().find("node node-b"), std::string::npos) << b.error_message();
  grpc::Status ctl = PoolInfo(Client(certs_, "client"), target_);
  EXPECT_TRUE(ctl.ok()) << ctl.error_message();
}

TEST_F(ApiTlsTest, RotationKeepsGoodMaterialAndServesANewCaToNewConnections) {
  const std::string main = certs_, other = certs_ + "/other";
  test::SecretDir s(dir_ + "/secret");
  s.VersionFrom("v1", main, "node-node-a", main);
  auto tls = TlsCredentials::Load(TlsFiles{s.cert(), s.key(), s.ca(), false});
  ASSERT_TRUE(tls.ok()) << tls.status().message();
  ASSERT_NO_FATAL_FAILURE(StartWith((*tls)->Server()));

  // One channel opened before any change: its connection must outlive every step below.
  auto live = v1::Datapath::NewStub(grpc::CreateChannel(target_, SslClient(main, "client", main)));
  v1::GetPoolInfoResponse info;
  ASSERT_TRUE(live->GetPoolInfo(Ctx().get(), {}, &info).ok());
  auto old_client_works = [&] { return PoolInfo(SslClient(main, "client", main), target_).ok(); };

  // Bad sets, each checked by the poller (files are polled every second; waited for through
  // refused_changes(), not slept for): a half-written certificate written in place, then a new
  // version whose key belongs to another certificate.
  const std::string real = fs::canonical(s.dir() + "/tls.crt").string();
  const std::string cert = ReadWholeFile(real);
  WriteFile(real, cert.substr(0, cert.size() / 2));
  ASSERT_TRUE(Eventually([&] { return (*tls)->refused_changes() >= 1; }, std::chrono::seconds(5)))
      << "the half-written certificate was not looked at";
  EXPECT_TRUE(old_client_works()) << "a half-written certificate replaced the working one";
  const uint64_t refused = (*tls)->refused_changes();
  s.Version("v2", ReadWholeFile(other + "/node-node-a.crt"),
            ReadWholeFile(main + "/node-node-a.key"),  // the key of the old certificate
            ReadWholeFile(other + "/ca.crt"));
  ASSERT_TRUE(
      Eventually([&] { return (*tls)->refused_changes() > refused; }, std::chrono::seconds(5)))
      << "the mismatched key was not looked at";
  EXPECT_TRUE(old_client_works()) << "a key of another certificate was put in force";
  EXPECT_EQ((*tls)->reloads(), 0u);

  // The real rotation: another CA altogether, swapped in like a secret volume update.
  s.VersionFrom("v3", other, "node-node-a", other);
  ASSERT_TRUE(Eventually([&] { return (*tls)->reloads() == 1; }, std::chrono::seconds(5)));
  EXPECT_TRUE(Eventually([&] { return PoolInfo(SslClient(other, "client", other), target_).ok(); },
                         std::chrono::seconds(5)))
      << "new connections do not get the new chain";
  // A client that trusts only the old CA is refused; so is one presenting an old-CA certificate.
  EXPECT_EQ(PoolInfo(SslClient(main, "client", main), target_).error_code(),
            grpc::StatusCode::UNAVAILABLE);
  EXPECT_EQ(PoolInfo(SslClient(main, "client", other), target_).error_code(),
            grpc::StatusCode::UNAVAILABLE);
  // The connection made before the rotation still carries calls.
  for (int i = 0; i < 5; ++i) {
    grpc::Status st = live->GetPoolInfo(Ctx().get(), {}, &info);
    ASSERT_TRUE(st.ok()) << "call " << i << " on the live channel: " << st.error_message();
  }
}
