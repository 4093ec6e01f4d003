// A child process owned by a test (a daemon, a client tool): started with its output in a log
// file, stopped with SIGTERM then SIGKILL when the object goes, or killed on purpose.
#pragma once

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <string>
#include <vector>

#include "common/endpoint.h"
#include "test/support/wait.h"

namespace nbdcsi::test {

// A child process owned by the test: SIGTERM, then SIGKILL, when it goes.
class Proc {
 public:
  Proc() = default;
  Proc(const Proc&) = delete;
  ~Proc() { Stop(); }
  bool Start(const std::vector<std::string>& argv, const std::string& log) {
    pid_ = fork();
    if (pid_ == 0) {
      prctl(PR_SET_PDEATHSIG, SIGKILL);  // never outlive a test that crashed
      int fd = open(log.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
      dup2(fd, 1);
      dup2(fd, 2);
      std::vector<char*> a;
      for (auto& s : argv) a.push_back(const_cast<char*>(s.c_str()));
      a.push_back(nullptr);
      execvp(a[0], a.data());
      _exit(127);
    }
    return pid_ > 0;
  }
  void Kill(int sig) {
    if (pid_ > 0) kill(pid_, sig);
  }
  bool Alive() { return pid_ > 0 && waitpid(pid_, nullptr, WNOHANG) == 0; }
  void Stop() {
    if (pid_ <= 0) return;
    kill(pid_, SIGTERM);
    int st;
    if (!WaitExited(pid_, &st, std::chrono::seconds(5))) {
      kill(pid_, SIGKILL);
      waitpid(pid_, &st, 0);
    }
    pid_ = -1;
  }

 private:
  pid_t pid_ = -1;
};

// True when something accepts connections at `ep` (a daemon is up).
inline bool CanConnect(const Endpoint& ep) {
  int fd;
  bool ok;
  if (ep.kind == Endpoint::Kind::kUnix) {
    fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_un sa{};
    sa.sun_family = AF_UNIX;
    std::snprintf(sa.sun_path, sizeof sa.sun_path, "%s", ep.path.c_str());
    ok = connect(fd, reinterpret_cast<sockaddr*>(&sa), sizeof sa) == 0;
  } else {
    fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in sa{};
    sa.sin_family = AF_INET;
    sa.sin_port = htons(ep.port);
    inet_pton(AF_INET, ep.host.c_str(), &sa.sin_addr);
    ok = connect(fd, reinterpret_cast<sockaddr*>(&sa), sizeof sa) == 0;
  }
  close(fd);
  return ok;
}

}  // namespace nbdcsi::test
