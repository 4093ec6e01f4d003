#include "datapath/engine/worker.h"

#include <fcntl.h>
#include <liburing.h>
#include <linux/falloc.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <cstring>
#include <future>

#include <spdlog/spdlog.h>

#include "datapath/engine/extents.h"
#include "datapath/nbd/codec.h"
#include "datapath/nbd/proto.h"

namespace nbdcsi::datapath {
namespace {

namespace proto = nbd;

constexpr size_t kRecvBufSize = 256 * 1024;
constexpr int kSlotsPerConn = 64;
constexpr size_t kIovMax = 64;  // two iovecs (header, data) per reply
// Slot buffers grow to the largest request seen and are reused, so steady-state requests never
// allocate. Buffers above this size (rare huge requests) are given back after the reply.
constexpr size_t kKeepBuffer = size_t{4} << 20;
// Requests with data that one connection may have in flight before we stop reading new headers.
constexpr uint64_t kMaxInflightBytes = uint64_t{128} << 20;
// O_DIRECT needs offset and length aligned to the device's logical block; 512 is the common case.
// If the device wants more, the kernel returns EINVAL and that request is retried buffered.
constexpr uint32_t kDirectAlign = 512;
// A WRITE payload at least this big, with nothing else buffered, is received straight into its
// slot instead of through the connection's receive buffer (saves a copy).
constexpr uint32_t kDirectRecvMin = 16 * 1024;
constexpr size_t kMaxExtents = 1024;
constexpr size_t kZeroChunk = size_t{1} << 20;

enum class SqeKind : uint8_t { kWake, kRecv, kSend, kIo };

// What every SQE carries in user_data: which handler gets its completion, and for whom.
struct Op {
  SqeKind kind;
  void* owner;
};

struct AlignedBuffer {
  uint8_t* data = nullptr;
  size_t cap = 0;

  bool Reserve(size_t n) {
    if (n <= cap) return true;
    Release();
    size_t c = (std::max<size_t>(n, 4096) + 4095) & ~size_t{4095};
    void* p = nullptr;
    if (posix_memalign(&p, 4096, c) != 0) return false;
    data = static_cast<uint8_t*>(p);
    cap = c;
    return true;
  }
  void Release() {
    free(data);
    data = nullptr;
    cap = 0;
  }
  ~AlignedBuffer() { free(data); }
};

struct Connection;

// One request's whole life. The states name where the slot is, so every list it can be on is
// explicit: the free list, a connection's receive path, the worker's throttle queue, the ring,
// the connection's send queue, or an in-flight sendmsg.
struct Slot {
  enum class State : uint8_t {
    kFree,
    kRecvPayload,  // WRITE header parsed, payload arriving
    kDraining,     // rejected WRITE: payload being discarded, error reply follows
    kThrottled,    // waiting for QoS tokens
    kParked,       // modifying request held by the volume's WriteGate (snapshot in progress)
    kExec,         // an SQE is in the ring
    kReplyQueued,  // reply built, waiting for the socket
    kSending,      // part of the sendmsg in flight
  };
  // Steps of multi-step commands.
  enum class Step : uint8_t { kMain, kZeroRange, kZeroWrite, kFuaSync };

  Op op{SqeKind::kIo, this};
  State state = State::kFree;
  Step step = Step::kMain;
  bool use_direct = false;
  bool gate_held = false;  // counted in the volume's WriteGate: End() when the I/O finishes
  Connection* conn = nullptr;
  proto::RequestHeader h{};
  AlignedBuffer buf;
  uint64_t done = 0;  // bytes of the current I/O already transferred (short I/O continues)
  uint64_t charged = 0;  // bytes counted against the connection's in-flight budget
  uint32_t nbd_error = 0;
  uint64_t start_ns = 0;
  uint64_t throttled_since = 0;
  uint64_t due_ns = 0;
  std::array<uint8_t, std::max(proto::kMaxDoneReplyLen, proto::kMaxReadReplyHeaderLen)> hdr{};
  uint32_t hdr_len = 0;
  uint32_t data_len = 0;  // reply bytes after hdr, taken from buf (READ data, BLOCK_STATUS chunk)
  Slot* next = nullptr;
};

struct Connection {
  Worker::Impl* w = nullptr;
  int fd = -1;
  std::shared_ptr<Volume> vol;
  proto::TransmissionParams params{};
  SizeMode size_mode = SizeMode::kNegotiated;
  uint32_t ctx_id = 0;

