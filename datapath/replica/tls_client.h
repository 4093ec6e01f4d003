// The client side of NBD's TLS (NBD_OPT_STARTTLS) for the replica client: certificate material
// and one TLS session per connection.
//
// Sessions run over memory BIOs, not over the socket: the handshake thread feeds them with
// blocking reads and writes, and afterwards the client's io_uring thread moves the ciphertext
// itself (recv into the read BIO, send out of the write BIO). The socket is then io_uring's
// alone, there is no terminator thread and no socketpair hop on the way of each request, and
// whatever the session decrypted during the handshake stays inside it for the io thread.
#pragma once

#include <openssl/ssl.h>

#include <memory>
#include <string>

#include "common/c_ptr.h"
#include "common/status.h"

namespace nbdcsi::replica {

using SslPtr = CPtr<SSL, SSL_free>;

struct TlsClientFiles {
  std::string cert;  // PEM certificate of this node (presented: the server requires it)
  std::string key;   // PEM private key of cert
  std::string ca;    // PEM bundle the server's certificate must chain to
  // Who the server must be, following common/tls.h: when set, the server's certificate must
  // name this node (URI SAN spiffe://nbd.csi.io/node/<id>), whatever address was dialled;
  // when empty, it must carry the dialled host as a DNS or IP SAN.
  std::string server_node;

  bool enabled() const { return !cert.empty() || !key.empty() || !ca.empty(); }
};

class ClientTlsContext {
 public:
  // Reads the three files now: ENOENT/EACCES naming the file, EINVAL when one does not parse or
  // the key does not belong to the certificate.
  static StatusOr<std::unique_ptr<ClientTlsContext>> Load(const TlsClientFiles& files);
  ~ClientTlsContext();
  ClientTlsContext(const ClientTlsContext&) = delete;
  ClientTlsContext& operator=(const ClientTlsContext&) = delete;

  // A client session on two memory BIOs (SSL_get_rbio/SSL_get_wbio) that checks the dialled
  // `host` (a name or an IP literal; empty for a Unix socket) unless a server node is set.
  StatusOr<SslPtr> NewSession(const std::string& host) const;
  // After the handshake: EACCES unless the server's certificate names the configured node
  // (a no-op without one; the host was checked in the handshake).
  Status CheckServerIdentity(SSL* ssl) const;

  const TlsClientFiles& files() const { return files_; }

 private:
  explicit ClientTlsContext(TlsClientFiles f) : files_(std::move(f)) {}
  TlsClientFiles files_;
  SSL_CTX* ctx_ = nullptr;
};

}  // namespace nbdcsi::replica
