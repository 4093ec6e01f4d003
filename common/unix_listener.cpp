#include "common/unix_listener.h"

#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <chrono>
#include <cstring>
#include <random>

#include <fmt/format.h>
#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/server_builder.h>
#include <grpcpp/server_posix.h>
#include <spdlog/spdlog.h>

namespace nbdcsi {

// Answers every method of every service with PERMISSION_DENIED, without reading the request.
class DenyAllService final : public grpc::CallbackGenericService {
 public:
  grpc::ServerGenericBidiReactor* CreateReactor(grpc::GenericCallbackServerContext*) override {
    class Refusal final : public grpc::ServerGenericBidiReactor {
     public:
      Refusal() {
        Finish(grpc::Status(grpc::StatusCode::PERMISSION_DENIED,
                            "this socket serves root and the daemon's own uid (and --allow-uid); "
                            "the connecting process's uid is not one of them"));
      }
      void OnDone() override { delete this; }
    };
    return new Refusal();
  }
};

namespace {

int64_t NowMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

Status BindAt(int fd, const std::string& path) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.size() >= sizeof(addr.sun_path)) {
    return Error(ENAMETOOLONG, "unix socket path {} is longer than {} bytes", path,
                 sizeof(addr.sun_path) - 1);
  }
  memcpy(addr.sun_path, path.c_str(), path.size() + 1);
  if (bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
    return Error(errno, "bind {}: {}", path, strerror(errno));
  }
  return Status::Ok();
}

// A name in path's directory that a crash may leave behind but no one else uses.
std::string TempSocketPath(const std::string& path) {
  size_t slash = path.rfind('/');
  std::string dir = slash == std::string::npos ? "." : path.substr(0, slash);
  std::random_device rd;
  return fmt::format("{}/.sock-{:08x}", dir, rd());
}

}  // namespace

bool PeerUids::Allows(uid_t uid) const {
  if (uid == 0 || uid == geteuid()) return true;
  return std::find(extra.begin(), extra.end(), uid) != extra.end();
}

std::string PeerUids::Describe() const {
  std::string out = "uid 0";
  if (geteuid() != 0) out += fmt::format(", {} (this process)", geteuid());
  for (uid_t u : extra) out += fmt::format(", {}", u);
  return out;
}

StatusOr<uid_t> ParseUid(const std::string& s) {
  uint64_t v = 0;
  auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  if (s.empty() || ec != std::errc() || end != s.data() + s.size() || v >= 0xffffffffull) {
    return Error(EINVAL, "--allow-uid \"{}\": not a numeric uid (0 to 4294967294)", s);
  }
  return static_cast<uid_t>(v);
}

StatusOr<std::unique_ptr<UnixPeerListener>> UnixPeerListener::Bind(const std::string& path,
                                                                   mode_t mode,
                                                                   PeerUids allowed) {
  std::unique_ptr<UnixPeerListener> l(new UnixPeerListener());
  l->path_ = path;
  l->allowed_ = std::move(allowed);
  l->listen_fd_ = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (l->listen_fd_ < 0) return Error(errno, "socket: {}", strerror(errno));
  l->wake_fd_ = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (l->wake_fd_ < 0) return Error(errno, "eventfd: {}", strerror(errno));

  // Bound under a temporary name, narrowed, then renamed: whoever looks at `path` finds the
  // final mode or nothing. A temporary name too long for sun_path falls back to binding `path`
  // itself and narrowing it at once; SO_PEERCRED still guards that instant.
  std::string tmp = TempSocketPath(path);
  const bool via_tmp = tmp.size() < sizeof(sockaddr_un::sun_path);
  const std::string& bound = via_tmp ? tmp : path;
  if (Status s = BindAt(l->listen_fd_, bound); !s.ok()) return s;
  auto undo = [&](Status s) {
    unlink(bound.c_str());
    return s;
  };
  if (chmod(bound.c_str(), mode) != 0) {
    return undo(Error(errno, "chmod {:o} {}: {}", mode, bound, strerror(errno)));
  }
  if (via_tmp && rename(tmp.c_str(), path.c_str()) != 0) {
    return undo(Error(errno, "rename {} to {}: {}", tmp, path, strerror(errno)));
  }
  struct stat st {};
  if (lstat(path.c_str(), &st) != 0 || !S_ISSOCK(st.st_mode) || (st.st_mode & 07777) != mode) {
    unlink(path.c_str());
    return Error(EPERM, "socket {} does not have mode {:o} after binding", path, mode);
  }
  if (listen(l->listen_fd_, SOMAXCONN) != 0) {
    int err = errno;
    unlink(path.c_str());
    return Error(err, "listen {}: {}", path, strerror(err));
  }

  l->bound_ = true;
  l->deny_service_ = std::make_unique<DenyAllService>();
  grpc::ServerBuilder b;
  b.RegisterCallbackGenericService(l->deny_service_.get());
  l->deny_server_ = b.BuildAndStart();
  if (!l->deny_server_) {
    return Error(EIO, "{}: cannot start the refusing gRPC server", path);
  }
  return l;
}

