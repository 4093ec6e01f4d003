// The engine worker's ring loop and every request's path through it (worker_impl.h says how the
// worker is split): receive, QoS, execute on the volume's files or hand to a backend, reply.
// Everything one request goes through is in this one translation unit, with the inline hints it
// had before the split, so the split costs the hot path no call.
#include <linux/falloc.h>

#include <cstring>

#include "datapath/engine/extents.h"
#include "datapath/engine/worker_impl.h"

namespace nbdcsi::datapath {

using namespace worker_internal;

// ---- the ring loop ----------------------------------------------------------------------------

// How long the ring may sleep: until the earliest throttled request is due, and never longer
// than kThrottleRecheckNs while any waits (limits may change). -1: no timeout.
NBDCSI_WORKER_INLINE int64_t Worker::Impl::ThrottleWaitNs() {
  if (throttled.empty()) return -1;
  uint64_t now = MonotonicNowNs();
  uint64_t wait = kThrottleRecheckNs;
  for (uint64_t v : throttled) {
    Slot* s = ResolveSlot(Tag::Decode(v));
    if (s) wait = std::min(wait, s->due_ns > now ? s->due_ns - now : 0);
  }
  return static_cast<int64_t>(wait);
}

void Worker::Impl::Run() {
  self->running_.store(true, std::memory_order_relaxed);
  ArmWake();
  bool wake_armed = true;
  for (;;) {
    io_uring_cqe* cqe = nullptr;
    int r;
    int64_t wait = ThrottleWaitNs();
    if (wait >= 0) {
      __kernel_timespec ts{static_cast<long long>(wait / 1000000000),
                           static_cast<long long>(wait % 1000000000)};
      r = io_uring_submit_and_wait_timeout(&ring, &cqe, 1, &ts, nullptr);
    } else {
      r = io_uring_submit_and_wait(&ring, 1);
    }
    if (r < 0 && r != -ETIME && r != -EINTR && r != -EAGAIN && r != -EBUSY) {
      spdlog::critical("worker {}: io_uring wait failed: {}", index, strerror(-r));
      std::abort();  // a broken ring cannot serve anyone; the supervisor restarts us
    }
    unsigned head;
    unsigned seen = 0;
    io_uring_for_each_cqe(&ring, head, cqe) {
      ++seen;
      if (!Dispatch(Tag::Decode(io_uring_cqe_get_data64(cqe)), cqe->res)) wake_armed = false;
    }
    io_uring_cq_advance(&ring, seen);
    RunThrottled();
    PublishGauges();
    if (stopping.load(std::memory_order_acquire) && live == 0) {
      if (!wake_armed) break;
      // The wake read stayed armed for backend completions while connections were left
      // (OnWake): complete it, so the loop ends with nothing of ours in the ring.
      if (!stop_wake_sent) {
        stop_wake_sent = true;
        uint64_t one = 1;
        if (write(efd, &one, sizeof one) < 0) {  // eventfd writes only fail on overflow
        }
      }
    }
  }
  self->running_.store(false, std::memory_order_relaxed);
  std::lock_guard lk(mu);
  exited = true;
  for (auto& in : incoming) in.Refuse();
  incoming.clear();
}

// One completion to its handler. Returns false only when the wake-up read was not re-armed.
NBDCSI_WORKER_INLINE bool Worker::Impl::Dispatch(const Tag& t, int res) {
  switch (t.kind) {
    case TagKind::kWake:
      return OnWake(res);
    case TagKind::kCancel:
      return true;  // the outcome shows on the cancelled SQE's own completion
    case TagKind::kRecv:
      if (Connection* c = ResolveConn(t)) OnRecv(c, res);
      return true;
    case TagKind::kSend:
      if (Connection* c = ResolveConn(t)) OnSend(c, res);
      return true;
    case TagKind::kIo:
      if (Slot* s = ResolveSlot(t)) OnIo(s, res);
      return true;
  }
  Check(false, "completion with unknown kind {}", static_cast<int>(t.kind));
  return true;
}

// CheckRequest against the size this connection's mode says (see SizeMode).
NBDCSI_WORKER_INLINE proto::RequestCheck Worker::Impl::CheckSized(Connection* c,
                                                                  const proto::RequestHeader& h) {
  if (c->size_mode == SizeMode::kLive)
    c->params.export_size = c->vol ? c->vol->size() : c->backend->size();
  proto::RequestCheck chk = proto::CheckRequest(h, c->params);
  if (chk.nbd_error || c->size_mode != SizeMode::kWindow) return chk;
  // Inside the window: only reads may go past the volume's end (the file reads as zeroes
  // there). The subtraction form cannot wrap, as in CheckRequest.
  const uint64_t size = c->vol->size();
  const bool past = h.offset > size || h.length > size - h.offset;
  if (!past || h.type == proto::kCmdRead || h.type == proto::kCmdFlush) return chk;
  const bool writes = h.type == proto::kCmdWrite || h.type == proto::kCmdWriteZeroes ||
                      h.type == proto::kCmdTrim;
  chk.nbd_error = writes ? proto::kErrNoSpc : proto::kErrInval;
  return chk;
}

// ---- slots --------------------------------------------------------------------------------

NBDCSI_WORKER_INLINE Slot* Worker::Impl::TakeSlot(Connection* c, const proto::RequestHeader& h) {
  Slot* s = c->free_list;
  c->free_list = s->next;
  s->next = nullptr;
  Move(s, SlotState::kNew);
  s->gen = NextGen();
  s->h = h;
  s->step = Slot::Step::kMain;
  s->done = 0;
  s->charged = 0;
  s->nbd_error = 0;
  s->hdr_len = 0;
  s->data_len = 0;
  s->throttled_since = 0;
  s->gate_held = false;
  s->orphan = false;
  s->start_ns = MonotonicNowNs();
  ++c->busy_slots;
  if (c->stats) c->stats->RequestStarted(index);  // this worker's own shard: no shared line
  return s;
}

// Back to the free list: after its reply was sent, or because its connection was aborted.
void Worker::Impl::ReleaseSlot(Slot* s, bool abort) {
  Connection* c = s->conn;
  // A slot released twice would sit on the free list twice and serve two requests at once.
  if (!Check(s->state != SlotState::kFree, "second release of slot {} (request {:#x})",
             s->index, s->h.cookie))
    return;
  Check(abort ? engine::SlotMayAbortTo(s->state)
              : engine::SlotTransitionAllowed(s->state, SlotState::kFree),
        "release of request {:#x} in state {}{}", s->h.cookie, engine::SlotStateName(s->state),
        abort ? " (abort)" : "");
  if (s->buf.cap > kKeepBuffer) s->buf.Release();
  c->inflight_bytes -= s->charged;
  s->charged = 0;
  s->state = SlotState::kFree;
  s->gen = 0;
  s->next = c->free_list;
  c->free_list = s;
  Check(c->busy_slots > 0, "connection {}: busy slot count underflow", c->id);
  --c->busy_slots;
  if (c->stats) c->stats->RequestEnded(index);
}

NBDCSI_WORKER_INLINE bool Worker::Impl::Charge(Connection* c, Slot* s, uint64_t bytes) {
  if (!s->buf.Reserve(bytes)) return false;
  s->charged = bytes;
  c->inflight_bytes += bytes;
  return true;
}

// ---- receiving requests -----------------------------------------------------------------

// Parses whatever the receive buffer holds, then asks for more. Runs after every recv.
// May free `c` (bad framing, or a closing connection gone idle): callers must not use it after.
void Worker::Impl::PumpRecv(Connection* c) {
  if (c->recv_inflight) return;
  if (c->life != ConnLife::kOpen) return MaybeFree(c);
  for (;;) {
    size_t avail = c->rend - c->rpos;
    uint8_t* p = c->rbuf.data + c->rpos;
    if (c->drain_left) {
      size_t n = std::min<uint64_t>(avail, c->drain_left);
      c->rpos += n;
      c->drain_left -= n;
      if (c->drain_left) break;
      Slot* s = c->drain_slot;
      c->drain_slot = nullptr;
      ReplyError(s, s->nbd_error);
      continue;
    }
    if (c->cur_write) {
      Slot* s = c->cur_write;
      size_t n = std::min<uint64_t>(avail, s->h.length - s->done);
      std::memcpy(s->buf.data + s->done, p, n);
      c->rpos += n;
      s->done += n;
      if (s->done < s->h.length) break;
      c->cur_write = nullptr;
      s->done = 0;
      Admit(s);
      continue;
    }
    if (avail < proto::kRequestHeaderLen) break;
    if (!c->free_list || c->inflight_bytes > kMaxInflightBytes) {
      c->recv_blocked = true;
      return;
    }
    proto::RequestHeader h;
    if (!proto::ParseRequestHeader(p, &h)) {
      spdlog::warn("nbd: {}: bad request magic, closing the connection", c->name());
      return Abort(c, "bad request magic");
    }
    c->rpos += proto::kRequestHeaderLen;
    if (h.type == proto::kCmdDisc) {
      // No reply; finish what is in flight, then close (the spec's soft disconnect).
      SetLife(c, ConnLife::kClosing);
      return MaybeFree(c);
    }
    if (!Receive(c, h)) return;
  }
  SubmitRecv(c);
}

// Takes a slot for the request `h` and starts it on its way. False when the connection stops
// reading here (an error it cannot resynchronise after).
NBDCSI_WORKER_INLINE bool Worker::Impl::Receive(Connection* c, const proto::RequestHeader& h) {
  proto::RequestCheck chk = CheckSized(c, h);
  Slot* s = TakeSlot(c, h);
  if (chk.nbd_error) {
    spdlog::debug(
        "nbd: {}: rejected request type {} flags {:#x} offset {} length {}: "
        "NBD error {}",
        c->name(), h.type, h.flags, h.offset, h.length, chk.nbd_error);
    if (chk.fatal) {
      spdlog::warn(
          "nbd: {}: request type {} length {} cannot be resynchronised, "
          "closing after the error reply",
          c->name(), h.type, h.length);
      SetLife(c, ConnLife::kClosing);
      ReplyError(s, chk.nbd_error);
      return false;
    }
    if (chk.drain) {
      StartDrain(c, s, chk.nbd_error, chk.drain);
      return true;
    }
    ReplyError(s, chk.nbd_error);
    return true;
  }
  if (h.type == proto::kCmdWrite) {
    if (!Charge(c, s, h.length)) {
      StartDrain(c, s, proto::kErrNoMem, h.length);
      return true;
    }
    Move(s, SlotState::kRecvPayload);
    c->cur_write = s;
    return true;
  }
  if (h.type == proto::kCmdRead && !Charge(c, s, h.length)) {
    ReplyError(s, proto::kErrNoMem);
    return true;
  }
  Admit(s);
  return true;
}

// A WRITE refused before its payload: the payload is read and discarded, then the error goes
// out, so the stream stays in sync (only broken framing ends a connection).
NBDCSI_WORKER_INLINE void Worker::Impl::StartDrain(Connection* c, Slot* s, uint32_t nbd_error,
                                                   uint64_t bytes) {
  s->nbd_error = nbd_error;
  Move(s, SlotState::kDraining);
  c->drain_slot = s;
  c->drain_left = bytes;
}

NBDCSI_WORKER_INLINE void Worker::Impl::SubmitRecv(Connection* c) {
  io_uring_sqe* sqe = GetSqe();
  Slot* cw = c->cur_write;
  if (cw && c->rpos == c->rend && cw->h.length - cw->done >= kDirectRecvMin) {
    io_uring_prep_recv(sqe, c->fd, cw->buf.data + cw->done, cw->h.length - cw->done, 0);
    c->recv_direct = true;
  } else {
    if (c->rpos == c->rend) {
      c->rpos = c->rend = 0;
    } else if (c->rpos > 0 && kRecvBufSize - c->rend < 64 * 1024) {
      std::memmove(c->rbuf.data, c->rbuf.data + c->rpos, c->rend - c->rpos);
      c->rend -= c->rpos;
      c->rpos = 0;
    }
    io_uring_prep_recv(sqe, c->fd, c->rbuf.data + c->rend, kRecvBufSize - c->rend, 0);
    c->recv_direct = false;
  }
  io_uring_sqe_set_data64(sqe, ConnTag(c, TagKind::kRecv));
  c->recv_inflight = true;
  ++c->sqes;
}

NBDCSI_WORKER_INLINE void Worker::Impl::OnRecv(Connection* c, int res) {
  --c->sqes;
  c->recv_inflight = false;
  if (c->life == ConnLife::kAborted) return MaybeFree(c);
  if (res == -EAGAIN || res == -EINTR) return PumpRecv(c);
  if (res <= 0) {
    // The client went away (possibly mid-request). Nobody is left to read replies; whatever
    // is executing completes and is dropped.
    return Abort(c, res == 0 ? "client closed the connection" : strerror(-res));
  }
  if (c->recv_direct) {
    Slot* s = c->cur_write;
    s->done += static_cast<uint32_t>(res);
    if (s->done == s->h.length) {
      c->cur_write = nullptr;
      s->done = 0;
      Admit(s);
    }
  } else {
    c->rend += static_cast<size_t>(res);
  }
  PumpRecv(c);
}

// ---- QoS ----------------------------------------------------------------------------------

inline void Worker::Impl::Admit(Slot* s) {
  Connection* c = s->conn;
  if (c->backend) return SubmitToBackend(s);
  Throttle& t = c->vol->throttle();
  if (!t.unlimited()) {
    Throttle::Dir dir = s->h.type == proto::kCmdRead    ? Throttle::Dir::kRead
                        : s->h.type == proto::kCmdWrite ? Throttle::Dir::kWrite
                                                            : Throttle::Dir::kOther;
    if (dir != Throttle::Dir::kOther) {
      uint64_t now = MonotonicNowNs();
      uint64_t gen = t.generation();
      uint64_t wait = t.Admit(dir, s->h.length, now);
      if (wait) {
        if (!s->throttled_since) s->throttled_since = now;
        s->due_ns = now + wait;
        s->throttle_gen = gen;
        Move(s, SlotState::kThrottled);
        throttled.push_back(SlotTag(s));
        return;
      }
      if (s->throttled_since) {
        c->vol->stats().RecordThrottle(index, now - s->throttled_since);
        s->throttled_since = 0;
      }
    }
  }
  s->use_direct = c->vol->direct_fd() != c->vol->buffered_fd() &&
                  s->h.offset % kDirectAlign == 0 && s->h.length % kDirectAlign == 0;
  Execute(s);
}

// Asks again for every waiting request that is due, or whose volume's limits changed.
inline void Worker::Impl::RunThrottled() {
  if (throttled.empty()) return;
  uint64_t now = MonotonicNowNs();
  size_t keep = 0;
  for (uint64_t v : throttled) {
    Slot* s = ResolveSlot(Tag::Decode(v));
    if (!s) continue;
    if (s->due_ns > now && s->throttle_gen == s->conn->vol->throttle().generation()) {
      throttled[keep++] = v;  // stable: requests keep their order
    } else {
      scratch.push_back(v);
    }
  }
  throttled.resize(keep);
  for (uint64_t v : scratch) {
    if (Slot* s = ResolveSlot(Tag::Decode(v))) Admit(s);
  }
  scratch.clear();
}

// ---- executing ----------------------------------------------------------------------------

void Worker::Impl::Execute(Slot* s) {
  Connection* c = s->conn;
  Volume& v = *c->vol;
  const proto::RequestHeader& h = s->h;
  if (Modifies(h.type) && !s->gate_held) {
    if (!v.gate().TryBegin(h.offset, h.length, waiter)) {
      Move(s, SlotState::kParked);
      parked.push_back(SlotTag(s));
      return;
    }
    s->gate_held = true;
  }
  Move(s, SlotState::kExec);
  // Fenced (Pool::FenceVolume): a newer target owns the volume. Checked after the write
  // gate was passed, so a fence either sees this write in flight and waits for it, or this
  // check sees the fence's epoch; every step of a request comes through here, so nothing of
  // an old epoch is submitted once the fence has returned. Volumes never fenced compare
  // with 0 and never take this branch.
  if (c->epoch < v.fence_epoch()) return Fenced(s);
  // Its data file was removed under us: nothing written now can become durable.
  if ((Modifies(h.type) || h.type == proto::kCmdFlush) && v.data_lost())
    return ReplyError(s, proto::kErrIo);
  if (h.type == proto::kCmdBlockStatus) return BlockStatus(s);
  if (opts.test_hold_writes_efd >= 0 && h.type == proto::kCmdWrite && s->done == 0) {
    // Tests only: the write waits in the ring behind this read (WorkerOptions). Its own
    // completion carries nothing (a kCancel tag is dropped on arrival).
    io_uring_sqe* hold = GetSqe();
    io_uring_prep_read(hold, opts.test_hold_writes_efd, &hold_sink, sizeof hold_sink, 0);
    hold->flags |= IOSQE_IO_LINK;
    io_uring_sqe_set_data64(hold, Tag{TagKind::kCancel}.Encode());
  }
  io_uring_sqe* sqe = PrepareIo(s);
  if (!sqe) return Fail(s, EINVAL);  // CheckRequest lets only the commands handled through
  io_uring_sqe_set_data64(sqe, SlotTag(s));
  ++c->sqes;
}

// The SQE for the slot's current step, or nullptr for a command the engine does not run.
NBDCSI_WORKER_INLINE io_uring_sqe* Worker::Impl::PrepareIo(Slot* s) {
  Volume& v = *s->conn->vol;
  const proto::RequestHeader& h = s->h;
  int fd = s->use_direct ? v.direct_fd() : v.buffered_fd();
  io_uring_sqe* sqe = nullptr;
  switch (h.type) {
    case proto::kCmdRead:
      sqe = GetSqe();
      io_uring_prep_read(sqe, fd, s->buf.data + s->done, h.length - s->done, h.offset + s->done);
      return sqe;
    case proto::kCmdWrite:
      sqe = GetSqe();
      io_uring_prep_write(sqe, fd, s->buf.data + s->done, h.length - s->done, h.offset + s->done);
      // FUA: this write alone is durable before we reply (RWF_DSYNC, the per-I/O O_DSYNC).
      if (h.flags & proto::kCmdFlagFua) sqe->rw_flags = RWF_DSYNC;
      return sqe;
    case proto::kCmdFlush:
      // fdatasync semantics: everything written before (through any connection, any fd of
      // this file, page cache included) is on stable storage when we reply.
      sqe = GetSqe();
      io_uring_prep_fsync(sqe, v.buffered_fd(), IORING_FSYNC_DATASYNC);
      return sqe;
    case proto::kCmdTrim:
    case proto::kCmdWriteZeroes:
      sqe = GetSqe();
      PrepareSpaceOp(s, sqe);
      return sqe;
    default:
      return nullptr;
  }
}

// EPERM, not ESHUTDOWN: the old target must not retry or reconnect to the same volume at the
// same epoch; only a newer epoch (a new claim in the cluster state) can get in again.
NBDCSI_WORKER_INLINE void Worker::Impl::Fenced(Slot* s) {
  Connection* c = s->conn;
  self->fenced_.fetch_add(1, std::memory_order_relaxed);
  if (!c->fence_logged) {
    c->fence_logged = true;
    spdlog::warn("nbd: volume {}: connection at epoch {} is fenced (volume at epoch {}); its "
                 "requests are refused with EPERM", c->vol->name(), c->epoch,
                 c->vol->fence_epoch());
  }
  ReplyError(s, proto::kErrPerm);
}

NBDCSI_WORKER_INLINE void Worker::Impl::PrepareSpaceOp(Slot* s, io_uring_sqe* sqe) {
  const int fd = s->conn->vol->buffered_fd();
  const proto::RequestHeader& h = s->h;
  switch (s->step) {
    case Slot::Step::kMain: {
      bool punch = h.type == proto::kCmdTrim || !(h.flags & proto::kCmdFlagNoHole);
      int mode = FALLOC_FL_KEEP_SIZE | (punch ? FALLOC_FL_PUNCH_HOLE : FALLOC_FL_ZERO_RANGE);
      io_uring_prep_fallocate(sqe, fd, mode, h.offset, h.length);
      break;
    }
    case Slot::Step::kZeroRange:
      io_uring_prep_fallocate(sqe, fd, FALLOC_FL_KEEP_SIZE | FALLOC_FL_ZERO_RANGE, h.offset,
                              h.length);
      break;
    case Slot::Step::kZeroWrite: {
      if (!zeros.data) {
        zeros.Reserve(kZeroChunk);
        std::memset(zeros.data, 0, kZeroChunk);
      }
      uint64_t n = std::min<uint64_t>(h.length - s->done, kZeroChunk);
      io_uring_prep_write(sqe, fd, zeros.data, static_cast<unsigned>(n), h.offset + s->done);
      break;
    }
    case Slot::Step::kFuaSync:
      io_uring_prep_fsync(sqe, fd, IORING_FSYNC_DATASYNC);
      break;
  }
}

// lseek(SEEK_DATA/SEEK_HOLE) has no io_uring opcode; it only reads file system metadata that
// is almost always cached, so BLOCK_STATUS runs inline.
inline void Worker::Impl::BlockStatus(Slot* s) {
  const proto::RequestHeader& h = s->h;
  std::array<proto::Extent, kMaxExtents> ext;
  bool req_one = h.flags & proto::kCmdFlagReqOne;
  int n = MapExtents(s->conn->vol->buffered_fd(), h.offset, h.length, ext.data(), ext.size(),
                     req_one);
  if (n <= 0) return Fail(s, n < 0 ? -n : EIO);
  ReplyExtents(s, ext.data(), static_cast<size_t>(n));
}

NBDCSI_WORKER_INLINE void Worker::Impl::ReplyExtents(Slot* s, const proto::Extent* ext, size_t n) {
  const proto::RequestHeader& h = s->h;
  size_t cap = 64 + kMaxExtents * 8;
  if (!s->buf.Reserve(cap)) return Fail(s, ENOMEM);
  size_t len = proto::EncodeBlockStatusReply(s->buf.data, cap, h.cookie, s->conn->ctx_id, ext, n);
  if (!len) return Fail(s, EIO);
  s->hdr_len = 0;
  s->data_len = static_cast<uint32_t>(len);
  QueueReply(s);
}

NBDCSI_WORKER_INLINE void Worker::Impl::OnIo(Slot* s, int res) {
  Connection* c = s->conn;
  --c->sqes;
  if (!Check(s->state == SlotState::kExec, "I/O completion for request {:#x} in state {}",
             s->h.cookie, engine::SlotStateName(s->state)))
    return MaybeFree(c);
  if (c->life == ConnLife::kAborted) {
    EndWrite(s);
    ReleaseSlot(s, /*abort=*/true);
    return MaybeFree(c);
  }
  if (res == -EAGAIN || res == -EINTR) return Execute(s);
  const proto::RequestHeader& h = s->h;
  switch (h.type) {
    case proto::kCmdRead:
    case proto::kCmdWrite:
      if (res < 0) {
        if (res == -EINVAL && s->use_direct) {
          // The device wants a larger alignment than kDirectAlign: go through the page cache.
          s->use_direct = false;
          return Execute(s);
        }
        return Fail(s, -res);
      }
      if (res == 0) {
        if (h.type == proto::kCmdWrite) return Fail(s, EIO);
        // Past EOF of the backing file: a sparse tail reads as zeroes.
        std::memset(s->buf.data + s->done, 0, h.length - s->done);
        s->done = h.length;
      } else {
        s->done += static_cast<uint64_t>(res);
      }
      if (s->done < h.length) return Execute(s);  // short I/O: continue where it stopped
      if (h.type == proto::kCmdWrite && (h.flags & proto::kCmdFlagFua)) return Promise(s);
      return Complete(s);
    case proto::kCmdFlush:
      return res < 0 ? Fail(s, -res) : Promise(s);
    default:  // TRIM, WRITE_ZEROES
      return OnSpaceOp(s, res);
  }
}

NBDCSI_WORKER_INLINE void Worker::Impl::OnSpaceOp(Slot* s, int res) {
  const proto::RequestHeader& h = s->h;
  bool fua = h.flags & proto::kCmdFlagFua;
  bool unsupported = res == -EOPNOTSUPP || res == -ENOTSUP || res == -ENOSYS;
  switch (s->step) {
    case Slot::Step::kMain:
      if (unsupported) {
        if (h.type == proto::kCmdTrim) break;  // TRIM is advisory: nothing to do
        if (h.flags & proto::kCmdFlagFastZero) return Fail(s, ENOTSUP);
        bool punched = !(h.flags & proto::kCmdFlagNoHole);
        s->step = punched ? Slot::Step::kZeroRange : Slot::Step::kZeroWrite;
        return Execute(s);
      }
      if (res < 0) return Fail(s, -res);
      break;
    case Slot::Step::kZeroRange:
      if (unsupported) {
        if (h.flags & proto::kCmdFlagFastZero) return Fail(s, ENOTSUP);
        s->step = Slot::Step::kZeroWrite;
        return Execute(s);
      }
      if (res < 0) return Fail(s, -res);
      break;
    case Slot::Step::kZeroWrite:
      if (res < 0) return Fail(s, -res);
      if (res == 0) return Fail(s, EIO);
      s->done += static_cast<uint64_t>(res);
      if (s->done < h.length) return Execute(s);
      break;
    case Slot::Step::kFuaSync:
      return res < 0 ? Fail(s, -res) : Promise(s);
  }
  if (fua) {
    s->step = Slot::Step::kFuaSync;
    return Execute(s);
  }
  Complete(s);
}

// ---- backend exports ----------------------------------------------------------------------

// Hands the request to the backend whole: READ and WRITE are within the maximum block size
// (CheckRequest); TRIM and WRITE_ZEROES, which may be as long as the export, go in steps of
// it, one after the other, so that every request the backend sees keeps that bound (backend.h).
inline void Worker::Impl::SubmitToBackend(Slot* s) {
  Connection* c = s->conn;
  const proto::RequestHeader& h = s->h;
  Move(s, SlotState::kExec);
  BackendRequest r;
  r.offset = h.offset;
  r.length = h.length;
  r.fua = h.flags & proto::kCmdFlagFua;
  switch (h.type) {
    case proto::kCmdRead:
      r.op = BackendRequest::Op::kRead;
      r.data = s->buf.data;
      break;
    case proto::kCmdWrite:
      r.op = BackendRequest::Op::kWrite;
      r.data = s->buf.data;
      break;
    case proto::kCmdFlush:
      r.op = BackendRequest::Op::kFlush;
      r.length = 0;
      break;
    case proto::kCmdTrim:
    case proto::kCmdWriteZeroes:
      // FAST_ZERO (advertised for every writable export) asks for zeroes only if they are
      // cheaper than writing: a replica set cannot promise that for all its replicas, and the
      // spec lets a server answer ENOTSUP at once, which sends the client to plain writes.
      if (h.flags & proto::kCmdFlagFastZero) return ReplyError(s, proto::kErrNotSup);
      r.op = h.type == proto::kCmdTrim ? BackendRequest::Op::kTrim
                                       : BackendRequest::Op::kWriteZeroes;
      r.offset = h.offset + s->done;
      r.length = static_cast<uint32_t>(std::min<uint64_t>(h.length - s->done, proto::kMaxBlock));
      r.no_hole = h.flags & proto::kCmdFlagNoHole;
      break;
    case proto::kCmdBlockStatus: {
      // The backend has no allocation map to offer: the whole range is reported as data,
      // which is always true (a client only loses the chance to skip holes).
      const proto::Extent all{h.length, 0};
      return ReplyExtents(s, &all, 1);
    }
    default:
      return Fail(s, EINVAL);  // CheckRequest lets only the commands above through
  }
  ++c->backend_reqs;
  c->backend->Submit(r, [this, tag = SlotTag(s)](int res) { PostBackendDone(tag, res); });
}

// The BackendDone of every request, from any thread. The eventfd is written under the lock:
// once the worker can take this entry in, it may free the connection, stop and close the
// eventfd, so nothing of the worker may be touched after the lock is released.
NBDCSI_WORKER_INLINE void Worker::Impl::PostBackendDone(uint64_t tag, int res) {
  std::lock_guard lk(done_mu);
  const bool wake = done_posted.empty();
  done_posted.emplace_back(tag, res);
  if (wake) {
    uint64_t one = 1;
    if (write(efd, &one, sizeof one) < 0) {  // eventfd writes only fail on overflow
    }
  }
}

void Worker::Impl::TakeBackendDones() {
  {
    std::lock_guard lk(done_mu);
    if (done_posted.empty()) return;
    done_batch.swap(done_posted);
  }
  for (const auto& [tag, res] : done_batch) {
    if (Slot* s = ResolveSlot(Tag::Decode(tag))) OnBackendDone(s, res);
  }
  done_batch.clear();
}

NBDCSI_WORKER_INLINE void Worker::Impl::OnBackendDone(Slot* s, int res) {
  Connection* c = s->conn;
  --c->backend_reqs;
  if (!Check(s->state == SlotState::kExec, "backend completion for request {:#x} in state {}",
             s->h.cookie, engine::SlotStateName(s->state)))
    return MaybeFree(c);
  if (c->life == ConnLife::kAborted) {
    self->backend_dropped_.fetch_add(1, std::memory_order_relaxed);
    ReleaseSlot(s, /*abort=*/true);
    return MaybeFree(c);
  }
  if (res != 0) return Fail(s, res < 0 ? -res : EIO);  // > 0 breaks the contract: EIO
  const proto::RequestHeader& h = s->h;
  if (h.type == proto::kCmdTrim || h.type == proto::kCmdWriteZeroes) {
    s->done += std::min<uint64_t>(h.length - s->done, proto::kMaxBlock);
    if (s->done < h.length) return SubmitToBackend(s);
  }
  Complete(s);
}

// ---- replies ------------------------------------------------------------------------------

// The modifying I/O is finished (successfully or not): a snapshot waiting to drain may go.
NBDCSI_WORKER_INLINE void Worker::Impl::EndWrite(Slot* s) {
  if (s->orphan) {
    s->conn->vol->gate().EndOrphan();
    s->orphan = false;
  }
  if (s->gate_held) {
    s->conn->vol->gate().End();
    s->gate_held = false;
  }
}

// A FLUSH or FUA request is done on disk: before the reply promises durability, the data file
// must still have a name (one fstat), or what was synced dies with the last descriptor.
NBDCSI_WORKER_INLINE void Worker::Impl::Promise(Slot* s) {
  if (!s->conn->vol->CheckDataFile()) return ReplyError(s, proto::kErrIo);
  Complete(s);
}

inline void Worker::Impl::Complete(Slot* s) {
  EndWrite(s);
  const proto::RequestHeader& h = s->h;
  bool structured = s->conn->params.structured_replies;
  if (h.type == proto::kCmdRead) {
    s->hdr_len = static_cast<uint32_t>(
        proto::EncodeReadReplyHeader(s->hdr.data(), structured, h.cookie, h.offset, h.length));
    s->data_len = h.length;
  } else {
    s->hdr_len = static_cast<uint32_t>(
        proto::EncodeDoneReply(s->hdr.data(), structured, h.cookie, 0));
    s->data_len = 0;
  }
  QueueReply(s);
}

inline void Worker::Impl::Fail(Slot* s, int err) {
  uint32_t code = proto::ErrnoToNbd(err);
  if (code == proto::kErrIo)
    spdlog::error("nbd: {}: request type {} offset {} length {} failed: {}", s->conn->name(),
                  s->h.type, s->h.offset, s->h.length, strerror(err));
  ReplyError(s, code);
}

inline void Worker::Impl::ReplyError(Slot* s, uint32_t nbd_error) {
  EndWrite(s);
  s->nbd_error = nbd_error;
  s->hdr_len = static_cast<uint32_t>(proto::EncodeDoneReply(
      s->hdr.data(), s->conn->params.structured_replies, s->h.cookie, nbd_error));
  s->data_len = 0;
  QueueReply(s);
}

inline void Worker::Impl::QueueReply(Slot* s) {
  Connection* c = s->conn;
  datapath::OpKind kind = StatKind(s->h.type);
  if (c->stats && kind != datapath::OpKind::kCount) {
    // Counted when the reply is queued, before the client can see it: a client that has its
    // reply is always counted. Into this worker's shard of the volume's counters.
    uint64_t bytes = s->nbd_error ? 0 : s->h.length;
    c->stats->Record(index, kind, bytes, MonotonicNowNs() - s->start_ns, s->nbd_error);
  }
  Move(s, SlotState::kReplyQueued);
  s->next = nullptr;
  if (c->sendq_tail) {
    c->sendq_tail->next = s;
  } else {
    c->sendq_head = s;
  }
  c->sendq_tail = s;
  if (!c->send_inflight) FlushSends(c);
}

// Gathers every queued reply (up to kIovMax iovecs) into one sendmsg.
NBDCSI_WORKER_INLINE void Worker::Impl::FlushSends(Connection* c) {
  if (c->life == ConnLife::kAborted || c->send_inflight) return;
  size_t n = 0;
  c->nsending = 0;
  while (c->sendq_head && n + 2 <= kIovMax && c->nsending < c->sending.size()) {
    Slot* s = c->sendq_head;
    c->sendq_head = s->next;
    if (!c->sendq_head) c->sendq_tail = nullptr;
    if (s->hdr_len) c->iov[n++] = iovec{s->hdr.data(), s->hdr_len};
    if (s->data_len) c->iov[n++] = iovec{s->buf.data, s->data_len};
    Move(s, SlotState::kSending);
    c->sending[c->nsending++] = s;
  }
  if (!c->nsending) return;
  c->iov_idx = 0;
  c->iov_cnt = n;
  SubmitSend(c);
}

inline void Worker::Impl::SubmitSend(Connection* c) {
  c->msg = msghdr{};
  c->msg.msg_iov = &c->iov[c->iov_idx];
  c->msg.msg_iovlen = c->iov_cnt - c->iov_idx;
  io_uring_sqe* sqe = GetSqe();
  io_uring_prep_sendmsg(sqe, c->fd, &c->msg, MSG_NOSIGNAL);
  io_uring_sqe_set_data64(sqe, ConnTag(c, TagKind::kSend));
  c->send_inflight = true;
  ++c->sqes;
}

NBDCSI_WORKER_INLINE void Worker::Impl::ReleaseSending(Connection* c) {
  for (size_t i = 0; i < c->nsending; ++i) ReleaseSlot(c->sending[i]);
  c->nsending = 0;
}

NBDCSI_WORKER_INLINE void Worker::Impl::OnSend(Connection* c, int res) {
  --c->sqes;
  c->send_inflight = false;
  if (c->life != ConnLife::kAborted && (res == -EAGAIN || res == -EINTR)) return SubmitSend(c);
  // 0 bytes for a non-empty message means the socket cannot take more: as good as an error.
  if (c->life == ConnLife::kAborted || res <= 0) {
    ReleaseSending(c);
    return Abort(c, res < 0 ? strerror(-res) : "connection closed");
  }
  // A partial send: step over what went out and send the rest.
  size_t left = static_cast<size_t>(res);
  while (left && c->iov_idx < c->iov_cnt) {
    iovec& v = c->iov[c->iov_idx];
    if (left >= v.iov_len) {
      left -= v.iov_len;
      ++c->iov_idx;
    } else {
      v.iov_base = static_cast<uint8_t*>(v.iov_base) + left;
      v.iov_len -= left;
      left = 0;
    }
  }
  if (c->iov_idx < c->iov_cnt) return SubmitSend(c);
  ReleaseSending(c);
  FlushSends(c);
  if (c->recv_blocked) {  // slots came free: read the requests we stopped at
    c->recv_blocked = false;
    return PumpRecv(c);  // may free c; otherwise it leaves work pending or frees when idle
  }
  MaybeFree(c);
}

}  // namespace nbdcsi::datapath
