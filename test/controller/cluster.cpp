#include "test/controller/cluster.h"

#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <thread>

#include <grpcpp/client_context.h>
#include <grpcpp/create_channel.h>
#include <grpcpp/security/credentials.h>
#include <grpcpp/support/channel_arguments.h>

#include "csi/driver.h"
#include "datapath/api/registry.grpc.pb.h"
#include "test/support/free_port.h"
#include "test/support/grpc_call.h"
#include "test/support/wait.h"

namespace nbdcsi::test {

namespace v1 = ::csi::v1;
namespace fs = std::filesystem;
using namespace std::chrono_literals;

// ---- Process ----

bool Process::Start(const std::vector<std::string>& argv, const std::string& log_path) {
  Stop();
  int log = open(log_path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  if (log < 0) return false;
  pid_t parent = getpid();
  pid_t pid = fork();
  if (pid < 0) {
    close(log);
    return false;
  }
  if (pid == 0) {
    // A test that crashes must not leave daemons behind holding ports and sockets.
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != parent) _exit(127);
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, nullptr);
    dup2(log, 1);
    dup2(log, 2);
    std::vector<char*> args;
    for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    execv(args[0], args.data());
    _exit(127);
  }
  close(log);
  pid_ = pid;
  return true;
}

bool Process::Running() {
  if (pid_ <= 0) return false;
  int st;
  pid_t r = waitpid(pid_, &st, WNOHANG);
  if (r == pid_) {
    pid_ = -1;
    return false;
  }
  return true;
}

int Process::Stop(std::chrono::milliseconds grace) {
  if (pid_ <= 0) return -1;
  // A sanitizer build exits slower: LSan scans the whole heap at exit, which takes seconds on a
  // loaded 2-core machine.
  if (std::getenv("NBDCSI_SANITIZER")) grace *= 4;
  kill(pid_, SIGTERM);
  int st = 0;
  if (!WaitExited(pid_, &st, grace)) {
    kill(pid_, SIGKILL);
    waitpid(pid_, &st, 0);
  }
  pid_ = -1;
  return st;
}

int Process::Wait(std::chrono::milliseconds timeout) {
  if (pid_ <= 0) return -1;
  auto deadline = std::chrono::steady_clock::now() + timeout;
  int st = 0;
  while (waitpid(pid_, &st, WNOHANG) != pid_) {
    if (std::chrono::steady_clock::now() > deadline) return -1;
    std::this_thread::sleep_for(10ms);  // the poll of a bounded wait (waitpid)
  }
  pid_ = -1;
  return st;
}

void Process::Kill9() {
  if (pid_ <= 0) return;
  kill(pid_, SIGKILL);
  int st;
  waitpid(pid_, &st, 0);
  pid_ = -1;
}

// ---- Cluster ----

std::string Cluster::Bin(const std::string& name) {
  const char* b = getenv("NBDCSI_BIN");
  return std::string(b ? b : "bin") + "/" + name;
}

std::string Cluster::Src(const std::string& rel) {
  const char* s = getenv("NBDCSI_SRC");
  return std::string(s ? s : ".") + "/" + rel;
}


Cluster::Cluster(ClusterOptions opts) : opts_(std::move(opts)) {
  std::string tmpl = (fs::temp_directory_path() / "nbdcsi-ctrl-XXXXXX").string();
  if (mkdtemp(tmpl.data())) dir_ = tmpl;
  registry_port_ = FreeLoopbackPort();
  for (size_t i = 0; i < opts_.nodes.size(); ++i) {
    api_ports_.push_back(FreeLoopbackPort());
    datapath_procs_.push_back(std::make_unique<Process>());
    datapath_stubs_.push_back(nullptr);
  }
}

Cluster::~Cluster() {
  controller_stub_.reset();
  identity_stub_.reset();
  csi_channel_.reset();
  if (controller_proc_) controller_proc_->Stop();
  for (auto& p : datapath_procs_) p->Stop();
  if (!dir_.empty() && !getenv("NBDCSI_KEEP")) {
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }
}

std::string Cluster::LogTail(const std::string& name, int lines) const {
  std::ifstream in(dir_ + "/" + name + ".log");
  std::vector<std::string> all;
  for (std::string l; std::getline(in, l);) all.push_back(l);
  std::string out = "---- " + name + ".log ----\n";
  size_t from = all.size() > static_cast<size_t>(lines) ? all.size() - lines : 0;
  for (size_t i = from; i < all.size(); ++i) out += all[i] + "\n";
  return out;
}

