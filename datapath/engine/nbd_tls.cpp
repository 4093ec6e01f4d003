#include "datapath/engine/nbd_tls.h"

#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <pthread.h>
#include <signal.h>
#include <spdlog/spdlog.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstring>
#include <mutex>
#include <thread>
#include <unordered_map>
#include <vector>

#include "common/fs_util.h"
#include "common/openssl_ptr.h"
#include "common/openssl_util.h"

namespace nbdcsi::datapath {
namespace {

// Certificates, keys and bundles are a few KiB; a bigger file is not what the operator meant.
constexpr size_t kMaxPemBytes = 1 << 20;

size_t CountOf(std::string_view hay, std::string_view needle) {
  size_t n = 0;
  for (size_t p = hay.find(needle); p != std::string_view::npos; p = hay.find(needle, p + 1)) ++n;
  return n;
}

// Reads every certificate of a PEM file. A truncated or corrupt block is an error, not the end
// of the list: a half-written bundle must not load as a shorter one.
StatusOr<std::vector<X509Ptr>> ParseCerts(const char* flag, const std::string& path,
                                          const std::string& pem) {
  BioPtr bio(BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())));
  if (!bio) return Error(ENOMEM, "{} {}: out of memory", flag, path);
  std::vector<X509Ptr> certs;
  ERR_clear_error();
  for (;;) {
    X509Ptr x(PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr));
    if (!x) break;
    certs.push_back(std::move(x));
  }
  const unsigned long e = ERR_peek_last_error();
  const bool clean_end =
      e == 0 || (ERR_GET_LIB(e) == ERR_LIB_PEM && ERR_GET_REASON(e) == PEM_R_NO_START_LINE);
  if (!clean_end) {
    return Error(EINVAL, "{} {}: unreadable certificate ({})", flag, path,
                 OpenSslReason("corrupt PEM"));
  }
  ERR_clear_error();
  const size_t begins = CountOf(pem, "-----BEGIN CERTIFICATE-----");
  if (certs.empty()) return Error(EINVAL, "{} {}: no PEM certificate in it", flag, path);
  if (begins != certs.size() || CountOf(pem, "-----END CERTIFICATE-----") != begins) {
    return Error(EINVAL, "{} {}: {} certificate block(s) but {} readable (truncated file?)", flag,
                 path, begins, certs.size());
  }
  return certs;
}

std::string Asn1Time(const ASN1_TIME* t) {
  BioPtr b(BIO_new(BIO_s_mem()));
  if (!b || ASN1_TIME_print(b.get(), t) != 1) return "?";
  char* data = nullptr;
  long n = BIO_get_mem_data(b.get(), &data);
  return std::string(data, static_cast<size_t>(n));
}

std::string Subject(X509* x) {
  char buf[512];
  X509_NAME_oneline(X509_get_subject_name(x), buf, sizeof buf);
  return buf;
}

struct Built {
  SslCtxPtr ctx;
  std::string summary;
};

