// Fault matrix, process deaths on this host (issue 12 part 4, case 1): kill -9 of
// nbd-csi-controller, nbd-datapathd and nbd-csi-node at seeded random instants while CSI calls
// run, then the call retried as the sidecars and kubelet retry it.
//
// What it proves, over a real controller and two real datapaths (test/controller/cluster.h,
// real gRPC over real sockets) and, where this host allows it, a real nbd-csi-node:
//   - every retried call ends in success with the right result (ids, sizes, content source,
//     topology), and no retry gets an answer that would stop a sidecar for good
//     (ALREADY_EXISTS, NOT_FOUND, INVALID_ARGUMENT, OUT_OF_RANGE, FAILED_PRECONDITION);
//   - no acknowledged write is lost: blocks written over NBD with FUA before a kill read back
//     after it, restores hold exactly the data of their snapshot's instant, expansions keep data;
//   - the pools stay consistent after every datapath restart: no broken volume, on disk only
//     NAME.img + NAME.json pairs of what the API lists, and at the end, once everything was
//     deleted through CSI, nothing at all (no orphan);
//   - the daemons' logs show no engine invariant violation.
// The calls: CreateVolume, CreateSnapshot (polled to ready_to_use by calling it again, as the
// snapshotter does), CreateVolume from the snapshot (restore), ControllerExpandVolume,
// DeleteVolume, DeleteSnapshot; and on the node NodeStage/Publish/Expand/Unpublish/Unstage of
// block volumes (nbdfuse + loop here: the datapath is not killed in that part, since a fuse
// attachment does not survive it by design; test/vm/faults_io_restart.sh does that on nbd.ko).
//
// The kill instant is a seeded fraction (0-1.2) of the call's duration measured at the start,
// so kills land before, inside and after the work. FAULTS_SEED=N replays a schedule (the seed
// is printed first); FAULTS_ROUNDS / FAULTS_NODE_ROUNDS size the run (defaults: 40 and 8).
#include <fcntl.h>
#include <linux/fs.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <grpcpp/client_context.h>
#include <grpcpp/create_channel.h>
#include <gtest/gtest.h>

#include "csi/csi.grpc.pb.h"
#include "datapath/api/attach.grpc.pb.h"
#include "datapath/api/datapath.grpc.pb.h"
#include "test/controller/cluster.h"
#include "test/controller/csi_requests.h"
#include "test/support/nbd_bytes.h"

