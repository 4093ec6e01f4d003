#include <utility>  // before Asio: GCC 12 needs std::exchange visible for asio/awaitable.hpp

#include "datapath/engine/frontend.h"

#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cstring>
#include <functional>
#include <future>
#include <map>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <thread>
#include <vector>

#include <boost/asio.hpp>
#include <boost/asio/local/stream_protocol.hpp>
#include <spdlog/spdlog.h>

#include "datapath/engine/export_name.h"
#include "datapath/engine/nbd_tls.h"
#include "datapath/engine/worker.h"
#include "datapath/nbd/codec.h"
#include "datapath/nbd/negotiate.h"
#include "datapath/pool/rules.h"

namespace nbdcsi::datapath {
namespace {

namespace asio = boost::asio;
using asio::use_awaitable;
using UnixProto = asio::local::stream_protocol;
using Tcp = asio::ip::tcp;

template <typename Socket>
constexpr bool kIsTcp = std::is_same_v<Socket, Tcp::socket>;

// A TLS handshake or a read/write inside TLS failed; what() says why (for the log).
class TlsFailure : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Repeats a non-blocking OpenSSL step, waiting for the socket as OpenSSL asks, until it is
// done. Throws like asio does for a closed peer (eof) or a closed socket (operation_aborted,
// from the handshake timer or Stop), and TlsFailure for a TLS error.
template <typename Op>
asio::awaitable<size_t> TlsStep(Tcp::socket& s, Op op) {
  for (;;) {
    const TlsIo r = op();
    switch (r.kind) {
      case TlsIo::Kind::kDone:
        co_return r.bytes;
      case TlsIo::Kind::kWantRead:
        co_await s.async_wait(Tcp::socket::wait_read, use_awaitable);
        break;
      case TlsIo::Kind::kWantWrite:
        co_await s.async_wait(Tcp::socket::wait_write, use_awaitable);
        break;
      case TlsIo::Kind::kClosed:
        throw boost::system::system_error(asio::error::eof);
      case TlsIo::Kind::kError:
        throw TlsFailure(r.error);
    }
  }
}

// The handshake's reads and writes: on the socket, or through TLS once STARTTLS is done.
template <typename Socket>
asio::awaitable<void> ReadFull(Socket& s, TlsSession* tls, uint8_t* p, size_t n) {
  if constexpr (kIsTcp<Socket>) {
    if (tls) {
      for (size_t got = 0; got < n;) {
        got += co_await TlsStep(s, [&] { return tls->Read({p + got, n - got}); });
      }
      co_return;
    }
  }
  co_await asio::async_read(s, asio::buffer(p, n), use_awaitable);
}

template <typename Socket>
asio::awaitable<void> WriteFull(Socket& s, TlsSession* tls, const std::vector<uint8_t>& out) {
  if constexpr (kIsTcp<Socket>) {
    if (tls) {
      for (size_t put = 0; put < out.size();) {
        put += co_await TlsStep(
            s, [&] { return tls->Write({out.data() + put, out.size() - put}); });
      }
      co_return;
    }
  }
  co_await asio::async_write(s, asio::buffer(out), use_awaitable);
}

template <typename Socket>
std::string PeerName(const Socket& s) {
  if constexpr (kIsTcp<Socket>) {
    boost::system::error_code ec;
    auto ep = s.remote_endpoint(ec);
    if (!ec) return ep.address().to_string() + ":" + std::to_string(ep.port());
    return "a TCP client";
  } else {
    return "a Unix socket client";
  }
}

// Whether a connection naming `epoch` (0: none) may open a volume fenced at `held`, and if
// not, the message it gets. A volume that was never fenced takes every connection, as before
// fencing existed; once fenced, only its epoch or a newer one (which fences it further).
std::optional<std::string> EpochRefusal(const std::string& volume, uint64_t epoch,
                                        uint64_t held) {
  if (!held) return std::nullopt;
  if (!epoch) {
    return fmt::format("volume {} is fenced at epoch {}: name an epoch ({}{}N)", volume, held,
                       volume, kEpochSuffix);
  }
  if (epoch < held) return fmt::format("stale epoch {}, volume {} is at {}", epoch, volume, held);
  return std::nullopt;
}

constexpr std::string_view kTargetDescription = "nbd-csi replicated volume (target)";

// The backend exports by name (without the suffix). Read by handshakes on the io thread and by
// ServeSocketPairs, changed by Add/RemoveBackendExport from other threads.
class BackendRegistry {
 public:
  Status Add(std::shared_ptr<ExportBackend> backend) {
    const std::string name = backend->name();
    std::lock_guard lk(mu_);
    auto [it, added] = map_.try_emplace(name, nullptr);
    if (!added)
      return Error(EEXIST, "backend export {}{} is already registered", name, kTargetSuffix);
    it->second = std::make_shared<ServedBackend>(std::move(backend));
    return Status::Ok();
  }
  std::shared_ptr<ServedBackend> Find(std::string_view name) const {
    std::lock_guard lk(mu_);
    auto it = map_.find(name);
    return it == map_.end() ? nullptr : it->second;
  }
  std::shared_ptr<ServedBackend> Take(const std::string& name) {
    std::lock_guard lk(mu_);
    auto it = map_.find(name);
    if (it == map_.end()) return nullptr;
    auto served = std::move(it->second);
    map_.erase(it);
    return served;
  }
  std::vector<std::string> ExportNames() const {
    std::lock_guard lk(mu_);
    std::vector<std::string> out;
    for (const auto& [name, served] : map_) out.push_back(name + std::string(kTargetSuffix));
    return out;
  }

