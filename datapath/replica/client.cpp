#include "datapath/replica/client.h"

#include <liburing.h>
#include <openssl/err.h>
#include <pthread.h>
#include <signal.h>
#include <spdlog/spdlog.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstring>
#include <deque>
#include <mutex>
#include <thread>
#include <vector>

#include "common/openssl_util.h"
#include "datapath/engine/uring_sqe.h"
#include "datapath/nbd/codec.h"
#include "datapath/replica/nbd_errors.h"
#include "datapath/replica/reply_parser.h"

namespace nbdcsi::replica {
namespace {

using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

constexpr size_t kRxBytes = 256 * 1024;  // plaintext replies waiting to be parsed
constexpr size_t kNetBytes = 64 * 1024;  // TLS: ciphertext from one recv
constexpr size_t kMaxBatch = 64;         // requests per send
constexpr size_t kMaxBatchBytes = 8u << 20;
constexpr milliseconds kTick(100);  // timeout granularity while requests are in flight

enum Op : uint64_t { kOpRecv = 1, kOpSend = 2, kOpWake = 3 };
uint64_t Tag(size_t conn, Op op) { return (uint64_t{conn} << 8) | op; }

// The client whose io thread this is (null elsewhere): a callback that submits more requests
// needs no wake-up, and one that calls Close() is a bug we can name.
thread_local const void* tls_io_thread_of = nullptr;

}  // namespace

StatusOr<std::string> WireExportName(const std::string& export_name, uint64_t epoch) {
  if (export_name.find('\0') != std::string::npos) {
    return Error(EINVAL, "export name contains a NUL byte");
  }
  if (export_name.find("@epoch=") != std::string::npos) {
    return Error(EINVAL, "export name \"{}\" already names an epoch; pass the epoch separately",
                 export_name);
  }
  std::string wire = epoch > 0 ? fmt::format("{}@epoch={}", export_name, epoch) : export_name;
  if (wire.size() > nbd::kMaxStringLen) {
    return Error(EINVAL, "export name of {} bytes (at most {})", wire.size(), nbd::kMaxStringLen);
  }
  return wire;
}

// One request, from the submit call to its callback. The states are implied by the fields and
// checked where they change: queued (conn < 0) -> assigned to a connection with a cookie
// (slot held) -> its bytes in a send (in_send, plaintext only: the kernel reads the caller's
// buffer) -> reply complete (reply_done, slot freed). It completes when the reply is done and
// no send still holds its buffer, exactly once.
struct Request : ReplyState {
  uint16_t flags = 0;
  const uint8_t* write_buf = nullptr;
  Callback cb;
  BlockStatusCallback bs_cb;     // BLOCK_STATUS: called instead of cb, with the extents
  std::vector<BlockExtent> ext;  // BLOCK_STATUS: filled by the parser (extents points here)
  Clock::time_point deadline = Clock::time_point::max();
  Request* parent = nullptr;  // a FLUSH sent on every connection: the caller's request
  int children = 0;
  int conn = -1;
  bool on_wire = false;  // its header went into a send: only now may a reply name its cookie
  bool reply_done = false;
  bool in_send = false;
  bool completed = false;
  uint8_t hdr[nbd::kRequestHeaderLen];
};

struct ReplicaClient::Impl {
  struct Conn : ReplyParser::Table {
    struct Slot {
      Request* req = nullptr;
      uint32_t gen = 0;
    };
    Impl* impl = nullptr;
    size_t index = 0;
    int fd = -1;
    SslPtr ssl;
    bool dead = false;
    int ops = 0;  // SQEs in the kernel; the fd and buffers live until it is 0
    bool recv_armed = false;
    bool send_armed = false;
    std::unique_ptr<uint8_t[]> rx = std::make_unique<uint8_t[]>(kRxBytes);
    size_t rbeg = 0, rend = 0;
    std::unique_ptr<uint8_t[]> net;  // TLS only
    ReplyParser parser;
    std::deque<Request*> queue;   // have a cookie, wait for the next send
    std::vector<Request*> batch;  // in the send in flight (plaintext)
    std::vector<iovec> iov;
    size_t iov_at = 0;
    msghdr msg{};
    std::vector<uint8_t> tx;  // TLS: ciphertext of the send in flight
    size_t tx_at = 0;
    std::vector<Slot> slots;
    std::vector<uint32_t> free_slots;
    uint32_t in_flight = 0;

    ReplyState* Find(uint64_t cookie) override {
      const uint32_t i = static_cast<uint32_t>(cookie);
      if (i >= slots.size() || !slots[i].req || slots[i].gen != (cookie >> 32)) return nullptr;
      // A reply to a request we have not sent yet (a server guessing cookies) is no reply.
      return slots[i].req->on_wire ? slots[i].req : nullptr;
    }
    void Done(uint64_t cookie, ReplyState* r) override {
      auto* req = static_cast<Request*>(r);
      Release(static_cast<uint32_t>(cookie));
      req->reply_done = true;
      impl->MaybeComplete(req);
    }
    void Release(uint32_t i) {
      slots[i].req = nullptr;
      ++slots[i].gen;
      free_slots.push_back(i);
      --in_flight;
    }
  };

