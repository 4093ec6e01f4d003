#include "common/endpoint.h"

#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cctype>
#include <charconv>
#include <cstring>

#include <fmt/format.h>

namespace nbdcsi {
namespace {

constexpr std::string_view kForms = "expected unix:///absolute/path or tcp://host:port";
constexpr size_t kMaxSunPath = sizeof(sockaddr_un{}.sun_path);

Status Invalid(std::string_view s, std::string_view why) {
  return Error(EINVAL, "invalid endpoint \"{}\": {}", s, why);
}

bool ValidHostName(std::string_view h) {
  if (h.empty() || h.size() > 253) return false;
  for (char c : h) {
    if (!std::isalnum(static_cast<unsigned char>(c)) && c != '-' && c != '.' && c != '_') {
      return false;
    }
  }
  return h.front() != '-' && h.front() != '.';
}

bool ValidIpv6Literal(std::string_view h) {
  if (h.size() < 2 || h.find(':') == std::string_view::npos) return false;
  for (char c : h) {
    if (!std::isxdigit(static_cast<unsigned char>(c)) && c != ':' && c != '.') return false;
  }
  return true;
}

}  // namespace

std::string Endpoint::GrpcTarget() const {
  if (kind == Kind::kUnix) return "unix://" + path;
  if (host.find(':') != std::string::npos) return fmt::format("[{}]:{}", host, port);
  return fmt::format("{}:{}", host, port);
}

std::string Endpoint::ToString() const {
  if (kind == Kind::kUnix) return "unix://" + path;
  return "tcp://" + GrpcTarget();
}

StatusOr<Endpoint> ParseEndpoint(std::string_view s) {
  if (s.empty()) return Error(EINVAL, "invalid endpoint \"\": empty ({})", kForms);
  if (s.find('\0') != std::string_view::npos) return Invalid(s, "contains a NUL byte");
  Endpoint ep;
  if (s.starts_with("unix:")) {
    if (!s.starts_with("unix://")) {
      return Invalid(s, fmt::format("write unix:// followed by an absolute path, e.g. "
                                    "unix:///run/nbd-csi/datapath.sock"));
    }
    std::string_view path = s.substr(7);
    if (path.empty()) return Invalid(s, "no socket path");
    if (path.front() != '/') {
      return Invalid(s, fmt::format("socket path must be absolute (three slashes: unix:///{})",
                                    path));
    }
    if (path.back() == '/') return Invalid(s, "socket path names a directory");
    if (path.size() >= kMaxSunPath) {
      return Invalid(s, fmt::format("socket path is {} bytes; a unix socket path must be "
                                    "shorter than {}",
                                    path.size(), kMaxSunPath));
    }
    ep.kind = Endpoint::Kind::kUnix;
    ep.path = std::string(path);
    return ep;
  }
  if (s.starts_with("tcp://")) {
    std::string_view hp = s.substr(6);
    std::string_view host, port;
    if (!hp.empty() && hp.front() == '[') {
      size_t close = hp.find(']');
      if (close == std::string_view::npos) return Invalid(s, "missing ']' after IPv6 address");
      host = hp.substr(1, close - 1);
      if (!ValidIpv6Literal(host)) {
        return Invalid(s, fmt::format("\"{}\" is not an IPv6 address", host));
      }
      std::string_view after = hp.substr(close + 1);
      if (after.empty() || after.front() != ':') return Invalid(s, "missing :port");
      port = after.substr(1);
    } else {
      size_t colon = hp.rfind(':');
      if (colon == std::string_view::npos) return Invalid(s, "missing :port");
      host = hp.substr(0, colon);
      port = hp.substr(colon + 1);
      if (host.find(':') != std::string_view::npos) {
        return Invalid(s, "IPv6 addresses must be in brackets, e.g. tcp://[::1]:9000");
      }
      if (host.empty()) return Invalid(s, "missing host (use tcp://0.0.0.0:PORT for any)");
      if (!ValidHostName(host)) {
        return Invalid(s, fmt::format("\"{}\" is not a valid host name or address", host));
      }
    }
    if (port.empty()) return Invalid(s, "missing port number after ':'");
    unsigned value = 0;
    auto [end, ec] = std::from_chars(port.data(), port.data() + port.size(), value);
    if (ec != std::errc() || end != port.data() + port.size()) {
      return Invalid(s, fmt::format("port \"{}\" is not a number", port));
    }
    if (value == 0 || value > 65535) {
      return Invalid(s, fmt::format("port {} is out of range 1-65535", port));
    }
    ep.kind = Endpoint::Kind::kTcp;
    ep.host = std::string(host);
    ep.port = static_cast<uint16_t>(value);
    return ep;
  }
  size_t scheme_end = s.find("://");
  if (scheme_end != std::string_view::npos) {
    return Invalid(s, fmt::format("unsupported scheme \"{}\" ({})", s.substr(0, scheme_end),
                                  kForms));
  }
  return Invalid(s, fmt::format("no scheme ({})", kForms));
}

Status RemoveStaleUnixSocket(const std::string& path) {
  if (path.empty() || path.size() >= kMaxSunPath) {
    return Error(EINVAL, "unix socket path \"{}\" must be 1-{} bytes", path, kMaxSunPath - 1);
  }
  struct stat st{};
  if (lstat(path.c_str(), &st) != 0) {
    if (errno == ENOENT) return Status::Ok();
    return Error(errno, "cannot stat {}: {}", path, std::strerror(errno));
  }
  if (!S_ISSOCK(st.st_mode)) {
    return Error(EEXIST, "{} exists and is not a socket; refusing to replace it", path);
  }
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return Error(errno, "socket(AF_UNIX): {}", std::strerror(errno));
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::memcpy(addr.sun_path, path.data(), path.size());
  int rc = connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
  int err = errno;
  close(fd);
  if (rc == 0 || err == EAGAIN) {
    // EAGAIN: the listener's backlog is full, which still means somebody is listening.
    return Error(EADDRINUSE, "{} is in use by a running process", path);
  }
  if (err != ECONNREFUSED) {
    return Error(err, "cannot probe socket {}: {}", path, std::strerror(err));
  }
  if (unlink(path.c_str()) != 0 && errno != ENOENT) {
    return Error(errno, "cannot remove stale socket {}: {}", path, std::strerror(errno));
  }
  return Status::Ok();
}

}  // namespace nbdcsi
