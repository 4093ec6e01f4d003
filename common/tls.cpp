#include "common/tls.h"

#include <utility>

#include <grpcpp/security/credentials.h>
#include <grpcpp/security/server_credentials.h>

#include "common/fs_util.h"

namespace nbdcsi {
namespace {

// Certificates and keys are a few KiB; a bigger file is not what the operator meant to pass.
constexpr size_t kMaxPemBytes = 1 << 20;

struct Pem {
  std::string cert, key, ca;
};

// Reads one PEM file and checks it holds the kind of block it should, so that swapped or wrong
// files fail here with the flag named instead of as an opaque handshake failure later.
StatusOr<std::string> ReadPem(const char* flag, const std::string& path, const char* marker) {
  auto data = ReadSmallFile(path, kMaxPemBytes);
  if (!data.ok()) return Error(data.status().code(), "{}: {}", flag, data.status().message());
  if (data->find("-----BEGIN ") == std::string::npos) {
    return Error(EINVAL, "{} {}: not a PEM file (no -----BEGIN line)", flag, path);
  }
  if (data->find(marker) == std::string::npos) {
    return Error(EINVAL, "{} {}: no PEM block ending in \"{}\"", flag, path, marker);
  }
  return data;
}

StatusOr<Pem> LoadPem(const TlsFiles& tls) {
  Pem p;
  auto cert = ReadPem("--tls-cert", tls.cert, "CERTIFICATE-----");
  if (!cert.ok()) return cert.status();
  auto key = ReadPem("--tls-key", tls.key, "PRIVATE KEY-----");
  if (!key.ok()) return key.status();
  auto ca = ReadPem("--tls-ca", tls.ca, "CERTIFICATE-----");
  if (!ca.ok()) return ca.status();
  p.cert = std::move(*cert);
  p.key = std::move(*key);
  p.ca = std::move(*ca);
  return p;
}

}  // namespace

Status TlsFiles::Validate() const {
  const bool any = !cert.empty() || !key.empty() || !ca.empty();
  if (insecure) {
    if (any) {
      return Error(EINVAL, "--insecure cannot be combined with --tls-cert, --tls-key or --tls-ca");
    }
    return Status::Ok();
  }
  if (!any) {
    return Error(EINVAL, "no TLS files: give --tls-cert, --tls-key and --tls-ca (or --insecure "
                         "for plaintext on a trusted loopback)");
  }
  std::string missing;
  for (auto [flag, value] : {std::pair{"--tls-cert", &cert}, std::pair{"--tls-key", &key},
                             std::pair{"--tls-ca", &ca}}) {
    if (value->empty()) missing += missing.empty() ? flag : std::string(", ") + flag;
  }
  if (!missing.empty()) {
    return Error(EINVAL, "incomplete TLS configuration: missing {} (all of --tls-cert, --tls-key "
                         "and --tls-ca are needed)", missing);
  }
  return Status::Ok();
}

StatusOr<std::shared_ptr<grpc::ServerCredentials>> MakeServerCredentials(const TlsFiles& tls) {
  if (Status s = tls.Validate(); !s.ok()) return s;
  if (tls.insecure) return grpc::InsecureServerCredentials();
  auto pem = LoadPem(tls);
  if (!pem.ok()) return pem.status();
  // REQUIRE_..._AND_VERIFY: a client without a certificate, or with one the CA did not sign, is
  // refused during the handshake; no handler ever runs for it.
  grpc::SslServerCredentialsOptions opts(
      GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
  opts.pem_root_certs = pem->ca;
  opts.pem_key_cert_pairs.push_back({pem->key, pem->cert});
  auto creds = grpc::SslServerCredentials(opts);
  if (!creds) return Error(EINVAL, "gRPC rejected the TLS server credentials from {}", tls.cert);
  return creds;
}

StatusOr<std::shared_ptr<grpc::ChannelCredentials>> MakeChannelCredentials(const TlsFiles& tls) {
  if (Status s = tls.Validate(); !s.ok()) return s;
  if (tls.insecure) return grpc::InsecureChannelCredentials();
  auto pem = LoadPem(tls);
  if (!pem.ok()) return pem.status();
  grpc::SslCredentialsOptions opts;
  opts.pem_root_certs = pem->ca;
  opts.pem_private_key = pem->key;
  opts.pem_cert_chain = pem->cert;
  auto creds = grpc::SslCredentials(opts);
  if (!creds) return Error(EINVAL, "gRPC rejected the TLS client credentials from {}", tls.cert);
  return creds;
}

}  // namespace nbdcsi