namespace nbdcsi::test {
namespace {

namespace v1 = ::csi::v1;
namespace dp = ::nbdcsi::datapath::v1;
namespace fs = std::filesystem;
using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

constexpr uint64_t kMiB = uint64_t{1} << 20;
constexpr uint64_t kVolBytes = 16 * kMiB;
constexpr uint32_t kBlock = 4096;

uint64_t EnvOr(const char* name, uint64_t dflt) {
  const char* v = getenv(name);
  return v && *v ? std::stoull(v) : dflt;
}

// ---- a minimal NBD client: fixed newstyle, OPT_GO, simple replies ------------------------------
// Written from the protocol spec (not the daemon's codec), so it checks the server independently.

class Nbd {
 public:
  ~Nbd() { Close(); }
  // "" on success, else why not.
  std::string Connect(const std::string& sock, const std::string& name) {
    fd_ = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_un sa{};
    sa.sun_family = AF_UNIX;
    snprintf(sa.sun_path, sizeof sa.sun_path, "%s", sock.c_str());
    if (connect(fd_, reinterpret_cast<sockaddr*>(&sa), sizeof sa) != 0) {
      return "connect " + sock + ": " + strerror(errno);
    }
    timeval tv{20, 0};
    setsockopt(fd_, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd_, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    uint8_t greet[18];
    if (!RecvAll(greet, sizeof greet)) return "no greeting";
    if (Be64(greet) != 0x4e42444d41474943ull || Be64(greet + 8) != 0x49484156454f5054ull) {
      return "bad greeting";
    }
    std::string msg;
    Put32(&msg, 3);  // FIXED_NEWSTYLE | NO_ZEROES
    Put64(&msg, 0x49484156454f5054ull);
    Put32(&msg, 7);  // NBD_OPT_GO
    Put32(&msg, static_cast<uint32_t>(4 + name.size() + 2));
    Put32(&msg, static_cast<uint32_t>(name.size()));
    msg += name;
    msg.append(2, '\0');  // no information requests
    if (!SendAll(msg.data(), msg.size())) return "send GO";
    while (true) {
      uint8_t rep[20];
      if (!RecvAll(rep, sizeof rep)) return "GO reply";
      uint32_t type = Be32(rep + 12), len = Be32(rep + 16);
      std::string data(len, '\0');
      if (len && !RecvAll(data.data(), len)) return "GO reply data";
      if (type == 1) return "";  // ACK
      if (type & 0x80000000u) return "GO refused (" + std::to_string(type & 0xff) + ")";
      if (type == 3 && len >= 12 && Be16(reinterpret_cast<uint8_t*>(data.data())) == 0) {
        size_ = Be64(reinterpret_cast<uint8_t*>(data.data()) + 2);
      }
    }
  }
  // NBD error (0 = ok), or -1 when the connection failed.
  int Write(uint64_t off, const std::string& data, bool fua) {
    return Request(1, fua ? 1 : 0, off, static_cast<uint32_t>(data.size()), &data, nullptr);
  }
  int Read(uint64_t off, uint32_t len, std::string* out) {
    return Request(0, 0, off, len, nullptr, out);
  }
  uint64_t size() const { return size_; }
  void Close() {
    if (fd_ < 0) return;
    std::string disc;
    Put32(&disc, 0x25609513);
    Put32(&disc, 2);  // flags 0, NBD_CMD_DISC
    disc.append(20, '\0');
    // The server answers DISC by closing its end: wait for that, so the connection is gone
    // from the volume (a DeleteVolume right after would otherwise see it open).
    if (SendAll(disc.data(), disc.size())) {
      shutdown(fd_, SHUT_WR);
      char sink[4096];
      while (recv(fd_, sink, sizeof sink, 0) > 0) {
      }
    }
    close(fd_);
    fd_ = -1;
  }

 private:
  static uint64_t Be64(const uint8_t* p) {
    uint64_t v = 0;
    for (int i = 0; i < 8; ++i) v = v << 8 | p[i];
    return v;
  }
  static uint32_t Be32(const uint8_t* p) {
    return uint32_t(p[0]) << 24 | p[1] << 16 | p[2] << 8 | p[3];
  }
  static uint16_t Be16(const uint8_t* p) { return static_cast<uint16_t>(p[0] << 8 | p[1]); }
  static void Put32(std::string* s, uint32_t v) {
    for (int i = 3; i >= 0; --i) s->push_back(static_cast<char>(v >> (8 * i)));
  }
  static void Put64(std::string* s, uint64_t v) {
    for (int i = 7; i >= 0; --i) s->push_back(static_cast<char>(v >> (8 * i)));
  }
  bool SendAll(const void* p, size_t n) {
    const char* c = static_cast<const char*>(p);
    while (n) {
      ssize_t w = send(fd_, c, n, MSG_NOSIGNAL);
      if (w <= 0) return false;
      c += w;
      n -= static_cast<size_t>(w);
    }
    return true;
  }
  bool RecvAll(void* p, size_t n) { return test::RecvAll(fd_, p, n); }
  int Request(uint16_t type, uint16_t flags, uint64_t off, uint32_t len, const std::string* payload,
              std::string* out) {
    std::string req;
    Put32(&req, 0x25609513);
    Put32(&req, uint32_t(flags) << 16 | type);
    Put64(&req, ++handle_);
    Put64(&req, off);
    Put32(&req, len);
    if (payload) req += *payload;
    if (!SendAll(req.data(), req.size())) return -1;
    uint8_t rep[16];
    if (!RecvAll(rep, sizeof rep) || Be32(rep) != 0x67446698 || Be64(rep + 8) != handle_) return -1;
    uint32_t err = Be32(rep + 4);
    if (err == 0 && out) {
      out->assign(len, '\0');
      if (!RecvAll(out->data(), len)) return -1;
    }
    return static_cast<int>(err);
  }
  int fd_ = -1;
  uint64_t handle_ = 0;
  uint64_t size_ = 0;
};

std::string Pattern(uint64_t seed, size_t n) {
  std::mt19937_64 g(seed);
  std::string s(n, '\0');
  for (size_t i = 0; i + 8 <= n; i += 8) {
    uint64_t v = g();
    memcpy(&s[i], &v, 8);
  }
  return s;
}

// An acknowledged write: `len` bytes of Pattern(seed) at `off`.
struct Block {
  uint64_t off;
  uint32_t len;
  uint64_t seed;
};

// ---- the schedule and the figures --------------------------------------------------------------

enum class Victim { kController, kDatapath, kNode };
const char* VictimName(Victim v) {
  switch (v) {
    case Victim::kController: return "controller";
    case Victim::kDatapath: return "datapath";
    case Victim::kNode: return "node-plugin";
  }
  return "?";
}

struct Figures {
  int kill_points = 0;
  std::map<std::string, int> kills;          // by victim
  std::map<std::string, int> killed_during;  // by call
  std::map<std::string, int> first_try;      // first attempt's outcome: "OK" or the code name
  std::map<std::string, int> retry_codes;    // codes seen while retrying
  int retries = 0;
  int acked_writes = 0, verified_writes = 0;
  uint64_t verified_bytes = 0;
  int datapath_restarts_checked = 0;
  int orphans_cleaned = 0;
  int recut_snapshots = 0;  // snapshot re-taken because a restart abandoned its copy
  std::string Print() const {
    std::ostringstream o;
    o << "kill points " << kill_points << " (";
    for (auto& [k, n] : kills) o << k << " " << n << ", ";
    o << "), during: ";
    for (auto& [k, n] : killed_during) o << k << " " << n << ", ";
    o << "\nfirst attempt after the kill: ";
    for (auto& [k, n] : first_try) o << k << " " << n << ", ";
    o << "\nretries " << retries << ", codes while retrying: ";
    for (auto& [k, n] : retry_codes) o << k << " " << n << ", ";
    o << "\nwrites acknowledged " << acked_writes << ", verified " << verified_writes << " ("
      << verified_bytes / 1024 << " KiB), lost 0; pool checks after a datapath restart "
      << datapath_restarts_checked << " (orphans cleaned at restart " << orphans_cleaned
      << "), snapshots re-cut after a restart abandoned their copy " << recut_snapshots;
    return o.str();
  }
};

std::string CodeName(grpc::StatusCode c) {
  static const char* names[] = {"OK",
                                "CANCELLED",
                                "UNKNOWN",
                                "INVALID_ARGUMENT",
                                "DEADLINE_EXCEEDED",
                                "NOT_FOUND",
                                "ALREADY_EXISTS",
                                "PERMISSION_DENIED",
                                "RESOURCE_EXHAUSTED",
                                "FAILED_PRECONDITION",
                                "ABORTED",
                                "OUT_OF_RANGE",
                                "UNIMPLEMENTED",
                                "INTERNAL",
                                "UNAVAILABLE",
                                "DATA_LOSS",
                                "UNAUTHENTICATED"};
  int i = static_cast<int>(c);
  return i >= 0 && i < 17 ? names[i] : std::to_string(i);
}

// Answers after which a sidecar or kubelet would give up on a call that is valid: a retry of a
// valid call that gets one of these is a bug (a lost idempotency, a volume the kill destroyed).
bool Final(grpc::StatusCode c) {
  switch (c) {
    case grpc::StatusCode::ALREADY_EXISTS:
    case grpc::StatusCode::NOT_FOUND:
    case grpc::StatusCode::INVALID_ARGUMENT:
    case grpc::StatusCode::OUT_OF_RANGE:
    case grpc::StatusCode::FAILED_PRECONDITION:
    case grpc::StatusCode::UNIMPLEMENTED:
    case grpc::StatusCode::PERMISSION_DENIED: return true;
    default: return false;
  }
}

std::unique_ptr<grpc::ClientContext> CallCtx(std::chrono::seconds s = 20s) {
  auto c = std::make_unique<grpc::ClientContext>();
  c->set_deadline(std::chrono::system_clock::now() + s);
  return c;
}

std::string PoolName(const std::string& id) { return id.substr(id.rfind(':') + 1); }

// Files on disk that are not NAME.img + NAME.json pairs of `names`, and names without both.
std::vector<std::string> PoolDirProblems(const std::string& dir,
                                         const std::set<std::string>& names) {
  std::vector<std::string> bad;
  std::set<std::string> want, have;
  for (const auto& n : names) {
    want.insert(n + ".img");
    want.insert(n + ".json");
  }
  std::error_code ec;
  if (fs::exists(dir, ec)) {
    for (const auto& e : fs::directory_iterator(dir, ec)) have.insert(e.path().filename());
  }
  for (const auto& f : have)
    if (!want.count(f)) bad.push_back(dir + "/" + f + " (not a listed object)");
  for (const auto& f : want)
    if (!have.count(f)) bad.push_back(dir + "/" + f + " (missing)");
  return bad;
}

std::string GrepLog(const std::string& path, const std::vector<std::string>& needles) {
  std::ifstream in(path);
  std::string out;
  for (std::string l; std::getline(in, l);) {
    for (const auto& n : needles)
      if (l.find(n) != std::string::npos) out += l + "\n";
  }
  return out;
}

// ---- the fixture: cluster, schedule, kill harness ---------------------------------------------

class FaultsKill : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    seed_ = EnvOr("FAULTS_SEED", std::random_device{}());
    fprintf(stderr, "faults_kill: seed %llu (replay: FAULTS_SEED=%llu)\n",
            static_cast<unsigned long long>(seed_), static_cast<unsigned long long>(seed_));
    ClusterOptions o;
    o.capacity = "64Gi";
    o.heartbeat_ms = 100;
    cluster_ = new Cluster(o);
    start_error_ = cluster_->Start();
  }
  static void TearDownTestSuite() {
    delete cluster_;
    cluster_ = nullptr;
  }
  void SetUp() override {
    ASSERT_TRUE(start_error_.empty()) << start_error_;
    rng_.seed(seed_ ^ std::hash<std::string>{}(
                          ::testing::UnitTest::GetInstance()->current_test_info()->name()));
  }
  void TearDown() override {
    if (HasFailure()) {
      std::cerr << cluster_->LogTail("controller") << cluster_->LogTail("node-a")
                << cluster_->LogTail("node-b");
    }
  }

