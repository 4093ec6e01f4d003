// The node registry end to end. NodeRegistry logic runs on a fake clock (expiry, address changes,
// bad heartbeats). Then real nbd-datapathd processes (NBDCSI_BIN) heartbeat over mutual TLS to an
// in-test Registry server the way nbd-csi-controller runs it: the numbers arrive, the controller's
// Datapath channel works with the right certificate and nothing else does, a restarted registry
// hears from the node again within one interval, and bad flag combinations exit 2 with a message.
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/sysmacros.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>
#include <grpcpp/grpcpp.h>

#include "common/block_devices.h"
#include "common/tls.h"
#include "controller/node_datapath.h"
#include "controller/registry.h"
#include "datapath/api/datapath.grpc.pb.h"
#include "datapath/api/heartbeat.h"
#include "test/support/certs.h"
#include "test/support/free_port.h"
#include "test/support/grpc_call.h"
#include "test/support/temp_dir.h"
#include "test/support/wait.h"

namespace fs = std::filesystem;
using namespace std::chrono_literals;
using namespace nbdcsi;
using nbdcsi::controller::NodeInfo;
using nbdcsi::controller::NodeRegistry;
namespace v1 = ::nbdcsi::datapath::v1;
using std::chrono::milliseconds;
using std::chrono::steady_clock;

namespace {

constexpr uint64_t kMiB = uint64_t{1} << 20;
constexpr uint64_t kGiB = uint64_t{1} << 30;

v1::HeartbeatRequest Beat(const std::string& id, const std::string& addr, uint64_t free = 0) {
  v1::HeartbeatRequest r;
  r.set_node_id(id);
  r.set_api_address(addr);
  r.set_capacity_bytes(10 * kGiB);
  r.set_free_bytes(free);
  r.set_provisionable_bytes(7 * kGiB);
  r.set_provisioned_bytes(3 * kGiB);
  r.set_volumes(3);
  r.set_reflink(true);
  r.set_version("0.1.0");
  r.set_started_unix_ns(42);
  r.set_nbd_devices(16);
  return r;
}

struct FakeClock {
  steady_clock::time_point now = steady_clock::time_point{} + 1000h;
};

// The controller's real datapath clients (nothing is dialled until a call is made).
controller::NodeDatapathFactory GrpcDatapaths(std::shared_ptr<grpc::ChannelCredentials> creds,
                                              std::string tls_server_name = "") {
  controller::GrpcDatapathOptions o;
  o.creds = std::move(creds);
  o.tls_server_name = std::move(tls_server_name);
  o.timeout = 5s;
  return controller::MakeGrpcDatapathFactory(std::move(o));
}

// `made` (optional) records each client the registry asks for, as "node@address".
NodeRegistry MakeRegistry(FakeClock& clock, std::vector<std::string>* made = nullptr) {
  auto real = GrpcDatapaths(grpc::InsecureChannelCredentials());
  auto factory = [real, made](const std::string& node, const std::string& address) {
    if (made) made->push_back(node + "@" + address);
    return real(node, address);
  };
  return NodeRegistry(factory, 3000ms, 1000ms, [&clock] { return clock.now; });
}

}  // namespace

TEST(NodeRegistry, HeartbeatRegistersWithEveryField) {
  FakeClock clock;
  NodeRegistry reg = MakeRegistry(clock);
  EXPECT_FALSE(reg.Get("node-b").has_value());
  ASSERT_TRUE(reg.Heartbeat(Beat("node-b", "10.0.0.2:9820", 5 * kGiB)).ok());
  ASSERT_TRUE(reg.Heartbeat(Beat("node-a", "10.0.0.1:9820", 6 * kGiB)).ok());
  auto b = reg.Get("node-b");
  ASSERT_TRUE(b.has_value());
  EXPECT_EQ(b->node_id, "node-b");
  EXPECT_EQ(b->api_address, "10.0.0.2:9820");
  EXPECT_EQ(b->capacity_bytes, 10 * kGiB);
  EXPECT_EQ(b->free_bytes, 5 * kGiB);
  EXPECT_EQ(b->provisionable_bytes, 7 * kGiB);
  EXPECT_EQ(b->provisioned_bytes, 3 * kGiB);
  EXPECT_EQ(b->volumes, 3u);
  EXPECT_TRUE(b->reflink);
  EXPECT_EQ(b->nbd_devices, 16u);
  EXPECT_EQ(b->version, "0.1.0");
  EXPECT_EQ(b->started_unix_ns, 42);
  EXPECT_EQ(b->last_seen, clock.now);
  auto list = reg.List();
  ASSERT_EQ(list.size(), 2u);
  EXPECT_EQ(list[0].node_id, "node-a");  // sorted
  EXPECT_EQ(list[1].node_id, "node-b");
  // A later heartbeat replaces the numbers.
  clock.now += 1000ms;
  ASSERT_TRUE(reg.Heartbeat(Beat("node-b", "10.0.0.2:9820", 4 * kGiB)).ok());
  EXPECT_EQ(reg.Get("node-b")->free_bytes, 4 * kGiB);
  EXPECT_EQ(reg.Get("node-b")->last_seen, clock.now);
  EXPECT_EQ(reg.Get("node-b")->first_seen, clock.now - 1000ms);
}