  Op recv_op{SqeKind::kRecv, this};
  Op send_op{SqeKind::kSend, this};
  std::unique_ptr<uint8_t[]> rbuf{new uint8_t[kRecvBufSize]};
  size_t rpos = 0, rend = 0;
  bool recv_inflight = false;
  bool recv_direct = false;   // the in-flight recv targets cur_write's buffer
  bool recv_blocked = false;  // out of slots or over budget: resume when a reply is sent
  Slot* cur_write = nullptr;  // slot whose WRITE payload is arriving
  Slot* drain_slot = nullptr;
  uint64_t drain_left = 0;
  bool reading_stopped = false;   // DISC, or framing broken: no more requests are read
  bool dead = false;              // socket unusable: nothing more is sent
  int pending = 0;                // SQEs in flight that point into this connection
  int busy_slots = 0;
  uint64_t inflight_bytes = 0;

  std::array<Slot, kSlotsPerConn> slots;
  Slot* free_list = nullptr;
  Slot* sendq_head = nullptr;
  Slot* sendq_tail = nullptr;
  bool send_inflight = false;
  std::array<Slot*, kIovMax> sending{};  // a reply takes one or two iovecs
  size_t nsending = 0;
  std::array<iovec, kIovMax> iov{};
  size_t iov_idx = 0, iov_cnt = 0;
  msghdr msg{};

  Connection() {
    for (int i = kSlotsPerConn - 1; i >= 0; --i) {
      slots[i].conn = this;
      slots[i].next = free_list;
      free_list = &slots[i];
    }
  }
};

datapath::OpKind StatKind(uint16_t type) {
  switch (type) {
    case proto::kCmdRead: return datapath::OpKind::kRead;
    case proto::kCmdWrite: return datapath::OpKind::kWrite;
    case proto::kCmdFlush: return datapath::OpKind::kFlush;
    case proto::kCmdTrim: return datapath::OpKind::kTrim;
    case proto::kCmdWriteZeroes: return datapath::OpKind::kWriteZeroes;
    case proto::kCmdBlockStatus: return datapath::OpKind::kBlockStatus;
    default: return datapath::OpKind::kCount;
  }
}

}  // namespace

struct Worker::Impl {
  struct Incoming {
    int fd;
    std::shared_ptr<Volume> vol;
    nbd::Negotiated neg;
    SizeMode size_mode;
  };

  Worker* self;
  int index;
  WorkerOptions opts;
  io_uring ring{};
  bool ring_ok = false;
  int efd = -1;
  uint64_t efd_val = 0;
  Op wake_op{SqeKind::kWake, nullptr};
  std::thread thread;
  std::atomic<bool> stopping{false};
  std::mutex mu;
  bool exited = false;  // guarded by mu
  std::vector<Incoming> incoming;
  std::vector<Connection*> conns;
  std::vector<Slot*> throttled;
  std::vector<Slot*> parked;
  std::vector<Slot*> scratch;  // reused by RunThrottled and the parked retry
  // Told by a volume's WriteGate when parked writes may go; wakes this worker's ring.
  // It owns the eventfd: a gate may still hold a reference to it for a moment after the
  // worker is gone, and then writes into a still-open descriptor nobody reads.
  struct Waiter final : GateWaiter {
    int efd;
    explicit Waiter(int fd) : efd(fd) {}
    ~Waiter() override { close(efd); }
    void GateOpened() override {
      uint64_t one = 1;
      if (write(efd, &one, sizeof one) < 0) {  // eventfd writes only fail on overflow
      }
    }
  };
  std::shared_ptr<Waiter> waiter;
  AlignedBuffer zeros;

