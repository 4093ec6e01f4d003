#include "common/tls.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <map>
#include <mutex>
#include <thread>
#include <utility>

#include <fmt/format.h>
#include <grpcpp/security/auth_metadata_processor.h>
#include <grpcpp/security/tls_certificate_provider.h>
#include <grpcpp/security/tls_certificate_verifier.h>
#include <grpcpp/security/tls_credentials_options.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>
#include <spdlog/spdlog.h>

#include "common/file_id.h"
#include "common/fs_util.h"
#include "common/openssl_ptr.h"
#include "common/openssl_util.h"

namespace nbdcsi {
namespace {

namespace gx = grpc::experimental;
using std::chrono::steady_clock;

// Certificates and keys are a few KiB; a bigger file is not what the operator meant to pass.
constexpr size_t kMaxPemBytes = 1 << 20;
// How often the operator's files are checked, and how often gRPC re-reads the checked copies.
constexpr auto kPollInterval = std::chrono::seconds(1);
constexpr unsigned kGrpcRefreshSeconds = 1;
// gRPC reads key and certificate as two opens and compares their mtimes (whole seconds) before
// and after, retrying when they moved: copies published at least a second apart always differ
// there, so a read that straddles a swap is retried, never used.
constexpr auto kMinPublishGap = std::chrono::milliseconds(1100);

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

BioPtr MemBio(const std::string& s) {
  return BioPtr(BIO_new_mem_buf(s.data(), static_cast<int>(s.size())));
}

// Never prompts: an encrypted key is refused instead of reading a password from a terminal.
int NoPassword(char*, int, int, void*) { return 0; }

std::vector<X509Ptr> ParseCerts(const std::string& pem) {
  std::vector<X509Ptr> out;
  BioPtr bio = MemBio(pem);
  while (X509* x = PEM_read_bio_X509(bio.get(), nullptr, NoPassword, nullptr)) {
    out.emplace_back(x);
  }
  ERR_clear_error();  // the loop ends on "no start line", which is not an error here
  return out;
}

std::string AsnTime(const ASN1_TIME* t) {
  BioPtr bio(BIO_new(BIO_s_mem()));
  ASN1_TIME_print(bio.get(), t);
  char* data = nullptr;
  long n = BIO_get_mem_data(bio.get(), &data);
  return std::string(data, n > 0 ? static_cast<size_t>(n) : 0);
}

std::string CommonName(X509* x) {
  char buf[256] = "";
  X509_NAME_get_text_by_NID(X509_get_subject_name(x), NID_commonName, buf, sizeof buf);
  return buf;
}

std::string Join(const std::vector<std::string>& v) {
  std::string out;
  for (const auto& s : v) out += (out.empty() ? "" : ", ") + s;
  return out;
}

// One checked set: what gRPC will be given, and what the log says about it.
struct Material {
  std::string identity;  // certificate chain then key: one file, so they change together
  std::string ca;
  std::vector<std::string> node_ids;
  std::string summary;  // "CN=..., nodes ..., valid until ...": never key material
};

StatusOr<Material> ReadAndCheck(const TlsFiles& f) {
  auto cert = ReadPem("--tls-cert", f.cert, "CERTIFICATE-----");
  if (!cert.ok()) return cert.status();
  auto key = ReadPem("--tls-key", f.key, "PRIVATE KEY-----");
  if (!key.ok()) return key.status();
  auto ca = ReadPem("--tls-ca", f.ca, "CERTIFICATE-----");
  if (!ca.ok()) return ca.status();

  std::vector<X509Ptr> chain = ParseCerts(*cert);
  if (chain.empty()) {
    return Error(EINVAL, "--tls-cert {}: no certificate could be parsed (truncated?)", f.cert);
  }
  BioPtr kbio = MemBio(*key);
  PkeyPtr pkey(PEM_read_bio_PrivateKey(kbio.get(), nullptr, NoPassword, nullptr));
  ERR_clear_error();
  if (!pkey) {
    return Error(EINVAL, "--tls-key {}: no readable PEM private key (truncated, or encrypted?)",
                 f.key);
  }
  X509* leaf = chain.front().get();
  if (X509_check_private_key(leaf, pkey.get()) != 1) {
    ERR_clear_error();
    return Error(EINVAL, "--tls-key {} does not belong to --tls-cert {}", f.key, f.cert);
  }
  if (X509_cmp_current_time(X509_get0_notAfter(leaf)) < 0) {
    return Error(EINVAL, "--tls-cert {}: expired on {}", f.cert,
                 AsnTime(X509_get0_notAfter(leaf)));
  }
  if (ParseCerts(*ca).empty()) {
    return Error(EINVAL, "--tls-ca {}: no certificate could be parsed (truncated?)", f.ca);
  }
  Material m;
  m.identity = *cert;
  if (m.identity.back() != '\n') m.identity += '\n';
  m.identity += *key;
  m.ca = std::move(*ca);
  m.node_ids = NodeIdsInUris(UriSans(leaf));
  m.summary = fmt::format("CN={}{}, valid until {}", CommonName(leaf),
                          m.node_ids.empty() ? "" : ", node " + Join(m.node_ids),
                          AsnTime(X509_get0_notAfter(leaf)));
  return m;
}

// A sealed in-memory file holding `data`, close-on-exec so that no child inherits it.
StatusOr<int> SealedMemfd(const std::string& data) {
  int fd = memfd_create("nbd-csi-tls", MFD_CLOEXEC | MFD_ALLOW_SEALING);
  if (fd < 0) return Error(errno, "memfd_create: {}", strerror(errno));
  Status w = WriteAll(fd, data, "memfd");
  if (w.ok() && fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE | F_SEAL_SEAL) != 0) {
    w = Error(errno, "seal memfd: {}", strerror(errno));
  }
  if (!w.ok()) {
    close(fd);
    return w;
  }
  return fd;
}

class NodeVerifier final : public gx::ExternalCertificateVerifier {
 public:
  explicit NodeVerifier(std::string node_id) : node_(std::move(node_id)) {}