 private:
  mutable std::mutex mu_;
  std::map<std::string, std::shared_ptr<ServedBackend>, std::less<>> map_;
};

// What the negotiation of one connection sees of the pool and the backend exports: names,
// sizes, read-only flags, and the epoch rules. One per connection, so a client refused for its
// epoch is logged once however many options it tries.
class ConnCatalog final : public nbd::ExportCatalog {
 public:
  ConnCatalog(Pool& pool, const BackendRegistry& backends, const std::string& peer,
              std::atomic<uint64_t>& refused)
      : pool_(pool), backends_(backends), peer_(peer), refused_(refused) {}
  std::optional<nbd::ExportInfo> Lookup(std::string_view name) override {
    Refusal ignored;
    return Resolve(name, ignored);
  }
  std::optional<nbd::ExportInfo> Resolve(std::string_view name, Refusal& why) override {
    auto parsed = ParseExportName(name);
    if (!parsed.ok()) {
      why = Refusal{nbd::kRepErrInvalid, parsed.status().message()};
      return std::nullopt;
    }
    if (parsed->target) {
      auto served = backends_.Find(parsed->volume);
      if (!served) return std::nullopt;
      return nbd::ExportInfo{std::string(name), served->backend->size(), false,
                             std::string(kTargetDescription)};
    }
    auto v = pool_.Acquire(parsed->volume);
    if (!v) return std::nullopt;
    if (auto refusal = EpochRefusal(v->name(), parsed->epoch, v->fence_epoch())) {
      Refuse(*refusal);
      why = Refusal{nbd::kRepErrPolicy, *refusal};
      return std::nullopt;
    }
    // The canonical name is the name as given: the hand-off parses it again for the
    // connection's mode and epoch.
    if (parsed->growable) {
      return nbd::ExportInfo{std::string(name), kGrowableWindow, v->read_only(),
                             "nbd-csi volume (growable window)"};
    }
    return nbd::ExportInfo{std::string(name), v->size(), v->read_only(), "nbd-csi volume"};
  }
  std::vector<std::string> List() override {
    std::vector<std::string> names = pool_.Names();
    for (auto& n : backends_.ExportNames()) names.push_back(std::move(n));
    return names;
  }

  // Counts and logs (once per connection) a client refused for its epoch.
  void Refuse(const std::string& why) {
    refused_.fetch_add(1, std::memory_order_relaxed);
    if (logged_) return;
    logged_ = true;
    spdlog::warn("nbd: {} refused: {}", peer_, why);
  }

