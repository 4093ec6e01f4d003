// OpenSSL objects owned by std::unique_ptr, freed with their own *_free function: one set for the
// gRPC TLS material (common/tls.cpp) and the NBD TLS terminator (datapath/engine/nbd_tls.cpp).
#pragma once

#include <memory>

#include <openssl/bio.h>
#include <openssl/evp.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>

namespace nbdcsi {

template <typename T, void (*Free)(T*)>
struct OpenSslFree {
  void operator()(T* p) const { Free(p); }
};

// BIO_free returns int; the wrapper makes it fit the deleter's void signature.
inline void BioFreeVoid(BIO* b) { BIO_free(b); }

using BioPtr = std::unique_ptr<BIO, OpenSslFree<BIO, BioFreeVoid>>;
using X509Ptr = std::unique_ptr<X509, OpenSslFree<X509, X509_free>>;
using PkeyPtr = std::unique_ptr<EVP_PKEY, OpenSslFree<EVP_PKEY, EVP_PKEY_free>>;
using SslCtxPtr = std::unique_ptr<SSL_CTX, OpenSslFree<SSL_CTX, SSL_CTX_free>>;

}  // namespace nbdcsi