  v1::Controller::Stub& C() { return cluster_->controller(); }
  size_t NodeIndex(const std::string& node) { return node == "node-a" ? 0 : 1; }
  std::string NbdSock(const std::string& node) {
    return cluster_->dir() + "/" + node + "-nbd.sock";
  }
  std::string PoolDir(const std::string& node) { return cluster_->dir() + "/pool-" + node; }

  double Uniform(double lo, double hi) { return std::uniform_real_distribution<>(lo, hi)(rng_); }

  // Restarts what was killed and waits until it serves again.
  void Revive(Victim v, const std::string& node) {
    if (v == Victim::kController) {
      std::string e = cluster_->StartController();
      ASSERT_TRUE(e.empty()) << e;
      for (const auto& n : cluster_->nodes()) ASSERT_TRUE(cluster_->WaitRegistered(n, 20s)) << n;
    } else if (v == Victim::kDatapath) {
      std::string e = cluster_->StartDatapath(NodeIndex(node));
      ASSERT_TRUE(e.empty()) << e;
      ASSERT_TRUE(cluster_->WaitRegistered(node, 20s)) << node;
      CheckPool(node);
    } else {
      ASSERT_TRUE(node_revive_);
      node_revive_();
    }
  }

  // Runs `call` (which makes one CSI call and records its status) on a thread, kills the
  // victim after the scheduled delay, waits for the call to return, restarts the victim.
  void KillDuring(const std::string& what, Victim v, const std::string& node,
                  const std::function<grpc::Status()>& call) {
    double frac = Uniform(0, 1.2);
    auto delay = std::chrono::duration_cast<Clock::duration>(calib_[what] * frac);
    grpc::Status first;
    std::thread t([&] { first = call(); });
    std::this_thread::sleep_for(delay);  // the stimulus: the kill lands at a random point
    switch (v) {
      case Victim::kController: cluster_->StopController(true); break;
      case Victim::kDatapath: cluster_->StopDatapath(NodeIndex(node), true); break;
      case Victim::kNode: node_kill_(); break;
    }
    t.join();
    ++fig_.kill_points;
    ++fig_.kills[VictimName(v)];
    ++fig_.killed_during[what];
    ++fig_.first_try[first.ok() ? "OK" : CodeName(first.error_code())];
    Revive(v, node);
  }

  // Calls until success, as a sidecar would (bounded: 60 s), then once more: a sidecar whose
  // answer was lost calls again, and that must succeed too. `call` checks every successful
  // answer itself (ids, sizes, sources).
  grpc::Status Retry(const std::string& what, const std::function<grpc::Status()>& call) {
    auto deadline = Clock::now() + 60s;
    grpc::Status st = call();
    auto backoff = 20ms;
    while (!st.ok()) {
      ++fig_.retries;
      ++fig_.retry_codes[CodeName(st.error_code())];
      if (Final(st.error_code())) {
        ADD_FAILURE() << what << ": a retry got " << CodeName(st.error_code()) << " \""
                      << st.error_message() << "\", which ends a sidecar's retries";
        return st;
      }
      if (Clock::now() > deadline) {
        ADD_FAILURE() << what << ": still " << CodeName(st.error_code())
                      << " after 60 s: " << st.error_message();
        return st;
      }
      std::this_thread::sleep_for(backoff);  // bounded retry, as a sidecar's
      backoff = std::min<std::chrono::milliseconds>(backoff * 2, 500ms);
      st = call();
    }
    grpc::Status again = call();
    if (!again.ok()) {
      ADD_FAILURE() << what << ": the same call again after its success got "
                    << CodeName(again.error_code()) << " \"" << again.error_message() << "\"";
    }
    return again;
  }

  // A kill point: the call with a kill during it, then retried to success.
  grpc::Status KillAndRetry(const std::string& what, Victim v, const std::string& node,
                            const std::function<grpc::Status()>& call) {
    KillDuring(what, v, node, call);
    if (::testing::Test::HasFatalFailure())
      return grpc::Status(grpc::StatusCode::INTERNAL, "revive");
    return Retry(what, call);
  }

  // Times one uninterrupted call (the kill instants are fractions of it).
  void Calibrate(const std::string& what, const std::function<grpc::Status()>& call) {
    auto t0 = Clock::now();
    grpc::Status st = call();
    ASSERT_TRUE(st.ok()) << what << ": " << st.error_message();
    calib_[what] = std::max<Clock::duration>(Clock::now() - t0, 2ms);
  }

