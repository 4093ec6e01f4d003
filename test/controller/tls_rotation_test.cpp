// Certificate rotation of the gRPC links, with a real nbd-csi-controller and a real
// nbd-datapathd whose --tls-* files are Kubernetes-style secret volumes (tls.crt ->
// ..data/tls.crt, ..data swapped in one rename). Mid-run, both are rotated to certificates of a
// new CA, while:
//  - an NBD client does verified I/O on the datapath's unix socket (it must not notice),
//  - a gRPC channel opened before the rotation keeps calling the datapath's TCP API,
//  - CSI ListVolumes keeps going through the controller's own channel to the datapath,
//  - the datapath keeps heartbeating.
// Then new connections get the new chain (a client of the new CA is served), a client that
// trusts only the old CA is refused, and a restarted datapath registers and is called with the
// new material on both ends.
#include <sys/wait.h>
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
#include "test/support/secret_dir.h"

namespace nbdcsi::test {
namespace {

namespace v1 = ::csi::v1;
namespace dpv1 = ::nbdcsi::datapath::v1;
namespace fs = std::filesystem;
using namespace std::chrono_literals;
using grpc::StatusCode;

grpc::Status PoolInfo(const std::string& target,
                      const std::shared_ptr<grpc::ChannelCredentials>& creds) {
  auto stub = dpv1::Datapath::NewStub(grpc::CreateChannel(target, creds));
  dpv1::GetPoolInfoResponse info;
  auto ctx = Ctx();
  ctx->set_deadline(std::chrono::system_clock::now() + 5s);
  return stub->GetPoolInfo(ctx.get(), {}, &info);
}

template <typename F>
bool Eventually(F ok, std::chrono::milliseconds timeout) {
  auto end = std::chrono::steady_clock::now() + timeout;
  while (std::chrono::steady_clock::now() < end) {
    if (ok()) return true;
    std::this_thread::sleep_for(100ms);  // the poll of a bounded wait
  }
  return ok();
}

int ReadInt(const std::string& path) {
  std::ifstream in(path);
  int n = 0;
  in >> n;
  return n;
}

// Calls `call` every 50 ms on its own thread until stopped; counts what failed and why.
class Hammer {
 public:
  template <typename F>
  explicit Hammer(F call)
      : thread_([this, call] {
          while (!stop_) {
            grpc::Status st = call();
            ++calls_;
            if (!st.ok()) {
              ++failed_;
              std::lock_guard lock(mu_);
              last_error_ = st.error_message();
            }
            std::this_thread::sleep_for(50ms);  // pacing: a steady caller
          }
        }) {}
  ~Hammer() { Stop(); }
  void Stop() {
    stop_ = true;
    if (thread_.joinable()) thread_.join();
  }
  int calls() const { return calls_; }
  int failed() const { return failed_; }
  std::string last_error() {
    std::lock_guard lock(mu_);
    return last_error_;
  }