TEST(NodeRegistry, ExpiresAfterTtlAndComesBackWithTheNextHeartbeat) {
  FakeClock clock;
  NodeRegistry reg = MakeRegistry(clock);
  ASSERT_TRUE(reg.Heartbeat(Beat("node-a", "127.0.0.1:9820")).ok());
  clock.now += 3000ms;  // exactly the ttl: still live
  EXPECT_TRUE(reg.Get("node-a").has_value());
  EXPECT_TRUE(reg.Datapath("node-a").ok());
  clock.now += 1ms;
  EXPECT_FALSE(reg.Get("node-a").has_value());
  EXPECT_TRUE(reg.List().empty());
  auto dp = reg.Datapath("node-a");
  ASSERT_FALSE(dp.ok());
  EXPECT_EQ(dp.status().code(), ENODEV);
  EXPECT_NE(dp.status().message().find("node-a"), std::string::npos) << dp.status().message();
  ASSERT_TRUE(reg.Heartbeat(Beat("node-a", "127.0.0.1:9820")).ok());
  EXPECT_TRUE(reg.Get("node-a").has_value());
  EXPECT_EQ(reg.Get("node-a")->first_seen, clock.now);  // a new registration
  EXPECT_TRUE(reg.Datapath("node-a").ok());
}

TEST(NodeRegistry, ChannelIsCachedPerAddressAndDroppedWhenItChanges) {
  FakeClock clock;
  std::vector<std::string> made;
  NodeRegistry reg = MakeRegistry(clock, &made);
  EXPECT_EQ(reg.Datapath("nobody").status().code(), ENODEV);
  ASSERT_TRUE(reg.Heartbeat(Beat("node-a", "127.0.0.1:9820")).ok());
  auto first = reg.Datapath("node-a");
  ASSERT_TRUE(first.ok());
  ASSERT_TRUE(reg.Heartbeat(Beat("node-a", "127.0.0.1:9820")).ok());
  auto same = reg.Datapath("node-a");
  ASSERT_TRUE(same.ok());
  EXPECT_EQ(first->get(), same->get()) << "same address: the client must be reused";
  ASSERT_TRUE(reg.Heartbeat(Beat("node-a", "127.0.0.1:9821")).ok());
  EXPECT_EQ(reg.Get("node-a")->api_address, "127.0.0.1:9821");
  auto moved = reg.Datapath("node-a");
  ASSERT_TRUE(moved.ok());
  EXPECT_NE(first->get(), moved->get()) << "a new address needs a new channel";
  EXPECT_EQ(made, (std::vector<std::string>{"node-a@127.0.0.1:9820", "node-a@127.0.0.1:9821"}));
}

TEST(NodeRegistry, BadHeartbeatsAreRefusedAndChangeNothing) {
  FakeClock clock;
  NodeRegistry reg = MakeRegistry(clock);
  ASSERT_TRUE(reg.Heartbeat(Beat("node-a", "127.0.0.1:9820")).ok());
  for (const char* id : {"", "Node-A", "node_a", "-node", "node-", "a/b"}) {
    Status s = reg.Heartbeat(Beat(id, "127.0.0.1:9820"));
    EXPECT_EQ(s.code(), EINVAL) << id;
    EXPECT_NE(s.message().find("node id"), std::string::npos) << s.message();
  }
  EXPECT_EQ(reg.Heartbeat(Beat(std::string(254, 'a'), "127.0.0.1:1")).code(), EINVAL);
  for (const char* addr : {"", "127.0.0.1", "127.0.0.1:0", "tcp://127.0.0.1:9820", "::1:9820",
                           "host name:1", "0.0.0.0:9820"}) {
    Status s = reg.Heartbeat(Beat("node-a", addr));
    EXPECT_EQ(s.code(), EINVAL) << addr;
    EXPECT_NE(s.message().find("node-a"), std::string::npos) << s.message();
  }
  ASSERT_EQ(reg.List().size(), 1u);
  EXPECT_EQ(reg.Get("node-a")->api_address, "127.0.0.1:9820");
}

TEST(NodeRegistry, ServiceMapsErrorsAndAnnouncesTheInterval) {
  FakeClock clock;
  NodeRegistry reg = MakeRegistry(clock);
  auto svc = controller::MakeRegistryService(reg);
  grpc::ServerBuilder b;
  b.RegisterService(svc.get());
  auto server = b.BuildAndStart();
  ASSERT_NE(server, nullptr);
  auto stub = v1::Registry::NewStub(server->InProcessChannel({}));
  v1::HeartbeatResponse resp;
  {
    grpc::ClientContext ctx;
    ASSERT_TRUE(stub->Heartbeat(&ctx, Beat("node-a", "[::1]:9820"), &resp).ok());
    EXPECT_EQ(resp.interval_ms(), 1000u);
  }
  {
    grpc::ClientContext ctx;
    grpc::Status st = stub->Heartbeat(&ctx, Beat("NODE", "[::1]:9820"), &resp);
    EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_NE(st.error_message().find("NODE"), std::string::npos) << st.error_message();
  }
  EXPECT_EQ(reg.List().size(), 1u);
  server->Shutdown();
}