// A server SSL_CTX with the protocol settings of every NBD listener and no material yet.
StatusOr<SslCtxPtr> NewServerCtx() {
  ERR_clear_error();
  SslCtxPtr ctx(SSL_CTX_new(TLS_server_method()));
  if (!ctx) return Error(ENOMEM, "cannot create a TLS context: {}", OpenSslReason("?"));
  SSL_CTX* c = ctx.get();
  SSL_CTX_set_min_proto_version(c, TLS1_2_VERSION);
  // No renegotiation (a CPU-cost lever for clients), no resumption (see NbdTlsContext), and a
  // client that closes TCP without close_notify simply ends its stream: NBD frames its own
  // messages, so truncation cannot go unnoticed.
  SSL_CTX_set_options(c, SSL_OP_NO_RENEGOTIATION | SSL_OP_NO_TICKET |
                             SSL_OP_CIPHER_SERVER_PREFERENCE | SSL_OP_IGNORE_UNEXPECTED_EOF);
  SSL_CTX_set_session_cache_mode(c, SSL_SESS_CACHE_OFF);
  SSL_CTX_set_num_tickets(c, 0);
  static const unsigned char kSidCtx[] = "nbd-csi";
  SSL_CTX_set_session_id_context(c, kSidCtx, sizeof kSidCtx - 1);
  // TLS 1.2 only: forward-secret AEAD suites (TLS 1.3 suites are all of that kind already).
  if (SSL_CTX_set_cipher_list(c, "ECDHE+AESGCM:ECDHE+CHACHA20") != 1) {
    return Error(EINVAL, "TLS 1.2 cipher list refused: {}", OpenSslReason("?"));
  }
  // The terminator retries writes from a buffer that may have moved and grown.
  SSL_CTX_set_mode(c, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
  SSL_CTX_set_verify(c, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, nullptr);
  return ctx;
}

// The certificate chain of --nbd-tls-cert, its leaf inside its validity period.
Status UseCertChain(SSL_CTX* c, const NbdTlsFiles& f, const std::vector<X509Ptr>& chain) {
  X509* leaf = chain[0].get();
  if (X509_cmp_current_time(X509_get0_notAfter(leaf)) < 0) {
    return Error(EINVAL, "--nbd-tls-cert {}: expired on {}", f.cert,
                 Asn1Time(X509_get0_notAfter(leaf)));
  }
  if (X509_cmp_current_time(X509_get0_notBefore(leaf)) > 0) {
    return Error(EINVAL, "--nbd-tls-cert {}: not valid before {}", f.cert,
                 Asn1Time(X509_get0_notBefore(leaf)));
  }
  if (SSL_CTX_use_certificate(c, leaf) != 1) {
    return Error(EINVAL, "--nbd-tls-cert {}: refused ({})", f.cert, OpenSslReason("?"));
  }
  for (size_t i = 1; i < chain.size(); ++i) {
    // add1: the context takes its own reference; ours goes with the vector.
    if (SSL_CTX_add1_chain_cert(c, chain[i].get()) != 1) {
      return Error(EINVAL, "--nbd-tls-cert {}: intermediate {} refused ({})", f.cert, i,
                   OpenSslReason("?"));
    }
  }
  return Status::Ok();
}

// The private key of --nbd-tls-key, which must match the certificate.
Status UseKey(SSL_CTX* c, const NbdTlsFiles& f, const std::string& key_pem) {
  BioPtr kbio(BIO_new_mem_buf(key_pem.data(), static_cast<int>(key_pem.size())));
  EVP_PKEY* key = kbio ? PEM_read_bio_PrivateKey(kbio.get(), nullptr, nullptr, nullptr) : nullptr;
  if (!key) {
    return Error(EINVAL, "--nbd-tls-key {}: no readable PEM private key ({})", f.key,
                 OpenSslReason("?"));
  }
  const int used = SSL_CTX_use_PrivateKey(c, key);
  EVP_PKEY_free(key);
  if (used != 1 || SSL_CTX_check_private_key(c) != 1) {
    return Error(EINVAL, "--nbd-tls-key {} does not belong to --nbd-tls-cert {} ({})", f.key,
                 f.cert, OpenSslReason("key values mismatch"));
  }
  return Status::Ok();
}

// The CAs of --nbd-tls-ca, which clients' certificates must chain to.
Status TrustCas(SSL_CTX* c, const NbdTlsFiles& f, const std::vector<X509Ptr>& cas) {
  X509_STORE* store = SSL_CTX_get_cert_store(c);
  for (const auto& ca : cas) {
    // Also sent in the CertificateRequest, so clients holding several certificates pick the
    // one this CA signed.
    if (X509_STORE_add_cert(store, ca.get()) != 1 || SSL_CTX_add_client_CA(c, ca.get()) != 1) {
      return Error(EINVAL, "--nbd-tls-ca {}: certificate refused ({})", f.ca, OpenSslReason("?"));
    }
  }
  return Status::Ok();
}

// Builds a server SSL_CTX from the three files. Everything is checked here, before it can
// replace working material: the key must match the certificate, the certificate must be inside
// its validity period, the CA bundle must hold at least one certificate.
StatusOr<Built> Build(const NbdTlsFiles& f) {
  auto cert_pem = ReadSmallFile(f.cert, kMaxPemBytes);
  if (!cert_pem.ok())
    return Error(cert_pem.status().code(), "--nbd-tls-cert: {}", cert_pem.status().message());
  auto key_pem = ReadSmallFile(f.key, kMaxPemBytes);
  if (!key_pem.ok())
    return Error(key_pem.status().code(), "--nbd-tls-key: {}", key_pem.status().message());
  auto ca_pem = ReadSmallFile(f.ca, kMaxPemBytes);
  if (!ca_pem.ok())
    return Error(ca_pem.status().code(), "--nbd-tls-ca: {}", ca_pem.status().message());

  auto chain = ParseCerts("--nbd-tls-cert", f.cert, *cert_pem);
  if (!chain.ok()) return chain.status();
  auto cas = ParseCerts("--nbd-tls-ca", f.ca, *ca_pem);
  if (!cas.ok()) return cas.status();

  auto ctx = NewServerCtx();
  if (!ctx.ok()) return ctx.status();
  SSL_CTX* c = ctx->get();
  if (Status s = UseCertChain(c, f, *chain); !s.ok()) return s;
  if (Status s = UseKey(c, f, *key_pem); !s.ok()) return s;
  if (Status s = TrustCas(c, f, *cas); !s.ok()) return s;
  ERR_clear_error();
  X509* leaf = (*chain)[0].get();
  std::string summary = fmt::format(
      "{} (valid until {}), clients verified against {} CA "
      "certificate(s) from {}",
      Subject(leaf), Asn1Time(X509_get0_notAfter(leaf)), cas->size(), f.ca);
  return Built{std::move(*ctx), std::move(summary)};
}

TlsIo FromSsl(SSL* ssl, int r) {
  switch (SSL_get_error(ssl, r)) {
    case SSL_ERROR_WANT_READ:
      return {TlsIo::Kind::kWantRead};
    case SSL_ERROR_WANT_WRITE:
      return {TlsIo::Kind::kWantWrite};
    case SSL_ERROR_ZERO_RETURN:
      ERR_clear_error();
      return {TlsIo::Kind::kClosed};
    case SSL_ERROR_SYSCALL:
      if (ERR_peek_error() == 0) {
        const int err = errno;
        return {TlsIo::Kind::kError, 0,
                err ? std::string(std::strerror(err)) : "connection closed by the client"};
      }
      break;
    default:
      break;
  }
  // Verification failures say why (expired, unknown CA) in the verify result, not the queue.
  const long v = SSL_get_verify_result(ssl);
  std::string why = OpenSslReason("TLS failure");
  if (v != X509_V_OK) {
    why = fmt::format("client certificate refused: {} ({})", X509_verify_cert_error_string(v), why);
  }
  return {TlsIo::Kind::kError, 0, std::move(why)};
}

}  // namespace