static std::vector<std::string> TlsFlags(const std::string& d, const std::string& who) {
  if (d.empty()) return {"--insecure"};
  if (fs::exists(d + "/tls.crt")) {  // a Kubernetes TLS secret's layout
    return {"--tls-cert", d + "/tls.crt", "--tls-key", d + "/tls.key", "--tls-ca", d + "/ca.crt"};
  }
  return {"--tls-cert", d + "/" + who + ".crt", "--tls-key", d + "/" + who + ".key", "--tls-ca",
          d + "/ca.crt"};
}

std::string Cluster::StartController() {
  if (!controller_proc_) controller_proc_ = std::make_unique<Process>();
  std::vector<std::string> argv = {Bin("nbd-csi-controller"),
                                   "--csi-endpoint",
                                   "unix://" + dir_ + "/csi.sock",
                                   "--registry-listen",
                                   "127.0.0.1:" + std::to_string(registry_port_),
                                   "--heartbeat-interval",
                                   std::to_string(opts_.heartbeat_ms),
                                   "--datapath-timeout",
                                   "5000",
                                   "--log-level",
                                   "debug"};
  for (auto& f : TlsFlags(opts_.tls.controller, "server")) argv.push_back(f);
  for (auto& a : opts_.controller_args) argv.push_back(a);
  if (!controller_proc_->Start(argv, dir_ + "/controller.log")) return "cannot start the controller";
  controller_stub_.reset();
  identity_stub_.reset();
  const std::string sock = dir_ + "/csi.sock";
  WaitUntil([&] { return fs::exists(sock) || !controller_proc_->Running(); }, 10s);
  if (!fs::exists(sock)) return "the controller did not start\n" + LogTail("controller");
  // A channel made before the socket exists backs off for seconds after its first failed
  // connect; tests restart the controller and want it back at once.
  grpc::ChannelArguments args;
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 50);
  args.SetInt(GRPC_ARG_MIN_RECONNECT_BACKOFF_MS, 50);
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 200);
  csi_channel_ = grpc::CreateCustomChannel("unix://" + dir_ + "/csi.sock",
                                           grpc::InsecureChannelCredentials(), args);
  controller_stub_ = v1::Controller::NewStub(csi_channel_);
  identity_stub_ = v1::Identity::NewStub(csi_channel_);
  if (!WaitControllerServing(10s)) return "the controller does not serve CSI\n" + LogTail("controller");
  return "";
}

void Cluster::StopController(bool kill9) {
  if (!controller_proc_) return;
  if (kill9) {
    controller_proc_->Kill9();
  } else {
    controller_proc_->Stop();
  }
  // kill -9 leaves the socket file behind; StartController waits for a fresh one.
  std::error_code ec;
  fs::remove(dir_ + "/csi.sock", ec);
}

std::string Cluster::StartDatapath(size_t i) {
  const std::string& node = opts_.nodes[i];
  std::string pool = dir_ + "/pool-" + node;
  fs::create_directories(pool);
  std::vector<std::string> argv = {Bin("nbd-datapathd"),
                                   "--pool",
                                   pool,
                                   "--api",
                                   "unix://" + dir_ + "/" + node + "-api.sock",
                                   "--nbd-listen",
                                   "unix://" + dir_ + "/" + node + "-nbd.sock",
                                   "--workers",
                                   "1",
                                   "--capacity",
                                   opts_.capacity,
                                   "--node-id",
                                   node,
                                   "--advertise",
                                   "127.0.0.1:" + std::to_string(api_ports_[i]),
                                   "--controller",
                                   "127.0.0.1:" + std::to_string(registry_port_),
                                   "--heartbeat-interval",
                                   std::to_string(opts_.heartbeat_ms),
                                   "--log-level",
                                   "debug"};
  for (auto& f : TlsFlags(opts_.tls.datapath, "node-" + node)) argv.push_back(f);
  if (!datapath_procs_[i]->Start(argv, dir_ + "/" + node + ".log")) return "cannot start " + node;
  // The API socket appears once the daemon serves.
  const std::string api_sock = dir_ + "/" + node + "-api.sock";
  WaitUntil([&] { return fs::exists(api_sock) || !datapath_procs_[i]->Running(); }, 10s);
  if (!fs::exists(api_sock)) return "datapath " + node + " did not start\n" + LogTail(node);
  auto ch = grpc::CreateChannel("unix://" + dir_ + "/" + node + "-api.sock",
                                grpc::InsecureChannelCredentials());
  datapath_stubs_[i] = nbdcsi::datapath::v1::Datapath::NewStub(ch);
  return "";
}