  ClientOptions opts;
  std::string name;
  ExportProperties props;
  // The end requests are checked against: props.size, raised by Grow once a fresh handshake saw
  // the export grow (the server checks each request against its volume's live size).
  std::atomic<uint64_t> size{0};
  std::unique_ptr<ClientTlsContext> tls;  // for Grow's handshake
  std::vector<std::unique_ptr<Conn>> conns;
  io_uring ring{};
  bool ring_ok = false;
  int wake_fd = -1;
  uint64_t wake_buf = 0;
  bool wake_armed = false;
  std::thread thread;

  std::mutex mu;
  std::vector<Request*> incoming;    // guarded by mu
  bool closing = false;              // guarded by mu
  Clock::time_point close_deadline;  // guarded by mu
  std::string last_loss;             // guarded by mu
  bool joined = false;               // guarded by close_mu
  std::mutex close_mu;
  std::atomic<bool> wake_pending{false};

  // io thread only
  std::deque<Request*> pending;  // accepted, no connection yet
  std::vector<Request*> taken;
  std::vector<std::pair<uint64_t, int>> cqes;
  size_t rr = 0;
  bool shutting_down = false;
  Clock::time_point next_timeout_check;

  std::atomic<uint64_t> c_requests{0}, c_ok{0}, c_errors{0}, c_timeouts{0}, c_bytes_read{0},
      c_bytes_written{0}, c_in_flight{0}, c_lost{0};
  std::atomic<size_t> healthy{0};

  ~Impl() {
    for (auto& c : conns) {
      if (c->fd >= 0) close(c->fd);
    }
    if (ring_ok) io_uring_queue_exit(&ring);
    if (wake_fd >= 0) close(wake_fd);
  }

  // ---- submission (any thread) ----

  Status Submit(std::unique_ptr<Request> r) {
    if (opts.request_timeout.count() > 0) r->deadline = Clock::now() + opts.request_timeout;
    {
      std::lock_guard lk(mu);
      if (closing) return Error(ESHUTDOWN, "replica {}: the client is closed", name);
      if (healthy.load() == 0) {
        return Error(ENOTCONN, "replica {}: no connection left ({})", name, last_loss);
      }
      incoming.push_back(r.release());
    }
    c_requests.fetch_add(1, std::memory_order_relaxed);
    c_in_flight.fetch_add(1, std::memory_order_relaxed);
    // On the io thread (a callback submitting more) the loop drains incoming before it waits.
    if (tls_io_thread_of != this && !wake_pending.exchange(true)) Wake();
    return Status::Ok();
  }

  void Wake() {
    const uint64_t one = 1;
    [[maybe_unused]] ssize_t w = write(wake_fd, &one, sizeof one);
  }

  Status CheckRange(uint16_t type, uint64_t offset, uint64_t length) const {
    const char* what = CommandName(type);
    if (length == 0) return Error(EINVAL, "replica {}: {} of 0 bytes", name, what);
    if ((type == nbd::kCmdRead || type == nbd::kCmdWrite) && length > props.max_block) {
      return Error(EINVAL, "replica {}: {} of {} bytes (the server takes at most {})", name, what,
                   length, props.max_block);
    }
    if (offset % props.min_block != 0 || length % props.min_block != 0) {
      return Error(EINVAL, "replica {}: {} [{}, +{}) not aligned to the server's {}-byte blocks",
                   name, what, offset, length, props.min_block);
    }
    const uint64_t end = size.load(std::memory_order_acquire);
    if (offset > end || length > end - offset) {
      return Error(type == nbd::kCmdRead || type == nbd::kCmdTrim || type == nbd::kCmdBlockStatus
                       ? EINVAL
                       : ENOSPC,
                   "replica {}: {} [{}, +{}) past the end of the {}-byte export", name, what,
                   offset, length, end);
    }
    if (type != nbd::kCmdRead && type != nbd::kCmdBlockStatus && opts.read_only) {
      return Error(EROFS, "replica {}: opened read-only", name);
    }
    return Status::Ok();
  }

  // ---- the io thread ----

  void Loop() {
    tls_io_thread_of = this;
    for (auto& c : conns) {
      // The handshake may have left decrypted bytes inside the TLS session.
      if (c->ssl) DecryptAndParse(*c);
      ArmRecv(*c);
    }
    for (;;) {
      ArmWake();
      TakeIncoming();
      Dispatch();
      for (auto& c : conns) {
        if (!c->dead) KickSend(*c);
      }
      if (CheckClose()) break;
      WaitAndReap();
      CheckTimeouts();
    }
  }

  void ArmWake() {
    if (wake_armed || shutting_down) return;
    io_uring_sqe* sqe = GetSqe();
    io_uring_prep_read(sqe, wake_fd, &wake_buf, sizeof wake_buf, 0);
    io_uring_sqe_set_data64(sqe, Tag(0, kOpWake));
    wake_armed = true;
  }

