// TLS for NBD over TCP: the server's certificate material (reloaded when its files change), one
// connection's TLS session during the handshake, and the terminator threads that carry a
// negotiated TLS connection's transmission phase.
//
// Why a terminator: the io_uring workers speak plain NBD on a file descriptor and know nothing
// of TLS. After the option phase, a TLS connection is split at a socketpair: the worker adopts
// one end like any other connection, and a terminator thread moves bytes between the other end
// and the TLS session (decrypting requests, encrypting replies). The worker's I/O path is the
// same for every kind of client, and the cost of TLS stays on threads of its own.
//
// OpenSSL is used directly (not through asio::ssl) so that a session can leave the handshake's
// io_context for a terminator thread with its buffered bytes intact: whatever the client sent
// right behind its last option is already decrypted inside the session, and must reach the
// worker first.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>

#include "common/file_id.h"
#include "common/status.h"

struct ssl_st;      // OpenSSL's SSL
struct ssl_ctx_st;  // OpenSSL's SSL_CTX

namespace nbdcsi::datapath {

struct NbdTlsFiles {
  std::string cert;  // PEM certificate of this server, then any intermediates
  std::string key;   // PEM private key of cert
  std::string ca;    // PEM bundle that client certificates must chain to
};

// One step of a non-blocking OpenSSL call on a socket.
struct TlsIo {
  enum class Kind { kDone, kWantRead, kWantWrite, kClosed, kError };
  TlsIo(Kind k, size_t n = 0, std::string why = {}) : kind(k), bytes(n), error(std::move(why)) {}
  Kind kind;
  size_t bytes = 0;   // kDone of Read/Write: how many
  std::string error;  // kError: why, for the log (e.g. "certificate has expired")
};

// The server side of one connection's TLS, bound to the connection's socket. Move-only.
class TlsSession {
 public:
  TlsSession() = default;
  explicit TlsSession(ssl_st* ssl) : ssl_(ssl) {}
  TlsSession(TlsSession&& o) noexcept : ssl_(o.ssl_) { o.ssl_ = nullptr; }
  TlsSession& operator=(TlsSession&& o) noexcept;
  TlsSession(const TlsSession&) = delete;
  TlsSession& operator=(const TlsSession&) = delete;
  ~TlsSession();

  // Each returns kWantRead/kWantWrite when the socket must become ready first; then call again
  // with the same arguments.
  TlsIo Accept();
  TlsIo Read(std::span<uint8_t> buf);
  TlsIo Write(std::span<const uint8_t> buf);
  // "TLSv1.3 TLS_AES_256_GCM_SHA384, client CN=..." for the log.
  std::string Describe() const;

  ssl_st* get() const { return ssl_; }
  ssl_st* release() {
    ssl_st* s = ssl_;
    ssl_ = nullptr;
    return s;
  }

 private:
  ssl_st* ssl_ = nullptr;
};

// The server's TLS configuration: TLS 1.2 or newer (1.3 when the client has it), the
// certificate and key from NbdTlsFiles, and mandatory client certificates verified against
// the CA bundle (expiry and extended key usage included). No session resumption: every
// connection proves its certificate against the CA in force at that moment, which is what
// makes a CA rotation take effect at once.
//
// Not thread-safe: the frontend's io thread owns it. Sessions made from it stay valid after a
// reload (each keeps the material it was created with).
class NbdTlsContext {
 public:
  // Reads and checks the three files: ENOENT/EACCES or EINVAL with the file named, also when
  // the key does not belong to the certificate or the certificate is outside its validity.
  static StatusOr<std::unique_ptr<NbdTlsContext>> Load(const NbdTlsFiles& files);
  ~NbdTlsContext();
  NbdTlsContext(const NbdTlsContext&) = delete;
  NbdTlsContext& operator=(const NbdTlsContext&) = delete;

  // Looks at the files' identities (device, inode, size, mtime, ctime; symlinks followed, so a
  // Kubernetes secret volume's atomic directory swap counts). When they differ from what was
  // last loaded, builds new material from them. A set that does not load (half-written, key
  // and certificate from different renewals, expired) is logged once per state of the files
  // and the current material stays; it is tried again at each call until it loads, because a
  // writer may finish without changing anything we compare. Returns true when new material
  // was taken.
  bool ReloadIfChanged();

  // A session for a newly accepted connection on `fd` (which must stay open for the session's
  // life and be non-blocking), on the material in force now.
  StatusOr<TlsSession> NewSession(int fd);

  // Subject and expiry of the certificate in force, for logs and tests.
  const std::string& summary() const { return summary_; }

 private:
  NbdTlsContext(NbdTlsFiles files);

  NbdTlsFiles files_;
  ssl_ctx_st* ctx_ = nullptr;
  std::string summary_;
  std::unique_ptr<FileId[]> loaded_;  // identities of cert, key, ca when ctx_ was built
  std::unique_ptr<FileId[]> failed_;  // identities of the last set that failed (log once)
};

// OpenSSL writes to its socket with write(), not send(MSG_NOSIGNAL): a peer that has gone
// raises SIGPIPE. Every thread that runs TLS I/O calls this first, so that it gets EPIPE instead
// of dying whatever the process's SIGPIPE disposition (a blocked, pending SIGPIPE is harmless).
void BlockSigpipe();

// Carries the transmission phase of TLS connections: per connection, decrypted bytes from the
// network go to the worker's socketpair end, the worker's replies go back encrypted. One thread
// with an epoll set; a connection ends when either side is done and what that side sent has
// been delivered: the client's EOF or close_notify becomes a half-close towards the worker,
// and the worker's close becomes a close_notify towards the client.
class TlsTerminator {
 public:
  explicit TlsTerminator(int index);
  ~TlsTerminator();
  TlsTerminator(const TlsTerminator&) = delete;
  TlsTerminator& operator=(const TlsTerminator&) = delete;

  Status Start();
  // Takes ownership of the session, of `net_fd` (the client's TCP socket the session runs on)
  // and of `plain_fd` (the terminator's end of the worker's socketpair). Thread-safe. `peer`
  // names the client in the log.
  void Add(TlsSession session, int net_fd, int plain_fd, std::string peer);
  // Lets connections finish on their own for up to `grace` (their workers are expected to have
  // closed their ends, so what is buffered drains), then closes the rest and joins the thread.
  void Stop(std::chrono::milliseconds grace);
  size_t connections() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace nbdcsi::datapath
