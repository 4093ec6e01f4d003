// One etcd member (Debian's etcd-server) on a loopback address, started by a test and killed by
// it: free ports, data in a temp dir, PDEATHSIG so it dies with the test. Integration tests of the
// cluster state (etcd_cluster_test) and of replicated volumes share it.
#pragma once

#include <fcntl.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "common/etcd/etcd_client.h"
#include "common/tls.h"
#include "test/support/certs.h"
#include "test/support/free_port.h"
#include "test/support/temp_dir.h"
#include "test/support/wait.h"

namespace nbdcsi::test {

// $ETCD_BIN, else the usual install paths; "" when there is none.
inline std::string EtcdBinary() {
  if (const char* e = getenv("ETCD_BIN"); e && *e) return e;
  for (const char* p : {"/usr/bin/etcd", "/usr/local/bin/etcd"}) {
    if (access(p, X_OK) == 0) return p;
  }
  return "";
}

// One etcd member on loopback. Killed (SIGKILL) by the destructor; PDEATHSIG kills it with us if
// the test itself dies.
class EtcdProcess {
 public:
  // `tls`: serve clients over TLS with make-certs.sh's server certificate and require client
  // certificates of its CA (etcd's --client-cert-auth). The server certificate names 127.0.0.1,
  // so a TLS member listens there rather than on kIp.
  explicit EtcdProcess(const TestCerts* tls = nullptr, std::string ip = "127.0.0.21")
      : dir_("nbdcsi-etcd"), tls_(tls), ip_(tls ? "127.0.0.1" : std::move(ip)) {}
  ~EtcdProcess() { Kill(); }

  // What a client needs to reach this member.
  TlsFiles ClientTls() const {
    if (!tls_) return TlsFiles{.cert = "", .key = "", .ca = "", .insecure = true};
    return TlsFiles{.cert = (*tls_)("client.crt"),
                    .key = (*tls_)("client.key"),
                    .ca = (*tls_)("ca.crt"),
                    .insecure = false};
  }

  bool Start(std::string* why) {
    using namespace std::chrono_literals;
    if (!dir_.ok()) {
      *why = dir_.error();
      return false;
    }
    if (client_port_ == 0) {
      client_port_ = FreeLoopbackPort(ip_.c_str());
      peer_port_ = FreeLoopbackPort(ip_.c_str());
    }
    const std::string client =
        fmt::format("{}://{}:{}", tls_ ? "https" : "http", ip_, client_port_);
    const std::string peer = fmt::format("http://{}:{}", ip_, peer_port_);
    std::vector<std::string> args = {EtcdBinary(),
                                     "--name=it",
                                     "--data-dir=" + dir_ / "data",
                                     "--listen-client-urls=" + client,
                                     "--advertise-client-urls=" + client,
                                     "--listen-peer-urls=" + peer,
                                     "--initial-advertise-peer-urls=" + peer,
                                     "--initial-cluster=it=" + peer,
                                     "--initial-cluster-state=new",
                                     "--logger=zap",
                                     "--log-level=warn",
                                     "--log-outputs=" + dir_ / "etcd.log"};
    if (tls_) {
      args.push_back("--cert-file=" + (*tls_)("server.crt"));
      args.push_back("--key-file=" + (*tls_)("server.key"));
      args.push_back("--trusted-ca-file=" + (*tls_)("ca.crt"));
      args.push_back("--client-cert-auth");
    }
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    pid_ = fork();
    if (pid_ < 0) {
      *why = "fork failed";
      return false;
    }
    if (pid_ == 0) {
      prctl(PR_SET_PDEATHSIG, SIGKILL);
      int null = open("/dev/null", O_RDWR);
      dup2(null, 0);
      dup2(null, 1);
      execv(argv[0], argv.data());
      _exit(127);
    }
    // Ready when a linearizable read answers (the member has elected itself leader).
    auto client_or = etcd::EtcdClient::Create(
        {.endpoints = {endpoint()}, .call_timeout = 1s, .tls = ClientTls()});
    if (!client_or.ok()) {
      *why = client_or.status().message();
      return false;
    }
    Status last;
    bool ready = WaitUntil(
        [&] {
          int st;
          if (waitpid(pid_, &st, WNOHANG) == pid_) {
            pid_ = -1;
            return true;
          }
          auto r = (*client_or)->Range("/ready");
          last = r.status();
          return r.ok();
        },
        30s, 50ms);
    if (!ready || pid_ < 0) {
      *why = fmt::format("etcd did not become ready at {} (last: {}); log {}", endpoint(),
                         last.message(), dir_ / "etcd.log");
      return false;
    }
    return true;
  }

  void Kill() {
    if (pid_ <= 0) return;
    kill(pid_, SIGKILL);
    int st;
    waitpid(pid_, &st, 0);
    pid_ = -1;
  }

  std::string endpoint() const { return fmt::format("{}:{}", ip_, client_port_); }

 private:
  TempDir dir_;
  const TestCerts* tls_;
  std::string ip_;
  int client_port_ = 0;
  int peer_port_ = 0;
  pid_t pid_ = -1;
};

}  // namespace nbdcsi::test
