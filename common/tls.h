// Mutual TLS for the TCP gRPC links between nbd-csi-controller and nbd-datapathd. Both ends load
// a certificate, its key and the CA that signed the peer's certificate; both ends require the
// peer to present a certificate signed by that CA. Plaintext is only for loopback tests, and
// only when the operator says --insecure.
#pragma once

#include <memory>
#include <string>

#include <grpcpp/security/credentials.h>
#include <grpcpp/security/server_credentials.h>

#include "common/status.h"

namespace nbdcsi {

struct TlsFiles {
  std::string cert;  // PEM certificate chain of this process
  std::string key;   // PEM private key
  std::string ca;    // PEM CA bundle that the peer's certificate must chain to
  bool insecure = false;  // plaintext; all three files must then be empty

  // EINVAL unless either all three files are named or insecure is set alone; the message names
  // the missing or conflicting flags. Does not open the files (the Make* functions do).
  Status Validate() const;
};

// Server side: requires and verifies a client certificate. Files are read now (ENOENT/EACCES
// with the flag and path named; EINVAL when a file holds no PEM block of the expected kind).
// With insecure set: plaintext credentials.
StatusOr<std::shared_ptr<grpc::ServerCredentials>> MakeServerCredentials(const TlsFiles& tls);
// Client side: presents our certificate and verifies the server's against the CA; the server's
// certificate must carry the host of the dialled address as a DNS or IP SAN. With insecure set:
// plaintext credentials.
StatusOr<std::shared_ptr<grpc::ChannelCredentials>> MakeChannelCredentials(const TlsFiles& tls);

}  // namespace nbdcsi