void BlockSigpipe() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGPIPE);
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
}

// ---- TlsSession ----

TlsSession& TlsSession::operator=(TlsSession&& o) noexcept {
  if (this != &o) {
    if (ssl_) SSL_free(ssl_);
    ssl_ = o.ssl_;
    o.ssl_ = nullptr;
  }
  return *this;
}

TlsSession::~TlsSession() {
  if (ssl_) SSL_free(ssl_);
}

// errno is cleared too: SSL_ERROR_SYSCALL with an empty error queue is read from it.
TlsIo TlsSession::Accept() {
  ERR_clear_error();
  errno = 0;
  const int r = SSL_accept(ssl_);
  if (r == 1) return {TlsIo::Kind::kDone};
  return FromSsl(ssl_, r);
}

TlsIo TlsSession::Read(std::span<uint8_t> buf) {
  ERR_clear_error();
  errno = 0;
  const int r = SSL_read(ssl_, buf.data(), static_cast<int>(std::min<size_t>(buf.size(), INT_MAX)));
  if (r > 0) return {TlsIo::Kind::kDone, static_cast<size_t>(r)};
  return FromSsl(ssl_, r);
}

TlsIo TlsSession::Write(std::span<const uint8_t> buf) {
  ERR_clear_error();
  errno = 0;
  const int r =
      SSL_write(ssl_, buf.data(), static_cast<int>(std::min<size_t>(buf.size(), INT_MAX)));
  if (r > 0) return {TlsIo::Kind::kDone, static_cast<size_t>(r)};
  return FromSsl(ssl_, r);
}