UnixPeerListener::~UnixPeerListener() {
  Stop();
  if (wake_fd_ >= 0) close(wake_fd_);
}

Status UnixPeerListener::Serve(grpc::Server* server) {
  if (server_ != nullptr || stopped_) return Error(EINVAL, "{}: already served", path_);
  server_ = server;
  thread_ = std::thread([this] { AcceptLoop(); });
  return Status::Ok();
}

void UnixPeerListener::Stop() {
  if (stopped_) return;
  stopped_ = true;
  if (thread_.joinable()) {
    uint64_t one = 1;
    (void)!write(wake_fd_, &one, sizeof one);
    thread_.join();
  }
  if (listen_fd_ >= 0) {
    close(listen_fd_);
    listen_fd_ = -1;
  }
  if (bound_) {
    // Only a socket: a file someone put there since is not ours to remove.
    struct stat st {};
    if (lstat(path_.c_str(), &st) == 0 && S_ISSOCK(st.st_mode)) unlink(path_.c_str());
  }
  if (deny_server_) {
    deny_server_->Shutdown(std::chrono::system_clock::now() + std::chrono::milliseconds(200));
    deny_server_->Wait();
  }
}

void UnixPeerListener::Refuse(int fd, pid_t pid, uid_t uid) {
  refused_.fetch_add(1);
  // A local user who reconnects in a loop must not flood the log: one line per second at most.
  const int64_t now = NowMs();
  if (now - last_refusal_log_ms_ >= 1000) {
    spdlog::warn("{}: refused a connection from uid {} (pid {}): allowed are {}{}", path_, uid,
                 pid, allowed_.Describe(),
                 unlogged_ ? fmt::format(" ({} more refusals not logged)", unlogged_) : "");
    last_refusal_log_ms_ = now;
    unlogged_ = 0;
  } else {
    ++unlogged_;
  }
  grpc::AddInsecureChannelFromFd(deny_server_.get(), fd);
}

void UnixPeerListener::AcceptLoop() {
  pollfd fds[2] = {{listen_fd_, POLLIN, 0}, {wake_fd_, POLLIN, 0}};
  for (;;) {
    if (poll(fds, 2, -1) < 0) {
      if (errno == EINTR) continue;
      spdlog::error("{}: poll: {}", path_, strerror(errno));
      return;
    }
    if (fds[1].revents != 0) return;
    int fd = accept4(listen_fd_, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) {
      if (errno == EAGAIN || errno == EINTR || errno == ECONNABORTED) continue;
      spdlog::warn("{}: accept: {}", path_, strerror(errno));
      // Out of descriptors: give the process a moment instead of spinning on a ready socket.
      if (errno == EMFILE || errno == ENFILE) poll(nullptr, 0, 100);
      continue;
    }
    ucred cred{};
    socklen_t len = sizeof cred;
    if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) {
      spdlog::warn("{}: SO_PEERCRED: {}; connection closed", path_, strerror(errno));
      close(fd);
      continue;
    }
    if (allowed_.Allows(cred.uid)) {
      grpc::AddInsecureChannelFromFd(server_, fd);
    } else {
      Refuse(fd, cred.pid, cred.uid);
    }
  }
}

}  // namespace nbdcsi