  Impl(Worker* s, int i, WorkerOptions o) : self(s), index(i), opts(o) {}

  // ---- ring plumbing ----------------------------------------------------------------------
  io_uring_sqe* GetSqe() {
    io_uring_sqe* sqe = io_uring_get_sqe(&ring);
    while (!sqe) {
      // The SQ is full: hand what we have to the kernel. Completions are never dropped
      // (IORING_FEAT_NODROP), so this always frees room.
      io_uring_submit(&ring);
      sqe = io_uring_get_sqe(&ring);
    }
    return sqe;
  }

  void ArmWake() {
    io_uring_sqe* sqe = GetSqe();
    io_uring_prep_read(sqe, efd, &efd_val, sizeof efd_val, 0);
    io_uring_sqe_set_data(sqe, &wake_op);
  }

  void Run() {
    ArmWake();
    bool wake_armed = true;
    for (;;) {
      io_uring_cqe* cqe = nullptr;
      int r;
      if (!throttled.empty()) {
        uint64_t now = MonotonicNowNs();
        uint64_t due = UINT64_MAX;
        for (Slot* s : throttled) due = std::min(due, s->due_ns);
        uint64_t wait = due > now ? due - now : 0;
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
        auto* op = static_cast<Op*>(io_uring_cqe_get_data(cqe));
        int res = cqe->res;
        switch (op->kind) {
          case SqeKind::kWake: wake_armed = OnWake(res); break;
          case SqeKind::kRecv: OnRecv(static_cast<Connection*>(op->owner), res); break;
          case SqeKind::kSend: OnSend(static_cast<Connection*>(op->owner), res); break;
          case SqeKind::kIo: OnIo(static_cast<Slot*>(op->owner), res); break;
        }
      }
      io_uring_cq_advance(&ring, seen);
      RunThrottled();
      if (stopping.load(std::memory_order_acquire) && conns.empty() && !wake_armed) break;
    }
    std::lock_guard lk(mu);
    exited = true;
    for (auto& in : incoming) {
      close(in.fd);
      in.vol->stats().ConnectionClosed();
    }
    incoming.clear();
  }

  // ---- new connections and shutdown -------------------------------------------------------
  bool OnWake(int res) {
    std::vector<Incoming> batch;
    {
      std::lock_guard lk(mu);
      batch.swap(incoming);
    }
    for (auto& in : batch) AddConnection(std::move(in));
    if (!parked.empty()) {
      scratch.swap(parked);  // Execute may park some again
      for (Slot* s : scratch) Execute(s);
      scratch.clear();
    }
    if (stopping.load(std::memory_order_acquire)) {
      for (Connection* c : std::vector<Connection*>(conns)) Abort(c, "daemon shutting down");
      return false;
    }
    ArmWake();
    return true;
  }

  void AddConnection(Incoming in) {
    auto* c = new Connection();
    c->w = this;
    c->fd = in.fd;
    c->vol = std::move(in.vol);
    c->params.export_size = in.neg.export_info.size;
    c->params.read_only = in.neg.export_info.read_only;
    c->params.structured_replies = in.neg.structured_replies;
    c->params.base_allocation = in.neg.base_allocation;
    c->ctx_id = in.neg.base_allocation_id;
    c->size_mode = in.size_mode;
    conns.push_back(c);
    self->live_.fetch_add(1, std::memory_order_relaxed);
    if (stopping.load(std::memory_order_acquire)) {
      Abort(c, "daemon shutting down");
      return;
    }
    PumpRecv(c);
  }

