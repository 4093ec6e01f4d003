// A loopback TCP port nobody listens on right now (the kernel's pick), for tests that start
// daemons on TCP. Another process could take it before the daemon binds; the tests then fail
// loudly rather than hang. 0 when no port could be had.
#pragma once

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

namespace nbdcsi::test {

// `ip`: another loopback address (127.x.y.z) for a daemon that should not share 127.0.0.1.
inline int FreeLoopbackPort(const char* ip = "127.0.0.1") {
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return 0;
  sockaddr_in a{};
  a.sin_family = AF_INET;
  if (inet_pton(AF_INET, ip, &a.sin_addr) != 1) {
    close(fd);
    return 0;
  }
  socklen_t len = sizeof(a);
  int port = 0;
  if (bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) == 0 &&
      getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) == 0) {
    port = ntohs(a.sin_port);
  }
  close(fd);
  return port;
}

}  // namespace nbdcsi::test