TEST(Heartbeat, RequestCarriesThePoolNumbers) {
  datapath::HeartbeatOptions o;
  o.node_id = "n1";
  o.advertise = "10.1.1.1:9820";
  o.version = "9.9";
  o.started_unix_ns = 77;
  datapath::PoolInfo info;
  info.capacity = 10 * kGiB;
  info.overcommit_ratio = 2.0;
  info.provisioned = 15 * kGiB;
  info.free = 9 * kGiB;
  info.volumes = 4;
  info.reflink = true;
  v1::HeartbeatRequest r = datapath::MakeHeartbeatRequest(o, info, 3);
  EXPECT_EQ(r.node_id(), "n1");
  EXPECT_EQ(r.api_address(), "10.1.1.1:9820");
  EXPECT_EQ(r.capacity_bytes(), 10 * kGiB);
  EXPECT_EQ(r.free_bytes(), 9 * kGiB);
  EXPECT_EQ(r.provisioned_bytes(), 15 * kGiB);
  EXPECT_EQ(r.provisionable_bytes(), 5 * kGiB);  // 10 GiB x 2 - 15 GiB
  EXPECT_EQ(r.volumes(), 4u);
  EXPECT_TRUE(r.reflink());
  EXPECT_EQ(r.version(), "9.9");
  EXPECT_EQ(r.started_unix_ns(), 77);
  EXPECT_EQ(r.nbd_devices(), 3u);
  info.provisioned = 30 * kGiB;  // overcommitted beyond the ratio: nothing left, no wrap
  EXPECT_EQ(datapath::MakeHeartbeatRequest(o, info, 0).provisionable_bytes(), 0u);
}

// ---- HeartbeatSender in process ----

class SenderTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(tmp_.Create("hb_sender")) << tmp_.error();
    dir_ = tmp_.path();
    datapath::PoolOptions opts;
    opts.dir = dir_ + "/pool";
    opts.capacity_bytes = kGiB;
    auto pool = datapath::Pool::Open(opts);
    ASSERT_TRUE(pool.ok()) << pool.status().message();
    pool_ = std::move(*pool);
  }
  void TearDown() override {
    pool_.reset();
    tmp_.Remove();
  }
  datapath::HeartbeatOptions Options(const std::string& controller, milliseconds interval) {
    datapath::HeartbeatOptions o;
    o.node_id = "node-s";
    o.advertise = "127.0.0.1:9820";
    o.controller = controller;
    o.creds = grpc::InsecureChannelCredentials();
    o.interval = interval;
    return o;
  }
  test::TempDir tmp_;
  std::string dir_;
  std::unique_ptr<datapath::Pool> pool_;
};

// The sender's clock for counting what a window of time holds without waiting it out: each wait
// that ends inside the window returns at once with the clock at its deadline; the first that ends
// beyond it parks the sender (until Stop) and says so. Only the sender's thread moves the time.
class WindowClock final : public datapath::HeartbeatClock {
 public:
  explicit WindowClock(milliseconds window) : end_(steady_clock::time_point{} + window) {}
  steady_clock::time_point Now() override { return now_; }
  void WaitUntil(std::unique_lock<std::mutex>& lock, std::condition_variable& cv,
                 steady_clock::time_point deadline, const std::function<bool()>& stopped) override {
    if (stopped()) return;
    if (deadline < end_) {
      now_ = deadline;
      return;
    }
    parked.Notify();
    cv.wait(lock, stopped);
  }
  test::Event parked;

 private:
  const steady_clock::time_point end_;
  steady_clock::time_point now_{};
};

TEST_F(SenderTest, RefusesBadOptions) {
  struct Case {
    datapath::HeartbeatOptions o;
    const char* why;
  };
  std::vector<Case> cases;
  cases.push_back({Options("127.0.0.1:1", 1000ms), ""});
  cases.back().o.node_id = "Node";
  cases.back().why = "node id";
  cases.push_back({Options("127.0.0.1", 1000ms), "controller address"});
  cases.push_back({Options("127.0.0.1:1", 1000ms), "advertised address"});
  cases.back().o.advertise = "x";
  cases.push_back({Options("127.0.0.1:1", 10ms), "below the minimum"});
  cases.push_back({Options("127.0.0.1:1", 1000ms), "credentials"});
  cases.back().o.creds = nullptr;
  for (auto& c : cases) {
    datapath::HeartbeatSender sender(*pool_, c.o);
    Status s = sender.Start();
    EXPECT_EQ(s.code(), EINVAL) << c.why;
    EXPECT_NE(s.message().find(c.why), std::string::npos) << s.message();
  }
}

TEST_F(SenderTest, StopsPromptlyWhileACallHangs) {
  // A listener that never accepts: TCP connects (the kernel's backlog) and then nothing answers,
  // like a controller that hangs. Stop() must not wait out the 10 s interval or the call.
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof(a);
  ASSERT_EQ(bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)), 0);
  ASSERT_EQ(listen(fd, 16), 0);
  ASSERT_EQ(getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len), 0);
  datapath::HeartbeatSender sender(
      *pool_, Options("127.0.0.1:" + std::to_string(ntohs(a.sin_port)), 10000ms));
  ASSERT_TRUE(sender.Start().ok());
  // The sender has dialled once the listener has a connection to accept.
  pollfd pfd{fd, POLLIN, 0};
  ASSERT_EQ(poll(&pfd, 1, 10000), 1) << "the sender never connected";
  auto t0 = steady_clock::now();
  sender.Stop();
  EXPECT_LT(steady_clock::now() - t0, 1000ms);
  EXPECT_EQ(sender.counters().ok, 0u);
  EXPECT_FALSE(sender.counters().connected);
  sender.Stop();  // idempotent
  close(fd);
}