  bool Verify(gx::TlsCustomVerificationCheckRequest* req, std::function<void(grpc::Status)>,
              grpc::Status* sync_status) override {
    std::vector<std::string> uris;
    for (const auto& u : req->uri_names()) uris.emplace_back(u.data(), u.size());
    std::vector<std::string> ids = NodeIdsInUris(uris);
    if (std::find(ids.begin(), ids.end(), node_) != ids.end()) {
      *sync_status = grpc::Status::OK;
    } else {
      *sync_status = grpc::Status(
          grpc::StatusCode::UNAUTHENTICATED,
          fmt::format("the datapath at {} presented a certificate for {}, not for node {} (URI "
                      "SAN {} expected)",
                      std::string(req->target_name().data(), req->target_name().size()),
                      ids.empty() ? "no node" : "node " + Join(ids), node_,
                      NodeIdentityUri(node_)));
    }
    return true;  // decided synchronously
  }
  void Cancel(gx::TlsCustomVerificationCheckRequest*) override {}

 private:
  const std::string node_;
};

class RefuseNodePeers final : public grpc::AuthMetadataProcessor {
 public:
  bool IsBlocking() const override { return false; }
  grpc::Status Process(const InputMetadata&, grpc::AuthContext* ctx, OutputMetadata*,
                       OutputMetadata*) override {
    std::vector<std::string> ids = PeerNodeIds(*ctx);
    if (ids.empty()) return grpc::Status::OK;
    spdlog::warn("TLS: refused a call from a certificate for node {}: datapath certificates "
                 "cannot call this API", Join(ids));
    return grpc::Status(grpc::StatusCode::PERMISSION_DENIED,
                        fmt::format("the client certificate is node {}'s: a datapath's "
                                    "certificate cannot call another datapath's API",
                                    Join(ids)));
  }
};

}  // namespace