std::string TlsSession::Describe() const {
  if (!ssl_) return "no TLS";
  std::string peer = "no client certificate";
  if (X509* x = SSL_get0_peer_certificate(ssl_)) peer = "client " + Subject(x);
  return fmt::format("{} {}, {}", SSL_get_version(ssl_), SSL_get_cipher_name(ssl_), peer);
}

// ---- NbdTlsContext ----

namespace {
constexpr size_t kFiles = 3;
}  // namespace

NbdTlsContext::NbdTlsContext(NbdTlsFiles files)
    : files_(std::move(files)),
      loaded_(std::make_unique<FileId[]>(kFiles)),
      failed_(std::make_unique<FileId[]>(kFiles)) {}

NbdTlsContext::~NbdTlsContext() {
  if (ctx_) SSL_CTX_free(ctx_);
}

StatusOr<std::unique_ptr<NbdTlsContext>> NbdTlsContext::Load(const NbdTlsFiles& files) {
  for (auto [flag, path] :
       {std::pair{"--nbd-tls-cert", &files.cert}, std::pair{"--nbd-tls-key", &files.key},
        std::pair{"--nbd-tls-ca", &files.ca}}) {
    if (path->empty()) return Error(EINVAL, "{} is empty", flag);
  }
  std::unique_ptr<NbdTlsContext> c(new NbdTlsContext(files));
  // Identities first, contents second: if a file changes in between, the next check sees a
  // difference and loads again, never the other way round.
  c->loaded_[0] = FileId::Of(files.cert);
  c->loaded_[1] = FileId::Of(files.key);
  c->loaded_[2] = FileId::Of(files.ca);
  auto built = Build(files);
  if (!built.ok()) return built.status();
  c->ctx_ = built->ctx.release();
  c->summary_ = std::move(built->summary);
  return c;
}

bool NbdTlsContext::ReloadIfChanged() {
  FileId now[kFiles] = {FileId::Of(files_.cert), FileId::Of(files_.key), FileId::Of(files_.ca)};
  if (std::equal(now, now + kFiles, loaded_.get())) return false;
  auto built = Build(files_);
  if (!built.ok()) {
    if (!std::equal(now, now + kFiles, failed_.get())) {
      spdlog::warn(
          "nbd tls: the certificate files changed but do not load: {}; new handshakes "
          "keep the current certificate {} (retrying while the files differ)",
          built.status().message(), summary_);
      std::copy(now, now + kFiles, failed_.get());
    }
    return false;
  }
  SSL_CTX_free(ctx_);  // sessions made from it hold their own references
  ctx_ = built->ctx.release();
  summary_ = std::move(built->summary);
  std::copy(now, now + kFiles, loaded_.get());
  std::fill(failed_.get(), failed_.get() + kFiles, FileId{});
  spdlog::info("nbd tls: new certificate in force for new connections: {}", summary_);
  return true;
}

StatusOr<TlsSession> NbdTlsContext::NewSession(int fd) {
  ERR_clear_error();
  SSL* ssl = SSL_new(ctx_);
  if (!ssl) return Error(ENOMEM, "cannot create a TLS session: {}", OpenSslReason("?"));
  TlsSession s(ssl);
  if (SSL_set_fd(ssl, fd) != 1) return Error(EINVAL, "TLS on fd {}: {}", fd, OpenSslReason("?"));
  return s;
}

// ---- TlsTerminator ----