 private:
  Pool& pool_;
  const BackendRegistry& backends_;
  const std::string& peer_;
  std::atomic<uint64_t>& refused_;
  bool logged_ = false;
};

// How a fence that a handshake ran off the io thread ended.
struct FenceOutcome {
  int code = 0;
  std::string message;
};

}  // namespace

struct NbdFrontend::Impl {
  Pool& pool;
  FrontendOptions opts;
  BackendRegistry backends;
  std::atomic<uint64_t> fenced_handshakes{0};
  std::vector<std::unique_ptr<Worker>> workers;
  std::atomic<unsigned> next_worker{0};
  std::vector<std::unique_ptr<TlsTerminator>> terminators;  // only with TLS on a TCP listener
  unsigned next_terminator = 0;                             // io thread only
  std::vector<std::unique_ptr<UnixProto::acceptor>> unix_acceptors;
  std::vector<std::unique_ptr<asio::ip::tcp::acceptor>> tcp_acceptors;
  std::vector<std::string> unix_paths;
  std::map<uint64_t, std::function<void()>> handshakes;  // io thread only
  uint64_t next_handshake = 0;
  std::thread thread;
  std::future<void> loop_done;
  bool started = false;
  bool stopping = false;  // io thread only
  // Declared last, so destroyed first: coroutine frames it still owns reference the members
  // above when they unwind.
  asio::io_context io{1};
  asio::steady_timer reload_timer{io};
  // Fences asked for by handshakes (VOLUME@epoch=N above the volume's epoch) run here: they
  // fsync metadata and wait for the volume's writes to drain, which must not stall the other
  // handshakes on the io thread. Declared after `io`, so it is joined (a fence running to its
  // end) while `io` can still take the fence's completion.
  asio::thread_pool fence_pool{1};

  Impl(Pool& p, FrontendOptions o) : pool(p), opts(o) {}

  template <typename Acceptor>
  asio::awaitable<void> AcceptLoop(Acceptor& acceptor) {
    for (;;) {
      bool backoff = false;
      try {
        auto sock = co_await acceptor.async_accept(use_awaitable);
        nbd::TlsPolicy policy = nbd::TlsPolicy::kNone;
        if constexpr (std::is_same_v<Acceptor, Tcp::acceptor>) {
          sock.set_option(Tcp::no_delay(true));  // small replies must not wait for Nagle
          if (opts.tls) policy = nbd::TlsPolicy::kRequired;
        }
        asio::co_spawn(io, Handshake(std::move(sock), policy), asio::detached);
      } catch (const boost::system::system_error& e) {
        if (e.code() == asio::error::operation_aborted || !acceptor.is_open()) co_return;
        spdlog::warn("nbd: accept failed: {}", e.code().message());
        backoff = true;
      }
      if (backoff) {
        // EMFILE and friends: back off instead of spinning, keep serving.
        asio::steady_timer t(io, std::chrono::milliseconds(100));
        co_await t.async_wait(use_awaitable);
      }
    }
  }

  // Checks the TLS files for a renewal every tls_reload_interval, on this thread, which is the
  // only one that makes sessions from the context.
  asio::awaitable<void> ReloadLoop() {
    for (;;) {
      reload_timer.expires_after(opts.tls_reload_interval);
      boost::system::error_code ec;
      co_await reload_timer.async_wait(asio::redirect_error(use_awaitable, ec));
      if (ec || stopping) co_return;
      opts.tls->ReloadIfChanged();
    }
  }

  // One connection between accept and hand-off. Whatever way Handshake ends (co_return,
  // exception, hand-off), the destructor runs: the client sees its socket closed at once, not
  // when the last copy of `s` happens to go, and Stop() no longer knows the socket.
  template <typename Socket>
  struct Pending {
    Impl& m;
    const uint64_t id;
    const std::shared_ptr<Socket> s;
    const std::string peer;
    asio::steady_timer deadline;
    std::shared_ptr<Volume> vol;
    std::shared_ptr<ServedBackend> served;  // instead of vol, for NAME@target
    ExportName name;       // what the chosen export name asks: volume, mode, epoch
    bool counted = false;  // vol's connection count includes this one; the worker takes it over
    // Set once STARTTLS is done; from then on every byte goes through it.
    std::optional<TlsSession> tls;
    bool tls_up = false;  // tells a failed TLS handshake from a failure inside TLS

