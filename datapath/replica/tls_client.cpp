#include "datapath/replica/tls_client.h"

#include <arpa/inet.h>
#include <fmt/ranges.h>
#include <openssl/err.h>
#include <openssl/x509v3.h>

#include <vector>

#include "common/fs_util.h"
#include "common/openssl_util.h"
#include "common/tls.h"

namespace nbdcsi::replica {
namespace {

constexpr size_t kMaxPemBytes = 1 << 20;

Status CheckReadable(const char* what, const std::string& path) {
  if (path.empty()) return Error(EINVAL, "replica TLS: the {} file is not set", what);
  auto data = ReadSmallFile(path, kMaxPemBytes);
  if (!data.ok())
    return Error(data.status().code(), "replica TLS {}: {}", what, data.status().message());
  if (data->find("-----BEGIN ") == std::string::npos) {
    return Error(EINVAL, "replica TLS {} {}: not a PEM file", what, path);
  }
  return Status::Ok();
}

bool IsIpLiteral(const std::string& host) {
  unsigned char buf[sizeof(in6_addr)];
  return inet_pton(AF_INET, host.c_str(), buf) == 1 || inet_pton(AF_INET6, host.c_str(), buf) == 1;
}

}  // namespace

StatusOr<std::unique_ptr<ClientTlsContext>> ClientTlsContext::Load(const TlsClientFiles& f) {
  for (auto [what, path] :
       {std::pair{"certificate", &f.cert}, std::pair{"key", &f.key}, std::pair{"CA", &f.ca}}) {
    if (Status s = CheckReadable(what, *path); !s.ok()) return s;
  }
  std::unique_ptr<ClientTlsContext> c(new ClientTlsContext(f));
  ERR_clear_error();
  c->ctx_ = SSL_CTX_new(TLS_client_method());
  if (!c->ctx_) return Error(ENOMEM, "replica TLS: no context: {}", OpenSslReason("?"));
  SSL_CTX* ctx = c->ctx_;
  SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
  // No renegotiation; no resumption (each connection proves its certificates afresh, as the
  // server side insists on too).
  SSL_CTX_set_options(ctx, SSL_OP_NO_RENEGOTIATION | SSL_OP_NO_TICKET);
  SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
  if (SSL_CTX_set_cipher_list(ctx, "ECDHE+AESGCM:ECDHE+CHACHA20") != 1) {
    return Error(EINVAL, "replica TLS: cipher list refused: {}", OpenSslReason("?"));
  }
  // The io thread writes from buffers that move between retries.
  SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
  SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, nullptr);
  if (SSL_CTX_use_certificate_chain_file(ctx, f.cert.c_str()) != 1) {
    return Error(EINVAL, "replica TLS certificate {}: {}", f.cert, OpenSslReason("unreadable"));
  }
  if (SSL_CTX_use_PrivateKey_file(ctx, f.key.c_str(), SSL_FILETYPE_PEM) != 1) {
    return Error(EINVAL, "replica TLS key {}: {}", f.key, OpenSslReason("unreadable"));
  }
  if (SSL_CTX_check_private_key(ctx) != 1) {
    return Error(EINVAL, "replica TLS key {} does not belong to certificate {} ({})", f.key, f.cert,
                 OpenSslReason("key values mismatch"));
  }
  if (SSL_CTX_load_verify_locations(ctx, f.ca.c_str(), nullptr) != 1) {
    return Error(EINVAL, "replica TLS CA {}: {}", f.ca, OpenSslReason("unreadable"));
  }
  ERR_clear_error();
  return c;
}

ClientTlsContext::~ClientTlsContext() {
  if (ctx_) SSL_CTX_free(ctx_);
}

StatusOr<SslPtr> ClientTlsContext::NewSession(const std::string& host) const {
  ERR_clear_error();
  SslPtr ssl(SSL_new(ctx_));
  if (!ssl) return Error(ENOMEM, "replica TLS: no session: {}", OpenSslReason("?"));
  BIO* rbio = BIO_new(BIO_s_mem());
  BIO* wbio = BIO_new(BIO_s_mem());
  if (!rbio || !wbio) {
    BIO_free(rbio);
    BIO_free(wbio);
    return Error(ENOMEM, "replica TLS: no memory BIO");
  }
  // An empty read BIO means "wait for the network", not end of stream.
  BIO_set_mem_eof_return(rbio, -1);
  SSL_set_bio(ssl.get(), rbio, wbio);  // the session owns both now
  SSL_set_connect_state(ssl.get());
  if (files_.server_node.empty()) {
    if (host.empty()) {
      return Error(EINVAL,
                   "replica TLS over a Unix socket needs a server node to check the server's "
                   "certificate against (there is no host name)");
    }
    X509_VERIFY_PARAM* p = SSL_get0_param(ssl.get());
    if (IsIpLiteral(host)) {
      if (X509_VERIFY_PARAM_set1_ip_asc(p, host.c_str()) != 1) {
        return Error(EINVAL, "replica TLS: bad IP address {}", host);
      }
    } else {
      X509_VERIFY_PARAM_set_hostflags(p, X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS);
      if (X509_VERIFY_PARAM_set1_host(p, host.c_str(), 0) != 1 ||
          SSL_set_tlsext_host_name(ssl.get(), host.c_str()) != 1) {
        return Error(EINVAL, "replica TLS: bad host name {}", host);
      }
    }
  }
  return ssl;
}

Status ClientTlsContext::CheckServerIdentity(SSL* ssl) const {
  if (files_.server_node.empty()) return Status::Ok();
  X509* peer = SSL_get0_peer_certificate(ssl);
  if (!peer) return Error(EACCES, "the server presented no certificate");
  const std::vector<std::string> ids = NodeIdsInUris(UriSans(peer));
  for (const std::string& id : ids) {
    if (id == files_.server_node) return Status::Ok();
  }
  return Error(EACCES, "the server's certificate does not name node {} ({} needed; it names {})",
               files_.server_node, NodeIdentityUri(files_.server_node),
               ids.empty() ? std::string("no node") : fmt::format("{}", fmt::join(ids, ", ")));
}

}  // namespace nbdcsi::replica