TEST_F(SenderTest, FollowsAShorterIntervalFromTheControllerAndStopsBetweenCalls) {
  // The registry asks for 150 ms; the sender was told 5 s.
  NodeRegistry reg(GrpcDatapaths(grpc::InsecureChannelCredentials()), 1000ms, 150ms);
  auto svc = controller::MakeRegistryService(reg);
  grpc::ServerBuilder b;
  int port = 0;
  b.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
  b.RegisterService(svc.get());
  auto server = b.BuildAndStart();
  ASSERT_NE(server, nullptr);
  auto opts = Options("127.0.0.1:" + std::to_string(port), 5000ms);
  auto clock = std::make_shared<WindowClock>(1000ms);
  opts.clock = clock;
  datapath::HeartbeatSender sender(*pool_, opts);
  ASSERT_TRUE(sender.Start().ok());
  // Counts what one second of the sender's clock holds; the clock parks it after that second.
  ASSERT_TRUE(clock->parked.Wait()) << "the sender never used up its second";
  auto c = sender.counters();
  // 1 + 1000/150 calls if the short interval is followed; 1 if not.
  EXPECT_GE(c.ok, 4u);
  EXPECT_LE(c.ok, 9u);
  EXPECT_TRUE(c.connected);
  auto node = reg.Get("node-s");
  ASSERT_TRUE(node.has_value());
  EXPECT_EQ(node->capacity_bytes, kGiB);
  auto t0 = steady_clock::now();
  sender.Stop();  // between calls: wakes the wait
  EXPECT_LT(steady_clock::now() - t0, 500ms);
  server->Shutdown();
}

TEST(Heartbeat, ResolvesEveryAddressOfTheController) {
  auto v4 = datapath::ResolveController("127.0.0.1:9811");
  ASSERT_TRUE(v4.ok()) << v4.status().message();
  EXPECT_EQ(*v4, std::vector<std::string>{"127.0.0.1:9811"});
  auto v6 = datapath::ResolveController("[::1]:9811");
  ASSERT_TRUE(v6.ok()) << v6.status().message();
  EXPECT_EQ(*v6, std::vector<std::string>{"[::1]:9811"});
  auto name = datapath::ResolveController("localhost:9811");
  ASSERT_TRUE(name.ok()) << name.status().message();
  EXPECT_NE(std::find(name->begin(), name->end(), "127.0.0.1:9811"), name->end());
  auto bad = datapath::ResolveController("no-such-host.invalid:9811");
  EXPECT_EQ(bad.status().code(), EHOSTUNREACH);
  EXPECT_NE(bad.status().message().find("no-such-host.invalid"), std::string::npos);
}

TEST_F(SenderTest, HeartbeatsEveryControllerReplicaAndFollowsTheNameAsItChanges) {
  // Two controller replicas, each with its own soft registry, behind one name.
  struct Replica {
    std::unique_ptr<NodeRegistry> reg;
    std::unique_ptr<datapath::v1::Registry::Service> svc;
    std::unique_ptr<grpc::Server> server;
    int port = 0;
  };
  std::vector<Replica> reps(2);
  for (auto& r : reps) {
    r.reg = std::make_unique<NodeRegistry>(GrpcDatapaths(grpc::InsecureChannelCredentials()),
                                           5000ms, 150ms);
    r.svc = controller::MakeRegistryService(*r.reg);
    grpc::ServerBuilder b;
    b.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &r.port);
    b.RegisterService(r.svc.get());
    r.server = b.BuildAndStart();
    ASSERT_NE(r.server, nullptr);
  }
  std::mutex mu;
  std::vector<std::string> answer = {"127.0.0.1:" + std::to_string(reps[0].port),
                                     "127.0.0.1:" + std::to_string(reps[1].port)};
  std::string asked_for;
  auto opts = Options("controller.nbd-csi.svc:9811", 200ms);
  opts.resolve = [&](const std::string& c) -> StatusOr<std::vector<std::string>> {
    std::lock_guard lock(mu);
    asked_for = c;
    if (answer.empty()) return Error(EHOSTUNREACH, "cannot resolve controller.nbd-csi.svc");
    return answer;
  };
  datapath::HeartbeatSender sender(*pool_, opts);
  ASSERT_TRUE(sender.Start().ok());
  test::WaitUntil([&] {
    return reps[0].reg->Get("node-s").has_value() && reps[1].reg->Get("node-s").has_value() &&
           sender.counters().controllers == 2 && sender.counters().connected;
  });
  EXPECT_TRUE(reps[0].reg->Get("node-s").has_value());
  EXPECT_TRUE(reps[1].reg->Get("node-s").has_value());
  EXPECT_EQ(sender.counters().controllers, 2u);
  EXPECT_TRUE(sender.counters().connected);
  {
    std::lock_guard lock(mu);
    EXPECT_EQ(asked_for, "controller.nbd-csi.svc:9811");
  }
  // Replica 0 leaves the name: it stops hearing from the node, replica 1 keeps hearing.
  {
    std::lock_guard lock(mu);
    answer = {"127.0.0.1:" + std::to_string(reps[1].port)};
  }
  test::WaitUntil([&] { return sender.counters().controllers == 1; });
  EXPECT_EQ(sender.counters().controllers, 1u);
  uint64_t ok_before = sender.counters().ok;
  // A failing resolver keeps the last known addresses rather than going silent.
  {
    std::lock_guard lock(mu);
    answer.clear();
  }
  test::WaitUntil([&] { return sender.counters().ok > ok_before; });
  EXPECT_GT(sender.counters().ok, ok_before);
  EXPECT_EQ(sender.counters().controllers, 1u);
  sender.Stop();
  for (auto& r : reps) r.server->Shutdown();
}

// ---- real nbd-datapathd processes ----

namespace {

std::string Bin() {
  const char* b = getenv("NBDCSI_BIN");
  return std::string(b ? b : "bin") + "/nbd-datapathd";
}

std::string ReadAll(const std::string& path) {
  std::ifstream f(path);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}


class Daemon {
 public:
  ~Daemon() { Kill(); }