    Pending(Impl& impl, Socket sock)
        : m(impl),
          id(impl.next_handshake++),
          s(std::make_shared<Socket>(std::move(sock))),
          peer(PeerName(*s)),
          deadline(impl.io, std::chrono::seconds(impl.opts.handshake_timeout_sec)) {
      // Stop() closes every socket still in the handshake (only this thread touches the map).
      m.handshakes.emplace(id, [s = s] {
        boost::system::error_code ignored;
        s->close(ignored);
      });
      deadline.async_wait([s = s](const boost::system::error_code& ec) {
        if (!ec) {
          spdlog::info("nbd: handshake timed out, closing");
          boost::system::error_code ignored;
          s->close(ignored);
        }
      });
    }
    Pending(const Pending&) = delete;
    Pending& operator=(const Pending&) = delete;
    ~Pending() {
      if (counted) vol->stats().ConnectionClosed();
      deadline.cancel();
      m.handshakes.erase(id);
      boost::system::error_code ignored;
      if (s->is_open()) s->close(ignored);
    }
    TlsSession* session() { return tls ? &*tls : nullptr; }
  };

  template <typename Socket>
  asio::awaitable<void> Handshake(Socket sock, nbd::TlsPolicy policy) {
    Pending<Socket> c(*this, std::move(sock));
    try {
      ConnCatalog catalog(pool, backends, c.peer, fenced_handshakes);
      nbd::Negotiator neg(catalog, policy);
      if (co_await Negotiate(c, neg, catalog)) HandOff(c, neg.result());
    } catch (const boost::system::system_error& e) {
      // EOF or reset mid-handshake: the client left; nothing to clean beyond the socket.
      spdlog::debug("nbd: handshake with {} ended: {}", c.peer, e.code().message());
    } catch (const TlsFailure& e) {
      // Refused certificates land here: the operator needs to see who and why.
      spdlog::info("nbd: {} with {} failed: {}", c.tls_up ? "TLS session" : "TLS handshake",
                   c.peer, e.what());
    }
  }

  // Greeting, client flags, then options until the client picks an export (true) or the
  // handshake ends (false).
  template <typename Socket>
  asio::awaitable<bool> Negotiate(Pending<Socket>& c, nbd::Negotiator& neg,
                                  ConnCatalog& catalog) {
    std::vector<uint8_t> out;
    neg.Greeting(out);
    co_await asio::async_write(*c.s, asio::buffer(out), use_awaitable);
    out.clear();

    uint8_t flags[4];
    co_await asio::async_read(*c.s, asio::buffer(flags), use_awaitable);
    if (!neg.OnClientFlags(nbd::LoadBE32(flags))) {
      spdlog::info("nbd: client flags {:#x} refused, closing", nbd::LoadBE32(flags));
      co_return false;
    }
    std::vector<uint8_t> payload;
    for (;;) {
      uint8_t hdr[16];
      co_await ReadFull(*c.s, c.session(), hdr, sizeof hdr);
      const auto oh = neg.OnOptionHeader(hdr);
      bool drained = false;
      payload.clear();
      switch (oh.action) {
        case nbd::Negotiator::HeaderAction::kClose:
          spdlog::info("nbd: malformed option header (option {}, length {}), closing",
                       oh.option, oh.length);
          co_return false;
        case nbd::Negotiator::HeaderAction::kReadPayload:
          payload.resize(oh.length);
          co_await ReadFull(*c.s, c.session(), payload.data(), payload.size());
          break;
        case nbd::Negotiator::HeaderAction::kDrainThenReply:
          co_await Drain(c, oh.length);
          drained = true;
          break;
      }
      const auto step = neg.OnOption(oh.option, payload, drained, out);
      if (step == nbd::Negotiator::Step::kTransmission &&
          !co_await AcquireVolume(c, neg.result(), oh.option, out, catalog)) {
        // `out` holds the refusal for GO; EXPORT_NAME has no error reply and just closes.
        if (!out.empty()) co_await WriteFull(*c.s, c.session(), out);
        co_return false;
      }
      if (!out.empty()) {
        co_await WriteFull(*c.s, c.session(), out);  // STARTTLS's ACK still goes in plaintext
        out.clear();
      }
      switch (step) {
        case nbd::Negotiator::Step::kContinue:
          break;
        case nbd::Negotiator::Step::kClose:
          co_return false;
        case nbd::Negotiator::Step::kTransmission:
          co_return true;
        case nbd::Negotiator::Step::kStartTls:
          if (!co_await StartTls(c, neg)) co_return false;
          break;
      }
    }
  }

  // An option too long to keep but short enough to answer: read and drop its payload.
  template <typename Socket>
  asio::awaitable<void> Drain(Pending<Socket>& c, uint64_t length) {
    std::array<uint8_t, 64 * 1024> sink;
    for (uint64_t left = length; left;) {
      const size_t n = std::min<uint64_t>(left, sink.size());
      co_await ReadFull(*c.s, c.session(), sink.data(), n);
      left -= n;
    }
  }

