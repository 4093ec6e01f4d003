// OpenSSL objects owned by std::unique_ptr, freed with their own *_free function: one set for the
// gRPC TLS material (common/tls.cpp) and the NBD TLS terminator (datapath/engine/nbd_tls.cpp).
#pragma once

#include <openssl/bio.h>
#include <openssl/evp.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>

#include "common/c_ptr.h"

namespace nbdcsi {

using BioPtr = CPtr<BIO, BIO_free>;
using X509Ptr = CPtr<X509, X509_free>;
using PkeyPtr = CPtr<EVP_PKEY, EVP_PKEY_free>;
using SslCtxPtr = CPtr<SSL_CTX, SSL_CTX_free>;

}  // namespace nbdcsi