struct TlsCredentials::State {
  TlsFiles files;
  std::mutex mu;
  FileId seen[3];                        // guarded by mu: the versions last read
  std::string identity, ca;              // guarded by mu: what gRPC was given
  std::vector<std::string> node_ids;     // guarded by mu
  std::string last_error;                // guarded by mu: logged once per distinct error
  steady_clock::time_point published{};  // guarded by mu
  uint64_t reloads = 0;                  // guarded by mu
  uint64_t refused = 0;                  // guarded by mu: changed sets that did not load
  // The fds gRPC reads as /proc/self/fd/N. Never closed: credentials made from this state may
  // outlive it, and a reused fd number would hand gRPC another file.
  int identity_fd = -1, ca_fd = -1;
  std::shared_ptr<gx::FileWatcherCertificateProvider> provider;

  Status Start(Material m) {
    auto id = SealedMemfd(m.identity);
    if (!id.ok()) return id.status();
    auto ca_memfd = SealedMemfd(m.ca);
    if (!ca_memfd.ok()) {
      close(*id);
      return ca_memfd.status();
    }
    identity_fd = *id;
    ca_fd = *ca_memfd;
    const std::string id_path = "/proc/self/fd/" + std::to_string(identity_fd);
    provider = std::make_shared<gx::FileWatcherCertificateProvider>(
        id_path, id_path, "/proc/self/fd/" + std::to_string(ca_fd), kGrpcRefreshSeconds);
    for (int i = 0; i < 3; ++i) seen[i] = FileId::Of(Path(i));
    identity = std::move(m.identity);
    ca = std::move(m.ca);
    node_ids = std::move(m.node_ids);
    published = steady_clock::now();
    spdlog::info("TLS: {} in force ({})", files.cert, m.summary);
    return Status::Ok();
  }

  const std::string& Path(int i) const { return i == 0 ? files.cert : i == 1 ? files.key : files.ca; }

  // Puts a changed, good set in force; keeps the current one otherwise.
  void Check() {
    std::lock_guard lock(mu);
    FileId now[3] = {FileId::Of(files.cert), FileId::Of(files.key), FileId::Of(files.ca)};
    if (now[0] == seen[0] && now[1] == seen[1] && now[2] == seen[2]) return;
    if (steady_clock::now() - published < kMinPublishGap) return;  // the next poll takes it
    std::copy(std::begin(now), std::end(now), std::begin(seen));
    auto m = ReadAndCheck(files);
    if (!m.ok()) {
      ++refused;
      if (m.status().message() != last_error) {
        last_error = m.status().message();
        spdlog::warn("TLS: the changed files do not load, keeping the certificate in force: {}",
                     last_error);
      }
      return;
    }
    last_error.clear();
    if (m->identity == identity && m->ca == ca) return;
    Status s = Replace(identity_fd, m->identity);
    if (s.ok()) s = Replace(ca_fd, m->ca);
    if (!s.ok()) {
      spdlog::error("TLS: cannot hand the new certificate to gRPC: {}", s.message());
      return;
    }
    identity = std::move(m->identity);
    ca = std::move(m->ca);
    node_ids = std::move(m->node_ids);
    published = steady_clock::now();
    ++reloads;
    spdlog::info("TLS: reloaded {}: {} in force for new connections", files.cert, m->summary);
  }

  // dup3 swaps the file behind the fd number in one step: a reader opens the old or the new.
  static Status Replace(int slot, const std::string& data) {
    auto fd = SealedMemfd(data);
    if (!fd.ok()) return fd.status();
    int rc = dup3(*fd, slot, O_CLOEXEC);
    int err = errno;
    close(*fd);
    if (rc < 0) return Error(err, "dup3: {}", strerror(err));
    return Status::Ok();
  }
};

