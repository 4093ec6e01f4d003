// Mutual TLS for the TCP gRPC links between nbd-csi-controller and nbd-datapathd. Both ends load
// a certificate, its key and the CA that signed the peer's certificate; both ends require the
// peer to present a certificate signed by that CA. Plaintext is only for loopback tests, and
// only when the operator says --insecure.
//
// Node identity: a datapath's certificate names its node with the URI SAN
// spiffe://nbd.csi.io/node/<node-id> (NodeIdentityUri). The controller's Registry accepts a
// heartbeat for node N only from a certificate that names N, and the controller dials node N's
// datapath only if the certificate it presents names N. A certificate may name several nodes;
// it then speaks for each of them.
//
// Rotation: the files are re-read when they change (checked every second: a changed inode,
// size or mtime, which covers both an in-place rewrite and a Kubernetes secret volume's
// `..data` symlink swap). A new set is checked first (PEM parses, the key belongs to the
// certificate, the certificate has not expired, the CA bundle parses); a set that fails is
// logged once and ignored, and the material in force stays. A good set is handed to gRPC's
// FileWatcherCertificateProvider through sealed in-memory files (memfd, read by gRPC as
// /proc/self/fd/N and replaced with one dup3 each, key and certificate in one file so they
// always change together), so the checked copy is the only one gRPC ever reads and no copy of
// the key touches a file system. New handshakes use it within about two seconds; established
// connections, and the calls on them, keep the session they negotiated.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include <grpcpp/security/auth_context.h>
#include <grpcpp/security/credentials.h>
#include <grpcpp/security/server_credentials.h>

#include "common/status.h"

namespace nbdcsi {

inline constexpr std::string_view kNodeIdentityPrefix = "spiffe://nbd.csi.io/node/";

// "spiffe://nbd.csi.io/node/<node_id>".
std::string NodeIdentityUri(std::string_view node_id);
// The node ids named by those of `uris` that start with kNodeIdentityPrefix (sorted, unique).
std::vector<std::string> NodeIdsInUris(const std::vector<std::string>& uris);
// The node ids the peer's certificate names (empty for plaintext, or a certificate without a
// node URI). gRPC fills the auth context only after the chain was verified against the CA.
std::vector<std::string> PeerNodeIds(const grpc::AuthContext& ctx);
// OK when the peer's certificate names `node_id`; EPERM saying what it names otherwise.
Status CheckPeerIsNode(const grpc::AuthContext& ctx, const std::string& node_id);

// The flags that name a TlsFiles, for its messages: a daemon may take several sets (--tls-*, and
// --cluster-etcd-tls-* for etcd).
struct TlsFlagNames {
  const char* cert = "--tls-cert";
  const char* key = "--tls-key";
  const char* ca = "--tls-ca";
  const char* insecure = "--insecure";
};

struct TlsFiles {
  std::string cert;  // PEM certificate chain of this process
  std::string key;   // PEM private key
  std::string ca;    // PEM CA bundle that the peer's certificate must chain to
  bool insecure = false;  // plaintext; all three files must then be empty

  // EINVAL unless either all three files are named or insecure is set alone; the message names
  // the missing or conflicting flags. Does not open the files (the Make* functions do).
  Status Validate(const TlsFlagNames& flags = TlsFlagNames()) const;
};

// What a server accepts beyond "a certificate the CA signed".
enum class TlsPeers {
  kAnyCaSigned,
  // Also refuse (PERMISSION_DENIED) a client whose certificate names a node: the datapath's TCP
  // API is for the controller, and a datapath's certificate must not drive another node.
  kNotNodes,
};

// The certificate material of one process, watched and reloaded as described above. Every
// credential made from it follows the reloads. Load() of the same three paths again returns
// the same material (after checking the files at once); it lives until the process exits.
class TlsCredentials {
 public:
  // Reads and checks the files now: ENOENT/EACCES naming the flag and path, EINVAL when a file
  // holds no PEM block of the expected kind, the key does not belong to the certificate, or
  // the certificate has expired. `tls` must not be insecure.
  static StatusOr<std::shared_ptr<TlsCredentials>> Load(const TlsFiles& tls);

  // Requires and verifies a client certificate: a client without one, or with one the CA did
  // not sign (or that expired), is refused in the handshake; no handler runs for it.
  std::shared_ptr<grpc::ServerCredentials> Server(TlsPeers peers = TlsPeers::kAnyCaSigned) const;
  // Presents our certificate; the server's must chain to the CA and carry the host of the
  // dialled address (or the channel's SSL target name override) as a DNS or IP SAN.
  std::shared_ptr<grpc::ChannelCredentials> Channel() const;
  // As Channel(), but the server's certificate must name node `node_id` (a URI SAN, see above)
  // instead of the dialled host: an address alone proves nothing about which node answers.
  std::shared_ptr<grpc::ChannelCredentials> ChannelToNode(const std::string& node_id) const;

  // The node ids our own certificate (the one in force) names.
  std::vector<std::string> NodeIds() const;
  // How many sets have been put in force since the first (0 until the files change).
  uint64_t reloads() const;
  // How many times a change of the files was looked at and refused (the set in force kept): a
  // test can wait for the check instead of sleeping past the polls.
  uint64_t refused_changes() const;
  const TlsFiles& files() const;

  struct State;  // shared with the watcher thread

 private:
  explicit TlsCredentials(std::shared_ptr<State> s) : state_(std::move(s)) {}
  std::shared_ptr<State> state_;
};

// Server side: TlsCredentials::Load(tls)->Server(peers), or plaintext credentials when
// insecure is set. Errors as Load().
StatusOr<std::shared_ptr<grpc::ServerCredentials>> MakeServerCredentials(
    const TlsFiles& tls, TlsPeers peers = TlsPeers::kAnyCaSigned);
// Client side: TlsCredentials::Load(tls)->Channel(), or plaintext credentials when insecure is
// set.
StatusOr<std::shared_ptr<grpc::ChannelCredentials>> MakeChannelCredentials(const TlsFiles& tls);

}  // namespace nbdcsi