  bool Start(const std::vector<std::string>& args, const std::string& log) {
    log_ = log;
    pid_ = fork();
    if (pid_ < 0) return false;
    if (pid_ == 0) {
      int fd = open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
      if (fd >= 0) {
        dup2(fd, 1);
        dup2(fd, 2);
      }
      std::vector<char*> argv;
      std::string bin = Bin();
      argv.push_back(bin.data());
      for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
      argv.push_back(nullptr);
      execv(bin.c_str(), argv.data());
      _exit(127);
    }
    return true;
  }

  // The exit code, or -1 when it is still running after `timeout`.
  int WaitExit(milliseconds timeout) {
    int st = 0;
    if (pid_ <= 0 || !test::WaitExited(pid_, &st, timeout)) return -1;
    pid_ = -1;
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
  }

  int Stop() {
    if (pid_ > 0) kill(pid_, SIGTERM);
    int rc = WaitExit(10s);
    Kill();
    return rc;
  }

  void Kill() {
    if (pid_ <= 0) return;
    kill(pid_, SIGKILL);
    waitpid(pid_, nullptr, 0);
    pid_ = -1;
  }

  std::string Log() const { return ReadAll(log_); }
  bool Running() const { return pid_ > 0 && kill(pid_, 0) == 0; }

 private:
  pid_t pid_ = -1;
  std::string log_;
};

// The Registry as nbd-csi-controller serves it, plus a record of every heartbeat for the test.
class RecordingRegistry final : public v1::Registry::Service {
 public:
  explicit RecordingRegistry(NodeRegistry& reg, controller::RegistryServiceOptions opts = {})
      : inner_(controller::MakeRegistryService(reg, opts)) {}

  grpc::Status Heartbeat(grpc::ServerContext* ctx, const v1::HeartbeatRequest* req,
                         v1::HeartbeatResponse* resp) override {
    grpc::Status st = inner_->Heartbeat(ctx, req, resp);
    std::lock_guard lock(mu_);
    beats_.push_back({steady_clock::now(), *req});
    cv_.notify_all();
    return st;
  }

  // The first heartbeat recorded after index `after` that satisfies `pred`, within `timeout`.
  template <typename Pred>
  std::optional<std::pair<steady_clock::time_point, v1::HeartbeatRequest>> WaitFor(
      size_t after, milliseconds timeout, Pred pred) {
    std::unique_lock lock(mu_);
    auto end = steady_clock::now() + timeout;
    size_t seen = after;
    while (true) {
      for (; seen < beats_.size(); ++seen) {
        if (pred(beats_[seen].second)) return beats_[seen];
      }
      if (cv_.wait_until(lock, end) == std::cv_status::timeout && seen == beats_.size()) {
        return std::nullopt;
      }
    }
  }

  size_t count() {
    std::lock_guard lock(mu_);
    return beats_.size();
  }

 private:
  std::unique_ptr<v1::Registry::Service> inner_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<std::pair<steady_clock::time_point, v1::HeartbeatRequest>> beats_;
};

// A "controller": NodeRegistry + Registry server on a fixed port with the given credentials.
struct Controller {
  Controller(std::shared_ptr<grpc::ServerCredentials> server_creds,
             std::shared_ptr<grpc::ChannelCredentials> channel_creds, milliseconds interval,
             int port, controller::RegistryServiceOptions opts = {})
      : reg(GrpcDatapaths(std::move(channel_creds)), 3 * interval, interval), svc(reg, opts) {
    grpc::ServerBuilder b;
    b.AddListeningPort("127.0.0.1:" + std::to_string(port), std::move(server_creds), &bound);
    b.RegisterService(&svc);
    server = b.BuildAndStart();
  }
  ~Controller() {
    if (server) server->Shutdown(std::chrono::system_clock::now() + 1s);
  }
  NodeRegistry reg;
  RecordingRegistry svc;
  int bound = 0;
  std::unique_ptr<grpc::Server> server;
};

std::unique_ptr<grpc::ClientContext> Ctx() { return test::CallContext(5s); }

class DatapathdTest : public ::testing::Test {
 protected:
  // One certificate set for the suite: the tests only read it.
  static void SetUpTestSuite() {
    certs_made_ = std::make_unique<test::TestCerts>("registry_certs", "node-a node-b");
  }
  static void TearDownTestSuite() { certs_made_.reset(); }

  void SetUp() override {
    if (!fs::exists(Bin())) GTEST_SKIP() << Bin() << " is not built";
    ASSERT_TRUE(certs_made_->ok) << ReadAll(certs_made_->log());
    certs_ = certs_made_->path();
    ASSERT_TRUE(tmp_.Create("registry_test")) << tmp_.error();
    dir_ = tmp_.path();
  }
  void TearDown() override { tmp_.Remove(); }

  TlsFiles Files(const std::string& who, const std::string& sub = "") const {
    std::string d = certs_ + sub;
    return TlsFiles{d + "/" + who + ".crt", d + "/" + who + ".key", d + "/ca.crt", false};
  }
  std::shared_ptr<grpc::ChannelCredentials> Client(const std::string& who,
                                                   const std::string& sub = "") const {
    auto c = MakeChannelCredentials(Files(who, sub));
    EXPECT_TRUE(c.ok()) << c.status().message();
    return c.ok() ? *c : nullptr;
  }
  std::shared_ptr<grpc::ServerCredentials> Server(const std::string& who) const {
    auto c = MakeServerCredentials(Files(who));
    EXPECT_TRUE(c.ok()) << c.status().message();
    return c.ok() ? *c : nullptr;
  }