  // CheckRequest against the size this connection's mode says (see SizeMode).
  static proto::RequestCheck CheckSized(Connection* c, const proto::RequestHeader& h) {
    if (c->size_mode == SizeMode::kLive) c->params.export_size = c->vol->size();
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

  void Abort(Connection* c, const char* why) {
    if (!c->dead) {
      spdlog::debug("nbd: closing connection to volume {}: {}", c->vol->name(), why);
      c->dead = true;
      c->reading_stopped = true;
      // Wakes a pending recv/send with an error so that every SQE of this connection completes.
      shutdown(c->fd, SHUT_RDWR);
      // Requests waiting for QoS tokens hold no SQE: drop them now.
      auto it = std::remove_if(throttled.begin(), throttled.end(),
                               [c](Slot* s) { return s->conn == c; });
      for (auto j = it; j != throttled.end(); ++j) ReleaseSlot(*j);
      throttled.erase(it, throttled.end());
      auto pit = std::remove_if(parked.begin(), parked.end(), [c](Slot* s) { return s->conn == c; });
      for (auto j = pit; j != parked.end(); ++j) ReleaseSlot(*j);
      parked.erase(pit, parked.end());
    }
    MaybeFree(c);
  }

  void MaybeFree(Connection* c) {
    if (c->pending > 0) return;
    bool idle = c->busy_slots == 0 && !c->send_inflight;
    if (!c->dead && !(c->reading_stopped && idle)) return;
    close(c->fd);
    c->vol->stats().ConnectionClosed();
    conns.erase(std::find(conns.begin(), conns.end(), c));
    self->live_.fetch_sub(1, std::memory_order_relaxed);
    delete c;
  }

  // ---- receiving requests -----------------------------------------------------------------
  Slot* TakeSlot(Connection* c, const proto::RequestHeader& h) {
    Slot* s = c->free_list;
    c->free_list = s->next;
    s->next = nullptr;
    s->h = h;
    s->state = Slot::State::kExec;
    s->step = Slot::Step::kMain;
    s->done = 0;
    s->charged = 0;
    s->nbd_error = 0;
    s->hdr_len = 0;
    s->data_len = 0;
    s->throttled_since = 0;
    s->gate_held = false;
    s->start_ns = MonotonicNowNs();
    ++c->busy_slots;
    return s;
  }

  void ReleaseSlot(Slot* s) {
    Connection* c = s->conn;
    if (s->buf.cap > kKeepBuffer) s->buf.Release();
    c->inflight_bytes -= s->charged;
    s->charged = 0;
    s->state = Slot::State::kFree;
    s->next = c->free_list;
    c->free_list = s;
    --c->busy_slots;
  }

  bool Charge(Connection* c, Slot* s, uint64_t bytes) {
    if (!s->buf.Reserve(bytes)) return false;
    s->charged = bytes;
    c->inflight_bytes += bytes;
    return true;
  }

  // Parses whatever the receive buffer holds, then asks for more. Runs after every recv.
  // May free `c` (bad framing, or a stopped connection gone idle): callers must not use it after.
  void PumpRecv(Connection* c) {
    if (c->recv_inflight) return;
    if (c->reading_stopped || c->dead) return MaybeFree(c);
    for (;;) {
      size_t avail = c->rend - c->rpos;
      uint8_t* p = c->rbuf.get() + c->rpos;
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
        spdlog::warn("nbd: volume {}: bad request magic, closing the connection", c->vol->name());
        Abort(c, "bad request magic");
        return;
      }
      c->rpos += proto::kRequestHeaderLen;
      if (h.type == proto::kCmdDisc) {
        // No reply; finish what is in flight, then close (the spec's soft disconnect).
        c->reading_stopped = true;
        MaybeFree(c);
        return;
      }
      proto::RequestCheck chk = CheckSized(c, h);
      Slot* s = TakeSlot(c, h);
      if (chk.nbd_error) {
        spdlog::debug("nbd: volume {}: rejected request type {} flags {:#x} offset {} length {}: "
                      "NBD error {}", c->vol->name(), h.type, h.flags, h.offset, h.length,
                      chk.nbd_error);
        s->nbd_error = chk.nbd_error;
        if (chk.fatal) {
          spdlog::warn("nbd: volume {}: request type {} length {} cannot be resynchronised, "
                       "closing after the error reply", c->vol->name(), h.type, h.length);
          c->reading_stopped = true;
          ReplyError(s, chk.nbd_error);
          return;
        }
        if (chk.drain) {
          s->state = Slot::State::kDraining;
          c->drain_slot = s;
          c->drain_left = chk.drain;
          continue;
        }
        ReplyError(s, chk.nbd_error);
        continue;
      }
      if (h.type == proto::kCmdWrite) {
        if (!Charge(c, s, h.length)) {
          s->nbd_error = proto::kErrNoMem;
          s->state = Slot::State::kDraining;
          c->drain_slot = s;
          c->drain_left = h.length;
          continue;
        }
        s->state = Slot::State::kRecvPayload;
        c->cur_write = s;
        continue;
      }
      if (h.type == proto::kCmdRead && !Charge(c, s, h.length)) {
        ReplyError(s, proto::kErrNoMem);
        continue;
      }
      Admit(s);
      if (c->dead) return;
    }
    if (c->reading_stopped || c->dead) return;

    io_uring_sqe* sqe = GetSqe();
    Slot* cw = c->cur_write;
    if (cw && c->rpos == c->rend && cw->h.length - cw->done >= kDirectRecvMin) {
      io_uring_prep_recv(sqe, c->fd, cw->buf.data + cw->done, cw->h.length - cw->done, 0);
      c->recv_direct = true;
    } else {
      if (c->rpos == c->rend) {
        c->rpos = c->rend = 0;
      } else if (c->rpos > 0 && kRecvBufSize - c->rend < 64 * 1024) {
        std::memmove(c->rbuf.get(), c->rbuf.get() + c->rpos, c->rend - c->rpos);
        c->rend -= c->rpos;
        c->rpos = 0;
      }
      io_uring_prep_recv(sqe, c->fd, c->rbuf.get() + c->rend, kRecvBufSize - c->rend, 0);
      c->recv_direct = false;
    }
    io_uring_sqe_set_data(sqe, &c->recv_op);
    c->recv_inflight = true;
    ++c->pending;
  }