namespace {

// A fixed buffer used as a queue: bytes are appended at the tail and consumed at the head.
class ByteQueue {
 public:
  explicit ByteQueue(size_t cap) : buf_(std::make_unique<uint8_t[]>(cap)), cap_(cap) {}
  size_t size() const { return end_ - begin_; }
  bool empty() const { return begin_ == end_; }
  std::span<const uint8_t> data() const { return {buf_.get() + begin_, size()}; }
  void Consume(size_t n) {
    begin_ += n;
    if (begin_ == end_) begin_ = end_ = 0;
  }
  // Room at the tail; moves the bytes to the front first when the tail room is small, so reads
  // stay large. (SSL_write tolerates the move: SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER.)
  std::span<uint8_t> Room() {
    if (begin_ > 0 && cap_ - end_ < cap_ / 4) {
      std::memmove(buf_.get(), buf_.get() + begin_, size());
      end_ -= begin_;
      begin_ = 0;
    }
    return {buf_.get() + end_, cap_ - end_};
  }
  void Commit(size_t n) { end_ += n; }

 private:
  std::unique_ptr<uint8_t[]> buf_;
  size_t cap_;
  size_t begin_ = 0;
  size_t end_ = 0;
};

// Per direction: a TLS record is at most 16 KiB; a few of them in flight keep both sides busy.
constexpr size_t kQueueBytes = 128 * 1024;
// Rounds of Drive for one connection before the others get a turn.
constexpr int kDriveRounds = 16;

}  // namespace

struct TlsTerminator::Impl {
  // One connection. Every fd is registered edge-triggered for both directions once; Drive tries
  // every direction whenever anything happens, so a direction that stopped did so on EAGAIN or
  // WANT_* from a real attempt, and the next edge on that fd wakes it.
  struct Pipe {
    TlsSession tls;
    int net = -1;
    int plain = -1;
    std::string peer;
    ByteQueue up{kQueueBytes};    // decrypted, towards the worker
    ByteQueue down{kQueueBytes};  // from the worker, to encrypt
    bool net_eof = false;         // client sent close_notify or EOF
    bool plain_eof = false;       // the worker closed its end
    bool plain_shut = false;      // we half-closed towards the worker
    bool queued = false;          // already on this round's to-do list
    bool dead = false;
  };
  enum class Result { kIdle, kAgain, kEnded };

  int index;
  int ep = -1;
  int wake = -1;
  std::thread thread;
  std::mutex mu;
  std::vector<std::unique_ptr<Pipe>> incoming;     // guarded by mu
  bool stopping = false;                           // guarded by mu
  std::chrono::steady_clock::time_point deadline;  // guarded by mu
  std::atomic<size_t> live{0};
  // Thread only:
  std::unordered_map<Pipe*, std::unique_ptr<Pipe>> pipes;

  explicit Impl(int i) : index(i) {}

  static void Close(Pipe& p) {
    if (p.net >= 0) close(p.net);
    if (p.plain >= 0) close(p.plain);
    p.net = p.plain = -1;
  }

  void Register(Pipe* p) {
    epoll_event ev{};
    ev.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET;
    ev.data.ptr = p;
    if (epoll_ctl(ep, EPOLL_CTL_ADD, p->net, &ev) != 0 ||
        epoll_ctl(ep, EPOLL_CTL_ADD, p->plain, &ev) != 0) {
      spdlog::error("nbd tls: cannot watch the connection from {}: {}", p->peer,
                    std::strerror(errno));
      End(*p, "not watchable");
    }
  }

  void End(Pipe& p, std::string_view why) {
    if (p.dead) return;
    if (why.empty()) {
      spdlog::debug("nbd tls: connection from {} closed", p.peer);
    } else {
      spdlog::info("nbd tls: connection from {} ended: {}", p.peer, why);
    }
    if (p.net >= 0) epoll_ctl(ep, EPOLL_CTL_DEL, p.net, nullptr);
    if (p.plain >= 0) epoll_ctl(ep, EPOLL_CTL_DEL, p.plain, nullptr);
    Close(p);
    p.dead = true;
    live.fetch_sub(1, std::memory_order_relaxed);
  }