  // Counts the connection before the client learns the export is ready, so a delete racing
  // with this handshake either fails with EBUSY or makes Acquire fail here. A client naming an
  // epoch above the volume's fences the volume first (Pool::FenceVolume): when it is let in,
  // no older connection writes any more. On refusal `out` is replaced by the error reply
  // (for GO; empty for EXPORT_NAME, which can only close).
  template <typename Socket>
  asio::awaitable<bool> AcquireVolume(Pending<Socket>& c, const nbd::Negotiated& r,
                                      uint32_t option, std::vector<uint8_t>& out,
                                      ConnCatalog& catalog) {
    auto refuse = [&](uint32_t error, const std::string& why) {
      out.clear();
      if (option == nbd::kOptGo) nbd::EncodeOptionError(out, option, error, why);
    };
    auto parsed = ParseExportName(r.export_info.name);  // Resolve accepted it: cannot fail
    if (!parsed.ok()) {
      refuse(nbd::kRepErrInvalid, parsed.status().message());
      co_return false;
    }
    c.name = std::move(*parsed);
    if (c.name.target) {
      // Held until the hand-off, so RemoveBackendExport waits for this handshake too.
      c.served = backends.Find(c.name.volume);
      if (c.served) co_return true;
      spdlog::info("nbd: backend export {} went away during the handshake", r.export_info.name);
      refuse(nbd::kRepErrUnknown, "unknown export");
      co_return false;
    }
    if (c.name.epoch) {
      auto v = pool.Acquire(c.name.volume);
      if (v && c.name.epoch > v->fence_epoch()) {
        v.reset();
        const FenceOutcome f = co_await Fence(c.name.volume, c.name.epoch);
        if (f.code) {
          if (f.code == ESTALE) catalog.Refuse(f.message);  // a newer target got there first
          else spdlog::error("nbd: {}: fencing for {}: {}", c.peer, r.export_info.name, f.message);
          refuse(f.code == ESTALE ? nbd::kRepErrPolicy : nbd::kRepErrPlatform, f.message);
          co_return false;
        }
      }
    }
    c.vol = pool.Acquire(c.name.volume);
    if (!c.vol) {
      spdlog::info("nbd: volume {} went away during the handshake", r.export_info.name);
      refuse(nbd::kRepErrUnknown, "unknown export");
      co_return false;
    }
    // Fenced further since the name was resolved: refused now, rather than served only to get
    // EPERM for every request.
    if (auto why = EpochRefusal(c.vol->name(), c.name.epoch, c.vol->fence_epoch())) {
      catalog.Refuse(*why);
      refuse(nbd::kRepErrPolicy, *why);
      c.vol.reset();
      co_return false;
    }
    c.vol->stats().ConnectionOpened();
    c.counted = true;
    co_return true;
  }

  // Pool::FenceVolume on fence_pool, awaited by the handshake, which resumes on the io thread
  // (the completion is posted back there: a coroutine of this thread must never be resumed on
  // another). Not a coroutine itself: GCC 12 miscompiles lambdas that capture a coroutine's
  // parameters (the string was freed twice), so the arguments travel through async_initiate.
  auto Fence(std::string volume, uint64_t epoch) {
    return asio::async_initiate<decltype(use_awaitable), void(FenceOutcome)>(
        [this](auto handler, std::string name, uint64_t e) {
          asio::post(fence_pool, [this, name = std::move(name), e,
                                  handler = std::move(handler)]() mutable {
            FenceOutcome out;
            auto r = pool.FenceVolume(name, e);
            if (!r.ok()) out = FenceOutcome{r.status().code(), r.status().message()};
            auto ex = asio::get_associated_executor(handler, io.get_executor());
            asio::post(ex, [handler = std::move(handler), out = std::move(out)]() mutable {
              std::move(handler)(std::move(out));
            });
          });
        },
        use_awaitable, std::move(volume), epoch);
  }