  io_uring_sqe* GetSqe() { return datapath::engine::GetSqe(ring); }

  void TakeIncoming() {
    {
      std::lock_guard lk(mu);
      taken.swap(incoming);  // both keep their capacity: no allocation per round
    }
    for (Request* r : taken) pending.push_back(r);
    taken.clear();
  }

  Conn* PickConn() {
    Conn* best = nullptr;
    for (size_t k = 0; k < conns.size(); ++k) {
      Conn* c = conns[(rr + k) % conns.size()].get();
      if (c->dead || c->free_slots.empty()) continue;
      if (!best || c->in_flight < best->in_flight) best = c;
    }
    if (best) rr = best->index + 1;
    return best;
  }

  void Assign(Conn& c, Request* r) {
    const uint32_t i = c.free_slots.back();
    c.free_slots.pop_back();
    c.slots[i] = {r, c.slots[i].gen};
    ++c.in_flight;
    r->conn = static_cast<int>(c.index);
    const uint64_t cookie = (uint64_t{c.slots[i].gen} << 32) | i;
    uint8_t* h = r->hdr;
    nbd::StoreBE32(h, nbd::kRequestMagic);
    nbd::StoreBE16(h + 4, r->flags);
    nbd::StoreBE16(h + 6, r->type);
    nbd::StoreBE64(h + 8, cookie);
    nbd::StoreBE64(h + 16, r->offset);
    nbd::StoreBE32(h + 24, r->type == nbd::kCmdFlush ? 0 : r->length);
    c.queue.push_back(r);
  }

  void Dispatch() {
    while (!pending.empty()) {
      Request* r = pending.front();
      size_t live = 0;
      for (auto& c : conns) live += c->dead ? 0 : 1;
      if (live == 0) {
        pending.pop_front();
        Fail(r, Error(ENOTCONN, "no connection left ({})", LastLoss()));
        continue;
      }
      if (r->type == nbd::kCmdFlush && live > 1 && !props.can_multi_conn()) {
        // Without CAN_MULTI_CONN a FLUSH only covers writes of its own connection.
        bool room = true;
        for (auto& c : conns) room = room && (c->dead || !c->free_slots.empty());
        if (!room) return;
        pending.pop_front();
        for (auto& c : conns) {
          if (c->dead) continue;
          auto* child = new Request;
          child->type = nbd::kCmdFlush;
          child->parent = r;
          child->deadline = r->deadline;
          ++r->children;
          Assign(*c, child);
        }
        continue;
      }
      Conn* c = PickConn();
      if (!c) return;  // every connection is full: wait for replies
      pending.pop_front();
      Assign(*c, r);
    }
  }

  void KickSend(Conn& c) {
    if (c.send_armed || c.dead) return;
    if (c.ssl) {
      c.tx.clear();
      c.tx_at = 0;
      size_t bytes = 0;
      while (!c.queue.empty() && bytes < kMaxBatchBytes) {
        Request* r = c.queue.front();
        c.queue.pop_front();
        r->on_wire = true;
        if (!TlsWrite(c, r->hdr, sizeof r->hdr)) return;
        if (r->type == nbd::kCmdWrite && !TlsWrite(c, r->write_buf, r->length)) return;
        bytes += sizeof r->hdr + (r->type == nbd::kCmdWrite ? r->length : 0);
      }
      // Also whatever the session wants to say by itself (an alert, a key update answer).
      BIO* w = SSL_get_wbio(c.ssl.get());
      const size_t n = BIO_ctrl_pending(w);
      if (n == 0) return;
      c.tx.resize(n);
      BIO_read(w, c.tx.data(), static_cast<int>(n));
      io_uring_sqe* sqe = GetSqe();
      io_uring_prep_send(sqe, c.fd, c.tx.data(), c.tx.size(), MSG_NOSIGNAL);
      io_uring_sqe_set_data64(sqe, Tag(c.index, kOpSend));
    } else {
      if (c.queue.empty()) return;
      c.iov.clear();
      c.iov_at = 0;
      size_t bytes = 0;
      while (!c.queue.empty() && c.batch.size() < kMaxBatch && bytes < kMaxBatchBytes) {
        Request* r = c.queue.front();
        c.queue.pop_front();
        c.iov.push_back({r->hdr, sizeof r->hdr});
        bytes += sizeof r->hdr;
        if (r->type == nbd::kCmdWrite) {
          c.iov.push_back({const_cast<uint8_t*>(r->write_buf), r->length});
          bytes += r->length;
        }
        r->in_send = true;
        r->on_wire = true;
        c.batch.push_back(r);
      }
      PrepSendmsg(c);
    }
    c.send_armed = true;
    ++c.ops;
  }