  Result Drive(Pipe& p) {
    for (int round = 0; round < kDriveRounds; ++round) {
      bool progress = false;
      // Client -> worker. SSL_read first: it may hold decrypted bytes that no fd event announces.
      if (!p.net_eof && !p.up.Room().empty()) {
        auto room = p.up.Room();
        TlsIo r = p.tls.Read(room);
        if (r.kind == TlsIo::Kind::kDone) {
          p.up.Commit(r.bytes);
          progress = true;
        } else if (r.kind == TlsIo::Kind::kClosed) {
          p.net_eof = true;
          progress = true;
        } else if (r.kind == TlsIo::Kind::kError) {
          End(p, "reading: " + r.error);
          return Result::kEnded;
        }
      }
      if (!p.up.empty()) {
        auto d = p.up.data();
        ssize_t n = send(p.plain, d.data(), d.size(), MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n > 0) {
          p.up.Consume(static_cast<size_t>(n));
          progress = true;
        } else if (errno != EAGAIN && errno != EINTR) {
          // The worker closed the connection (bad framing, shutdown): nothing can go on.
          End(p, fmt::format("the worker side closed ({})", std::strerror(errno)));
          return Result::kEnded;
        }
      }
      if (p.net_eof && p.up.empty() && !p.plain_shut) {
        // The worker sees EOF, finishes what is in flight and closes its end.
        shutdown(p.plain, SHUT_WR);
        p.plain_shut = true;
      }
      // Worker -> client.
      if (!p.plain_eof && !p.down.Room().empty()) {
        auto room = p.down.Room();
        ssize_t n = recv(p.plain, room.data(), room.size(), MSG_DONTWAIT);
        if (n > 0) {
          p.down.Commit(static_cast<size_t>(n));
          progress = true;
        } else if (n == 0) {
          p.plain_eof = true;
          progress = true;
        } else if (errno != EAGAIN && errno != EINTR) {
          End(p, fmt::format("reading the worker side: {}", std::strerror(errno)));
          return Result::kEnded;
        }
      }
      if (!p.down.empty()) {
        TlsIo r = p.tls.Write(p.down.data());
        if (r.kind == TlsIo::Kind::kDone) {
          p.down.Consume(r.bytes);
          progress = true;
        } else if (r.kind == TlsIo::Kind::kError || r.kind == TlsIo::Kind::kClosed) {
          End(p, "writing: " + (r.error.empty() ? std::string("closed") : r.error));
          return Result::kEnded;
        }
      }
      if (p.plain_eof && p.down.empty()) {
        // Everything the worker said is out. close_notify is a courtesy (one non-blocking try):
        // the client has its replies, and NBD frames its own messages.
        ERR_clear_error();
        SSL_shutdown(p.tls.get());
        ERR_clear_error();
        End(p, "");
        return Result::kEnded;
      }
      if (!progress) return Result::kIdle;
    }
    return Result::kAgain;
  }

  void TakeIncoming(std::vector<Pipe*>& todo) {
    std::vector<std::unique_ptr<Pipe>> fresh;
    {
      std::lock_guard lk(mu);
      fresh.swap(incoming);
    }
    for (auto& up : fresh) {
      Pipe* p = up.get();
      Register(p);
      if (p->dead) continue;  // freed with `fresh`
      pipes[p] = std::move(up);
      // Bytes may already wait inside the session (decrypted behind the last option) or on
      // either socket, with no edge to come: drive it once now.
      p->queued = true;
      todo.push_back(p);
    }
  }