  template <typename Socket>
  asio::awaitable<bool> StartTls(Pending<Socket>& c, nbd::Negotiator& neg) {
    if constexpr (kIsTcp<Socket>) {
      auto session = opts.tls->NewSession(c.s->native_handle());
      if (!session.ok()) {
        spdlog::error("nbd: TLS for {}: {}", c.peer, session.status().message());
        co_return false;
      }
      c.s->native_non_blocking(true);
      c.tls.emplace(std::move(*session));
      co_await TlsStep(*c.s, [&] { return c.tls->Accept(); });
      neg.OnTlsEstablished();
      c.tls_up = true;
      spdlog::debug("nbd: TLS with {}: {}", c.peer, c.tls->Describe());
      co_return true;
    } else {
      co_return false;  // Unix listeners never require TLS, so never accept STARTTLS
    }
  }

  // Gives the negotiated connection to a worker. A TLS connection reaches its worker through a
  // socketpair; a terminator thread carries the bytes between the pair's other end and the TLS
  // session.
  template <typename Socket>
  void HandOff(Pending<Socket>& c, const nbd::Negotiated& r) {
    int fd = -1;
    int terminator_end = -1;
    if (c.tls) {
      int sv[2];
      if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) {
        spdlog::error("nbd: socketpair for the TLS connection of {}: {}", c.peer,
                      std::strerror(errno));
        return;
      }
      terminator_end = sv[0];
      fd = sv[1];
      fcntl(terminator_end, F_SETFL, fcntl(terminator_end, F_GETFL) | O_NONBLOCK);
    }
    c.deadline.cancel();
    c.counted = false;  // the worker owns the count from here
    if (c.tls) {
      const int net = c.s->release();
      const unsigned t = next_terminator++ % terminators.size();
      terminators[t]->Add(std::move(*c.tls), net, terminator_end, c.peer);
    } else {
      fd = c.s->release();
    }
    // The worker's ring waits for readiness itself; a blocking socket keeps short sends and
    // receives from surfacing as EAGAIN completions.
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK);
    const unsigned w = next_worker.fetch_add(1, std::memory_order_relaxed) % workers.size();
    spdlog::debug("nbd: connection to {} (size {}) on worker {}", r.export_info.name,
                  r.export_info.size, w);
    if (c.served) return workers[w]->Adopt(fd, std::move(c.served), r);
    // A target's replica connection (an epoch) follows the volume's size: when a replicated
    // volume grows, its target (replica::ReplicaClient::Grow) goes on over the same connections.
    const SizeMode mode = c.name.growable ? SizeMode::kWindow
                          : c.name.epoch  ? SizeMode::kLive
                                          : SizeMode::kNegotiated;
    workers[w]->Adopt(fd, std::move(c.vol), r, mode, c.name.epoch);
  }
};

NbdFrontend::NbdFrontend(Pool& pool, FrontendOptions opts)
    : impl_(std::make_unique<Impl>(pool, opts)) {}

NbdFrontend::~NbdFrontend() { Stop(); }

Status NbdFrontend::Listen(const Endpoint& ep) {
  Impl& m = *impl_;
  try {
    if (ep.kind == Endpoint::Kind::kUnix) {
      Status st = RemoveStaleUnixSocket(ep.path);
      if (!st.ok()) return st;
      auto a = std::make_unique<UnixProto::acceptor>(m.io);
      a->open();
      // Bind under a tight umask so the socket is never reachable with wider permissions.
      mode_t old = umask(0077);
      boost::system::error_code ec;
      a->bind(UnixProto::endpoint(ep.path), ec);
      umask(old);
      if (ec) return Error(ec.value(), "cannot listen on {}: {}", ep.ToString(), ec.message());
      chmod(ep.path.c_str(), 0600);
      a->listen(asio::socket_base::max_listen_connections);
      m.unix_paths.push_back(ep.path);
      m.unix_acceptors.push_back(std::move(a));
    } else {
      if (!m.opts.tls && !m.opts.insecure_tcp) {
        return Error(EINVAL, "NBD over TCP ({}) needs TLS: give --nbd-tls-cert, --nbd-tls-key "
                             "and --nbd-tls-ca (or --insecure-nbd-tcp for plaintext on a "
                             "trusted network)", ep.ToString());
      }
      asio::ip::tcp::resolver res(m.io);
      auto results = res.resolve(ep.host, std::to_string(ep.port));
      auto a = std::make_unique<asio::ip::tcp::acceptor>(m.io);
      auto endpoint = results.begin()->endpoint();
      a->open(endpoint.protocol());
      a->set_option(asio::socket_base::reuse_address(true));
      a->bind(endpoint);
      a->listen(asio::socket_base::max_listen_connections);
      m.tcp_acceptors.push_back(std::move(a));
    }
  } catch (const boost::system::system_error& e) {
    return Error(e.code().value(), "cannot listen on {}: {}", ep.ToString(), e.code().message());
  }
  if (ep.kind == Endpoint::Kind::kUnix) {
    spdlog::info("nbd: listening on {}", ep.ToString());
  } else if (m.opts.tls) {
    spdlog::info("nbd: listening on {} with TLS required (client certificates verified); "
                 "certificate {}", ep.ToString(), m.opts.tls->summary());
  } else {
    spdlog::warn("nbd: listening on {} WITHOUT TLS (--insecure-nbd-tcp): whoever reaches this "
                 "port can read and write every volume", ep.ToString());
  }
  return Status::Ok();
}

