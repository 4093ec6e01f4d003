// A certificate set from test/tls/make-certs.sh (two CAs, server, client and node certificates)
// in a temp dir of its own, removed with it. The script costs a few hundred ms, so suites make one
// set and share it among their tests.
#pragma once

#include <cstdlib>
#include <memory>
#include <string>
#include <string_view>

#include <grpcpp/security/credentials.h>
#include <grpcpp/security/server_credentials.h>

#include "test/support/secret_dir.h"
#include "test/support/temp_dir.h"

namespace nbdcsi::test {

// Runs make-certs.sh (from $NBDCSI_SRC, else the working directory) into `out`, its output into
// `log`, with a node certificate for each of the space-separated `nodes`. True when it succeeded.
inline bool MakeCerts(const std::string& out, const std::string& log,
                      std::string_view nodes = "") {
  const char* src = std::getenv("NBDCSI_SRC");
  std::string cmd = std::string(src ? src : ".") + "/test/tls/make-certs.sh " + out + " " +
                    std::string(nodes) + " >" + log + " 2>&1";
  return std::system(cmd.c_str()) == 0;
}

struct TestCerts {
  explicit TestCerts(std::string_view tag, std::string_view nodes = "") : dir(tag) {
    if (dir.ok()) ok = MakeCerts(path(), log(), nodes);
  }
  std::string path() const { return dir / "c"; }              // the make-certs.sh output
  std::string log() const { return dir / "make-certs.log"; }  // what the script said
  // path()/name
  std::string operator()(const std::string& name) const { return path() + "/" + name; }

  TempDir dir;
  bool ok = false;
};

// gRPC's own SSL credentials from make-certs.sh files, independent of common/tls (so they can
// present what TlsCredentials::Load refuses, such as an expired certificate): a client that
// presents DIR/WHO.crt and .key (nothing when `who` is "") and trusts CA_DIR/ca.crt.
inline std::shared_ptr<grpc::ChannelCredentials> SslClient(const std::string& dir,
                                                           const std::string& who,
                                                           const std::string& ca_dir) {
  grpc::SslCredentialsOptions o;
  o.pem_root_certs = ReadWholeFile(ca_dir + "/ca.crt");
  if (!who.empty()) {
    o.pem_cert_chain = ReadWholeFile(dir + "/" + who + ".crt");
    o.pem_private_key = ReadWholeFile(dir + "/" + who + ".key");
  }
  return grpc::SslCredentials(o);
}

// A server that presents DIR/WHO.crt and requires a client certificate of CA_DIR's CA.
inline std::shared_ptr<grpc::ServerCredentials> SslServer(const std::string& dir,
                                                          const std::string& who,
                                                          const std::string& ca_dir) {
  grpc::SslServerCredentialsOptions o(GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
  o.pem_root_certs = ReadWholeFile(ca_dir + "/ca.crt");
  o.pem_key_cert_pairs.push_back(
      {ReadWholeFile(dir + "/" + who + ".key"), ReadWholeFile(dir + "/" + who + ".crt")});
  return grpc::SslServerCredentials(o);
}

}  // namespace nbdcsi::test