  // The datapath's own flags; `extra` adds the cluster ones.
  std::vector<std::string> Args(const std::vector<std::string>& extra) const {
    std::vector<std::string> a = {"--pool", dir_ + "/pool", "--capacity", "1Gi",
                                  "--nbd-listen", "unix://" + dir_ + "/nbd.sock",
                                  "--workers", "1"};
    if (std::find(extra.begin(), extra.end(), "--api") == extra.end()) {
      a.insert(a.end(), {"--api", "unix://" + dir_ + "/api.sock"});
    }
    a.insert(a.end(), extra.begin(), extra.end());
    return a;
  }
  std::vector<std::string> TlsArgs(const std::string& who, const std::string& sub = "") const {
    TlsFiles t = Files(who, sub);
    return {"--tls-cert", t.cert, "--tls-key", t.key, "--tls-ca", t.ca};
  }

  // Runs the daemon expecting a configuration error: exit 2 and `message` in its output.
  void ExpectUsageError(const std::vector<std::string>& extra, const std::string& message) {
    Daemon d;
    ASSERT_TRUE(d.Start(Args(extra), dir_ + "/usage.log"));
    int rc = d.WaitExit(10s);
    std::string log = d.Log();
    EXPECT_EQ(rc, 2) << log;
    EXPECT_NE(log.find(message), std::string::npos) << "expected \"" << message << "\" in:\n"
                                                    << log;
    EXPECT_FALSE(fs::exists(dir_ + "/pool")) << "the pool was opened despite bad flags";
  }

  bool WaitForSocket(milliseconds timeout) const {
    return test::WaitUntil([&] { return fs::exists(dir_ + "/api.sock"); }, timeout);
  }

  static inline std::unique_ptr<test::TestCerts> certs_made_;
  test::TempDir tmp_;
  std::string dir_, certs_;
};

}  // namespace

TEST_F(DatapathdTest, ClusterFlagsAreValidatedBeforeAnythingStarts) {
  const std::string adv = "127.0.0.1:" + std::to_string(test::FreeLoopbackPort());
  ExpectUsageError({"--advertise", adv}, "no TLS files");
  ExpectUsageError({"--api-tcp-listen", adv}, "no TLS files");
  ExpectUsageError({"--controller", "127.0.0.1:1", "--advertise", adv, "--insecure"},
                   "--controller needs --node-id");
  ExpectUsageError({"--controller", "127.0.0.1:1", "--node-id", "n1", "--insecure"},
                   "--controller needs --node-id");
  ExpectUsageError({"--node-id", "Bad_Node"}, "--node-id: node id \"Bad_Node\"");
  ExpectUsageError({"--advertise", "127.0.0.1"}, "--advertise: address \"127.0.0.1\"");
  ExpectUsageError({"--advertise", "0.0.0.0:9820", "--insecure"}, "wildcard");
  ExpectUsageError({"--advertise", adv, "--insecure", "--tls-cert", Files("server").cert},
                   "cannot be combined");
  ExpectUsageError({"--advertise", adv, "--tls-cert", Files("server").cert},
                   "missing --tls-key, --tls-ca");
  ExpectUsageError({"--advertise", adv, "--tls-cert", dir_ + "/nope.crt", "--tls-key",
                    Files("server").key, "--tls-ca", Files("server").ca},
                   "--tls-cert: ");
  ExpectUsageError({"--api", "tcp://" + adv}, "must be a unix socket");
}