  void OnRecv(Connection* c, int res) {
    --c->pending;
    c->recv_inflight = false;
    if (c->dead) return MaybeFree(c);
    if (res == -EAGAIN || res == -EINTR) return PumpRecv(c);
    if (res <= 0) {
      // The client went away (possibly mid-request). Nobody is left to read replies; whatever
      // is executing completes and is dropped.
      Abort(c, res == 0 ? "client closed the connection" : strerror(-res));
      return;
    }
    if (c->recv_direct) {
      Slot* s = c->cur_write;
      s->done += static_cast<uint32_t>(res);
      if (s->done == s->h.length) {
        c->cur_write = nullptr;
        s->done = 0;
        Admit(s);
        if (c->dead) return;
      }
    } else {
      c->rend += static_cast<size_t>(res);
    }
    PumpRecv(c);
  }

  // ---- QoS ----------------------------------------------------------------------------------
  void Admit(Slot* s) {
    Connection* c = s->conn;
    Throttle& t = c->vol->throttle();
    if (!t.unlimited()) {
      Throttle::Dir dir = s->h.type == proto::kCmdRead    ? Throttle::Dir::kRead
                          : s->h.type == proto::kCmdWrite ? Throttle::Dir::kWrite
                                                              : Throttle::Dir::kOther;
      if (dir != Throttle::Dir::kOther) {
        uint64_t now = MonotonicNowNs();
        uint64_t wait = t.Admit(dir, s->h.length, now);
        if (wait) {
          if (!s->throttled_since) s->throttled_since = now;
          s->due_ns = now + wait;
          s->state = Slot::State::kThrottled;
          throttled.push_back(s);
          return;
        }
        if (s->throttled_since) {
          c->vol->stats().RecordThrottle(now - s->throttled_since);
          s->throttled_since = 0;
        }
      }
    }
    s->use_direct = c->vol->direct_fd() != c->vol->buffered_fd() &&
                    s->h.offset % kDirectAlign == 0 && s->h.length % kDirectAlign == 0;
    Execute(s);
  }