Status NbdFrontend::Start() {
  Impl& m = *impl_;
  for (unsigned i = 0; i < std::max(1u, m.opts.workers); ++i) {
    auto w = std::make_unique<Worker>(static_cast<int>(i), m.opts.worker);
    Status st = w->Start();
    if (!st.ok()) return st;
    m.workers.push_back(std::move(w));
  }
  if (m.opts.tls && !m.tcp_acceptors.empty()) {
    for (unsigned i = 0; i < std::max(1u, m.opts.workers); ++i) {
      auto t = std::make_unique<TlsTerminator>(static_cast<int>(i));
      Status st = t->Start();
      if (!st.ok()) return st;
      m.terminators.push_back(std::move(t));
    }
    asio::co_spawn(m.io, m.ReloadLoop(), asio::detached);
  }
  for (auto& a : m.unix_acceptors) asio::co_spawn(m.io, m.AcceptLoop(*a), asio::detached);
  for (auto& a : m.tcp_acceptors) asio::co_spawn(m.io, m.AcceptLoop(*a), asio::detached);
  std::promise<void> done;
  m.loop_done = done.get_future();
  m.thread = std::thread([&m, done = std::move(done)]() mutable {
    pthread_setname_np(pthread_self(), "nbd-accept");
    BlockSigpipe();  // the TLS handshakes run here
    m.io.run();
    done.set_value();
  });
  m.started = true;
  return Status::Ok();
}

StatusOr<std::vector<int>> NbdFrontend::ServeSocketPairs(const std::string& volume, unsigned n) {
  Impl& m = *impl_;
  if (m.workers.empty()) return Error(EINVAL, "the NBD workers are not running");
  if (n == 0) return Error(EINVAL, "at least one connection is needed");
  std::vector<int> clients;
  std::vector<int> servers;
  auto close_all = [&] {
    for (int fd : clients) close(fd);
    for (int fd : servers) close(fd);
  };
  for (unsigned i = 0; i < n; ++i) {
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) {
      int err = errno;
      close_all();
      return Error(err, "socketpair for volume {}: {}", volume, std::strerror(err));
    }
    clients.push_back(sv[0]);
    servers.push_back(sv[1]);
  }
  if (auto parsed = ParseExportName(volume); parsed.ok() && parsed->target) {
    auto served = m.backends.Find(parsed->volume);
    if (!served) {
      close_all();
      return Error(ENOENT, "backend export {} is not registered", volume);
    }
    nbd::Negotiated neg;
    neg.export_info =
        nbd::ExportInfo{volume, served->backend->size(), false, std::string(kTargetDescription)};
    neg.transmission_flags = nbd::TransmissionFlags(false, false);
    for (int fd : servers) {
      unsigned w = m.next_worker.fetch_add(1, std::memory_order_relaxed) % m.workers.size();
      m.workers[w]->Adopt(fd, served, neg, SizeMode::kLive);
    }
    spdlog::debug("nbd: backend export {} served over {} socketpair(s)", volume, n);
    return clients;
  }
  auto vol = m.pool.Acquire(volume);
  if (!vol) {
    close_all();
    return Error(ENOENT, "volume {} is not exported (missing, or still being copied)", volume);
  }
  // The kernel's connections name no epoch: a fenced volume belongs to its newest target, and
  // a local attach that slipped in would write beside it.
  if (auto why = EpochRefusal(vol->name(), 0, vol->fence_epoch())) {
    close_all();
    m.fenced_handshakes.fetch_add(1, std::memory_order_relaxed);
    return Error(EPERM, "{}", *why);
  }
  nbd::Negotiated neg;
  neg.export_info = nbd::ExportInfo{vol->name(), vol->size(), vol->read_only(), "nbd-csi volume"};
  neg.transmission_flags = nbd::TransmissionFlags(vol->read_only(), false);
  for (int fd : servers) {
    vol->stats().ConnectionOpened();  // the worker owns the count from here, as after a handshake
    unsigned w = m.next_worker.fetch_add(1, std::memory_order_relaxed) % m.workers.size();
    m.workers[w]->Adopt(fd, vol, neg, SizeMode::kLive);
  }
  spdlog::debug("nbd: volume {} served over {} socketpair(s)", volume, n);
  return clients;
}