TEST_F(DatapathdTest, HeartbeatsOverMutualTlsAndTheControllerReachesTheApi) {
  constexpr milliseconds kInterval = 400ms;
  // The controller presents client.crt both as the Registry server and as the Datapath client;
  // the datapath presents server.crt both ways.
  const int reg_port = test::FreeLoopbackPort();
  auto ctl = std::make_unique<Controller>(Server("client"), Client("client"), kInterval, reg_port);
  ASSERT_NE(ctl->server, nullptr);
  const std::string adv = "127.0.0.1:" + std::to_string(test::FreeLoopbackPort());
  const int64_t before_ns = std::chrono::duration_cast<std::chrono::nanoseconds>(
                                std::chrono::system_clock::now().time_since_epoch()).count();
  Daemon d;
  std::vector<std::string> extra = {"--node-id", "node-a", "--advertise", adv,
                                    "--controller", "127.0.0.1:" + std::to_string(reg_port),
                                    "--heartbeat-interval", "400"};
  auto tls = TlsArgs("server");
  extra.insert(extra.end(), tls.begin(), tls.end());
  ASSERT_TRUE(d.Start(Args(extra), dir_ + "/d.log"));
  ASSERT_TRUE(WaitForSocket(10s)) << d.Log();

  // The first heartbeat within two intervals of the API being up (plus scheduling slack).
  auto first = ctl->svc.WaitFor(0, 2 * kInterval + 500ms, [](auto&) { return true; });
  ASSERT_TRUE(first.has_value()) << d.Log();
  const v1::HeartbeatRequest& hb = first->second;
  EXPECT_EQ(hb.node_id(), "node-a");
  EXPECT_EQ(hb.api_address(), adv);
  EXPECT_EQ(hb.capacity_bytes(), kGiB);
  EXPECT_EQ(hb.provisioned_bytes(), 0u);
  EXPECT_EQ(hb.provisionable_bytes(), kGiB);
  EXPECT_EQ(hb.volumes(), 0u);
  EXPECT_GT(hb.free_bytes(), 0u);
  EXPECT_FALSE(hb.version().empty());
  EXPECT_GE(hb.started_unix_ns(), before_ns);
  EXPECT_EQ(hb.nbd_devices(), nbdcsi::CountNbdDevices("/dev"));
  ASSERT_TRUE(ctl->reg.Get("node-a").has_value());

  // The controller's way in: NodeRegistry::Datapath over mutual TLS.
  auto stub = ctl->reg.Datapath("node-a");
  ASSERT_TRUE(stub.ok()) << stub.status().message();
  v1::CreateVolumeRequest cr;
  cr.set_name("vol1");
  cr.set_size_bytes(64 * kMiB);
  auto created = (*stub)->CreateVolume(cr);
  ASSERT_TRUE(created.ok()) << created.status().message() << "\n" << d.Log();
  // The next heartbeats carry the new numbers.
  size_t n = ctl->svc.count();
  auto after = ctl->svc.WaitFor(n, 2 * kInterval + 500ms,
                                [](const v1::HeartbeatRequest& r) { return r.volumes() == 1; });
  ASSERT_TRUE(after.has_value());
  EXPECT_EQ(after->second.provisioned_bytes(), 64 * kMiB);
  EXPECT_EQ(after->second.provisionable_bytes(), kGiB - 64 * kMiB);
  EXPECT_EQ(after->second.started_unix_ns(), hb.started_unix_ns());

  // Anyone else is refused: a certificate from another CA, and plaintext.
  v1::GetPoolInfoResponse info;
  auto other = v1::Datapath::NewStub(grpc::CreateChannel(adv, Client("client", "/other")));
  EXPECT_EQ(other->GetPoolInfo(Ctx().get(), {}, &info).error_code(),
            grpc::StatusCode::UNAVAILABLE);
  auto plain = v1::Datapath::NewStub(grpc::CreateChannel(adv, grpc::InsecureChannelCredentials()));
  EXPECT_EQ(plain->GetPoolInfo(Ctx().get(), {}, &info).error_code(),
            grpc::StatusCode::UNAVAILABLE);
  auto good = v1::Datapath::NewStub(grpc::CreateChannel(adv, Client("client")));
  ASSERT_TRUE(good->GetPoolInfo(Ctx().get(), {}, &info).ok());
  EXPECT_EQ(info.volumes(), 1u);
  // A shared certificate name instead of the address's host: the name must be in the SANs.
  // (A handshake that fails is UNAVAILABLE on the wire, EAGAIN through the controller's client.)
  NodeRegistry named_wrong(GrpcDatapaths(Client("client"), "datapath.invalid"), 10s, kInterval);
  ASSERT_TRUE(named_wrong.Heartbeat(hb).ok());
  auto wrong = named_wrong.Datapath("node-a");
  ASSERT_TRUE(wrong.ok());
  EXPECT_EQ((*wrong)->ListVolumes().status().code(), EAGAIN);
  NodeRegistry named(GrpcDatapaths(Client("client"), "localhost"), 10s, kInterval);
  ASSERT_TRUE(named.Heartbeat(hb).ok());
  auto right = named.Datapath("node-a");
  ASSERT_TRUE(right.ok());
  auto named_list = (*right)->ListVolumes();
  ASSERT_TRUE(named_list.ok()) << named_list.status().message();
  EXPECT_EQ(named_list->size(), 1u);

  // Controller restart: the registry goes away for a few intervals, then a new one (empty, as
  // after a real restart) listens on the same port. It knows the node again within one interval.
  ctl.reset();
  // The datapath has noticed once it says so.
  test::WaitUntil([&] { return d.Log().find("lost the controller") != std::string::npos; });
  ctl = std::make_unique<Controller>(Server("client"), Client("client"), kInterval, reg_port);
  ASSERT_NE(ctl->server, nullptr) << "could not listen on port " << reg_port << " again";
  const auto restarted = steady_clock::now();
  auto again = ctl->svc.WaitFor(0, 3 * kInterval, [](auto&) { return true; });
  ASSERT_TRUE(again.has_value()) << d.Log();
  EXPECT_LE(again->first - restarted, kInterval + 300ms)
      << "took " << std::chrono::duration_cast<milliseconds>(again->first - restarted).count()
      << " ms";
  EXPECT_EQ(again->second.volumes(), 1u);
  EXPECT_TRUE(ctl->reg.Get("node-a").has_value());
  // The datapath logs the recovery once the reply is back: the next heartbeat proves it was.
  EXPECT_TRUE(ctl->svc.WaitFor(ctl->svc.count(), 3 * kInterval, [](auto&) { return true; }));

  EXPECT_EQ(d.Stop(), 0) << d.Log();
  std::string log = d.Log();
  EXPECT_NE(log.find("registered with the controller"), std::string::npos) << log;
  EXPECT_NE(log.find("lost the controller"), std::string::npos) << log;
  EXPECT_NE(log.find("reachable again"), std::string::npos) << log;
}