  void Loop() {
    std::vector<Pipe*> again;
    std::vector<Pipe*> todo;
    epoll_event events[64];
    for (;;) {
      todo.clear();
      TakeIncoming(todo);
      int timeout = (again.empty() && todo.empty()) ? -1 : 0;
      {
        std::lock_guard lk(mu);
        if (stopping) {
          if (pipes.empty() && incoming.empty()) return;
          const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
              deadline - std::chrono::steady_clock::now());
          if (left.count() <= 0) {
            for (auto& [p, owned] : pipes) End(*p, "shutting down");
            pipes.clear();
            return;
          }
          timeout = timeout == 0 ? 0 : static_cast<int>(left.count()) + 1;
        }
      }
      const int n = epoll_wait(ep, events, 64, timeout);
      if (n < 0 && errno != EINTR) {
        spdlog::error("nbd tls: epoll_wait: {}", std::strerror(errno));
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
        continue;
      }
      for (Pipe* p : again) {
        if (!p->queued) {
          p->queued = true;
          todo.push_back(p);
        }
      }
      again.clear();
      for (int i = 0; i < n; ++i) {
        if (events[i].data.ptr == nullptr) {
          uint64_t v;
          [[maybe_unused]] ssize_t r = read(wake, &v, sizeof v);
          continue;
        }
        auto* p = static_cast<Pipe*>(events[i].data.ptr);
        if (!p->queued) {
          p->queued = true;
          todo.push_back(p);
        }
      }
      for (Pipe* p : todo) {
        p->queued = false;
        if (p->dead) continue;
        if (Drive(*p) == Result::kAgain) again.push_back(p);
      }
      // Freed only now: a later event of this round may still have pointed at them.
      for (auto it = pipes.begin(); it != pipes.end();) {
        it = it->first->dead ? pipes.erase(it) : std::next(it);
      }
      std::erase_if(again, [](Pipe* p) { return p->dead; });
    }
  }
};

TlsTerminator::TlsTerminator(int index) : impl_(std::make_unique<Impl>(index)) {}

TlsTerminator::~TlsTerminator() { Stop(std::chrono::milliseconds(0)); }

Status TlsTerminator::Start() {
  Impl& m = *impl_;
  m.ep = epoll_create1(EPOLL_CLOEXEC);
  if (m.ep < 0) return Error(errno, "nbd tls: epoll_create1: {}", std::strerror(errno));
  m.wake = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (m.wake < 0) return Error(errno, "nbd tls: eventfd: {}", std::strerror(errno));
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.ptr = nullptr;
  if (epoll_ctl(m.ep, EPOLL_CTL_ADD, m.wake, &ev) != 0) {
    return Error(errno, "nbd tls: epoll_ctl: {}", std::strerror(errno));
  }
  m.thread = std::thread([&m] {
    BlockSigpipe();
    const std::string name = "nbd-tls-" + std::to_string(m.index);
    pthread_setname_np(pthread_self(), name.substr(0, 15).c_str());
    m.Loop();
  });
  return Status::Ok();
}

void TlsTerminator::Add(TlsSession session, int net_fd, int plain_fd, std::string peer) {
  Impl& m = *impl_;
  auto p = std::make_unique<Impl::Pipe>();
  p->tls = std::move(session);
  p->net = net_fd;
  p->plain = plain_fd;
  p->peer = std::move(peer);
  {
    std::lock_guard lk(m.mu);
    if (!m.stopping && m.thread.joinable()) {
      m.incoming.push_back(std::move(p));
      m.live.fetch_add(1, std::memory_order_relaxed);
    }
  }
  if (p) {  // not taken: stopping or never started
    Impl::Close(*p);
    return;
  }
  const uint64_t one = 1;
  [[maybe_unused]] ssize_t r = write(m.wake, &one, sizeof one);
}

void TlsTerminator::Stop(std::chrono::milliseconds grace) {
  Impl& m = *impl_;
  {
    std::lock_guard lk(m.mu);
    if (!m.stopping) {
      m.stopping = true;
      m.deadline = std::chrono::steady_clock::now() + grace;
    }
  }
  if (m.wake >= 0) {
    const uint64_t one = 1;
    [[maybe_unused]] ssize_t r = write(m.wake, &one, sizeof one);
  }
  if (m.thread.joinable()) m.thread.join();
  {
    std::lock_guard lk(m.mu);
    for (auto& p : m.incoming) {
      Impl::Close(*p);
      m.live.fetch_sub(1, std::memory_order_relaxed);
    }
    m.incoming.clear();
  }
  if (m.wake >= 0) close(m.wake);
  if (m.ep >= 0) close(m.ep);
  m.wake = m.ep = -1;
}

size_t TlsTerminator::connections() const { return impl_->live.load(std::memory_order_relaxed); }

}  // namespace nbdcsi::datapath
