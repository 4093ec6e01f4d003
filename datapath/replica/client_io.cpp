#include <liburing.h>
#include <openssl/err.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <climits>
#include <cstring>

#include "datapath/replica/client_impl.h"
#include "datapath/replica/nbd_errors.h"

namespace nbdcsi::replica {
namespace client_internal {

thread_local const void* tls_io_thread_of = nullptr;

}  // namespace client_internal

using namespace client_internal;

void ReplicaClient::Impl::Loop() {
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

void ReplicaClient::Impl::ArmWake() {
  if (wake_armed || shutting_down) return;
  io_uring_sqe* sqe = GetSqe();
  io_uring_prep_read(sqe, wake_fd, &wake_buf, sizeof wake_buf, 0);
  io_uring_sqe_set_data64(sqe, Tag(0, kOpWake));
  wake_armed = true;
}

void ReplicaClient::Impl::TakeIncoming() {
  {
    std::lock_guard lk(mu);
    taken.swap(incoming);  // both keep their capacity: no allocation per round
  }
  for (Request* r : taken) pending.push_back(r);
  taken.clear();
}

ReplicaClient::Impl::Conn* ReplicaClient::Impl::PickConn() {
  Conn* best = nullptr;
  for (size_t k = 0; k < conns.size(); ++k) {
    Conn* c = conns[(rr + k) % conns.size()].get();
    if (c->dead || c->free_slots.empty()) continue;
    if (!best || c->in_flight < best->in_flight) best = c;
  }
  if (best) rr = best->index + 1;
  return best;
}

void ReplicaClient::Impl::Assign(Conn& c, Request* r) {
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

void ReplicaClient::Impl::Dispatch() {
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

void ReplicaClient::Impl::KickSend(Conn& c) {
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

void ReplicaClient::Impl::PrepSendmsg(Conn& c) {
  c.msg = {};
  c.msg.msg_iov = c.iov.data() + c.iov_at;
  c.msg.msg_iovlen = std::min<size_t>(c.iov.size() - c.iov_at, IOV_MAX);
  io_uring_sqe* sqe = GetSqe();
  io_uring_prep_sendmsg(sqe, c.fd, &c.msg, MSG_NOSIGNAL);
  io_uring_sqe_set_data64(sqe, Tag(c.index, kOpSend));
}

bool ReplicaClient::Impl::TlsWrite(Conn& c, const uint8_t* p, size_t n) {
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

void ReplicaClient::Impl::ArmRecv(Conn& c) {
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

void ReplicaClient::Impl::Compact(Conn& c) {
  if (c.rbeg == c.rend) {
    c.rbeg = c.rend = 0;
  } else if (c.rbeg > 0 && kRxBytes - c.rend < ReplyParser::kMaxBuffered * 2) {
    std::memmove(c.rx.get(), c.rx.get() + c.rbeg, c.rend - c.rbeg);
    c.rend -= c.rbeg;
    c.rbeg = 0;
  }
}

bool ReplicaClient::Impl::Parse(Conn& c) {
  auto used = c.parser.Feed(c.rx.get() + c.rbeg, c.rend - c.rbeg, c);
  if (!used.ok()) {
    Kill(c, used.status());
    return false;
  }
  c.rbeg += *used;
  Compact(c);
  return true;
}

void ReplicaClient::Impl::DecryptAndParse(Conn& c) {
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

void ReplicaClient::Impl::OnRecv(Conn& c, int res) {
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

void ReplicaClient::Impl::OnSend(Conn& c, int res) {
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

void ReplicaClient::Impl::WaitAndReap() {
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

bool ReplicaClient::Impl::closing_now() {
  std::lock_guard lk(mu);
  return closing;
}

void ReplicaClient::Impl::ReleaseIfIdle(Conn& c) {
  if (c.dead && c.ops == 0 && c.fd >= 0) {
    close(c.fd);
    c.fd = -1;
    c.ssl.reset();
  }
}

std::string ReplicaClient::Impl::LastLoss() {
  std::lock_guard lk(mu);
  return last_loss;
}

void ReplicaClient::Impl::Kill(Conn& c, const Status& cause) {
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

void ReplicaClient::Impl::Fail(Request* r, Status s) {
  r->error = std::move(s);
  r->reply_done = true;
  MaybeComplete(r);
}

void ReplicaClient::Impl::MaybeComplete(Request* r) {
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
    if (r->type == nbd::kCmdWrite) c_bytes_written.fetch_add(r->length, std::memory_order_relaxed);
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

void ReplicaClient::Impl::CheckTimeouts() {
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

bool ReplicaClient::Impl::CheckClose() {
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

void ReplicaClient::Impl::SendDisc(Conn& c) {
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

}  // namespace nbdcsi::replica