TEST_F(DatapathdTest, ControllerWithAnotherCaNeverHearsFromTheNode) {
  constexpr milliseconds kInterval = 200ms;
  const int reg_port = test::FreeLoopbackPort();
  // The controller's certificate is from "other": the datapath must refuse to talk to it.
  TlsFiles other = Files("client", "/other");
  auto creds = MakeServerCredentials(other);
  ASSERT_TRUE(creds.ok());
  Controller ctl(*creds, Client("client", "/other"), kInterval, reg_port);
  ASSERT_NE(ctl.server, nullptr);
  Daemon d;
  const std::string adv = "127.0.0.1:" + std::to_string(test::FreeLoopbackPort());
  std::vector<std::string> extra = {"--node-id", "node-a",
                                    "--advertise", adv,
                                    "--controller", "127.0.0.1:" + std::to_string(reg_port),
                                    "--heartbeat-interval", "200"};
  auto tls = TlsArgs("server");
  extra.insert(extra.end(), tls.begin(), tls.end());
  ASSERT_TRUE(d.Start(Args(extra), dir_ + "/d.log"));
  ASSERT_TRUE(WaitForSocket(10s)) << d.Log();
  // Wait until the datapath has tried and been refused, rather than for a fixed time.
  test::WaitUntil([&] { return d.Log().find("TLS handshake") != std::string::npos; });
  EXPECT_EQ(ctl.svc.count(), 0u);
  EXPECT_TRUE(ctl.reg.List().empty());
  EXPECT_TRUE(d.Running());
  EXPECT_EQ(d.Stop(), 0) << d.Log();
  std::string log = d.Log();
  EXPECT_NE(log.find("cannot reach the controller"), std::string::npos) << log;
  EXPECT_NE(log.find("TLS handshake"), std::string::npos) << log;
  EXPECT_EQ(log.find("registered with the controller"), std::string::npos) << log;
}

TEST_F(DatapathdTest, InsecureLoopbackModeForTests) {
  constexpr milliseconds kInterval = 200ms;
  const int reg_port = test::FreeLoopbackPort();
  Controller ctl(grpc::InsecureServerCredentials(), grpc::InsecureChannelCredentials(), kInterval,
                 reg_port);
  ASSERT_NE(ctl.server, nullptr);
  const std::string adv = "127.0.0.1:" + std::to_string(test::FreeLoopbackPort());
  Daemon d;
  ASSERT_TRUE(d.Start(Args({"--node-id", "node-b", "--advertise", adv, "--controller",
                            "127.0.0.1:" + std::to_string(reg_port), "--insecure",
                            "--heartbeat-interval", "200"}),
                      dir_ + "/d.log"));
  ASSERT_TRUE(WaitForSocket(10s)) << d.Log();
  ASSERT_TRUE(ctl.svc.WaitFor(0, 2 * kInterval + 500ms, [](auto&) { return true; }).has_value())
      << d.Log();
  ASSERT_TRUE(ctl.reg.Get("node-b").has_value());
  EXPECT_EQ(ctl.reg.Get("node-b")->capacity_bytes, kGiB);
  auto stub = ctl.reg.Datapath("node-b");
  ASSERT_TRUE(stub.ok());
  auto vols = (*stub)->ListVolumes();
  EXPECT_TRUE(vols.ok()) << vols.status().message();
  EXPECT_EQ(d.Stop(), 0) << d.Log();
  EXPECT_NE(d.Log().find("plaintext"), std::string::npos);
}

// Node binding in the Registry: a heartbeat for node N needs a client certificate naming N.
TEST_F(DatapathdTest, BoundRegistryAcceptsOnlyTheNodeTheCertificateNames) {
  const int reg_port = test::FreeLoopbackPort();
  Controller ctl(Server("client"), Client("client"), 1s, reg_port,
                 {.bind_node_identity = true});
  ASSERT_NE(ctl.server, nullptr);
  const std::string target = "127.0.0.1:" + std::to_string(reg_port);
  auto beat = [&](const std::string& cert, const std::string& node) {
    auto stub = v1::Registry::NewStub(grpc::CreateChannel(target, Client(cert)));
    v1::HeartbeatRequest req;
    req.set_node_id(node);
    req.set_api_address("127.0.0.1:9820");
    v1::HeartbeatResponse resp;
    return stub->Heartbeat(Ctx().get(), req, &resp);
  };
  grpc::Status as_b = beat("node-node-a", "node-b");
  EXPECT_EQ(as_b.error_code(), grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_NE(as_b.error_message().find("node node-a's, it cannot speak for node node-b"),
            std::string::npos)
      << as_b.error_message();
  grpc::Status no_identity = beat("server", "node-a");
  EXPECT_EQ(no_identity.error_code(), grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_NE(no_identity.error_message().find("names no node"), std::string::npos)
      << no_identity.error_message();
  EXPECT_TRUE(ctl.reg.List().empty()) << "a refused heartbeat registered a node";
  grpc::Status own = beat("node-node-a", "node-a");
  ASSERT_TRUE(own.ok()) << own.error_message();
  EXPECT_TRUE(ctl.reg.Get("node-a").has_value());
  EXPECT_FALSE(ctl.reg.Get("node-b").has_value());
  // A refused heartbeat for a registered node does not move it either.
  auto stub = v1::Registry::NewStub(grpc::CreateChannel(target, Client("node-node-b")));
  v1::HeartbeatRequest req;
  req.set_node_id("node-a");
  req.set_api_address("127.0.0.1:1");
  v1::HeartbeatResponse resp;
  EXPECT_EQ(stub->Heartbeat(Ctx().get(), req, &resp).error_code(),
            grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_EQ(ctl.reg.Get("node-a")->api_address, "127.0.0.1:9820");
}

// A datapath started with another node's certificate stops at once, naming both.
TEST_F(DatapathdTest, CertificateOfAnotherNodeIsAStartError) {
  const std::string adv = "127.0.0.1:" + std::to_string(test::FreeLoopbackPort());
  std::vector<std::string> extra = {"--node-id", "node-b", "--advertise", adv};
  auto tls = TlsArgs("node-node-a");
  extra.insert(extra.end(), tls.begin(), tls.end());
  ExpectUsageError(extra, "is the certificate of node node-a, not of --node-id node-b");
}