  void RunThrottled() {
    if (throttled.empty()) return;
    uint64_t now = MonotonicNowNs();
    auto it = std::stable_partition(throttled.begin(), throttled.end(),
                                    [now](Slot* s) { return s->due_ns > now; });
    scratch.assign(it, throttled.end());  // reused: no allocation per pass
    throttled.erase(it, throttled.end());
    for (Slot* s : scratch) Admit(s);
    scratch.clear();
  }

  // ---- executing ----------------------------------------------------------------------------
  void Execute(Slot* s) {
    Connection* c = s->conn;
    Volume& v = *c->vol;
    const proto::RequestHeader& h = s->h;
    bool modifies = h.type == proto::kCmdWrite || h.type == proto::kCmdTrim ||
                    h.type == proto::kCmdWriteZeroes;
    if (modifies && !s->gate_held) {
      if (!v.gate().TryBegin(h.offset, h.length, waiter)) {
        s->state = Slot::State::kParked;
        parked.push_back(s);
        return;
      }
      s->gate_held = true;
    }
    s->state = Slot::State::kExec;
    int fd = s->use_direct ? v.direct_fd() : v.buffered_fd();
    io_uring_sqe* sqe = nullptr;
    switch (h.type) {
      case proto::kCmdRead:
        sqe = GetSqe();
        io_uring_prep_read(sqe, fd, s->buf.data + s->done, h.length - s->done, h.offset + s->done);
        break;
      case proto::kCmdWrite:
        sqe = GetSqe();
        io_uring_prep_write(sqe, fd, s->buf.data + s->done, h.length - s->done, h.offset + s->done);
        // FUA: this write alone is durable before we reply (RWF_DSYNC, the per-I/O O_DSYNC).
        if (h.flags & proto::kCmdFlagFua) sqe->rw_flags = RWF_DSYNC;
        break;
      case proto::kCmdFlush:
        // fdatasync semantics: everything written before (through any connection, any fd of
        // this file, page cache included) is on stable storage when we reply.
        sqe = GetSqe();
        io_uring_prep_fsync(sqe, v.buffered_fd(), IORING_FSYNC_DATASYNC);
        break;
      case proto::kCmdTrim:
      case proto::kCmdWriteZeroes: {
        sqe = GetSqe();
        switch (s->step) {
          case Slot::Step::kMain: {
            bool punch = h.type == proto::kCmdTrim || !(h.flags & proto::kCmdFlagNoHole);
            int mode = FALLOC_FL_KEEP_SIZE | (punch ? FALLOC_FL_PUNCH_HOLE : FALLOC_FL_ZERO_RANGE);
            io_uring_prep_fallocate(sqe, v.buffered_fd(), mode, h.offset, h.length);
            break;
          }
          case Slot::Step::kZeroRange:
            io_uring_prep_fallocate(sqe, v.buffered_fd(), FALLOC_FL_KEEP_SIZE | FALLOC_FL_ZERO_RANGE,
                                    h.offset, h.length);
            break;
          case Slot::Step::kZeroWrite: {
            if (!zeros.data) {
              zeros.Reserve(kZeroChunk);
              std::memset(zeros.data, 0, kZeroChunk);
            }
            uint64_t n = std::min<uint64_t>(h.length - s->done, kZeroChunk);
            io_uring_prep_write(sqe, v.buffered_fd(), zeros.data, static_cast<unsigned>(n),
                                h.offset + s->done);
            break;
          }
          case Slot::Step::kFuaSync:
            io_uring_prep_fsync(sqe, v.buffered_fd(), IORING_FSYNC_DATASYNC);
            break;
        }
        break;
      }
      case proto::kCmdBlockStatus: {
        // lseek(SEEK_DATA/SEEK_HOLE) has no io_uring opcode; it only reads file system metadata
        // that is almost always cached, so it runs inline.
        std::array<proto::Extent, kMaxExtents> ext;
        bool req_one = h.flags & proto::kCmdFlagReqOne;
        int n = MapExtents(v.buffered_fd(), h.offset, h.length, ext.data(), ext.size(), req_one);
        if (n <= 0) return Fail(s, n < 0 ? -n : EIO);
        size_t cap = 64 + kMaxExtents * 8;
        if (!s->buf.Reserve(cap)) return Fail(s, ENOMEM);
        size_t len = proto::EncodeBlockStatusReply(s->buf.data, cap, h.cookie, c->ctx_id,
                                                   ext.data(), static_cast<size_t>(n));
        if (!len) return Fail(s, EIO);
        s->hdr_len = 0;
        s->data_len = static_cast<uint32_t>(len);
        return QueueReply(s);
      }
      default:
        return Fail(s, EINVAL);  // CheckRequest lets only the commands above through
    }
    io_uring_sqe_set_data(sqe, &s->op);
    ++c->pending;
  }

