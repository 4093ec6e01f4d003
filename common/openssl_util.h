// Small OpenSSL helpers shared by every TLS user (the gRPC material in common/tls.cpp, the NBD
// server's terminator in datapath/engine/nbd_tls.cpp, the replica client's sessions in
// datapath/replica/tls_client.cpp).
#pragma once

#include <string>
#include <vector>

#include <openssl/x509.h>

namespace nbdcsi {

// The reason of the most recent OpenSSL error on this thread ("no start line", "key values
// mismatch"), or `fallback` when the queue is empty; clears the queue.
std::string OpenSslReason(const char* fallback);

// The URI subject alternative names of a certificate (node identities are URI SANs, tls.h).
std::vector<std::string> UriSans(X509* cert);

}  // namespace nbdcsi