  void PrepSendmsg(Conn& c) {
    c.msg = {};
    c.msg.msg_iov = c.iov.data() + c.iov_at;
    c.msg.msg_iovlen = std::min<size_t>(c.iov.size() - c.iov_at, IOV_MAX);
    io_uring_sqe* sqe = GetSqe();
    io_uring_prep_sendmsg(sqe, c.fd, &c.msg, MSG_NOSIGNAL);
    io_uring_sqe_set_data64(sqe, Tag(c.index, kOpSend));
  }

  bool TlsWrite(Conn& c, const uint8_t* p, size_t n) {
    while (n > 0) {
      ERR_clear_error();
      const int w = SSL_write(c.ssl.get(), p, static_cast<int>(std::min<size_t>(n, INT_MAX)));
      if (w <= 0) {
        Kill(c, Error(EPROTO, "TLS write failed: {}", OpenSslReason("?")));
        return false;
      }
      p += w;
      n -= static_cast<size_t>(w);
    }
    return true;
  }

  void ArmRecv(Conn& c) {
    if (c.recv_armed || c.dead) return;
    io_uring_sqe* sqe = GetSqe();
    if (c.ssl) {
      if (!c.net) c.net = std::make_unique<uint8_t[]>(kNetBytes);
      io_uring_prep_recv(sqe, c.fd, c.net.get(), kNetBytes, 0);
    } else {
      Compact(c);
      io_uring_prep_recv(sqe, c.fd, c.rx.get() + c.rend, kRxBytes - c.rend, 0);
    }
    io_uring_sqe_set_data64(sqe, Tag(c.index, kOpRecv));
    c.recv_armed = true;
    ++c.ops;
  }

  void Compact(Conn& c) {
    if (c.rbeg == c.rend) {
      c.rbeg = c.rend = 0;
    } else if (c.rbeg > 0 && kRxBytes - c.rend < ReplyParser::kMaxBuffered * 2) {
      std::memmove(c.rx.get(), c.rx.get() + c.rbeg, c.rend - c.rbeg);
      c.rend -= c.rbeg;
      c.rbeg = 0;
    }
  }

  bool Parse(Conn& c) {
    auto used = c.parser.Feed(c.rx.get() + c.rbeg, c.rend - c.rbeg, c);
    if (!used.ok()) {
      Kill(c, used.status());
      return false;
    }
    c.rbeg += *used;
    Compact(c);
    return true;
  }

  void DecryptAndParse(Conn& c) {
    for (;;) {
      Compact(c);
      ERR_clear_error();
      const int r = SSL_read(c.ssl.get(), c.rx.get() + c.rend, static_cast<int>(kRxBytes - c.rend));
      if (r > 0) {
        c.rend += static_cast<size_t>(r);
        if (!Parse(c)) return;
        continue;
      }
      const int e = SSL_get_error(c.ssl.get(), r);
      if (e == SSL_ERROR_WANT_READ) return;
      if (e == SSL_ERROR_ZERO_RETURN) {
        Kill(c, Error(ECONNRESET, "the server closed the TLS session"));
      } else {
        Kill(c, Error(EPROTO, "TLS: {}", OpenSslReason("broken record")));
      }
      return;
    }
  }

  void OnRecv(Conn& c, int res) {
    c.recv_armed = false;
    if (c.dead) return;
    if (res == -EINTR || res == -EAGAIN || res == -ENOBUFS) {
      ArmRecv(c);
      return;
    }
    if (res <= 0) {
      Kill(c, res == 0 ? Error(ECONNRESET, "the server closed the connection")
                       : Error(-res, "recv: {}", strerror(-res)));
      return;
    }
    if (c.ssl) {
      BIO_write(SSL_get_rbio(c.ssl.get()), c.net.get(), res);
      DecryptAndParse(c);
    } else {
      c.rend += static_cast<size_t>(res);
      if (!Parse(c)) return;
    }
    ArmRecv(c);
  }

  void OnSend(Conn& c, int res) {
    c.send_armed = false;
    if (res == -EINTR || res == -EAGAIN) res = 0;  // resend the same bytes
    if (res < 0) {
      Kill(c, Error(-res == EPIPE ? EPIPE : -res, "send: {}", strerror(-res)));
    } else if (c.ssl) {
      c.tx_at += static_cast<size_t>(res);
      if (!c.dead && c.tx_at < c.tx.size()) {
        io_uring_sqe* sqe = GetSqe();
        io_uring_prep_send(sqe, c.fd, c.tx.data() + c.tx_at, c.tx.size() - c.tx_at, MSG_NOSIGNAL);
        io_uring_sqe_set_data64(sqe, Tag(c.index, kOpSend));
        c.send_armed = true;
        ++c.ops;
        return;
      }
    } else {
      size_t n = static_cast<size_t>(res);
      while (n > 0 && c.iov_at < c.iov.size()) {
        iovec& v = c.iov[c.iov_at];
        const size_t k = std::min(n, v.iov_len);
        v.iov_base = static_cast<uint8_t*>(v.iov_base) + k;
        v.iov_len -= k;
        n -= k;
        if (v.iov_len == 0) ++c.iov_at;
      }
      if (!c.dead && c.iov_at < c.iov.size()) {
        PrepSendmsg(c);
        c.send_armed = true;
        ++c.ops;
        return;
      }
    }
    // The batch is out (or will never be): the kernel holds no caller buffer any more.
    std::vector<Request*> done;
    done.swap(c.batch);
    for (Request* r : done) {
      r->in_send = false;
      MaybeComplete(r);
    }
  }