void Cluster::StopDatapath(size_t i, bool kill9) {
  if (kill9) {
    datapath_procs_[i]->Kill9();
  } else {
    datapath_procs_[i]->Stop();
  }
  std::error_code ec;
  fs::remove(dir_ + "/" + opts_.nodes[i] + "-api.sock", ec);
}

std::string Cluster::Start() {
  if (dir_.empty()) return "cannot make a temp dir";
  if (registry_port_ == 0) return "no free port";
  if (std::string e = StartController(); !e.empty()) return e;
  for (size_t i = 0; i < opts_.nodes.size(); ++i) {
    if (std::string e = StartDatapath(i); !e.empty()) return e;
  }
  if (opts_.wait_registered) {
    for (const auto& n : opts_.nodes) {
      if (!WaitRegistered(n, 10s)) {
        return "node " + n + " never registered\n" + LogTail("controller") + LogTail(n);
      }
    }
  }
  return "";
}

bool Cluster::WaitControllerServing(std::chrono::milliseconds timeout) {
  bool serving = false;
  WaitUntil(
      [&] {
        if (controller_proc_ && !controller_proc_->Running()) return true;
        v1::ProbeRequest req;
        v1::ProbeResponse resp;
        serving = identity_stub_->Probe(CallContext(500ms).get(), req, &resp).ok();
        return serving;
      },
      timeout, 20ms);
  return serving;
}

bool Cluster::WaitRegistered(const std::string& node, std::chrono::milliseconds timeout) {
  return WaitUntil(
      [&] {
        v1::GetCapacityRequest req;
        *req.mutable_accessible_topology() = NodeTopology(node);
        v1::GetCapacityResponse resp;
        return controller_stub_->GetCapacity(CallContext(1s).get(), req, &resp).ok() &&
               resp.available_capacity() > 0;
      },
      timeout, 20ms);
}

v1::Controller::Stub& Cluster::controller() { return *controller_stub_; }
v1::Identity::Stub& Cluster::identity() { return *identity_stub_; }

nbdcsi::datapath::v1::Datapath::Stub& Cluster::datapath(const std::string& node) {
  for (size_t i = 0; i < opts_.nodes.size(); ++i) {
    if (opts_.nodes[i] == node) return *datapath_stubs_[i];
  }
  std::abort();
}

std::string Cluster::Nbdctl(const std::string& node, const std::vector<std::string>& args,
                            bool* ok) {
  std::string cmd = Bin("nbdctl") + " --api unix://" + dir_ + "/" + node + "-api.sock";
  for (const auto& a : args) cmd += " '" + a + "'";
  cmd += " 2>>" + dir_ + "/nbdctl.log";
  FILE* p = popen(cmd.c_str(), "r");
  if (!p) {
    *ok = false;
    return "";
  }
  std::string out;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof(buf), p)) > 0) out.append(buf, n);
  int st = pclose(p);
  *ok = WIFEXITED(st) && WEXITSTATUS(st) == 0;
  return out;
}

// ---- helpers ----

std::unique_ptr<grpc::ClientContext> Ctx() { return CallContext(20s); }

grpc::Status Heartbeat(int registry_port, const std::shared_ptr<grpc::ChannelCredentials>& creds,
                       const std::string& node, const std::string& address) {
  auto stub = datapath::v1::Registry::NewStub(
      grpc::CreateChannel("127.0.0.1:" + std::to_string(registry_port), creds));
  datapath::v1::HeartbeatRequest req;
  req.set_node_id(node);
  req.set_api_address(address);
  req.set_capacity_bytes(uint64_t{4} << 30);
  req.set_free_bytes(uint64_t{4} << 30);
  req.set_provisionable_bytes(uint64_t{4} << 30);
  datapath::v1::HeartbeatResponse resp;
  return stub->Heartbeat(Ctx().get(), req, &resp);
}

}  // namespace nbdcsi::test
