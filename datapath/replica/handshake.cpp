#include "datapath/replica/handshake.h"

#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <climits>
#include <cstring>
#include <vector>

#include "common/openssl_util.h"
#include "datapath/nbd/codec.h"
#include "datapath/replica/nbd_errors.h"

namespace nbdcsi::replica {
namespace {

using Clock = std::chrono::steady_clock;

// Option replies we read into memory: INFO replies are a few bytes, error messages at most
// kMaxStringLen; anything longer is not a server we can trust to follow the protocol.
constexpr uint32_t kMaxOptionReplyLen = 64 * 1024;
// Option replies per option before we stop listening (a server looping on INFO replies).
constexpr int kMaxRepliesPerOption = 64;

const char* OptionName(uint32_t opt) {
  switch (opt) {
    case nbd::kOptStartTls:
      return "NBD_OPT_STARTTLS";
    case nbd::kOptStructuredReply:
      return "NBD_OPT_STRUCTURED_REPLY";
    case nbd::kOptGo:
      return "NBD_OPT_GO";
    case nbd::kOptSetMetaContext:
      return "NBD_OPT_SET_META_CONTEXT";
    default:
      return "option";
  }
}

// One connection during the handshake: a non-blocking socket driven with poll() against the
// deadline, with the TLS session (memory BIOs) in front of it once STARTTLS succeeded.
class Wire {
 public:
  Wire(int fd, std::string peer, Clock::time_point deadline)
      : fd_(fd), peer_(std::move(peer)), deadline_(deadline) {}

  const std::string& peer() const { return peer_; }
  SSL* ssl() const { return ssl_.get(); }
  SslPtr TakeSsl() { return std::move(ssl_); }

  Status Send(const uint8_t* p, size_t n) {
    if (!ssl_) return SendRaw(p, n);
    return Explained(SendTls(p, n));
  }
  Status Send(const std::vector<uint8_t>& v) { return Send(v.data(), v.size()); }

  Status Recv(uint8_t* p, size_t n) {
    if (!ssl_) return RecvPlain(p, n);
    return Explained(RecvTls(p, n));
  }

  Status StartTls(SslPtr ssl) {
    ssl_ = std::move(ssl);
    for (;;) {
      ERR_clear_error();
      const int r = SSL_do_handshake(ssl_.get());
      if (Status s = FlushTls(); !s.ok()) return Explained(s);
      if (r == 1) return Status::Ok();
      if (SSL_get_error(ssl_.get(), r) != SSL_ERROR_WANT_READ) return TlsFailure(r, "handshake");
      if (Status s = FeedTls(); !s.ok()) return Explained(s);
    }
  }

 private:
  // In TLS 1.3 the client's handshake is over before the server has judged the client's
  // certificate; a server that refuses it sends an alert and hangs up, and our next send or
  // recv sees only the reset. The alert may still be in the socket's receive queue: when it is,
  // it is the real reason.
  Status Explained(Status s) {
    if (s.ok() || (s.code() != ECONNRESET && s.code() != EPIPE)) return s;
    uint8_t buf[16384];
    for (;;) {
      const ssize_t n = recv(fd_, buf, sizeof buf, MSG_DONTWAIT);
      if (n <= 0) break;
      BIO_write(SSL_get_rbio(ssl_.get()), buf, static_cast<int>(n));
    }
    ERR_clear_error();
    uint8_t sink[256];
    const int r = SSL_read(ssl_.get(), sink, sizeof sink);
    if (r <= 0 && SSL_get_error(ssl_.get(), r) == SSL_ERROR_SSL) {
      return Error(EACCES, "TLS with {} failed: {} ({})", peer_, OpenSslReason("alert"),
                   s.message());
    }
    ERR_clear_error();
    if (!tls_confirmed_) {
      // GnuTLS servers (qemu-nbd, nbdkit) hang up without an alert. A hang-up before the first
      // reply inside TLS is, in practice, a refused certificate: say so, as a guess.
      return Error(EACCES,
                   "TLS with {}: the server hung up right after the TLS handshake, before any "
                   "reply (most likely it refused our certificate: {})",
                   peer_, s.message());
    }
    return s;
  }

  Status SendTls(const uint8_t* p, size_t n) {
    while (n > 0) {
      ERR_clear_error();
      const int w = SSL_write(ssl_.get(), p, static_cast<int>(std::min<size_t>(n, INT_MAX)));
      if (w <= 0) return TlsFailure(w, "sending");
      p += w;
      n -= static_cast<size_t>(w);
    }
    return FlushTls();
  }