Status NbdFrontend::AddBackendExport(std::shared_ptr<ExportBackend> backend) {
  if (!backend) return Error(EINVAL, "no backend to export");
  if (Status st = ValidateVolumeName(backend->name()); !st.ok()) {
    return Error(EINVAL, "backend export: {}", st.message());
  }
  const std::string name = backend->name();
  const uint64_t size = backend->size();
  if (Status st = impl_->backends.Add(std::move(backend)); !st.ok()) return st;
  spdlog::info("nbd: backend export {}{} added ({} bytes)", name, kTargetSuffix, size);
  return Status::Ok();
}

Status NbdFrontend::RemoveBackendExport(const std::string& name,
                                        std::chrono::milliseconds timeout) {
  Impl& m = *impl_;
  auto served = m.backends.Take(name);
  if (!served) return Error(ENOENT, "backend export {}{} is not registered", name, kTargetSuffix);
  served->removed.store(true, std::memory_order_release);
  auto gone = served->gone.get_future();
  served.reset();
  for (auto& w : m.workers) w->CloseRemoved();
  if (gone.wait_for(timeout) != std::future_status::ready) {
    spdlog::error(
        "nbd: backend export {}{} removed, but a connection to it still waits for its "
        "backend's completions after {} ms",
        name, kTargetSuffix, timeout.count());
    return Error(ETIMEDOUT,
                 "backend export {}{}: requests still in flight at the backend after "
                 "{} ms",
                 name, kTargetSuffix, timeout.count());
  }
  spdlog::info("nbd: backend export {}{} removed", name, kTargetSuffix);
  return Status::Ok();
}

std::string NbdFrontend::UnixSocketPath() const {
  return impl_->unix_paths.empty() ? std::string() : impl_->unix_paths.front();
}

EngineCounters NbdFrontend::counters() const {
  EngineCounters sum;
  for (const auto& w : impl_->workers) sum += w->counters();
  sum.fenced_handshakes = impl_->fenced_handshakes.load(std::memory_order_relaxed);
  return sum;
}

void NbdFrontend::Stop() {
  Impl& m = *impl_;
  if (m.started) {
    // Everything is closed from the io thread itself: handshakes in progress see their socket
    // closed (their clients get EOF), their coroutines unwind normally, and the loop runs out of
    // work. If something still lingers after two seconds, the loop is stopped outright.
    asio::post(m.io, [&m] {
      m.stopping = true;
      m.reload_timer.cancel();
      boost::system::error_code ignored;
      for (auto& a : m.unix_acceptors) a->close(ignored);
      for (auto& a : m.tcp_acceptors) a->close(ignored);
      for (auto& [id, close] : m.handshakes) close();
    });
    if (m.loop_done.wait_for(std::chrono::seconds(2)) != std::future_status::ready) {
      spdlog::warn("nbd: front door did not wind down in 2 s; stopping it");
      m.io.stop();
    }
    if (m.thread.joinable()) m.thread.join();
    m.started = false;
  }
  for (auto& w : m.workers) w->Stop();
  m.workers.clear();
  // After the workers: their closing ends are what lets each TLS connection finish (the last
  // replies are encrypted and sent, then close_notify).
  for (auto& t : m.terminators) t->Stop(std::chrono::seconds(2));
  m.terminators.clear();
  m.unix_acceptors.clear();
  m.tcp_acceptors.clear();
  for (const auto& p : m.unix_paths) unlink(p.c_str());
  m.unix_paths.clear();
}

}  // namespace nbdcsi::datapath