  // After a datapath restart: no broken object, the files on disk are the pairs the API lists.
  void CheckPool(const std::string& node) {
    ++fig_.datapath_restarts_checked;
    auto& d = cluster_->datapath(node);
    dp::GetPoolInfoResponse info;
    // After a kill -9 the old API socket file is still there, so StartDatapath may return (and
    // the controller still count the old registration) before the new daemon listens: wait for
    // it to answer (UNAVAILABLE, "connection refused", until then).
    grpc::Status st;
    for (auto deadline = Clock::now() + 20s;;) {
      info.Clear();
      st = d.GetPoolInfo(CallCtx().get(), dp::GetPoolInfoRequest(), &info);
      if (st.error_code() != grpc::StatusCode::UNAVAILABLE || Clock::now() > deadline) break;
      std::this_thread::sleep_for(50ms);  // the poll of a bounded wait
    }
    ASSERT_TRUE(st.ok()) << st.error_message();
    EXPECT_EQ(info.broken_volumes_size(), 0) << node << ": " << info.DebugString();
    fig_.orphans_cleaned += info.cleaned_orphans_size();
    // A restore the kill interrupted is restarted by Pool::Open, and its copy job commits the
    // volume's metadata when it ends (a .json.tmp, fsync, rename). A temp file is a leftover only
    // if it stays: look again for a while before calling it one.
    std::vector<std::string> bad;
    for (auto deadline = Clock::now() + 10s;;) {
      std::set<std::string> vols, snaps;
      dp::ListVolumesResponse lv;
      ASSERT_TRUE(d.ListVolumes(CallCtx().get(), dp::ListVolumesRequest(), &lv).ok());
      for (const auto& v : lv.volumes()) vols.insert(v.name());
      dp::ListSnapshotsResponse ls;
      ASSERT_TRUE(d.ListSnapshots(CallCtx().get(), dp::ListSnapshotsRequest(), &ls).ok());
      for (const auto& s : ls.snapshots()) snaps.insert(s.name());
      bad = PoolDirProblems(PoolDir(node) + "/volumes", vols);
      auto bad2 = PoolDirProblems(PoolDir(node) + "/snapshots", snaps);
      bad.insert(bad.end(), bad2.begin(), bad2.end());
      const bool only_commits = std::all_of(bad.begin(), bad.end(), [](const std::string& b) {
        return b.find(".tmp (not a listed object)") != std::string::npos;
      });
      if (bad.empty() || !only_commits || Clock::now() > deadline) break;
      std::this_thread::sleep_for(20ms);  // the poll of a bounded wait
    }
    for (const auto& b : bad) ADD_FAILURE() << node << " after restart: " << b;
  }

  // The pool's view of a volume (ok=false when it does not exist).
  dp::Volume PoolVolume(const std::string& node, const std::string& name, bool* ok) {
    dp::GetVolumeRequest r;
    r.set_name(name);
    dp::GetVolumeResponse resp;
    *ok = cluster_->datapath(node).GetVolume(CallCtx().get(), r, &resp).ok();
    return resp.volume();
  }

  // The daemon counts a connection closed a moment after it closed the socket.
  void WaitNoConnections(const std::string& node, const std::string& name) {
    auto deadline = Clock::now() + 10s;
    bool ok = true;
    while (Clock::now() < deadline) {
      if (PoolVolume(node, name, &ok).open_connections() == 0 || !ok) return;
      std::this_thread::sleep_for(5ms);  // the poll of a bounded wait
    }
    ADD_FAILURE() << name << " on " << node << " still has NBD connections 10 s after they closed";
  }

  bool WaitReady(const std::string& node, const std::string& name) {
    auto deadline = Clock::now() + 60s;
    while (Clock::now() < deadline) {
      bool ok;
      dp::Volume v = PoolVolume(node, name, &ok);
      if (ok && v.ready()) return true;
      std::this_thread::sleep_for(20ms);  // the poll of a bounded wait
    }
    return false;
  }

  // Writes `blocks` with FUA; each acknowledged one is appended to `acked`.
  void WriteBlocks(const std::string& node, const std::string& vol,
                   const std::vector<Block>& blocks, std::vector<Block>* acked) {
    Nbd c;
    std::string e = c.Connect(NbdSock(node), vol);
    ASSERT_EQ(e, "") << vol << " on " << node;
    for (const auto& b : blocks) {
      ASSERT_EQ(c.Write(b.off, Pattern(b.seed, b.len), true), 0) << vol << " @" << b.off;
      acked->push_back(b);
      ++fig_.acked_writes;
    }
    c.Close();
    WaitNoConnections(node, vol);
  }

  // Every block reads back as written (later blocks win where they overlap: none do here).
  void VerifyBlocks(const std::string& node, const std::string& vol,
                    const std::vector<Block>& blocks, const std::string& why) {
    Nbd c;
    std::string e = c.Connect(NbdSock(node), vol);
    ASSERT_EQ(e, "") << vol << " on " << node << " (" << why << ")";
    for (const auto& b : blocks) {
      std::string got;
      ASSERT_EQ(c.Read(b.off, b.len, &got), 0) << vol << " @" << b.off;
      ASSERT_TRUE(got == Pattern(b.seed, b.len))
          << why << ": " << vol << " on " << node << " lost the acknowledged write at offset "
          << b.off << " (" << b.len << " bytes)";
      ++fig_.verified_writes;
      fig_.verified_bytes += b.len;
    }
    c.Close();
    WaitNoConnections(node, vol);
  }

  // `n` blocks in [from, limit) placed by the schedule, each in a 64 KiB slot not in `used`, so
  // that no two writes to one volume overlap and each reads back exactly as written.
  std::vector<Block> Blocks(int n, uint64_t from, uint64_t limit, std::set<uint64_t>* used) {
    std::vector<Block> out;
    uint64_t slots = (limit - from) / (64 * 1024);
    while (static_cast<int>(out.size()) < n) {
      uint64_t s = from / (64 * 1024) + std::uniform_int_distribution<uint64_t>(0, slots - 1)(rng_);
      if (!used->insert(s).second) continue;
      uint32_t len = kBlock * std::uniform_int_distribution<uint32_t>(1, 16)(rng_);
      out.push_back({s * 64 * 1024, len, rng_()});
    }
    return out;
  }