  Status RecvPlain(uint8_t* p, size_t n) {
    while (n > 0) {
      auto r = RecvRawSome(p, n);
      if (!r.ok()) return r.status();
      p += *r;
      n -= *r;
    }
    return Status::Ok();
  }

  Status RecvTls(uint8_t* p, size_t n) {
    while (n > 0) {
      ERR_clear_error();
      const int r = SSL_read(ssl_.get(), p, static_cast<int>(std::min<size_t>(n, INT_MAX)));
      if (r > 0) {
        p += r;
        n -= static_cast<size_t>(r);
        tls_confirmed_ = true;
        continue;
      }
      if (SSL_get_error(ssl_.get(), r) != SSL_ERROR_WANT_READ) return TlsFailure(r, "receiving");
      if (Status s = FlushTls(); !s.ok()) return s;  // e.g. an alert or key update to answer
      if (Status s = FeedTls(); !s.ok()) return s;
    }
    return Status::Ok();
  }

  Status Wait(short events) {
    const auto left =
        std::chrono::duration_cast<std::chrono::milliseconds>(deadline_ - Clock::now()).count();
    if (left <= 0) return Error(ETIMEDOUT, "handshake with {}: no answer in time", peer_);
    pollfd p{fd_, events, 0};
    const int r = poll(&p, 1, static_cast<int>(std::min<long long>(left, INT_MAX)));
    if (r < 0 && errno != EINTR) return Error(errno, "poll: {}", strerror(errno));
    if (r == 0) return Error(ETIMEDOUT, "handshake with {}: no answer in time", peer_);
    return Status::Ok();
  }

  Status SendRaw(const uint8_t* p, size_t n) {
    while (n > 0) {
      const ssize_t w = send(fd_, p, n, MSG_NOSIGNAL | MSG_DONTWAIT);
      if (w > 0) {
        p += w;
        n -= static_cast<size_t>(w);
      } else if (errno == EAGAIN || errno == EINTR) {
        if (Status s = Wait(POLLOUT); !s.ok()) return s;
      } else {
        return Error(errno == EPIPE ? ECONNRESET : errno, "handshake with {}: send: {}", peer_,
                     strerror(errno));
      }
    }
    return Status::Ok();
  }

  StatusOr<size_t> RecvRawSome(uint8_t* p, size_t n) {
    for (;;) {
      const ssize_t r = recv(fd_, p, n, MSG_DONTWAIT);
      if (r > 0) return static_cast<size_t>(r);
      if (r == 0) {
        return Error(ECONNRESET, "handshake with {}: the server closed the connection", peer_);
      }
      if (errno != EAGAIN && errno != EINTR) {
        return Error(errno, "handshake with {}: recv: {}", peer_, strerror(errno));
      }
      if (Status s = Wait(POLLIN); !s.ok()) return s;
    }
  }

  Status FlushTls() {
    BIO* w = SSL_get_wbio(ssl_.get());
    uint8_t buf[16384];
    while (BIO_ctrl_pending(w) > 0) {
      const int n = BIO_read(w, buf, sizeof buf);
      if (n <= 0) break;
      if (Status s = SendRaw(buf, static_cast<size_t>(n)); !s.ok()) return s;
    }
    return Status::Ok();
  }

  Status FeedTls() {
    uint8_t buf[16384];
    auto n = RecvRawSome(buf, sizeof buf);
    if (!n.ok()) return n.status();
    BIO_write(SSL_get_rbio(ssl_.get()), buf, static_cast<int>(*n));
    return Status::Ok();
  }

  // A refused certificate (ours or theirs) is EACCES: retrying will not help, and the reason
  // ("certificate verify failed: unable to get local issuer certificate", "tlsv13 alert
  // certificate required") says which side to fix.
  Status TlsFailure(int r, const char* when) {
    const int e = SSL_get_error(ssl_.get(), r);
    const long v = SSL_get_verify_result(ssl_.get());
    if (v != X509_V_OK) {
      ERR_clear_error();
      return Error(EACCES, "TLS with {} failed ({}): the server's certificate is refused: {}",
                   peer_, when, X509_verify_cert_error_string(v));
    }
    if (e == SSL_ERROR_ZERO_RETURN) {
      return Error(ECONNRESET, "TLS with {} closed by the server ({})", peer_, when);
    }
    return Error(EACCES, "TLS with {} failed ({}): {}", peer_, when,
                 OpenSslReason("the connection broke"));
  }