namespace {

// Every loaded set, by its three paths; never freed (see State::identity_fd).
struct Watched {
  std::mutex mu;
  std::map<std::string, std::shared_ptr<TlsCredentials::State>> states;
};

Watched& AllWatched() {
  static Watched* w = new Watched();
  return *w;
}

// The thread that polls every watched set. It logs, so it must be gone before spdlog's registry
// is destroyed at exit (a detached poller logging then was a use-after-free under ASan):
// it is a static object created after the registry, hence destroyed, stopped and joined, first.
class Poller {
 public:
  Poller() : thread_([this] { Run(); }) {}
  ~Poller() {
    {
      std::lock_guard lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    thread_.join();
  }

 private:
  void Run() {
    std::unique_lock lock(mu_);
    while (!cv_.wait_for(lock, kPollInterval, [this] { return stop_; })) {
      lock.unlock();
      std::vector<std::shared_ptr<TlsCredentials::State>> states;
      {
        std::lock_guard w(AllWatched().mu);
        for (auto& [key, s] : AllWatched().states) states.push_back(s);
      }
      for (auto& s : states) s->Check();
      lock.lock();
    }
  }

  std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
  std::thread thread_;  // last: it starts once the members it uses exist
};

}  // namespace

std::string NodeIdentityUri(std::string_view node_id) {
  return std::string(kNodeIdentityPrefix) + std::string(node_id);
}

std::vector<std::string> NodeIdsInUris(const std::vector<std::string>& uris) {
  std::vector<std::string> out;
  for (const auto& u : uris) {
    if (u.size() > kNodeIdentityPrefix.size() && u.starts_with(kNodeIdentityPrefix)) {
      out.push_back(u.substr(kNodeIdentityPrefix.size()));
    }
  }
  std::sort(out.begin(), out.end());
  out.erase(std::unique(out.begin(), out.end()), out.end());
  return out;
}

std::vector<std::string> PeerNodeIds(const grpc::AuthContext& ctx) {
  std::vector<std::string> uris;
  for (const auto& v : ctx.FindPropertyValues(GRPC_PEER_URI_PROPERTY_NAME)) {
    uris.emplace_back(v.data(), v.size());
  }
  return NodeIdsInUris(uris);
}

Status CheckPeerIsNode(const grpc::AuthContext& ctx, const std::string& node_id) {
  std::vector<std::string> ids = PeerNodeIds(ctx);
  if (std::find(ids.begin(), ids.end(), node_id) != ids.end()) return Status::Ok();
  if (ids.empty()) {
    return Error(EPERM, "node {}: the client certificate names no node (a URI SAN {} is "
                        "needed)", node_id, NodeIdentityUri(node_id));
  }
  return Error(EPERM, "node {}: the client certificate is node {}'s, it cannot speak for node {}",
               node_id, Join(ids), node_id);
}

Status TlsFiles::Validate(const TlsFlagNames& f) const {
  const bool any = !cert.empty() || !key.empty() || !ca.empty();
  if (insecure) {
    if (any) {
      return Error(EINVAL, "{} cannot be combined with {}, {} or {}", f.insecure, f.cert, f.key,
                   f.ca);
    }
    return Status::Ok();
  }
  if (!any) {
    return Error(EINVAL, "no TLS files: give {}, {} and {} (or {} for plaintext on a trusted "
                         "loopback)", f.cert, f.key, f.ca, f.insecure);
  }
  std::string missing;
  for (auto [flag, value] : {std::pair{f.cert, &cert}, std::pair{f.key, &key},
                             std::pair{f.ca, &ca}}) {
    if (value->empty()) missing += missing.empty() ? flag : std::string(", ") + flag;
  }
  if (!missing.empty()) {
    return Error(EINVAL, "incomplete TLS configuration: missing {} (all of {}, {} and {} are "
                         "needed)", missing, f.cert, f.key, f.ca);
  }
  return Status::Ok();
}

StatusOr<std::shared_ptr<TlsCredentials>> TlsCredentials::Load(const TlsFiles& tls) {
  if (Status s = tls.Validate(); !s.ok()) return s;
  if (tls.insecure) return Error(EINVAL, "TLS credentials asked for with --insecure");
  const std::string key = tls.cert + '\n' + tls.key + '\n' + tls.ca;
  Watched& w = AllWatched();
  {
    std::lock_guard lock(w.mu);
    auto it = w.states.find(key);
    if (it != w.states.end()) {
      std::shared_ptr<State> s = it->second;
      s->Check();
      return std::shared_ptr<TlsCredentials>(new TlsCredentials(s));
    }
  }
  auto m = ReadAndCheck(tls);
  if (!m.ok()) return m.status();
  auto state = std::make_shared<State>();
  state->files = tls;
  if (Status s = state->Start(std::move(*m)); !s.ok()) return s;
  spdlog::default_logger_raw();  // the registry first, so that it outlives the poller
  static Poller poller;
  std::lock_guard lock(w.mu);
  // Two first loads of the same paths at once: the first one in wins, the other is dropped.
  auto [it, inserted] = w.states.try_emplace(key, state);
  return std::shared_ptr<TlsCredentials>(new TlsCredentials(it->second));
}

std::shared_ptr<grpc::ServerCredentials> TlsCredentials::Server(TlsPeers peers) const {
  gx::TlsServerCredentialsOptions opts(state_->provider);
  opts.watch_root_certs();
  opts.watch_identity_key_cert_pairs();
  // A client without a certificate, or with one the CA did not sign, is refused during the
  // handshake; no handler ever runs for it.
  opts.set_cert_request_type(GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
  // Each options object feeds exactly one credentials object: gRPC 1.51 takes over its core
  // options, so a second TlsServerCredentials from it would free them twice.
  auto creds = gx::TlsServerCredentials(opts);
  if (peers == TlsPeers::kNotNodes) {
    creds->SetAuthMetadataProcessor(std::make_shared<RefuseNodePeers>());
  }
  return creds;
}

std::shared_ptr<grpc::ChannelCredentials> TlsCredentials::Channel() const {
  gx::TlsChannelCredentialsOptions opts;
  opts.set_certificate_provider(state_->provider);
  opts.watch_root_certs();
  opts.watch_identity_key_cert_pairs();
  opts.set_certificate_verifier(std::make_shared<gx::HostNameCertificateVerifier>());
  return gx::TlsCredentials(opts);
}

std::shared_ptr<grpc::ChannelCredentials> TlsCredentials::ChannelToNode(
    const std::string& node_id) const {
  gx::TlsChannelCredentialsOptions opts;
  opts.set_certificate_provider(state_->provider);
  opts.watch_root_certs();
  opts.watch_identity_key_cert_pairs();
  opts.set_certificate_verifier(gx::ExternalCertificateVerifier::Create<NodeVerifier>(node_id));
  // The per-call host is the dialled address, which a node certificate need not list.
  opts.set_check_call_host(false);
  return gx::TlsCredentials(opts);
}

std::vector<std::string> TlsCredentials::NodeIds() const {
  std::lock_guard lock(state_->mu);
  return state_->node_ids;
}

uint64_t TlsCredentials::reloads() const {
  std::lock_guard lock(state_->mu);
  return state_->reloads;
}

uint64_t TlsCredentials::refused_changes() const {
  std::lock_guard lock(state_->mu);
  return state_->refused;
}

const TlsFiles& TlsCredentials::files() const { return state_->files; }

StatusOr<std::shared_ptr<grpc::ServerCredentials>> MakeServerCredentials(const TlsFiles& tls,
                                                                         TlsPeers peers) {
  if (Status s = tls.Validate(); !s.ok()) return s;
  if (tls.insecure) return grpc::InsecureServerCredentials();
  auto creds = TlsCredentials::Load(tls);
  if (!creds.ok()) return creds.status();
  return (*creds)->Server(peers);
}

StatusOr<std::shared_ptr<grpc::ChannelCredentials>> MakeChannelCredentials(const TlsFiles& tls) {
  if (Status s = tls.Validate(); !s.ok()) return s;
  if (tls.insecure) return grpc::InsecureChannelCredentials();
  auto creds = TlsCredentials::Load(tls);
  if (!creds.ok()) return creds.status();
  return (*creds)->Channel();
}

}  // namespace nbdcsi