  // ---- CSI calls ----
  grpc::Status CreateVolume(const std::string& name, const std::string& node, uint64_t bytes,
                            const std::string& from_snapshot, v1::Volume* out) {
    v1::CreateVolumeRequest r = VolumeRequest(name, static_cast<int64_t>(bytes));
    // The chart runs csi-provisioner with --strict-topology: the selected node is the only one.
    *r.mutable_accessibility_requirements()->add_requisite() = NodeTopology(node);
    *r.mutable_accessibility_requirements()->add_preferred() = NodeTopology(node);
    if (!from_snapshot.empty()) {
      r.mutable_volume_content_source()->mutable_snapshot()->set_snapshot_id(from_snapshot);
    }
    v1::CreateVolumeResponse resp;
    grpc::Status st = C().CreateVolume(CallCtx().get(), r, &resp);
    if (st.ok()) {
      const v1::Volume& v = resp.volume();
      EXPECT_EQ(v.volume_id(), "v1:" + node + ":" + name);
      EXPECT_EQ(v.capacity_bytes(), static_cast<int64_t>(bytes)) << name;
      EXPECT_EQ(NodeOf(v), node) << name;
      EXPECT_EQ(v.content_source().snapshot().snapshot_id(), from_snapshot) << name;
      if (out) *out = v;
    }
    return st;
  }
  grpc::Status DeleteVolume(const std::string& id) {
    v1::DeleteVolumeRequest r;
    r.set_volume_id(id);
    v1::DeleteVolumeResponse resp;
    return C().DeleteVolume(CallCtx().get(), r, &resp);
  }
  grpc::Status CreateSnapshot(const std::string& name, const std::string& src, uint64_t bytes,
                              v1::Snapshot* out) {
    v1::CreateSnapshotRequest r;
    r.set_name(name);
    r.set_source_volume_id(src);
    v1::CreateSnapshotResponse resp;
    grpc::Status st = C().CreateSnapshot(CallCtx().get(), r, &resp);
    if (st.ok()) {
      const v1::Snapshot& s = resp.snapshot();
      std::string node = src.substr(3, src.rfind(':') - 3);
      EXPECT_EQ(s.snapshot_id(), "s1:" + node + ":" + name);
      EXPECT_EQ(s.source_volume_id(), src);
      EXPECT_EQ(s.size_bytes(), static_cast<int64_t>(bytes));
      if (out) *out = s;
    }
    return st;
  }
  grpc::Status DeleteSnapshot(const std::string& id) {
    v1::DeleteSnapshotRequest r;
    r.set_snapshot_id(id);
    v1::DeleteSnapshotResponse resp;
    return C().DeleteSnapshot(CallCtx().get(), r, &resp);
  }
  grpc::Status Expand(const std::string& id, uint64_t bytes) {
    v1::ControllerExpandVolumeRequest r;
    r.set_volume_id(id);
    r.mutable_capacity_range()->set_required_bytes(static_cast<int64_t>(bytes));
    v1::ControllerExpandVolumeResponse resp;
    grpc::Status st = C().ControllerExpandVolume(CallCtx().get(), r, &resp);
    if (st.ok()) {
      EXPECT_GE(resp.capacity_bytes(), static_cast<int64_t>(bytes)) << id;
      EXPECT_TRUE(resp.node_expansion_required()) << id;
    }
    return st;
  }

  // CreateSnapshot again until ready_to_use, as csi-snapshotter polls. Counts a snapshot whose
  // creation time moved (a restart abandoned its copy and the retry took it again).
  void WaitSnapshotReady(const std::string& name, const std::string& src, uint64_t bytes,
                         const v1::Snapshot& first) {
    auto deadline = Clock::now() + 60s;
    bool recut = false;
    while (true) {
      v1::Snapshot s;
      grpc::Status st =
          Retry("CreateSnapshot (poll)", [&] { return CreateSnapshot(name, src, bytes, &s); });
      ASSERT_TRUE(st.ok());
      if (s.creation_time().seconds() != first.creation_time().seconds() ||
          s.creation_time().nanos() != first.creation_time().nanos()) {
        recut = true;
      }
      if (s.ready_to_use()) break;
      ASSERT_LT(Clock::now(), deadline) << "snapshot " << name << " not ready after 60 s";
      std::this_thread::sleep_for(20ms);  // the poll of a bounded wait
    }
    if (recut) ++fig_.recut_snapshots;
  }

  Victim PickControllerOrDatapath() {
    return std::bernoulli_distribution(0.5)(rng_) ? Victim::kController : Victim::kDatapath;
  }