  void OnIo(Slot* s, int res) {
    Connection* c = s->conn;
    --c->pending;
    if (c->dead) {
      EndWrite(s);
      ReleaseSlot(s);
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
        return Complete(s);
      case proto::kCmdFlush:
        return res < 0 ? Fail(s, -res) : Complete(s);
      default:  // TRIM, WRITE_ZEROES
        return OnSpaceOp(s, res);
    }
  }

  void OnSpaceOp(Slot* s, int res) {
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
        return res < 0 ? Fail(s, -res) : Complete(s);
    }
    if (fua) {
      s->step = Slot::Step::kFuaSync;
      return Execute(s);
    }
    Complete(s);
  }

  // ---- replies ------------------------------------------------------------------------------
  // The modifying I/O is finished (successfully or not): a snapshot waiting to drain may go.
  void EndWrite(Slot* s) {
    if (s->gate_held) {
      s->conn->vol->gate().End();
      s->gate_held = false;
    }
  }

  void Complete(Slot* s) {
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

  void Fail(Slot* s, int err) {
    uint32_t code = proto::ErrnoToNbd(err);
    if (code == proto::kErrIo)
      spdlog::error("nbd: volume {}: request type {} offset {} length {} failed: {}",
                    s->conn->vol->name(), s->h.type, s->h.offset, s->h.length, strerror(err));
    ReplyError(s, code);
  }

  void ReplyError(Slot* s, uint32_t nbd_error) {
    EndWrite(s);
    s->nbd_error = nbd_error;
    s->hdr_len = static_cast<uint32_t>(proto::EncodeDoneReply(
        s->hdr.data(), s->conn->params.structured_replies, s->h.cookie, nbd_error));
    s->data_len = 0;
    QueueReply(s);
  }

  void QueueReply(Slot* s) {
    Connection* c = s->conn;
    datapath::OpKind kind = StatKind(s->h.type);
    if (kind != datapath::OpKind::kCount) {
      uint64_t bytes = s->nbd_error ? 0 : s->h.length;
      c->vol->stats().RecordOp(kind, bytes, MonotonicNowNs() - s->start_ns, s->nbd_error != 0);
    }
    s->state = Slot::State::kReplyQueued;
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
  void FlushSends(Connection* c) {
    if (c->dead || c->send_inflight) return;
    size_t n = 0;
    c->nsending = 0;
    while (c->sendq_head && n + 2 <= kIovMax && c->nsending < c->sending.size()) {
      Slot* s = c->sendq_head;
      c->sendq_head = s->next;
      if (!c->sendq_head) c->sendq_tail = nullptr;
      if (s->hdr_len) c->iov[n++] = iovec{s->hdr.data(), s->hdr_len};
      if (s->data_len) c->iov[n++] = iovec{s->buf.data, s->data_len};
      s->state = Slot::State::kSending;
      c->sending[c->nsending++] = s;
    }
    if (!c->nsending) return;
    c->iov_idx = 0;
    c->iov_cnt = n;
    SubmitSend(c);
  }

  void SubmitSend(Connection* c) {
    c->msg = msghdr{};
    c->msg.msg_iov = &c->iov[c->iov_idx];
    c->msg.msg_iovlen = c->iov_cnt - c->iov_idx;
    io_uring_sqe* sqe = GetSqe();
    io_uring_prep_sendmsg(sqe, c->fd, &c->msg, MSG_NOSIGNAL);
    io_uring_sqe_set_data(sqe, &c->send_op);
    c->send_inflight = true;
    ++c->pending;
  }

  void OnSend(Connection* c, int res) {
    --c->pending;
    c->send_inflight = false;
    if (!c->dead && (res == -EAGAIN || res == -EINTR)) return SubmitSend(c);
    if (c->dead || res < 0) {
      for (size_t i = 0; i < c->nsending; ++i) ReleaseSlot(c->sending[i]);
      c->nsending = 0;
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
    for (size_t i = 0; i < c->nsending; ++i) ReleaseSlot(c->sending[i]);
    c->nsending = 0;
    FlushSends(c);
    if (c->recv_blocked) {  // slots came free: read the requests we stopped at
      c->recv_blocked = false;
      return PumpRecv(c);  // may free c; otherwise it leaves work pending or frees when idle
    }
    MaybeFree(c);
  }
};

Worker::Worker(int index, WorkerOptions opts) : impl_(std::make_unique<Impl>(this, index, opts)) {}

Worker::~Worker() {
  Stop();
  if (impl_->ring_ok) io_uring_queue_exit(&impl_->ring);
  if (!impl_->waiter && impl_->efd >= 0) close(impl_->efd);  // else the Waiter closes it
}

Status Worker::Start() {
  Impl& m = *impl_;
  m.efd = eventfd(0, EFD_CLOEXEC);
  if (m.efd < 0) return Error(errno, "eventfd: {}", strerror(errno));
  m.waiter = std::make_shared<Impl::Waiter>(m.efd);
  // The ring is created by the worker thread itself: with SINGLE_ISSUER the kernel binds the
  // ring to the task that creates it, and only that task may submit.
  std::promise<Status> ready;
  auto started = ready.get_future();
  m.thread = std::thread([&m, &ready] {
    pthread_setname_np(pthread_self(), fmt::format("nbd-worker-{}", m.index).c_str());
    io_uring_params p{};
    p.flags = IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_COOP_TASKRUN;
    int r = io_uring_queue_init_params(m.opts.ring_entries, &m.ring, &p);
    if (r == -EINVAL) {  // older kernels lack those flags
      p = io_uring_params{};
      r = io_uring_queue_init_params(m.opts.ring_entries, &m.ring, &p);
    }
    if (r < 0) {
      ready.set_value(Error(-r, "io_uring_queue_init: {}", strerror(-r)));
      return;
    }
    m.ring_ok = true;
    if (!(p.features & IORING_FEAT_NODROP)) {
      ready.set_value(
          Error(ENOTSUP, "this kernel's io_uring lacks IORING_FEAT_NODROP (needs Linux 5.5+)"));
      return;
    }
    ready.set_value(Status::Ok());
    m.Run();
  });
  Status st = started.get();
  if (!st.ok()) m.thread.join();
  return st;
}

void Worker::Stop() {
  Impl& m = *impl_;
  if (!m.thread.joinable()) return;
  m.stopping.store(true, std::memory_order_release);
  uint64_t one = 1;
  if (write(m.efd, &one, sizeof one) < 0) spdlog::warn("worker {}: eventfd write failed", m.index);
  m.thread.join();
}

void Worker::Adopt(int fd, std::shared_ptr<Volume> volume, const nbd::Negotiated& negotiated,
                   SizeMode size_mode) {
  Impl& m = *impl_;
  {
    std::lock_guard lk(m.mu);
    if (!m.exited) {
      m.incoming.push_back(Impl::Incoming{fd, std::move(volume), negotiated, size_mode});
      volume = nullptr;
    }
  }
  if (volume) {
    // The worker has stopped: nobody would serve this connection. (The frontend stops
    // accepting before it stops the workers, so this is only a guard.)
    close(fd);
    volume->stats().ConnectionClosed();
    return;
  }
  uint64_t one = 1;
  if (write(m.efd, &one, sizeof one) < 0) spdlog::warn("worker {}: eventfd write failed", m.index);
}

}  // namespace nbdcsi::datapath