  int fd_;
  std::string peer_;
  Clock::time_point deadline_;
  SslPtr ssl_;
  bool tls_confirmed_ = false;  // the server has said something inside TLS
};

struct OptionReply {
  uint32_t type;
  std::vector<uint8_t> data;
};

Status SendOption(Wire& w, uint32_t opt, const std::vector<uint8_t>& payload) {
  std::vector<uint8_t> m(nbd::kOptionHeaderLen + payload.size());
  nbd::StoreBE64(m.data(), nbd::kIHaveOpt);
  nbd::StoreBE32(m.data() + 8, opt);
  nbd::StoreBE32(m.data() + 12, static_cast<uint32_t>(payload.size()));
  std::copy(payload.begin(), payload.end(), m.begin() + nbd::kOptionHeaderLen);
  return w.Send(m);
}

StatusOr<OptionReply> ReadReply(Wire& w, uint32_t opt) {
  uint8_t h[nbd::kOptionReplyHeaderLen];
  if (Status s = w.Recv(h, sizeof h); !s.ok()) return s;
  if (nbd::LoadBE64(h) != nbd::kOptReplyMagic) {
    return Error(EPROTO, "{}: bad option reply magic {:#x} (not an NBD server?)", w.peer(),
                 nbd::LoadBE64(h));
  }
  const uint32_t got = nbd::LoadBE32(h + 8);
  if (got != opt) {
    return Error(EPROTO, "{}: reply to option {} while waiting for {}", w.peer(), got,
                 OptionName(opt));
  }
  OptionReply r{nbd::LoadBE32(h + 12), {}};
  const uint32_t len = nbd::LoadBE32(h + 16);
  if (len > kMaxOptionReplyLen) {
    return Error(EPROTO, "{}: {} reply of {} bytes (at most {} accepted)", w.peer(),
                 OptionName(opt), len, kMaxOptionReplyLen);
  }
  r.data.resize(len);
  if (len > 0) {
    if (Status s = w.Recv(r.data.data(), len); !s.ok()) return s;
  }
  return r;
}

std::string ErrorText(const OptionReply& r) {
  std::string msg =
      PrintableText(std::string_view(reinterpret_cast<const char*>(r.data.data()), r.data.size()));
  return msg.empty() ? fmt::format("error {:#x}", r.type) : msg;
}

// The errno for an error reply to an option; the stale-epoch refusal by its message, because
// the fencing contract fixes the message and not the error type.
int OptionErrno(const OptionReply& r) {
  const std::string_view msg(reinterpret_cast<const char*>(r.data.data()), r.data.size());
  if (msg.starts_with(kStaleEpochMessage)) return ESTALE;
  switch (r.type) {
    case nbd::kRepErrUnknown:
      return ENOENT;
    case nbd::kRepErrPolicy:
    case nbd::kRepErrTlsReqd:
      return EACCES;
    case nbd::kRepErrUnsup:
      return ENOTSUP;
    case nbd::kRepErrShutdown:
      return ESHUTDOWN;
    case nbd::kRepErrTooBig:
      return ENAMETOOLONG;
    default:
      return EPROTO;
  }
}

// NBD_OPT_SET_META_CONTEXT for base:allocation on `name`. A server that refuses the option or
// does not know the context is not an error: the export simply has no BLOCK_STATUS (the caller
// copies everything). A broken reply is.
Status SelectBaseAllocation(Wire& w, const std::string& name, ExportProperties* props) {
  std::vector<uint8_t> q(4 + name.size() + 4 + 4 + nbd::kMetaBaseAllocation.size());
  uint8_t* p = q.data();
  nbd::StoreBE32(p, static_cast<uint32_t>(name.size()));
  std::copy(name.begin(), name.end(), p + 4);
  p += 4 + name.size();
  nbd::StoreBE32(p, 1);
  nbd::StoreBE32(p + 4, static_cast<uint32_t>(nbd::kMetaBaseAllocation.size()));
  std::copy(nbd::kMetaBaseAllocation.begin(), nbd::kMetaBaseAllocation.end(), p + 8);
  if (Status s = SendOption(w, nbd::kOptSetMetaContext, q); !s.ok()) return s;
  bool have = false;
  uint32_t id = 0;
  for (int i = 0;; ++i) {
    if (i == kMaxRepliesPerOption) {
      return Error(EPROTO, "{}: more than {} replies to NBD_OPT_SET_META_CONTEXT", w.peer(), i);
    }
    auto r = ReadReply(w, nbd::kOptSetMetaContext);
    if (!r.ok()) return r.status();
    if (r->type & nbd::kRepFlagError) {
      return Status::Ok();  // e.g. NBD_REP_ERR_UNSUP; a refused export is GO's to report
    }
    if (r->type == nbd::kRepAck) {
      if (!r->data.empty()) {
        return Error(EPROTO, "{}: NBD_OPT_SET_META_CONTEXT ACK with data", w.peer());
      }
      break;
    }
    if (r->type != nbd::kRepMetaContext || r->data.size() < 4) {
      return Error(EPROTO, "{}: unexpected reply type {:#x} of {} bytes to SET_META_CONTEXT",
                   w.peer(), r->type, r->data.size());
    }
    const std::string_view ctx(reinterpret_cast<const char*>(r->data.data()) + 4,
                               r->data.size() - 4);
    // We asked for one context: a server naming another, or the same twice, is confused.
    if (ctx != nbd::kMetaBaseAllocation || have) {
      return Error(EPROTO, "{}: SET_META_CONTEXT answered with context \"{}\"", w.peer(),
                   PrintableText(ctx));
    }
    have = true;
    id = nbd::LoadBE32(r->data.data());
  }
  props->base_allocation = have;
  props->base_allocation_id = id;
  return Status::Ok();
}

// The greeting and the client flags: a fixed-newstyle server, or an error.
Status Greet(Wire& w) {
  uint8_t greet[nbd::kGreetingLen];
  if (Status s = w.Recv(greet, sizeof greet); !s.ok()) return s;
  if (nbd::LoadBE64(greet) != nbd::kNbdMagic || nbd::LoadBE64(greet + 8) != nbd::kIHaveOpt) {
    return Error(EPROTO, "{} is not a newstyle NBD server (greeting {:#x} {:#x})", w.peer(),
                 nbd::LoadBE64(greet), nbd::LoadBE64(greet + 8));
  }
  const uint16_t hflags = nbd::LoadBE16(greet + 16);
  if ((hflags & nbd::kHandshakeFlagFixedNewstyle) == 0) {
    return Error(ENOTSUP, "{} does not speak fixed newstyle NBD (it cannot report errors)",
                 w.peer());
  }
  // NO_ZEROES only matters to NBD_OPT_EXPORT_NAME, which we never send; echo it when offered.
  uint8_t cflags[4];
  nbd::StoreBE32(cflags, nbd::kClientFlagFixedNewstyle |
                             (hflags & nbd::kHandshakeFlagNoZeroes ? nbd::kClientFlagNoZeroes : 0));
  return w.Send(cflags, sizeof cflags);
}

// NBD_OPT_STARTTLS, the TLS handshake, and the server's identity.
Status UpgradeToTls(Wire& w, const ClientTlsContext& tls, const std::string& host) {
  if (Status s = SendOption(w, nbd::kOptStartTls, {}); !s.ok()) return s;
  auto r = ReadReply(w, nbd::kOptStartTls);
  if (!r.ok()) return r.status();
  if (r->type != nbd::kRepAck) {
    return Error(r->type == nbd::kRepErrPolicy || r->type == nbd::kRepErrUnsup ? ENOTSUP : EPROTO,
                 "{} refused NBD_OPT_STARTTLS ({}): the server does not offer TLS", w.peer(),
                 ErrorText(*r));
  }
  auto ssl = tls.NewSession(host);
  if (!ssl.ok()) return ssl.status();
  if (Status s = w.StartTls(std::move(*ssl)); !s.ok()) return s;
  if (Status s = tls.CheckServerIdentity(w.ssl()); !s.ok()) {
    return Error(s.code(), "TLS with {}: {}", w.peer(), s.message());
  }
  return Status::Ok();
}

// NBD_OPT_STRUCTURED_REPLY, which the client cannot do without.
Status RequireStructuredReplies(Wire& w) {
  if (Status s = SendOption(w, nbd::kOptStructuredReply, {}); !s.ok()) return s;
  auto sr = ReadReply(w, nbd::kOptStructuredReply);
  if (!sr.ok()) return sr.status();
  if (sr->type == nbd::kRepErrTlsReqd) {
    return Error(EACCES, "{} requires TLS and none is configured ({})", w.peer(), ErrorText(*sr));
  }
  if (sr->type != nbd::kRepAck) {
    return Error(ENOTSUP,
                 "{} refused structured replies ({}); the replica client needs them to tell a "
                 "failed read from a short one",
                 w.peer(), ErrorText(*sr));
  }
  return Status::Ok();
}

// One NBD_REP_INFO reply to NBD_OPT_GO into `props`; `have_export` is set by NBD_INFO_EXPORT.
Status ApplyInfo(Wire& w, const std::vector<uint8_t>& data, ExportProperties* props,
                 bool* have_export) {
  if (data.size() < 2) return Error(EPROTO, "{}: empty NBD_REP_INFO", w.peer());
  const uint8_t* d = data.data();
  switch (nbd::LoadBE16(d)) {
    case nbd::kInfoExport:
      if (data.size() != 12) return Error(EPROTO, "{}: NBD_INFO_EXPORT of bad size", w.peer());
      props->size = nbd::LoadBE64(d + 2);
      props->flags = nbd::LoadBE16(d + 10);
      *have_export = true;
      return Status::Ok();
    case nbd::kInfoBlockSize: {
      if (data.size() != 14) {
        return Error(EPROTO, "{}: NBD_INFO_BLOCK_SIZE of bad size", w.peer());
      }
      const uint32_t mn = nbd::LoadBE32(d + 2), pref = nbd::LoadBE32(d + 6),
                     mx = nbd::LoadBE32(d + 10);
      const auto pow2 = [](uint32_t v) { return v != 0 && (v & (v - 1)) == 0; };
      if (!pow2(mn) || mn > 65536 || !pow2(pref) || pref < mn || mx < mn) {
        return Error(EPROTO, "{}: impossible block sizes min {} preferred {} max {}", w.peer(), mn,
                     pref, mx);
      }
      props->min_block = mn;
      props->preferred_block = pref;
      props->max_block = std::min<uint32_t>(mx, nbd::kMaxPayload);
      return Status::Ok();
    }
    default:
      return Status::Ok();  // NAME, DESCRIPTION and future types carry nothing we need
  }
}

// NBD_OPT_GO for `name` with an NBD_INFO_BLOCK_SIZE request, its INFO replies into `props`.
Status Go(Wire& w, const std::string& name, ExportProperties* props) {
  std::vector<uint8_t> go(4 + name.size() + 2 + 2);
  nbd::StoreBE32(go.data(), static_cast<uint32_t>(name.size()));
  std::copy(name.begin(), name.end(), go.begin() + 4);
  nbd::StoreBE16(go.data() + 4 + name.size(), 1);
  nbd::StoreBE16(go.data() + 6 + name.size(), nbd::kInfoBlockSize);
  if (Status s = SendOption(w, nbd::kOptGo, go); !s.ok()) return s;
  bool have_export = false;
  for (int i = 0;; ++i) {
    if (i == kMaxRepliesPerOption) {
      return Error(EPROTO, "{}: more than {} replies to NBD_OPT_GO", w.peer(), i);
    }
    auto r = ReadReply(w, nbd::kOptGo);
    if (!r.ok()) return r.status();
    if (r->type & nbd::kRepFlagError) {
      return Error(OptionErrno(*r), "{} refused export \"{}\": {}", w.peer(), PrintableText(name),
                   ErrorText(*r));
    }
    if (r->type == nbd::kRepAck) {
      if (!r->data.empty()) return Error(EPROTO, "{}: NBD_OPT_GO ACK with data", w.peer());
      break;
    }
    if (r->type != nbd::kRepInfo) {
      return Error(EPROTO, "{}: unexpected reply type {:#x} to NBD_OPT_GO", w.peer(), r->type);
    }
    if (Status s = ApplyInfo(w, r->data, props, &have_export); !s.ok()) return s;
  }
  if (!have_export)
    return Error(EPROTO, "{}: NBD_OPT_GO succeeded without NBD_INFO_EXPORT", w.peer());
  return Status::Ok();
}

// The transmission flags the export must carry: HAS_FLAGS, and for writing FLUSH and FUA.
Status CheckTransmissionFlags(Wire& w, const std::string& name, bool read_only,
                              const ExportProperties& props) {
  if ((props.flags & nbd::kFlagHasFlags) == 0) {
    return Error(EPROTO, "{}: transmission flags without HAS_FLAGS", w.peer());
  }
  if (read_only) return Status::Ok();
  if (props.read_only()) {
    return Error(EROFS, "{}: export \"{}\" is read-only", w.peer(), PrintableText(name));
  }
  // A replica acknowledges a write as durable only if FUA and FLUSH reach its disk.
  if ((props.flags & (nbd::kFlagSendFlush | nbd::kFlagSendFua)) !=
      (nbd::kFlagSendFlush | nbd::kFlagSendFua)) {
    return Error(ENOTSUP, "{}: export \"{}\" does not accept FLUSH and FUA (flags {:#x})", w.peer(),
                 PrintableText(name), props.flags);
  }
  return Status::Ok();
}

Status Negotiate(Wire& w, const std::string& name, const ClientTlsContext* tls,
                 const std::string& host, bool read_only, bool base_allocation,
                 ExportProperties* props) {
  if (Status s = Greet(w); !s.ok()) return s;
  if (tls) {
    if (Status s = UpgradeToTls(w, *tls, host); !s.ok()) return s;
  }
  if (Status s = RequireStructuredReplies(w); !s.ok()) return s;
  if (base_allocation) {
    if (Status s = SelectBaseAllocation(w, name, props); !s.ok()) return s;
  }
  if (Status s = Go(w, name, props); !s.ok()) return s;
  return CheckTransmissionFlags(w, name, read_only, *props);
}

StatusOr<int> Dial(const Endpoint& ep, Clock::time_point deadline, const std::string& peer) {
  std::vector<std::pair<sockaddr_storage, socklen_t>> addrs;
  if (ep.kind == Endpoint::Kind::kUnix) {
    sockaddr_un sa{};
    sa.sun_family = AF_UNIX;
    if (ep.path.size() >= sizeof sa.sun_path) {
      return Error(ENAMETOOLONG, "{}: socket path too long", peer);
    }
    std::memcpy(sa.sun_path, ep.path.c_str(), ep.path.size() + 1);
    sockaddr_storage ss{};
    std::memcpy(&ss, &sa, sizeof sa);
    addrs.emplace_back(ss, static_cast<socklen_t>(sizeof sa));
  } else {
    addrinfo hints{};
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_NUMERICSERV;
    addrinfo* res = nullptr;
    const int g = getaddrinfo(ep.host.c_str(), std::to_string(ep.port).c_str(), &hints, &res);
    if (g != 0)
      return Error(EHOSTUNREACH, "{}: cannot resolve {}: {}", peer, ep.host, gai_strerror(g));
    for (addrinfo* a = res; a; a = a->ai_next) {
      sockaddr_storage ss{};
      std::memcpy(&ss, a->ai_addr, a->ai_addrlen);
      addrs.emplace_back(ss, a->ai_addrlen);
    }
    freeaddrinfo(res);
  }
  Status last = Error(EHOSTUNREACH, "{}: no address", peer);
  for (auto& [ss, len] : addrs) {
    const int fd = socket(ss.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) return Error(errno, "socket: {}", strerror(errno));
    int err = 0;
    if (connect(fd, reinterpret_cast<sockaddr*>(&ss), len) != 0) {
      err = errno;
      if (err == EINPROGRESS) {
        const auto left =
            std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
        pollfd p{fd, POLLOUT, 0};
        const int r =
            left > 0 ? poll(&p, 1, static_cast<int>(std::min<long long>(left, INT_MAX))) : 0;
        socklen_t sl = sizeof err;
        if (r <= 0) {
          err = ETIMEDOUT;
        } else if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &sl) != 0) {
          err = errno;
        }
      }
    }
    if (err == 0) {
      if (ep.kind == Endpoint::Kind::kTcp) {
        const int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
      }
      return fd;
    }
    close(fd);
    last = Error(err, "connect to {}: {}", peer, strerror(err));
  }
  return last;
}

}  // namespace

StatusOr<OpenedConnection> OpenConnection(const Endpoint& ep, const std::string& wire_name,
                                          const ClientTlsContext* tls, bool read_only,
                                          Clock::time_point deadline, bool base_allocation) {
  const std::string peer = ep.ToString();
  auto fd = Dial(ep, deadline, peer);
  if (!fd.ok()) return fd.status();
  Wire w(*fd, peer, deadline);
  OpenedConnection c;
  const std::string host = ep.kind == Endpoint::Kind::kTcp ? ep.host : std::string();
  if (Status s = Negotiate(w, wire_name, tls, host, read_only, base_allocation, &c.props);
      !s.ok()) {
    close(*fd);
    return s;
  }
  c.fd = *fd;
  c.ssl = w.TakeSsl();
  return c;
}

}  // namespace nbdcsi::replica
