// Helpers for integration tests written in C++ that start daemons and tools of their own: a
// child process the test owns (stopped when it goes), the project's binaries ($NBDCSI_BIN) and
// sources ($NBDCSI_SRC) as CTest passes them, whether a tool is installed, and whether a socket
// accepts connections yet.
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
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <optional>
#include <string>
#include <vector>

#include "common/endpoint.h"
#include "test/support/wait.h"

namespace nbdcsi::test {

using namespace std::chrono_literals;

inline bool Have(const std::string& tool) {
  return std::system(("command -v " + tool + " >/dev/null 2>&1").c_str()) == 0;
}

inline std::string Bin(const std::string& name) {
  const char* b = std::getenv("NBDCSI_BIN");
  return std::string(b ? b : "build/bin") + "/" + name;
}

inline std::string Src() {
  const char* s = std::getenv("NBDCSI_SRC");
  return s ? s : ".";
}

// A child process owned by the test: SIGTERM, then SIGKILL, when it goes; SIGKILL with the test
// if the test itself dies (PDEATHSIG), so a crashed test leaves no daemon behind.
class Proc {
 public:
  Proc() = default;
  Proc(const Proc&) = delete;
  ~Proc() { Stop(); }
  bool Start(const std::vector<std::string>& argv, const std::string& log) {
    pid_ = fork();
    if (pid_ == 0) {
      prctl(PR_SET_PDEATHSIG, SIGKILL);
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
    if (!test::WaitExited(pid_, &st, 5s)) {
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
    if (inet_pton(AF_INET, ep.host.c_str(), &sa.sin_addr) != 1)
      sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ok = connect(fd, reinterpret_cast<sockaddr*>(&sa), sizeof sa) == 0;
  }
  close(fd);
  return ok;
}

inline std::string ReadFile(const std::string& p) {
  std::ifstream f(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), {});
}

// What libnbd's nbdcopy reads from `uri` (at most 60 s; its messages in `log`), as the bytes of
// the file `out`; nullopt when the copy failed (the reason is in `log`).
inline std::optional<std::string> NbdcopyRead(const std::string& uri, const std::string& out,
                                              const std::string& log) {
  std::remove(out.c_str());
  const std::string cmd = "timeout 60 nbdcopy '" + uri + "' " + out + " >" + log + " 2>&1";
  if (std::system(cmd.c_str()) != 0) return std::nullopt;
  return ReadFile(out);
}

}  // namespace nbdcsi::test