  void WaitAndReap() {
    __kernel_timespec ts{};
    __kernel_timespec* tp = nullptr;
    if (c_in_flight.load(std::memory_order_relaxed) > 0 || shutting_down || closing_now()) {
      ts.tv_nsec = std::chrono::duration_cast<std::chrono::nanoseconds>(kTick).count();
      tp = &ts;
    }
    io_uring_cqe* cqe = nullptr;
    const int r = io_uring_submit_and_wait_timeout(&ring, &cqe, 1, tp, nullptr);
    if (r < 0 && r != -ETIME && r != -EINTR && r != -EBUSY) {
      spdlog::error("replica {}: io_uring wait: {}", name, strerror(-r));
    }
    unsigned head;
    unsigned seen = 0;
    // Copied out first: handlers submit SQEs and may run callbacks, the CQ ring must move on.
    cqes.clear();
    io_uring_for_each_cqe(&ring, head, cqe) {
      cqes.emplace_back(cqe->user_data, cqe->res);
      ++seen;
    }
    io_uring_cq_advance(&ring, seen);
    for (auto [tag, res] : cqes) {
      const Op op = static_cast<Op>(tag & 0xff);
      if (op == kOpWake) {
        wake_armed = false;
        wake_pending.store(false);
        continue;
      }
      Conn& c = *conns[tag >> 8];
      --c.ops;
      if (op == kOpRecv) {
        OnRecv(c, res);
      } else {
        OnSend(c, res);
      }
      ReleaseIfIdle(c);
    }
  }

  bool closing_now() {
    std::lock_guard lk(mu);
    return closing;
  }

  void ReleaseIfIdle(Conn& c) {
    if (c.dead && c.ops == 0 && c.fd >= 0) {
      close(c.fd);
      c.fd = -1;
      c.ssl.reset();
    }
  }

  std::string LastLoss() {
    std::lock_guard lk(mu);
    return last_loss;
  }

  void Kill(Conn& c, const Status& cause) {
    if (c.dead) return;
    c.dead = true;
    const std::string why = fmt::format("connection {} to {} lost: {}", c.index,
                                        opts.endpoint.ToString(), cause.message());
    {
      std::lock_guard lk(mu);
      last_loss = why;
    }
    healthy.fetch_sub(1);
    if (!shutting_down) {
      c_lost.fetch_add(1, std::memory_order_relaxed);
      spdlog::warn("replica {}: {} ({} request(s) in flight on it fail)", name, why, c.in_flight);
    }
    shutdown(c.fd, SHUT_RDWR);  // ends the recv and send in the kernel: their CQEs follow
    const Status fail(cause.code(), why);
    c.queue.clear();
    for (uint32_t i = 0; i < c.slots.size(); ++i) {
      Request* r = c.slots[i].req;
      if (!r) continue;
      c.Release(i);
      r->error = fail;
      r->reply_done = true;
      MaybeComplete(r);
    }
    if (healthy.load() == 0) {
      while (!pending.empty()) {
        Request* r = pending.front();
        pending.pop_front();
        Fail(r, Error(cause.code(), "no connection left ({})", why));
      }
    }
    ReleaseIfIdle(c);
  }

  void Fail(Request* r, Status s) {
    r->error = std::move(s);
    r->reply_done = true;
    MaybeComplete(r);
  }

  void MaybeComplete(Request* r) {
    if (!r->reply_done || r->in_send || r->completed) return;
    r->completed = true;
    if (Request* p = r->parent) {
      if (!r->error.ok() && p->error.ok()) p->error = r->error;
      delete r;
      if (--p->children == 0) {
        p->reply_done = true;
        MaybeComplete(p);
      }
      return;
    }
    Status s = std::move(r->error);
    if (s.ok()) {
      c_ok.fetch_add(1, std::memory_order_relaxed);
      if (r->type == nbd::kCmdRead) c_bytes_read.fetch_add(r->length, std::memory_order_relaxed);
      if (r->type == nbd::kCmdWrite)
        c_bytes_written.fetch_add(r->length, std::memory_order_relaxed);
    } else {
      c_errors.fetch_add(1, std::memory_order_relaxed);
      s = Status(s.code(), fmt::format("replica {}: {} [{}, +{}): {}", name, CommandName(r->type),
                                       r->offset, r->length, s.message()));
    }
    if (r->type == nbd::kCmdBlockStatus) {
      BlockStatusCallback cb = std::move(r->bs_cb);
      std::vector<BlockExtent> ext = s.ok() ? std::move(r->ext) : std::vector<BlockExtent>();
      delete r;
      c_in_flight.fetch_sub(1, std::memory_order_relaxed);
      cb(s, std::move(ext));
      return;
    }
    Callback cb = std::move(r->cb);
    delete r;
    c_in_flight.fetch_sub(1, std::memory_order_relaxed);
    cb(s);
  }

