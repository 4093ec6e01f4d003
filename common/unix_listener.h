// gRPC over a unix socket, with the caller's uid checked on every connection.
//
// gRPC tells a handler the peer's address, never its credentials, and for a unix client the
// address is empty. So the socket is not given to gRPC at all: UnixPeerListener binds and
// accepts it itself, reads each connection's uid with SO_PEERCRED (the kernel records it at
// connect(); the client cannot choose it), and then hands the connection's fd to a started
// grpc::Server with AddInsecureChannelFromFd. An allowed peer's connection goes to the real
// server; any other goes to a small server whose only service answers every method with
// PERMISSION_DENIED, so the client gets a clear status and its calls never reach a handler.
// The decision is per connection, which is what SO_PEERCRED describes: every call on it comes
// from the process that connected.
//
// The socket file's mode (0600) is the first barrier and SO_PEERCRED the second: it also covers
// a socket directory shared with other users, or a mode loosened by hand.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <grpcpp/server.h>

#include "common/status.h"

namespace nbdcsi {

class DenyAllService;

// Who may call: root, the server's own effective uid, and `extra`.
struct PeerUids {
  std::vector<uid_t> extra;

  bool Allows(uid_t uid) const;
  std::string Describe() const;  // "uid 0, 1000 (this process), 65534"
  // 0600 normally. With extra uids 0666: they must be able to connect(), and one mode bit
  // cannot name them, so the uid check alone decides who is served.
  mode_t SocketMode() const { return extra.empty() ? 0600 : 0666; }
};

// An --allow-uid value: a decimal uid below 2^32-1 (the kernel's "no uid"). EINVAL naming it.
StatusOr<uid_t> ParseUid(const std::string& s);

class UnixPeerListener {
 public:
  // Binds `path` with `mode`: the socket is bound under a temporary name next to it, chmod'ed
  // and renamed into place, so `path` never exists with a wider mode. The caller removes a stale
  // socket at `path` first (RemoveStaleUnixSocket).
  static StatusOr<std::unique_ptr<UnixPeerListener>> Bind(const std::string& path, mode_t mode,
                                                          PeerUids allowed);
  ~UnixPeerListener();  // Stop()
  UnixPeerListener(const UnixPeerListener&) = delete;
  UnixPeerListener& operator=(const UnixPeerListener&) = delete;

  // Starts accepting into `server`, which must be started (it needs no listening port) and
  // must outlive Stop().
  Status Serve(grpc::Server* server);
  // Stops accepting, closes the socket and removes the path; connections already handed over
  // stay with their server (the caller shuts it down). Idempotent.
  void Stop();

  const std::string& path() const { return path_; }
  uint64_t refused() const { return refused_.load(); }

 private:
  UnixPeerListener() = default;
  void AcceptLoop();
  void Refuse(int fd, pid_t pid, uid_t uid);

  std::string path_;
  PeerUids allowed_;
  int listen_fd_ = -1;
  int wake_fd_ = -1;  // eventfd: Stop() wakes the accept loop's poll
  grpc::Server* server_ = nullptr;
  std::unique_ptr<DenyAllService> deny_service_;  // declared first: outlives deny_server_
  std::unique_ptr<grpc::Server> deny_server_;
  std::thread thread_;
  std::atomic<uint64_t> refused_{0};
  int64_t last_refusal_log_ms_ = 0;  // accept thread only
  uint64_t unlogged_ = 0;            // accept thread only
  bool bound_ = false;  // path_ is our socket (removed by Stop())
  bool stopped_ = false;
};

}  // namespace nbdcsi
