// The fakes of the attach module's seams, shared by its unit tests: a kernel with nbd devices as a
// map, an export server that hands out real socketpair ends (so descriptor ownership is checked:
// every fd the manager gets must be closed by it), an nbdfuse + loop stand-in, and the cluster
// agent's targets.
#pragma once

#include <fcntl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <condition_variable>
#include <deque>
#include <fstream>
#include <functional>
#include <map>
#include <mutex>
#include <set>
#include <sstream>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include <gtest/gtest.h>

#include "datapath/attach/attachments.h"
#include "datapath/attach/export_server.h"
#include "datapath/attach/fuse_attach.h"
#include "datapath/attach/kernel_nbd.h"
#include "test/support/temp_dir.h"

namespace nbdcsi::datapath {

inline bool FdOpen(int fd) { return fcntl(fd, F_GETFD) != -1; }

// A kernel with nbd devices as a map index -> backend cookie.
class FakeKernel final : public KernelNbdInterface {
 public:
  Status available = Status::Ok();
  Status connect_error = Status::Ok();
  Status reconfigure_error = Status::Ok();
  Status in_use = Status::Ok();
  int connected_polls_before_gone = 0;  // how many Connected() calls still say true after DISC
  std::map<int, std::string> devices;
  std::map<int, unsigned> max_sectors;
  std::vector<KernelConnectParams> connects;
  std::vector<std::pair<int, size_t>> reconfigures;  // index, number of sockets
  std::vector<int> disconnects;
  std::vector<int> fds_seen;  // every socket passed in, to check the manager closes them
  // Connect blocks until released when set (for the concurrency test).
  bool block_connect = false;
  std::mutex mu;
  std::condition_variable cv;
  bool connect_entered = false, connect_release = false;

  Status Available() override { return available; }
  StatusOr<int> Connect(const std::vector<int>& fds, const KernelConnectParams& p) override {
    if (block_connect) {
      std::unique_lock lk(mu);
      connect_entered = true;
      cv.notify_all();
      cv.wait(lk, [&] { return connect_release; });
    }
    for (int fd : fds) EXPECT_TRUE(FdOpen(fd));
    fds_seen.insert(fds_seen.end(), fds.begin(), fds.end());
    connects.push_back(p);
    if (!connect_error.ok()) return connect_error;
    int index = 0;
    while (devices.count(index)) ++index;
    devices[index] = p.backend_identifier;
    return index;
  }
  Status Reconfigure(int index, const std::vector<int>& fds, uint64_t,
                     const std::string& cookie) override {
    for (int fd : fds) EXPECT_TRUE(FdOpen(fd));
    // Like the kernel: a device with a backend only takes sockets that name it.
    if (Backend(index) != cookie) return Error(EINVAL, "backend image doesn't match");
    fds_seen.insert(fds_seen.end(), fds.begin(), fds.end());
    reconfigures.emplace_back(index, fds.size());
    return reconfigure_error;
  }
  Status Disconnect(int index) override {
    disconnects.push_back(index);
    pending_gone_[index] = connected_polls_before_gone;
    return Status::Ok();
  }
  std::string Backend(int index) override {
    auto it = devices.find(index);
    return it == devices.end() ? "" : it->second;
  }
  int FindByBackend(const std::string& cookie) override {
    for (const auto& [i, c] : devices)
      if (c == cookie) return i;
    return -1;
  }
  bool Connected(int index) override {
    auto it = pending_gone_.find(index);
    if (it != pending_gone_.end()) {
      if (it->second-- > 0) return true;
      devices.erase(index);
      pending_gone_.erase(it);
    }
    return devices.count(index) > 0;
  }
  Status CheckNotInUse(int) override { return in_use; }
  StatusOr<unsigned> SetMaxSectorsKb(int index, unsigned kb) override {
    max_sectors[index] = kb;
    return kb;
  }
  std::vector<std::tuple<int, uint64_t, std::string>> resizes;
  std::map<int, uint64_t> sizes;  // what sysfs would show after a resize
  Status Resize(int index, uint64_t size, const std::string& cookie) override {
    if (Backend(index) != cookie) return Error(EINVAL, "backend image doesn't match");
    resizes.emplace_back(index, size, cookie);
    sizes[index] = size;
    return Status::Ok();
  }
  uint64_t SizeBytes(int index) override { return sizes.count(index) ? sizes[index] : 0; }
  Status WatchLinkDead(std::function<void(int)> cb) override {
    on_dead = std::move(cb);
    return Status::Ok();
  }
  void StopWatching() override { on_dead = nullptr; }
  std::function<void(int)> on_dead;