  void CheckTimeouts() {
    if (opts.request_timeout.count() == 0) return;
    const auto now = Clock::now();
    if (now < next_timeout_check) return;
    next_timeout_check = now + kTick / 2;
    for (auto& c : conns) {
      if (c->dead) continue;
      for (auto& slot : c->slots) {
        Request* r = slot.req;
        if (!r || r->deadline > now) continue;
        c_timeouts.fetch_add(1, std::memory_order_relaxed);
        Kill(*c, Error(ETIMEDOUT, "no reply to {} [{}, +{}) within {} ms", CommandName(r->type),
                       r->offset, r->length, opts.request_timeout.count()));
        break;
      }
    }
    for (auto it = pending.begin(); it != pending.end();) {
      if ((*it)->deadline > now) {
        ++it;
        continue;
      }
      Request* r = *it;
      it = pending.erase(it);
      c_timeouts.fetch_add(1, std::memory_order_relaxed);
      Fail(r, Error(ETIMEDOUT, "not sent within {} ms: every connection stayed full",
                    opts.request_timeout.count()));
    }
  }

  // True when the loop may end: closing, everything failed or finished, no SQE outstanding.
  bool CheckClose() {
    Clock::time_point deadline;
    {
      std::lock_guard lk(mu);
      if (!closing) return false;
      deadline = close_deadline;
    }
    if (!shutting_down) {
      const bool idle = pending.empty() && c_in_flight.load() == 0;
      if (!idle && Clock::now() < deadline) return false;
      shutting_down = true;
      for (auto& c : conns) {
        if (c->dead) continue;
        if (c->in_flight == 0 && !c->send_armed) SendDisc(*c);
        Kill(*c, Error(ESHUTDOWN, "the client is closing"));
      }
      while (!pending.empty()) {
        Request* r = pending.front();
        pending.pop_front();
        Fail(r, Error(ESHUTDOWN, "the client is closing"));
      }
      if (wake_armed) Wake();  // completes the eventfd read, so nothing is left in the kernel
    }
    for (auto& c : conns) {
      if (c->ops > 0) return false;
    }
    if (wake_armed) return false;
    // A submit that got in just before Close() may still sit in incoming: it gets its callback.
    TakeIncoming();
    while (!pending.empty()) {
      Request* r = pending.front();
      pending.pop_front();
      Fail(r, Error(ESHUTDOWN, "the client is closing"));
    }
    return true;
  }