 private:
  std::atomic<bool> stop_{false};
  std::atomic<int> calls_{0}, failed_{0};
  std::mutex mu_;
  std::string last_error_;
  std::thread thread_;
};

TEST(TlsRotation, NewCaMidRunKeepsLiveIoAndCallsAndRefusesTheOldCa) {
  if (!fs::exists("/usr/lib/python3/dist-packages/nbd.py") && !getenv("CI")) {
    GTEST_SKIP() << "needs python3-libnbd";
  }
  TestCerts made("nbdcsi-rotate", "node-a");
  ASSERT_TRUE(made.ok) << "test/tls/make-certs.sh failed, see " << made.log();
  const std::string certs = made.path();
  const std::string main = certs, other = certs + "/other";
  SecretDir ctl(certs + "/secret-controller"), dp(certs + "/secret-node-a");
  ctl.VersionFrom("v1", main, "server", main);
  dp.VersionFrom("v1", main, "node-node-a", main);

  ClusterOptions o;
  o.nodes = {"node-a"};
  o.tls = {ctl.dir(), dp.dir()};
  Cluster c(o);
  ASSERT_EQ(c.Start(), "");
  const std::string api = "127.0.0.1:" + std::to_string(c.api_port(0));

  // Live NBD I/O on the datapath's unix socket, across everything below.
  dpv1::CreateVolumeRequest cr;
  cr.set_name("live");
  cr.set_size_bytes(64 << 20);
  dpv1::CreateVolumeResponse created;
  ASSERT_TRUE(c.datapath("node-a").CreateVolume(Ctx().get(), cr, &created).ok());
  const std::string progress = c.dir() + "/io.progress", stop = c.dir() + "/io.stop";
  Process io;
  ASSERT_TRUE(io.Start({"/usr/bin/python3", Cluster::Src("test/support/nbd_live_io.py"),
                        "nbd+unix:///live?socket=" + c.dir() + "/node-a-nbd.sock", progress, stop},
                       c.dir() + "/io.log"));
  ASSERT_TRUE(Eventually([&] { return ReadInt(progress) >= 10; }, 10s))
      << ReadWholeFile(c.dir() + "/io.log");

  // Live gRPC: one channel opened now and used throughout, and the controller's own channel to
  // the datapath (CSI ListVolumes asks every node).
  auto live = dpv1::Datapath::NewStub(grpc::CreateChannel(api, SslClient(main, "server", main)));
  Hammer direct([&] {
    dpv1::GetPoolInfoResponse info;
    return live->GetPoolInfo(Ctx().get(), {}, &info);
  });
  Hammer via_controller([&] {
    v1::ListVolumesResponse list;
    return c.controller().ListVolumes(Ctx().get(), {}, &list);
  });
  // Both hammers running on the old material before the rotation (about half a second of calls
  // each): waited for, not slept for.
  ASSERT_TRUE(Eventually([&] { return direct.calls() >= 10 && via_controller.calls() >= 10; }, 10s))
      << direct.calls() << " direct, " << via_controller.calls() << " via the controller";

  // The rotation: both ends move to the new CA at once.
  const int io_before = ReadInt(progress);
  ctl.VersionFrom("v2", other, "server", other);
  dp.VersionFrom("v2", other, "node-node-a", other);

  // New connections are served with the new chain...
  EXPECT_TRUE(
      Eventually([&] { return PoolInfo(api, SslClient(other, "server", other)).ok(); }, 10s))
      << c.LogTail("node-a");
  auto new_client_beats = [&] {
    return Heartbeat(c.registry_port(), SslClient(other, "node-node-a", other), "node-a", api).ok();
  };
  EXPECT_TRUE(Eventually(new_client_beats, 10s)) << c.LogTail("controller");
  // ... and a client that trusts only the old CA is refused by both.
  grpc::Status old_dp = PoolInfo(api, SslClient(main, "server", main));
  EXPECT_EQ(old_dp.error_code(), StatusCode::UNAVAILABLE) << old_dp.error_message();
  grpc::Status old_reg =
      Heartbeat(c.registry_port(), SslClient(main, "node-node-a", main), "node-a", api);
  EXPECT_EQ(old_reg.error_code(), StatusCode::UNAVAILABLE) << old_reg.error_message();

  // A few more seconds of everything running on the new material.
  std::this_thread::sleep_for(2s);
  direct.Stop();
  via_controller.Stop();
  EXPECT_EQ(direct.failed(), 0) << direct.last_error();
  EXPECT_EQ(via_controller.failed(), 0) << via_controller.last_error();
  EXPECT_GT(direct.calls(), 40);
  EXPECT_TRUE(c.WaitRegistered("node-a", 1s)) << "heartbeats stopped";
  EXPECT_NE(c.LogTail("controller", 400).find("TLS: reloaded"), std::string::npos);
  EXPECT_NE(c.LogTail("node-a", 400).find("TLS: reloaded"), std::string::npos);
  EXPECT_EQ(c.LogTail("node-a", 400).find("lost the controller"), std::string::npos)
      << c.LogTail("node-a");

  std::ofstream(stop) << "";
  const int rc = io.Wait(10s);
  EXPECT_TRUE(rc != -1 && WIFEXITED(rc) && WEXITSTATUS(rc) == 0)
      << rc << ": " << ReadWholeFile(c.dir() + "/io.log");
  EXPECT_GT(ReadInt(progress), io_before + 10) << "NBD I/O stalled during the rotation";

  // A restarted datapath registers over a new connection, and the controller calls it over a
  // new one: both ends on the new CA only.
  c.StopDatapath(0);
  ASSERT_EQ(c.StartDatapath(0), "");
  auto req = VolumeRequest("after-rotation", 1 << 20);
  *req.mutable_accessibility_requirements()->add_requisite() = NodeTopology("node-a");
  grpc::Status st;
  for (int i = 0; i < 40; ++i) {
    v1::CreateVolumeResponse resp;
    st = c.controller().CreateVolume(Ctx().get(), req, &resp);
    if (st.ok()) break;
    std::this_thread::sleep_for(250ms);  // bounded retry while the channel reconnects
  }
  EXPECT_TRUE(st.ok()) << st.error_message() << c.LogTail("controller");
}

}  // namespace
}  // namespace nbdcsi::test