 private:
  std::map<int, int> pending_gone_;
};

class FakeServer final : public ExportServer {
 public:
  std::map<std::string, std::pair<uint64_t, bool>> volumes;  // size, read-only
  std::vector<int> server_ends;
  std::vector<std::pair<std::string, unsigned>> calls;

  ~FakeServer() override {
    for (int fd : server_ends) close(fd);
  }
  std::string socket = "/run/test/nbd.sock";
  std::string UnixSocketPath() const override { return socket; }
  StatusOr<ServedExport> Describe(const std::string& volume) override {
    auto it = volumes.find(volume);
    if (it == volumes.end()) return Error(ENOENT, "volume {} not found", volume);
    ServedExport e;
    e.size_bytes = it->second.first;
    e.read_only = it->second.second;
    return e;
  }
  StatusOr<ServedExport> Serve(const std::string& volume, unsigned n) override {
    calls.emplace_back(volume, n);
    auto it = volumes.find(volume);
    if (it == volumes.end()) return Error(ENOENT, "volume {} not found", volume);
    ServedExport e;
    e.size_bytes = it->second.first;
    e.read_only = it->second.second;
    for (unsigned i = 0; i < n; ++i) {
      int sv[2];
      EXPECT_EQ(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
      e.client_fds.push_back(sv[0]);
      server_ends.push_back(sv[1]);
    }
    return e;
  }
  // Backend exports VOLUME@target registered in the engine (their sizes live in FakeTargets).
  std::set<std::string> target_exports;
  std::vector<std::pair<std::string, unsigned>> target_calls;
  StatusOr<std::vector<int>> ServeTarget(const std::string& volume, unsigned n) override {
    target_calls.emplace_back(volume, n);
    if (!target_exports.count(volume)) {
      return Error(ENOENT, "no target of volume {} is open on this datapath", volume);
    }
    std::vector<int> fds;
    for (unsigned i = 0; i < n; ++i) {
      int sv[2];
      EXPECT_EQ(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
      fds.push_back(sv[0]);
      server_ends.push_back(sv[1]);
    }
    return fds;
  }
  // What OpenConnections answers, call by call; the last value repeats.
  std::deque<uint64_t> open_script;
  size_t open_calls = 0;
  uint64_t OpenConnections(const std::string&) override {
    ++open_calls;
    if (open_script.empty()) return 0;
    const uint64_t v = open_script.front();
    if (open_script.size() > 1) open_script.pop_front();
    return v;
  }
  // A server end whose peer was closed reads EOF at once.
  size_t ClosedPeers() const {
    size_t n = 0;
    for (int fd : server_ends) {
      char c;
      if (recv(fd, &c, 1, MSG_DONTWAIT) == 0) ++n;
    }
    return n;
  }
};

// nbdfuse + loop devices as a map loop index -> loop tag. Unavailable unless a test says so.
class FakeFuse final : public FuseLoopInterface {
 public:
  Status available =
      Error(ENODEV, "the nbdfuse + loop attach path is unavailable: missing nbdfuse");
  Status attach_error = Status::Ok();
  Status in_use = Status::Ok();
  std::string link_problem;
  std::map<int, std::string> loops;  // index -> the tag it was bound with
  std::map<int, uint64_t> sizes;
  std::vector<FuseAttachParams> attaches;
  std::vector<std::pair<std::string, int>> detaches;  // mount dir, pid
  std::vector<FuseRef> detach_refs;
  std::function<void()> after_started;  // runs inside Attach, after on_started
  int next_pid = 1000;

  Status Available() override { return available; }
  StatusOr<FuseAttachment> Attach(const FuseAttachParams& p,
                                  const std::function<void(int)>& on_started) override {
    attaches.push_back(p);
    int pid = next_pid++;
    on_started(pid);
    if (after_started) after_started();
    if (!attach_error.ok()) return attach_error;
    int index = 0;
    while (loops.count(index)) ++index;
    loops[index] = p.loop_tag;
    sizes[index] = p.size_bytes;
    return FuseAttachment{index, pid};
  }
  bool LoopBound(const FuseRef& ref) override {
    return loops.count(ref.loop_index) && loops[ref.loop_index] == ref.loop_tag;
  }
  Status CheckNotInUse(int) override { return in_use; }
  Status Detach(const FuseRef& ref) override {
    detaches.emplace_back(ref.mount_dir, ref.pid);
    detach_refs.push_back(ref);
    for (auto it = loops.begin(); it != loops.end();) {
      it = it->second == ref.loop_tag ? loops.erase(it) : std::next(it);
    }
    return Status::Ok();
  }
  Status Resize(int index, uint64_t size) override {
    sizes[index] = size;
    return Status::Ok();
  }
  uint64_t SizeBytes(int index) override { return sizes.count(index) ? sizes[index] : 0; }
  std::string LinkProblem(const FuseRef& ref) override {
    if (!LoopBound(ref)) return "loop not bound";
    return link_problem;
  }
};

// The cluster agent's targets: `open` holds the sizes of the targets open "here"; ReopenTarget
// opens one from `cluster` (the volumes the cluster state knows) and registers its export in the
// server, as ClusterAgent::OpenTarget does through the engine.
class FakeTargets final : public TargetAccess {
 public:
  explicit FakeTargets(FakeServer& server) : server_(server) {}
  std::map<std::string, uint64_t> open;
  std::map<std::string, uint64_t> cluster;
  Status reopen_error = Status::Ok();
  std::vector<std::string> reopens;

  void Open(const std::string& volume, uint64_t size) {
    open[volume] = cluster[volume] = size;
    server_.target_exports.insert(volume);
  }
  // The daemon restarted: the agent keeps no targets, the engine no backend exports.
  void Restart() {
    open.clear();
    server_.target_exports.clear();
  }
  StatusOr<uint64_t> OpenTargetSize(const std::string& volume) override {
    auto it = open.find(volume);
    if (it == open.end()) return Error(ENOENT, "no target of volume {} is open here", volume);
    return it->second;
  }
  StatusOr<uint64_t> ReopenTarget(const std::string& volume) override {
    reopens.push_back(volume);
    if (!reopen_error.ok()) return reopen_error;
    auto it = cluster.find(volume);
    if (it == cluster.end()) return Error(ENOENT, "no volume {} in the cluster state", volume);
    Open(volume, it->second);
    return it->second;
  }
  // As Target::Grow: the open target takes the cluster state's size (never smaller).
  StatusOr<uint64_t> GrowTarget(const std::string& volume) override {
    auto it = open.find(volume);
    if (it == open.end()) return Error(ENOENT, "no target of volume {} is open here", volume);
    if (!grow_error.ok()) return grow_error;
    it->second = std::max(it->second, cluster[volume]);
    return it->second;
  }
  Status grow_error = Status::Ok();

 private:
  FakeServer& server_;
};

// The fixture both attachment tests build on: a temporary directory for the records, the fakes,
// the options every test uses (2 connections by default, detach waits 0.5 s), and managers over
// them.
class AttachFixture : public ::testing::Test {
 protected:
  // From the test's SetUp: the directory (named after the test) and the options.
  void SetUpAttach(const char* name) {
    ASSERT_TRUE(tmp_.Create(name)) << tmp_.error();
    root_ = tmp_.path();
    dir_ = root_ + "/attachments";
    opts_.default_connections = 2;
    opts_.detach_wait = std::chrono::milliseconds(500);
  }
  void TearDown() override { tmp_.Remove(); }

  std::unique_ptr<AttachmentManager> NewManager() {
    auto m = std::make_unique<AttachmentManager>(dir_, kernel_, fuse_, server_, opts_);
    Status s = m->Init();
    EXPECT_TRUE(s.ok()) << s.message();
    return m;
  }
  static std::string ReadFile(const std::string& p) {
    std::ifstream in(p);
    std::stringstream ss;
    ss << in.rdbuf();
    return ss.str();
  }
  // Descriptor numbers get reused, so check the other side: every server end sees its peer gone.
  void ExpectAllClientFdsClosed() { EXPECT_EQ(server_.ClosedPeers(), server_.server_ends.size()); }

  test::TempDir tmp_;
  std::string root_, dir_;
  FakeKernel kernel_;
  FakeFuse fuse_;
  FakeServer server_;
  AttachOptions opts_;
};

}  // namespace nbdcsi::datapath