  static Cluster* cluster_;
  static std::string start_error_;
  static uint64_t seed_;
  std::mt19937_64 rng_;
  std::map<std::string, Clock::duration> calib_;
  Figures fig_;
  std::function<void()> node_kill_, node_revive_;
};

Cluster* FaultsKill::cluster_ = nullptr;
std::string FaultsKill::start_error_;
uint64_t FaultsKill::seed_ = 0;

// The controller/datapath matrix: per round a volume's whole life with a kill in every call.
TEST_F(FaultsKill, ProvisioningSnapshotsExpansion) {
  const int rounds = static_cast<int>(EnvOr("FAULTS_ROUNDS", 40));
  struct Live {
    std::string id, node;
    uint64_t size;
    std::vector<Block> acked;
    std::set<uint64_t> used;  // 64 KiB slots written
  };
  std::vector<Live> sources;

  // Calibration: one uninterrupted pass of every call.
  {
    const std::string n = "node-a";
    v1::Volume v;
    v1::Snapshot s;
    Calibrate("CreateVolume", [&] { return CreateVolume("pvc-cal", n, kVolBytes, "", &v); });
    Calibrate("CreateSnapshot",
              [&] { return CreateSnapshot("snap-cal", v.volume_id(), kVolBytes, &s); });
    WaitSnapshotReady("snap-cal", v.volume_id(), kVolBytes, s);
    Calibrate("Restore",
              [&] { return CreateVolume("pvc-cal-r", n, kVolBytes, s.snapshot_id(), nullptr); });
    ASSERT_TRUE(WaitReady(n, "pvc-cal-r"));
    Calibrate("ControllerExpandVolume", [&] { return Expand(v.volume_id(), 2 * kVolBytes); });
    Calibrate("DeleteVolume", [&] { return DeleteVolume("v1:node-a:pvc-cal-r"); });
    Calibrate("DeleteSnapshot", [&] { return DeleteSnapshot(s.snapshot_id()); });
    ASSERT_TRUE(DeleteVolume(v.volume_id()).ok());
    for (auto& [k, d] : calib_) {
      fprintf(stderr, "faults_kill: %s takes %.1f ms uninterrupted\n", k.c_str(),
              std::chrono::duration<double, std::milli>(d).count());
    }
  }

  auto t0 = Clock::now();
  for (int r = 0; r < rounds && !HasFatalFailure(); ++r) {
    const std::string node = cluster_->nodes()[r % 2];
    const std::string name = "pvc-f" + std::to_string(r);
    const std::string vid = "v1:" + node + ":" + name;
    const std::string snap = "snap-f" + std::to_string(r);
    const std::string restore = "pvc-f" + std::to_string(r) + "-r";
    const std::string rid = "v1:" + node + ":" + restore;
    SCOPED_TRACE("round " + std::to_string(r) + " on " + node);

    // CreateVolume, killed.
    ASSERT_TRUE(KillAndRetry("CreateVolume", PickControllerOrDatapath(), node, [&] {
                  return CreateVolume(name, node, kVolBytes, "", nullptr);
                }).ok());
    Live live{vid, node, kVolBytes, {}, {}};
    WriteBlocks(node, name, Blocks(4, 0, kVolBytes, &live.used), &live.acked);
    ASSERT_FALSE(HasFatalFailure());
    const std::vector<Block> before_snapshot = live.acked;

    // CreateSnapshot, killed; then polled to ready.
    v1::Snapshot s;
    ASSERT_TRUE(KillAndRetry("CreateSnapshot", PickControllerOrDatapath(), node, [&] {
                  return CreateSnapshot(snap, vid, kVolBytes, &s);
                }).ok());
    WaitSnapshotReady(snap, vid, kVolBytes, s);
    ASSERT_FALSE(HasFatalFailure());
    // Written after the snapshot: must be in the source, never in the restore.
    std::vector<Block> after;
    WriteBlocks(node, name, Blocks(2, 0, kVolBytes, &live.used), &after);
    for (const auto& b : after) live.acked.push_back(b);

    // Restore, killed; must hold the snapshot's instant.
    ASSERT_TRUE(KillAndRetry("Restore", PickControllerOrDatapath(), node, [&] {
                  return CreateVolume(restore, node, kVolBytes, s.snapshot_id(), nullptr);
                }).ok());
    ASSERT_TRUE(WaitReady(node, restore)) << restore << " never became ready";
    VerifyBlocks(node, restore, before_snapshot, "restore of " + snap);
    {
      Nbd c;
      ASSERT_EQ(c.Connect(NbdSock(node), restore), "");
      for (const auto& b : after) {
        std::string got;
        ASSERT_EQ(c.Read(b.off, b.len, &got), 0);
        // Never written before the snapshot: the restore must read zeroes there.
        EXPECT_TRUE(got == std::string(b.len, '\0'))
            << restore << " holds data written after " << snap << " at offset " << b.off;
      }
      c.Close();
      WaitNoConnections(node, restore);
    }

    // ControllerExpandVolume of the source, killed; data kept, new space usable.
    ASSERT_TRUE(KillAndRetry("ControllerExpandVolume", PickControllerOrDatapath(), node, [&] {
                  return Expand(vid, 2 * kVolBytes);
                }).ok());
    bool ok;
    EXPECT_EQ(PoolVolume(node, name, &ok).size_bytes(), 2 * kVolBytes);
    EXPECT_TRUE(ok);
    live.size = 2 * kVolBytes;
    WriteBlocks(node, name, Blocks(1, kVolBytes, 2 * kVolBytes, &live.used), &live.acked);
    VerifyBlocks(node, name, live.acked, "after expansion");

    // DeleteVolume of the restore and DeleteSnapshot, killed; gone afterwards.
    ASSERT_TRUE(KillAndRetry("DeleteVolume", PickControllerOrDatapath(), node, [&] {
                  return DeleteVolume(rid);
                }).ok());
    PoolVolume(node, restore, &ok);
    EXPECT_FALSE(ok) << restore << " survived its DeleteVolume";
    ASSERT_TRUE(KillAndRetry("DeleteSnapshot", PickControllerOrDatapath(), node, [&] {
                  return DeleteSnapshot(s.snapshot_id());
                }).ok());
    sources.push_back(std::move(live));
  }

  // Every acknowledged write of every source, after all those kills.
  for (const auto& l : sources) VerifyBlocks(l.node, PoolName(l.id), l.acked, "at the end");

  // Delete the sources, killed; then nothing may be left anywhere.
  for (const auto& l : sources) {
    ASSERT_TRUE(KillAndRetry("DeleteVolume", PickControllerOrDatapath(), l.node, [&] {
                  return DeleteVolume(l.id);
                }).ok());
  }
  v1::ListVolumesResponse lv;
  ASSERT_TRUE(C().ListVolumes(CallCtx().get(), v1::ListVolumesRequest(), &lv).ok());
  EXPECT_EQ(lv.entries_size(), 0) << lv.DebugString();
  v1::ListSnapshotsResponse ls;
  ASSERT_TRUE(C().ListSnapshots(CallCtx().get(), v1::ListSnapshotsRequest(), &ls).ok());
  EXPECT_EQ(ls.entries_size(), 0) << ls.DebugString();
  for (const auto& n : cluster_->nodes()) {
    for (const auto& b : PoolDirProblems(PoolDir(n) + "/volumes", {}))
      ADD_FAILURE() << "left behind: " << b;
    for (const auto& b : PoolDirProblems(PoolDir(n) + "/snapshots", {}))
      ADD_FAILURE() << "left behind: " << b;
    std::string bad = GrepLog(cluster_->dir() + "/" + n + ".log",
                              {"engine invariant violated", "stale completions dropped"});
    EXPECT_EQ(bad, "") << n;
  }
  double secs = std::chrono::duration<double>(Clock::now() - t0).count();
  fprintf(stderr, "faults_kill: %d rounds in %.1f s\n%s\n", rounds, secs, fig_.Print().c_str());
  RecordProperty("kill_points", fig_.kill_points);
  RecordProperty("verified_writes", fig_.verified_writes);
  EXPECT_GE(fig_.kill_points, 7 * rounds);
}

// ---- the node plugin: kill -9 in every kubelet call of a block volume's life -------------------

std::string ReadText(const std::string& path) {
  std::ifstream f(path);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

// Why this host cannot attach volumes ("" when it can): root, and nbd.ko or nbdfuse + loop.
std::string NodePrerequisites() {
  if (geteuid() != 0) return "needs root";
  if (access("/dev/nbd0", F_OK) == 0) return "";
  for (const char* p : {"/dev/fuse", "/dev/loop-control"}) {
    if (access(p, R_OK | W_OK) != 0) return std::string("needs ") + p;
  }
  if (system("command -v nbdfuse >/dev/null 2>&1") != 0) return "needs nbdfuse";
  return "";
}

// Loop devices whose backing file (nbdfuse's, under the pool) names `part`.
std::vector<std::string> LoopsFor(const std::string& dir, const std::string& part) {
  std::vector<std::string> out;
  for (const auto& e : fs::directory_iterator("/sys/block")) {
    std::string name = e.path().filename();
    if (name.rfind("loop", 0) != 0) continue;
    std::string backing = ReadText(e.path().string() + "/loop/backing_file");
    if (backing.find(dir) != std::string::npos && backing.find(part) != std::string::npos) {
      out.push_back("/dev/" + name);
    }
  }
  return out;
}

bool MountedAt(const std::string& target) {
  std::istringstream in(ReadText("/proc/self/mountinfo"));
  for (std::string line; std::getline(in, line);) {
    std::istringstream f(line);
    std::string x;
    for (int i = 0; i < 5 && f >> x; ++i) {
    }
    if (x == target) return true;
  }
  return false;
}

uint64_t DeviceBytes(const std::string& path) {
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return 0;
  uint64_t size = 0;
  if (ioctl(fd, BLKGETSIZE64, &size) != 0) size = 0;
  close(fd);
  return size;
}

// O_DIRECT I/O on the published device node, as a pod would do it; errno or 0.
int DeviceIo(const std::string& path, bool write, uint64_t off, std::string* data) {
  int fd = open(path.c_str(), (write ? O_WRONLY : O_RDONLY) | O_DIRECT | O_CLOEXEC);
  if (fd < 0) return errno;
  void* buf = nullptr;
  if (posix_memalign(&buf, 4096, data->size()) != 0) {
    close(fd);
    return ENOMEM;
  }
  int rc = 0;
  ssize_t n;
  if (write) {
    memcpy(buf, data->data(), data->size());
    n = pwrite(fd, buf, data->size(), static_cast<off_t>(off));
    if (n == static_cast<ssize_t>(data->size()) && fdatasync(fd) != 0) rc = errno;
  } else {
    n = pread(fd, buf, data->size(), static_cast<off_t>(off));
    if (n == static_cast<ssize_t>(data->size())) memcpy(data->data(), buf, data->size());
  }
  if (n != static_cast<ssize_t>(data->size())) rc = n < 0 ? errno : EIO;
  free(buf);
  close(fd);
  return rc;
}

TEST_F(FaultsKill, NodePluginBlockVolumes) {
  if (std::string why = NodePrerequisites(); !why.empty()) {
    const char* ci = getenv("CI");
    if (ci && std::string(ci) == "true")
      FAIL() << why << " (CI=true: prerequisites must be present)";
    GTEST_SKIP() << why;
  }
  const int rounds = static_cast<int>(EnvOr("FAULTS_NODE_ROUNDS", 8));
  const std::string node = "node-a";
  const std::string dir = cluster_->dir();
  const std::string csi_sock = dir + "/node-plugin.sock";
  Process plugin;
  std::shared_ptr<grpc::Channel> ch;
  std::unique_ptr<v1::Node::Stub> stub;
  fs::create_directories(dir + "/kubelet");  // --kubelet-root must exist
  auto start = [&] {
    fs::remove(csi_sock);
    ASSERT_TRUE(plugin.Start(
        {Cluster::Bin("nbd-csi-node"), "--csi-endpoint", "unix://" + csi_sock, "--node-id", node,
         "--datapath", "unix://" + dir + "/" + node + "-api.sock", "--kubelet-root",
         dir + "/kubelet", "--log-level", "debug"},
        dir + "/node-plugin.log"));
    auto deadline = Clock::now() + 20s;
    while (!fs::exists(csi_sock)) {
      ASSERT_TRUE(plugin.Running()) << ReadText(dir + "/node-plugin.log");
      ASSERT_LT(Clock::now(), deadline) << "nbd-csi-node did not create its socket";
      std::this_thread::sleep_for(10ms);  // the poll of a bounded wait
    }
    ch = grpc::CreateChannel("unix://" + csi_sock, grpc::InsecureChannelCredentials());
    ASSERT_TRUE(ch->WaitForConnected(std::chrono::system_clock::now() + 20s));
    stub = v1::Node::NewStub(ch);
  };
  node_kill_ = [&] { plugin.Kill9(); };
  node_revive_ = [&] {
    stub.reset();
    ch.reset();
    start();
  };
  start();
  ASSERT_FALSE(HasFatalFailure());
  auto atts = dp::Attachments::NewStub(grpc::CreateChannel(
      "unix://" + dir + "/" + node + "-api.sock", grpc::InsecureChannelCredentials()));
  auto attachments = [&](const std::string& vol) {
    dp::ListAttachmentsResponse resp;
    EXPECT_TRUE(atts->ListAttachments(CallCtx().get(), dp::ListAttachmentsRequest(), &resp).ok());
    std::vector<dp::Attachment> out;
    for (const auto& a : resp.attachments())
      if (a.volume() == vol) out.push_back(a);
    return out;
  };

  v1::VolumeCapability cap = BlockCap();
  struct Paths {
    std::string id, name, staging, target;
  };
  auto paths = [&](const std::string& name) {
    Paths p{"v1:" + node + ":" + name, name, dir + "/kubelet/plugins/nbd.csi.io/" + name + "/stage",
            dir + "/kubelet/pods/uid-" + name + "/volumeDevices/" + name};
    fs::create_directories(p.staging);  // kubelet makes these two
    fs::create_directories(fs::path(p.target).parent_path());
    return p;
  };
  auto stage = [&](const Paths& p) {
    v1::NodeStageVolumeRequest r;
    r.set_volume_id(p.id);
    r.set_staging_target_path(p.staging);
    *r.mutable_volume_capability() = cap;
    v1::NodeStageVolumeResponse resp;
    return stub->NodeStageVolume(CallCtx(60s).get(), r, &resp);
  };
  auto publish = [&](const Paths& p) {
    v1::NodePublishVolumeRequest r;
    r.set_volume_id(p.id);
    r.set_staging_target_path(p.staging);
    r.set_target_path(p.target);
    *r.mutable_volume_capability() = cap;
    v1::NodePublishVolumeResponse resp;
    return stub->NodePublishVolume(CallCtx(60s).get(), r, &resp);
  };
  auto expand = [&](const Paths& p, uint64_t bytes) {
    v1::NodeExpandVolumeRequest r;
    r.set_volume_id(p.id);
    r.set_volume_path(p.target);
    r.set_staging_target_path(p.staging);
    *r.mutable_volume_capability() = cap;
    r.mutable_capacity_range()->set_required_bytes(static_cast<int64_t>(bytes));
    v1::NodeExpandVolumeResponse resp;
    grpc::Status st = stub->NodeExpandVolume(CallCtx(60s).get(), r, &resp);
    if (st.ok()) {
      EXPECT_EQ(resp.capacity_bytes(), static_cast<int64_t>(bytes));
    }
    return st;
  };
  auto unpublish = [&](const Paths& p) {
    v1::NodeUnpublishVolumeRequest r;
    r.set_volume_id(p.id);
    r.set_target_path(p.target);
    v1::NodeUnpublishVolumeResponse resp;
    return stub->NodeUnpublishVolume(CallCtx(60s).get(), r, &resp);
  };
  auto unstage = [&](const Paths& p) {
    v1::NodeUnstageVolumeRequest r;
    r.set_volume_id(p.id);
    r.set_staging_target_path(p.staging);
    v1::NodeUnstageVolumeResponse resp;
    return stub->NodeUnstageVolume(CallCtx(60s).get(), r, &resp);
  };
  auto create = [&](const std::string& name) {
    v1::CreateVolumeRequest r = VolumeRequest(name, static_cast<int64_t>(kVolBytes));
    r.clear_volume_capabilities();
    *r.add_volume_capabilities() = cap;
    *r.mutable_accessibility_requirements()->add_requisite() = NodeTopology(node);
    v1::CreateVolumeResponse resp;
    return C().CreateVolume(CallCtx().get(), r, &resp);
  };

  // Calibration: one uninterrupted life.
  {
    Paths p = paths("pvc-ncal");
    ASSERT_TRUE(create(p.name).ok());
    Calibrate("NodeStageVolume", [&] { return stage(p); });
    Calibrate("NodePublishVolume", [&] { return publish(p); });
    ASSERT_TRUE(Expand(p.id, 2 * kVolBytes).ok());
    Calibrate("NodeExpandVolume", [&] { return expand(p, 2 * kVolBytes); });
    Calibrate("NodeUnpublishVolume", [&] { return unpublish(p); });
    Calibrate("NodeUnstageVolume", [&] { return unstage(p); });
    ASSERT_TRUE(DeleteVolume(p.id).ok());
    for (const char* k : {"NodeStageVolume", "NodePublishVolume", "NodeExpandVolume",
                          "NodeUnpublishVolume", "NodeUnstageVolume"}) {
      fprintf(stderr, "faults_kill: %s takes %.1f ms uninterrupted\n", k,
              std::chrono::duration<double, std::milli>(calib_[k]).count());
    }
  }

  auto t0 = Clock::now();
  for (int r = 0; r < rounds && !HasFatalFailure(); ++r) {
    SCOPED_TRACE("node round " + std::to_string(r));
    Paths p = paths("pvc-n" + std::to_string(r));
    ASSERT_TRUE(create(p.name).ok());

    ASSERT_TRUE(
        KillAndRetry("NodeStageVolume", Victim::kNode, node, [&] { return stage(p); }).ok());
    auto a = attachments(p.name);
    ASSERT_EQ(a.size(), 1u) << "a killed and retried stage must leave exactly one attachment";
    EXPECT_TRUE(a[0].link_ok()) << a[0].link_error();

    ASSERT_TRUE(
        KillAndRetry("NodePublishVolume", Victim::kNode, node, [&] { return publish(p); }).ok());
    struct stat tst {
    }, dst{};
    ASSERT_EQ(stat(p.target.c_str(), &tst), 0);
    ASSERT_EQ(stat(a[0].device().c_str(), &dst), 0);
    EXPECT_TRUE(S_ISBLK(tst.st_mode));
    EXPECT_EQ(tst.st_rdev, dst.st_rdev) << p.target << " is not " << a[0].device();

    // Acknowledged writes through the pod's device node.
    std::set<uint64_t> used;
    std::vector<Block> acked;
    for (const auto& b : Blocks(4, 0, kVolBytes, &used)) {
      std::string d = Pattern(b.seed, b.len);
      ASSERT_EQ(DeviceIo(p.target, true, b.off, &d), 0) << p.target;
      acked.push_back(b);
      ++fig_.acked_writes;
    }

    ASSERT_TRUE(Expand(p.id, 2 * kVolBytes).ok());
    ASSERT_TRUE(KillAndRetry("NodeExpandVolume", Victim::kNode, node, [&] {
                  return expand(p, 2 * kVolBytes);
                }).ok());
    EXPECT_EQ(DeviceBytes(p.target), 2 * kVolBytes);
    for (const auto& b : Blocks(1, kVolBytes, 2 * kVolBytes, &used)) {
      std::string d = Pattern(b.seed, b.len);
      ASSERT_EQ(DeviceIo(p.target, true, b.off, &d), 0) << "the grown part of " << p.target;
      acked.push_back(b);
      ++fig_.acked_writes;
    }
    for (const auto& b : acked) {
      std::string got(b.len, '\0');
      ASSERT_EQ(DeviceIo(p.target, false, b.off, &got), 0);
      ASSERT_TRUE(got == Pattern(b.seed, b.len)) << p.target << " lost the write at " << b.off;
      ++fig_.verified_writes;
      fig_.verified_bytes += b.len;
    }

    ASSERT_TRUE(KillAndRetry("NodeUnpublishVolume", Victim::kNode, node, [&] {
                  return unpublish(p);
                }).ok());
    EXPECT_FALSE(MountedAt(p.target));
    EXPECT_FALSE(fs::exists(p.target));
    ASSERT_TRUE(
        KillAndRetry("NodeUnstageVolume", Victim::kNode, node, [&] { return unstage(p); }).ok());
    EXPECT_TRUE(attachments(p.name).empty()) << p.name << " still attached after unstage";
    EXPECT_TRUE(LoopsFor(dir, "/" + p.name + "/").empty()) << p.name << ": a loop device is left";

    {
      bool ok;
      dp::Volume pv = PoolVolume(node, p.name, &ok);
      EXPECT_EQ(pv.open_connections(), 0u) << "connections left open by the detach";
    }
    // Detached: the pool's copy holds every acknowledged write.
    VerifyBlocks(node, p.name, acked, "after unstage");
    grpc::Status del = DeleteVolume(p.id);
    ASSERT_TRUE(del.ok()) << CodeName(del.error_code()) << " " << del.error_message();
  }
  double secs = std::chrono::duration<double>(Clock::now() - t0).count();
  fprintf(stderr, "faults_kill: node plugin, %d rounds in %.1f s\n%s\n", rounds, secs,
          fig_.Print().c_str());
  EXPECT_GE(fig_.kill_points, 5 * rounds);
  EXPECT_EQ(GrepLog(dir + "/node-plugin.log", {"panic", "terminate called"}), "");
  node_kill_ = nullptr;
  node_revive_ = nullptr;
  plugin.Stop();
}

}  // namespace
}  // namespace nbdcsi::test
