// StartCsiServer (sockets: stale, live, mode, tcp) and the Identity service over a real socket.
#include "csi/server.h"

#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <netinet/in.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <thread>

#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include "csi/csi.grpc.pb.h"
#include "csi/driver.h"
#include "csi/identity.h"
#include "test/support/grpc_call.h"
#include "test/support/temp_dir.h"
#include "test/support/wait.h"

namespace nbdcsi::csi {
namespace {

namespace v1 = ::csi::v1;

class CsiServerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(tmp_.Create("csi-srv")) << tmp_.error();
    dir_ = tmp_.path();
    sock_ = dir_ + "/sub/dir/csi.sock";  // parent directories do not exist yet
  }

  std::unique_ptr<v1::Identity::Stub> Connect(const std::string& target) {
    return test::InsecureStub<v1::Identity>(target);
  }

  // A socket file bound by a process that is gone (we close it without unlinking).
  void MakeStaleSocket(const std::string& path) {
    std::filesystem::create_directories(std::filesystem::path(path).parent_path());
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    ASSERT_GE(fd, 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    strncpy(addr.sun_path, path.c_str(), sizeof(addr.sun_path) - 1);
    ASSERT_EQ(bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0) << strerror(errno);
    close(fd);
  }

  test::TempDir tmp_;
  std::string dir_, sock_;
};

TEST_F(CsiServerTest, IdentityOverUnixSocket) {
  bool ready = false;
  auto identity = MakeIdentityService({.controller_service = true, .ready = [&]() -> Status {
                                         if (ready) return Status::Ok();
                                         return Error(EAGAIN, "no datapath registered yet");
                                       }});
  auto srv = StartCsiServer({.endpoint = "unix://" + sock_, .services = {identity.get()}});
  ASSERT_TRUE(srv.ok()) << srv.status().message();
  auto stub = Connect("unix:" + sock_);

  {
    grpc::ClientContext ctx;
    v1::GetPluginInfoResponse resp;
    ASSERT_TRUE(stub->GetPluginInfo(&ctx, {}, &resp).ok());
    EXPECT_EQ(resp.name(), "nbd.csi.io");
    EXPECT_EQ(resp.vendor_version(), DriverVersion());
    EXPECT_EQ(resp.vendor_version().substr(0, 5), "0.1.0");
  }
  {
    grpc::ClientContext ctx;
    v1::GetPluginCapabilitiesResponse resp;
    ASSERT_TRUE(stub->GetPluginCapabilities(&ctx, {}, &resp).ok());
    ASSERT_EQ(resp.capabilities_size(), 3);
    EXPECT_EQ(resp.capabilities(0).service().type(),
              v1::PluginCapability::Service::CONTROLLER_SERVICE);
    EXPECT_EQ(resp.capabilities(1).service().type(),
              v1::PluginCapability::Service::VOLUME_ACCESSIBILITY_CONSTRAINTS);
    EXPECT_EQ(resp.capabilities(2).volume_expansion().type(),
              v1::PluginCapability::VolumeExpansion::ONLINE);
  }
  for (bool want : {false, true}) {
    ready = want;
    grpc::ClientContext ctx;
    v1::ProbeResponse resp;
    ASSERT_TRUE(stub->Probe(&ctx, {}, &resp).ok()) << "not ready is an answer, not an error";
    ASSERT_TRUE(resp.has_ready());
    EXPECT_EQ(resp.ready().value(), want);
  }
  // A service that is not registered answers UNIMPLEMENTED.
  auto node = v1::Node::NewStub(grpc::CreateChannel("unix:" + sock_,
                                                    grpc::InsecureChannelCredentials()));
  grpc::ClientContext ctx;
  v1::NodeGetInfoResponse info;
  EXPECT_EQ(node->NodeGetInfo(&ctx, {}, &info).error_code(), grpc::StatusCode::UNIMPLEMENTED);

  (*srv)->Shutdown();
  (*srv)->Wait();
  EXPECT_FALSE(std::filesystem::exists(sock_)) << "Shutdown removes the socket file";
}

TEST_F(CsiServerTest, NodeIdentityHasNoControllerService) {
  auto identity = MakeIdentityService({.controller_service = false});
  auto srv = StartCsiServer({.endpoint = "unix://" + sock_, .services = {identity.get()}});
  ASSERT_TRUE(srv.ok()) << srv.status().message();
  grpc::ClientContext ctx;
  v1::GetPluginCapabilitiesResponse resp;
  ASSERT_TRUE(Connect("unix:" + sock_)->GetPluginCapabilities(&ctx, {}, &resp).ok());
  for (const auto& c : resp.capabilities()) {
    EXPECT_NE(c.service().type(), v1::PluginCapability::Service::CONTROLLER_SERVICE);
  }
  grpc::ClientContext ctx2;
  v1::ProbeResponse probe;
  ASSERT_TRUE(Connect("unix:" + sock_)->Probe(&ctx2, {}, &probe).ok());
  EXPECT_TRUE(probe.ready().value()) << "no ready function: always ready";
}

TEST_F(CsiServerTest, SocketMode0600) {
  auto identity = MakeIdentityService({});
  auto srv = StartCsiServer({.endpoint = "unix://" + sock_, .services = {identity.get()}});
  ASSERT_TRUE(srv.ok()) << srv.status().message();
  struct stat st{};
  ASSERT_EQ(stat(sock_.c_str(), &st), 0);
  EXPECT_TRUE(S_ISSOCK(st.st_mode));
  EXPECT_EQ(st.st_mode & 07777, 0600u);
}

TEST_F(CsiServerTest, OtherSocketMode) {
  auto identity = MakeIdentityService({});
  auto srv = StartCsiServer(
      {.endpoint = "unix://" + sock_, .services = {identity.get()}, .socket_mode = 0660});
  ASSERT_TRUE(srv.ok()) << srv.status().message();
  struct stat st{};
  ASSERT_EQ(stat(sock_.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 07777, 0660u);
  auto bad = StartCsiServer({.endpoint = "unix://" + dir_ + "/x.sock",
                             .services = {identity.get()},
                             .socket_mode = 010600});
  EXPECT_EQ(bad.status().code(), EINVAL);
}

TEST(PeerUidsTest, RootAndOwnUidAlwaysExtrasOnRequest) {
  PeerUids none;
  EXPECT_TRUE(none.Allows(0));
  EXPECT_TRUE(none.Allows(geteuid()));
  EXPECT_FALSE(none.Allows(65534));
  EXPECT_EQ(none.SocketMode(), 0600u);
  PeerUids some{{65534, 1000}};
  EXPECT_TRUE(some.Allows(65534));
  EXPECT_TRUE(some.Allows(1000));
  EXPECT_FALSE(some.Allows(65533));
  EXPECT_EQ(some.SocketMode(), 0666u);
  EXPECT_NE(some.Describe().find("65534"), std::string::npos) << some.Describe();
}

TEST(PeerUidsTest, ParseUidTakesDecimalUidsOnly) {
  EXPECT_EQ(ParseUid("0").value(), 0u);
  EXPECT_EQ(ParseUid("65534").value(), 65534u);
  EXPECT_EQ(ParseUid("4294967294").value(), 4294967294u);
  for (const char* bad : {"", "-1", "nobody", "12a", " 1", "4294967295", "99999999999"}) {
    auto u = ParseUid(bad);
    EXPECT_EQ(u.status().code(), EINVAL) << bad;
    EXPECT_NE(u.status().message().find("--allow-uid"), std::string::npos) << bad;
  }
}

// Extra uids must be able to connect(2): the socket is 0666 and SO_PEERCRED decides.
TEST_F(CsiServerTest, AllowUidOpensTheModeAndStillServes) {
  auto identity = MakeIdentityService({});
  auto srv = StartCsiServer(
      {.endpoint = "unix://" + sock_, .services = {identity.get()}, .peers = {{65534}}});
  ASSERT_TRUE(srv.ok()) << srv.status().message();
  struct stat st{};
  ASSERT_EQ(stat(sock_.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 07777, 0666u);
  grpc::ClientContext ctx;
  v1::GetPluginInfoResponse resp;
  EXPECT_TRUE(Connect("unix:" + sock_)->GetPluginInfo(&ctx, {}, &resp).ok());
  // No temporary socket name is left next to it.
  for (const auto& e :
       std::filesystem::directory_iterator(std::filesystem::path(sock_).parent_path())) {
    EXPECT_EQ(e.path(), sock_);
  }
  (*srv)->Shutdown();
  (*srv)->Wait();
  EXPECT_FALSE(std::filesystem::exists(sock_));
}

TEST_F(CsiServerTest, StaleSocketIsReplaced) {
  MakeStaleSocket(sock_);
  ASSERT_TRUE(std::filesystem::is_socket(sock_));
  auto identity = MakeIdentityService({});
  auto srv = StartCsiServer({.endpoint = "unix://" + sock_, .services = {identity.get()}});
  ASSERT_TRUE(srv.ok()) << srv.status().message();
  grpc::ClientContext ctx;
  v1::GetPluginInfoResponse resp;
  EXPECT_TRUE(Connect("unix:" + sock_)->GetPluginInfo(&ctx, {}, &resp).ok());
}

TEST_F(CsiServerTest, LiveSocketIsInUse) {
  auto identity = MakeIdentityService({});
  auto first = StartCsiServer({.endpoint = "unix://" + sock_, .services = {identity.get()}});
  ASSERT_TRUE(first.ok()) << first.status().message();
  auto identity2 = MakeIdentityService({});
  auto second = StartCsiServer({.endpoint = "unix://" + sock_, .services = {identity2.get()}});
  ASSERT_FALSE(second.ok());
  EXPECT_EQ(second.status().code(), EADDRINUSE) << second.status().message();
  // The running server is untouched.
  grpc::ClientContext ctx;
  v1::GetPluginInfoResponse resp;
  EXPECT_TRUE(Connect("unix:" + sock_)->GetPluginInfo(&ctx, {}, &resp).ok());
}

TEST_F(CsiServerTest, NotASocketIsLeftAlone) {
  std::filesystem::create_directories(std::filesystem::path(sock_).parent_path());
  { FILE* f = fopen(sock_.c_str(), "w"); ASSERT_TRUE(f); fputs("data", f); fclose(f); }
  auto identity = MakeIdentityService({});
  auto srv = StartCsiServer({.endpoint = "unix://" + sock_, .services = {identity.get()}});
  ASSERT_FALSE(srv.ok());
  EXPECT_EQ(srv.status().code(), EEXIST) << srv.status().message();
  EXPECT_TRUE(std::filesystem::is_regular_file(sock_));
}

TEST_F(CsiServerTest, BadEndpoint) {
  for (const char* e : {"", "/tmp/x.sock", "unix://relative", "http://x:1"}) {
    auto srv = StartCsiServer({.endpoint = e});
    ASSERT_FALSE(srv.ok()) << e;
    EXPECT_EQ(srv.status().code(), EINVAL) << e;
  }
}

// A port the kernel just handed out and that nobody holds now (endpoints refuse port 0).
int FreeTcpPort() {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof(a);
  if (bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0 ||
      getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) != 0) {
    close(fd);
    return -1;
  }
  close(fd);
  return ntohs(a.sin_port);
}

TEST_F(CsiServerTest, TcpEndpoint) {
  const int port = FreeTcpPort();
  ASSERT_GT(port, 0);
  auto identity = MakeIdentityService({});
  auto srv = StartCsiServer({.endpoint = "tcp://127.0.0.1:" + std::to_string(port),
                             .services = {identity.get()}});
  ASSERT_TRUE(srv.ok()) << srv.status().message();
  EXPECT_EQ((*srv)->port(), port);
  grpc::ClientContext ctx;
  v1::GetPluginInfoResponse resp;
  EXPECT_TRUE(Connect("127.0.0.1:" + std::to_string((*srv)->port()))
                  ->GetPluginInfo(&ctx, {}, &resp)
                  .ok());
}

TEST_F(CsiServerTest, ShutdownIsIdempotent) {
  auto identity = MakeIdentityService({});
  auto srv = StartCsiServer({.endpoint = "unix://" + sock_, .services = {identity.get()}});
  ASSERT_TRUE(srv.ok());
  (*srv)->Shutdown(std::chrono::milliseconds(100));
  (*srv)->Shutdown();
  (*srv)->Wait();
  srv->reset();  // the destructor shuts down again
  // The path is free for the next start.
  auto again = StartCsiServer({.endpoint = "unix://" + sock_, .services = {identity.get()}});
  EXPECT_TRUE(again.ok()) << again.status().message();
}

// Answers CreateVolume after `delay`, or as soon as the call is cancelled.
class SlowController final : public v1::Controller::Service {
 public:
  explicit SlowController(std::chrono::milliseconds delay) : delay_(delay) {}
  grpc::Status CreateVolume(grpc::ServerContext* ctx, const v1::CreateVolumeRequest* req,
                            v1::CreateVolumeResponse* resp) override {
    started.Notify();
    const auto end = std::chrono::steady_clock::now() + delay_;
    while (std::chrono::steady_clock::now() < end) {
      if (ctx->IsCancelled()) return grpc::Status(grpc::StatusCode::CANCELLED, "cancelled");
      // The stimulus: a handler that is slow on purpose (a synchronous handler has no
      // cancellation event to wait on, so it looks every 5 ms).
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    resp->mutable_volume()->set_volume_id("v1:n:" + req->name());
    return grpc::Status::OK;
  }
  test::Event started;

 private:
  std::chrono::milliseconds delay_;
};

struct CallResult {
  grpc::Status status;
  std::string volume_id;
};

CallResult CallCreate(const std::string& target) {
  auto stub = test::InsecureStub<v1::Controller>(target);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(20));
  v1::CreateVolumeRequest req;
  req.set_name("slow");
  v1::CreateVolumeResponse resp;
  CallResult r;
  r.status = stub->CreateVolume(&ctx, req, &resp);
  r.volume_id = resp.volume().volume_id();
  return r;
}

TEST_F(CsiServerTest, ShutdownLetsInFlightCallsFinishWithinGrace) {
  SlowController slow(std::chrono::milliseconds(300));
  auto srv = StartCsiServer({.endpoint = "unix://" + sock_, .services = {&slow}});
  ASSERT_TRUE(srv.ok());
  CallResult result;
  std::thread caller([&] { result = CallCreate("unix:" + sock_); });
  ASSERT_TRUE(slow.started.Wait());
  (*srv)->Shutdown(std::chrono::seconds(10));
  (*srv)->Wait();
  caller.join();
  EXPECT_TRUE(result.status.ok()) << result.status.error_message();
  EXPECT_EQ(result.volume_id, "v1:n:slow");
}

TEST_F(CsiServerTest, ShutdownCancelsCallsAfterGrace) {
  SlowController slow(std::chrono::seconds(15));
  auto srv = StartCsiServer({.endpoint = "unix://" + sock_, .services = {&slow}});
  ASSERT_TRUE(srv.ok());
  CallResult result;
  std::thread caller([&] { result = CallCreate("unix:" + sock_); });
  ASSERT_TRUE(slow.started.Wait());
  const auto t0 = std::chrono::steady_clock::now();
  (*srv)->Shutdown(std::chrono::milliseconds(100));
  (*srv)->Wait();
  caller.join();
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(5));
  EXPECT_FALSE(result.status.ok());
}

// kubelet and the sidecars keep their connection open between calls. A client that is connected
// (HTTP/2 preface and SETTINGS sent) but makes no call must not hold a stop up to the grace: the
// node plugin's every stop took the full 5 s before the drain counted calls instead.
TEST_F(CsiServerTest, ShutdownDoesNotWaitForAnIdleConnectedClient) {
  auto identity = MakeIdentityService({});
  auto srv = StartCsiServer({.endpoint = "unix://" + sock_, .services = {identity.get()}});
  ASSERT_TRUE(srv.ok());
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  ASSERT_GE(fd, 0);
  sockaddr_un a{};
  a.sun_family = AF_UNIX;
  std::strncpy(a.sun_path, sock_.c_str(), sizeof a.sun_path - 1);
  ASSERT_EQ(connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a), 0) << std::strerror(errno);
  static const char kHello[] =
      "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"  // the client preface, then an empty SETTINGS frame
      "\x00\x00\x00\x04\x00\x00\x00\x00\x00";
  ASSERT_EQ(send(fd, kHello, sizeof kHello - 1, MSG_NOSIGNAL), static_cast<ssize_t>(sizeof kHello - 1));
  // The server has taken the connection once its own SETTINGS arrive.
  char buf[64];
  ASSERT_GT(recv(fd, buf, sizeof buf, 0), 0);
  const auto t0 = std::chrono::steady_clock::now();
  (*srv)->Shutdown(std::chrono::seconds(5));
  (*srv)->Wait();
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(1));
  close(fd);
}

}  // namespace
}  // namespace nbdcsi::csi