  // NBD_CMD_DISC, best effort and non-blocking, so that the server logs a clean goodbye.
  void SendDisc(Conn& c) {
    uint8_t h[nbd::kRequestHeaderLen] = {};
    nbd::StoreBE32(h, nbd::kRequestMagic);
    nbd::StoreBE16(h + 6, nbd::kCmdDisc);
    if (c.ssl) {
      if (SSL_write(c.ssl.get(), h, sizeof h) <= 0) return ERR_clear_error();
      SSL_shutdown(c.ssl.get());  // close_notify
      ERR_clear_error();
      BIO* w = SSL_get_wbio(c.ssl.get());
      std::vector<uint8_t> out(BIO_ctrl_pending(w));
      if (out.empty()) return;
      BIO_read(w, out.data(), static_cast<int>(out.size()));
      [[maybe_unused]] ssize_t n = send(c.fd, out.data(), out.size(), MSG_NOSIGNAL | MSG_DONTWAIT);
    } else {
      [[maybe_unused]] ssize_t n = send(c.fd, h, sizeof h, MSG_NOSIGNAL | MSG_DONTWAIT);
    }
  }
};

ReplicaClient::ReplicaClient(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

ReplicaClient::~ReplicaClient() { Close(); }

StatusOr<std::unique_ptr<ReplicaClient>> ReplicaClient::Connect(const ClientOptions& o) {
  if (o.connections < 1 || o.connections > 64) {
    return Error(EINVAL, "replica client: {} connections (1 to 64)", o.connections);
  }
  if (o.max_in_flight_per_connection < 1 || o.max_in_flight_per_connection > 65536) {
    return Error(EINVAL, "replica client: {} requests in flight per connection (1 to 65536)",
                 o.max_in_flight_per_connection);
  }
  auto wire = WireExportName(o.export_name, o.epoch);
  if (!wire.ok()) return wire.status();
  std::unique_ptr<ClientTlsContext> tls;
  if (o.tls.enabled()) {
    auto t = ClientTlsContext::Load(o.tls);
    if (!t.ok()) return t.status();
    tls = std::move(*t);
  }

  auto impl = std::make_unique<Impl>();
  impl->opts = o;
  impl->name =
      o.name.empty() ? fmt::format("{} on {}", o.export_name, o.endpoint.ToString()) : o.name;
  for (int i = 0; i < o.connections; ++i) {
    auto c = OpenConnection(o.endpoint, *wire, tls.get(), o.read_only,
                            Clock::now() + o.handshake_timeout, o.base_allocation);
    if (!c.ok()) {
      return Status(c.status().code(),
                    fmt::format("replica {}: connection {} of {}: {}", impl->name, i + 1,
                                o.connections, c.status().message()));
    }
    auto conn = std::make_unique<Impl::Conn>();
    conn->impl = impl.get();
    conn->index = static_cast<size_t>(i);
    conn->fd = c->fd;
    conn->ssl = std::move(c->ssl);
    conn->slots.resize(o.max_in_flight_per_connection);
    for (uint32_t s = o.max_in_flight_per_connection; s-- > 0;) conn->free_slots.push_back(s);
    if (i == 0) {
      impl->props = c->props;
    } else if (c->props.size != impl->props.size || c->props.flags != impl->props.flags ||
               c->props.min_block != impl->props.min_block ||
               c->props.max_block != impl->props.max_block ||
               c->props.base_allocation != impl->props.base_allocation ||
               c->props.base_allocation_id != impl->props.base_allocation_id) {
      close(conn->fd);
      return Error(EPROTO,
                   "replica {}: connection {} sees another export (size {} flags {:#x}) "
                   "than connection 1 (size {} flags {:#x})",
                   impl->name, i + 1, c->props.size, c->props.flags, impl->props.size,
                   impl->props.flags);
    }
    impl->conns.push_back(std::move(conn));
  }
  impl->size.store(impl->props.size, std::memory_order_release);
  impl->tls = std::move(tls);
  // Enough entries for a recv and a send per connection, their resubmissions and the wake.
  const unsigned entries = std::max(64u, static_cast<unsigned>(o.connections) * 4 + 8);
  int r = io_uring_queue_init(entries, &impl->ring, 0);
  if (r < 0) return Error(-r, "replica {}: io_uring_queue_init: {}", impl->name, strerror(-r));
  impl->ring_ok = true;
  impl->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (impl->wake_fd < 0)
    return Error(errno, "replica {}: eventfd: {}", impl->name, strerror(errno));
  impl->healthy.store(impl->conns.size());
  Impl* m = impl.get();
  impl->thread = std::thread([m] {
    // OpenSSL never writes to the socket here (memory BIOs), but a send to a peer that is gone
    // must come back as EPIPE on any thread.
    sigset_t s;
    sigemptyset(&s);
    sigaddset(&s, SIGPIPE);
    pthread_sigmask(SIG_BLOCK, &s, nullptr);
    pthread_setname_np(pthread_self(), "nbd-replica");
    m->Loop();
  });
  spdlog::info("replica {}: {} connection(s){}, export {} bytes, flags {:#x}, blocks {}/{}/{}",
               impl->name, o.connections, tls ? " over TLS" : "", impl->props.size,
               impl->props.flags, impl->props.min_block, impl->props.preferred_block,
               impl->props.max_block);
  return std::unique_ptr<ReplicaClient>(new ReplicaClient(std::move(impl)));
}

Status ReplicaClient::Read(uint64_t offset, std::span<uint8_t> buf, Callback cb) {
  Impl& m = *impl_;
  if (Status s = m.CheckRange(nbd::kCmdRead, offset, buf.size()); !s.ok()) return s;
  auto r = std::make_unique<Request>();
  r->type = nbd::kCmdRead;
  r->offset = offset;
  r->length = static_cast<uint32_t>(buf.size());
  r->read_buf = buf.data();
  r->cb = std::move(cb);
  return m.Submit(std::move(r));
}

Status ReplicaClient::Write(uint64_t offset, std::span<const uint8_t> data, bool fua, Callback cb) {
  Impl& m = *impl_;
  if (Status s = m.CheckRange(nbd::kCmdWrite, offset, data.size()); !s.ok()) return s;
  auto r = std::make_unique<Request>();
  r->type = nbd::kCmdWrite;
  r->flags = fua ? nbd::kCmdFlagFua : 0;
  r->offset = offset;
  r->length = static_cast<uint32_t>(data.size());
  r->write_buf = data.data();
  r->cb = std::move(cb);
  return m.Submit(std::move(r));
}

Status ReplicaClient::Flush(Callback cb) {
  Impl& m = *impl_;
  if (m.opts.read_only) return Error(EROFS, "replica {}: opened read-only", m.name);
  auto r = std::make_unique<Request>();
  r->type = nbd::kCmdFlush;
  r->cb = std::move(cb);
  return m.Submit(std::move(r));
}

Status ReplicaClient::Trim(uint64_t offset, uint32_t length, bool fua, Callback cb) {
  Impl& m = *impl_;
  if (!m.props.can_trim())
    return Error(ENOTSUP, "replica {}: the server does not accept TRIM", m.name);
  if (Status s = m.CheckRange(nbd::kCmdTrim, offset, length); !s.ok()) return s;
  auto r = std::make_unique<Request>();
  r->type = nbd::kCmdTrim;
  r->flags = fua ? nbd::kCmdFlagFua : 0;
  r->offset = offset;
  r->length = length;
  r->cb = std::move(cb);
  return m.Submit(std::move(r));
}

Status ReplicaClient::WriteZeroes(uint64_t offset, uint32_t length, bool fua, bool no_hole,
                                  Callback cb) {
  Impl& m = *impl_;
  if (!m.props.can_write_zeroes()) {
    return Error(ENOTSUP, "replica {}: the server does not accept WRITE_ZEROES", m.name);
  }
  if (Status s = m.CheckRange(nbd::kCmdWriteZeroes, offset, length); !s.ok()) return s;
  auto r = std::make_unique<Request>();
  r->type = nbd::kCmdWriteZeroes;
  r->flags =
      static_cast<uint16_t>((fua ? nbd::kCmdFlagFua : 0) | (no_hole ? nbd::kCmdFlagNoHole : 0));
  r->offset = offset;
  r->length = length;
  r->cb = std::move(cb);
  return m.Submit(std::move(r));
}

Status ReplicaClient::BlockStatus(uint64_t offset, uint32_t length, BlockStatusCallback cb) {
  Impl& m = *impl_;
  if (!m.props.base_allocation) {
    return Error(ENOTSUP, "replica {}: no base:allocation meta context ({})", m.name,
                 m.opts.base_allocation ? "the server has none" : "not asked for at connect");
  }
  if (Status s = m.CheckRange(nbd::kCmdBlockStatus, offset, length); !s.ok()) return s;
  auto r = std::make_unique<Request>();
  r->type = nbd::kCmdBlockStatus;
  r->offset = offset;
  r->length = length;
  r->context_id = m.props.base_allocation_id;
  r->extents = &r->ext;
  r->bs_cb = std::move(cb);
  return m.Submit(std::move(r));
}

void ReplicaClient::Close(milliseconds grace) {
  Impl& m = *impl_;
  if (tls_io_thread_of == &m) {
    // Before close_mu: a Close() in progress on another thread holds it while joining us.
    spdlog::critical("replica {}: Close() called from a callback on its own io thread", m.name);
    std::abort();
  }
  std::lock_guard ck(m.close_mu);
  if (m.joined) return;
  {
    std::lock_guard lk(m.mu);
    if (!m.closing) {
      m.closing = true;
      m.close_deadline = Clock::now() + grace;
    }
  }
  m.Wake();
  if (m.thread.joinable()) m.thread.join();
  m.joined = true;
}

const ExportProperties& ReplicaClient::export_properties() const { return impl_->props; }

uint64_t ReplicaClient::size() const { return impl_->size.load(std::memory_order_acquire); }

StatusOr<uint64_t> ReplicaClient::Grow(uint64_t size) {
  Impl& m = *impl_;
  if (size <= m.size.load(std::memory_order_acquire)) return m.size.load();
  auto wire = WireExportName(m.opts.export_name, m.opts.epoch);
  if (!wire.ok()) return wire.status();
  auto c = OpenConnection(m.opts.endpoint, *wire, m.tls.get(), m.opts.read_only,
                          Clock::now() + m.opts.handshake_timeout, m.opts.base_allocation);
  if (!c.ok()) {
    return Status(c.status().code(), fmt::format("replica {}: a handshake to learn its size: {}",
                                                 m.name, c.status().message()));
  }
  const uint64_t seen = c->props.size;
  // No request was sent: a plain close ends it (the server sees the client go).
  c->ssl.reset();
  close(c->fd);
  if (seen < size) {
    return Error(ENOSPC, "replica {}: its export is {} bytes, less than {}", m.name, seen, size);
  }
  uint64_t now = m.size.load(std::memory_order_acquire);
  while (now < size && !m.size.compare_exchange_weak(now, size, std::memory_order_acq_rel)) {
  }
  spdlog::info("replica {}: requests may now reach {} bytes (its export has {})", m.name, size,
               seen);
  return std::max(now, size);
}
const std::string& ReplicaClient::name() const { return impl_->name; }
size_t ReplicaClient::healthy_connections() const { return impl_->healthy.load(); }

ClientCounters ReplicaClient::counters() const {
  const Impl& m = *impl_;
  ClientCounters c;
  c.requests = m.c_requests.load();
  c.completed_ok = m.c_ok.load();
  c.errors = m.c_errors.load();
  c.timeouts = m.c_timeouts.load();
  c.bytes_read = m.c_bytes_read.load();
  c.bytes_written = m.c_bytes_written.load();
  c.in_flight = m.c_in_flight.load();
  c.connections_lost = m.c_lost.load();
  c.connections_healthy = m.healthy.load();
  return c;
}

}  // namespace nbdcsi::replica
