#include "datapath/engine/worker.h"

#include <fcntl.h>
#include <liburing.h>
#include <linux/falloc.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <cstring>
#include <future>
#include <new>

#include <spdlog/spdlog.h>

#include "datapath/engine/extents.h"
#include "datapath/engine/request_state.h"
#include "datapath/nbd/codec.h"
#include "datapath/nbd/negotiate.h"
#include "datapath/nbd/proto.h"

namespace nbdcsi::datapath {
namespace {

namespace proto = nbd;
using engine::ConnLife;
using engine::SlotState;
using engine::Tag;
using engine::TagKind;

constexpr size_t kRecvBufSize = 256 * 1024;
constexpr int kSlotsPerConn = 64;
static_assert(kSlotsPerConn <= 256, "a slot index must fit the 8 bits of a Tag");
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
// Requests waiting for QoS tokens are looked at again at least this often, so a limit raised or
// removed live (ControllerModifyVolume) frees them within this time.
constexpr uint64_t kThrottleRecheckNs = 100'000'000;

// Checked builds (Debug, sanitizers: NBDCSI_STRICT_CHECKS) stop at the first broken invariant of
// the request life cycle, with the state that broke it; release builds count it (the counters
// reach `nbdctl`, tests and logs) and carry on with the safe choice at each site.
#ifdef NBDCSI_STRICT_CHECKS
constexpr bool kStrict = true;
#else
constexpr bool kStrict = false;
#endif

// Every buffer a connection owns (its receive buffer, its slots' data buffers, the Connection
// itself) is its own anonymous mapping, given back with munmap when the connection goes. Through
// malloc they would live in the worker thread's arena between long-lived allocations, and glibc
// keeps freed arena memory resident: after 1,000 short connections the daemon held 14 MiB more
// than before (malloc_stats: 14 MiB "system", 85 KiB "in use" in the worker's arena), and the
// 256 KiB receive buffers land in the arena too once glibc has raised its mmap threshold past
// them. A mapping is page-granular, which these buffers are anyway (O_DIRECT alignment).
void* MapPages(size_t bytes) {
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  return p == MAP_FAILED ? nullptr : p;
}
size_t PageRound(size_t n) { return (std::max<size_t>(n, 4096) + 4095) & ~size_t{4095}; }

struct AlignedBuffer {
  uint8_t* data = nullptr;
  size_t cap = 0;

  bool Reserve(size_t n) {
    if (n <= cap) return true;
    Release();
    size_t c = PageRound(n);
    data = static_cast<uint8_t*>(MapPages(c));
    if (!data) return false;
    cap = c;
    return true;
  }
  void Release() {
    if (data) munmap(data, cap);
    data = nullptr;
    cap = 0;
  }
  AlignedBuffer() = default;
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;
  ~AlignedBuffer() { Release(); }
};

struct Connection;

// One request's whole life (request_state.h has the states and the allowed moves). The state says
// which list the slot is on: the connection's free list, its receive path, the worker's throttle
// queue or parked list, the ring, the connection's send queue, or an in-flight sendmsg.
struct Slot {
  // Steps of multi-step commands.
  enum class Step : uint8_t { kMain, kZeroRange, kZeroWrite, kFuaSync };

  SlotState state = SlotState::kFree;
  Step step = Step::kMain;
  uint8_t index = 0;
  bool use_direct = false;
  bool gate_held = false;  // counted in the volume's WriteGate: End() when the I/O finishes
  bool orphan = false;     // its connection was aborted while it ran (WriteGate::Orphan)
  // Minted when the slot is taken, 0 while it is free: the identity of this request in every
  // Tag, so a completion or queue entry of an earlier request in this slot never matches.
  uint32_t gen = 0;
  Connection* conn = nullptr;
  proto::RequestHeader h{};
  AlignedBuffer buf;
  uint64_t done = 0;  // bytes of the current I/O already transferred (short I/O continues)
  uint64_t charged = 0;  // bytes counted against the connection's in-flight budget
  uint32_t nbd_error = 0;
  uint64_t start_ns = 0;
  uint64_t throttled_since = 0;
  uint64_t due_ns = 0;
  uint64_t throttle_gen = 0;  // the volume's Throttle::generation() when it started waiting
  std::array<uint8_t, std::max(proto::kMaxDoneReplyLen, proto::kMaxReadReplyHeaderLen)> hdr{};
  uint32_t hdr_len = 0;
  uint32_t data_len = 0;  // reply bytes after hdr, taken from buf (READ data, BLOCK_STATUS chunk)
  Slot* next = nullptr;
};

struct Connection {
  uint32_t id = 0;   // index in the worker's connection table
  uint32_t gen = 0;  // identity of this connection in its recv/send Tags
  ConnLife life = ConnLife::kOpen;
  int fd = -1;
  // What the connection serves: a pool volume, or a backend export (then `vol` is null and
  // `stats` too; `backend` is served->backend, kept raw for the request path).
  std::shared_ptr<Volume> vol;
  VolumeStats* stats = nullptr;
  std::shared_ptr<ServedBackend> served;
  ExportBackend* backend = nullptr;
  proto::TransmissionParams params{};
  SizeMode size_mode = SizeMode::kNegotiated;
  uint32_t ctx_id = 0;
  uint64_t epoch = 0;         // the client's epoch (VOLUME@epoch=N); 0: it named none
  bool fence_logged = false;  // its first request refused for a stale epoch was logged

  AlignedBuffer rbuf;  // kRecvBufSize, mapped by AddConnection
  size_t rpos = 0, rend = 0;
  bool recv_inflight = false;
  bool recv_direct = false;   // the in-flight recv targets cur_write's buffer
  bool recv_blocked = false;  // out of slots or over budget: resume when a reply is sent
  Slot* cur_write = nullptr;  // slot whose WRITE payload is arriving
  Slot* drain_slot = nullptr;
  uint64_t drain_left = 0;
  int sqes = 0;  // SQEs in flight that name this connection: recv, send, requests' I/O
  int backend_reqs = 0;  // requests handed to the backend whose done has not been taken in
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

  // Only `new (std::nothrow) Connection`: a daemon out of memory refuses one connection.
  static void* operator new(size_t n, const std::nothrow_t&) noexcept {
    return MapPages(PageRound(n));
  }
  static void operator delete(void* p, size_t n) { munmap(p, PageRound(n)); }

  // For logs: the volume's name, or the backend's with its suffix.
  std::string name() const {
    return vol ? vol->name() : backend->name() + std::string(kTargetSuffix);
  }

  Connection() {
    for (int i = kSlotsPerConn - 1; i >= 0; --i) {
      slots[i].conn = this;
      slots[i].index = static_cast<uint8_t>(i);
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

bool Modifies(uint16_t type) {
  return type == proto::kCmdWrite || type == proto::kCmdTrim || type == proto::kCmdWriteZeroes;
}

}  // namespace

struct Worker::Impl {
  struct Incoming {
    int fd;
    std::shared_ptr<Volume> vol;  // or:
    std::shared_ptr<ServedBackend> served;
    nbd::Negotiated neg;
    SizeMode size_mode;
    uint64_t epoch;

    // A connection that will never be served: its socket closed, the volume's count given back.
    void Refuse() {
      close(fd);
      if (vol) vol->stats().ConnectionClosed();
    }
  };

  Worker* self;
  int index;
  WorkerOptions opts;
  io_uring ring{};
  bool ring_ok = false;
  int efd = -1;
  uint64_t efd_val = 0;
  std::thread thread;
  std::atomic<bool> stopping{false};
  std::mutex mu;
  bool exited = false;  // guarded by mu
  std::vector<Incoming> incoming;
  // Live connections by id; an id is reused only with a new generation (Tag).
  std::vector<std::unique_ptr<Connection>> table;
  std::vector<uint32_t> free_ids;
  size_t live = 0;
  uint32_t last_gen = 0;
  // Requests waiting for QoS tokens and modifying requests held by a WriteGate, as encoded Tags
  // (kIo): a connection that goes away takes its entries out (Abort), and an entry that no longer
  // names a live request would be dropped, never run.
  std::vector<uint64_t> throttled;
  std::vector<uint64_t> parked;
  std::vector<uint64_t> scratch;  // reused by RunThrottled and the parked retry
  // Backend completions (encoded kIo Tag, result) posted from any thread by the BackendDone
  // callbacks; taken in by OnWake. The eventfd is written only when the list goes from empty to
  // non-empty: the worker drains the whole list under the same lock, so one wake covers all.
  std::mutex done_mu;
  std::vector<std::pair<uint64_t, int>> done_posted;  // guarded by done_mu
  std::vector<std::pair<uint64_t, int>> done_batch;   // worker thread only
  std::atomic<bool> close_removed{false};             // Worker::CloseRemoved asked for a sweep
  bool stop_wake_sent = false;
  uint64_t violations_logged = 0;
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
  uint64_t hold_sink = 0;  // where the test hold's eventfd reads land (WorkerOptions)

  Impl(Worker* s, int i, WorkerOptions o) : self(s), index(i), opts(o) {}

  // ---- invariants ---------------------------------------------------------------------------
  // Every broken rule of the request life cycle comes through here. Returns `ok` so call sites
  // read `if (!Check(...)) <safe choice>`.
  template <typename... Args>
  bool Check(bool ok, fmt::format_string<Args...> what, Args&&... args) {
    if (ok) return true;
    std::string msg = fmt::format(what, std::forward<Args>(args)...);
    if constexpr (kStrict) {
      spdlog::critical("worker {}: engine invariant violated: {}", index, msg);
      std::abort();
    }
    self->violations_.fetch_add(1, std::memory_order_relaxed);
    // Logged in full at first, then sampled, so a storm cannot flood the log.
    if (violations_logged < 20 || violations_logged % 10000 == 0)
      spdlog::error("worker {}: engine invariant violated: {}", index, msg);
    ++violations_logged;
    return false;
  }

  void Move(Slot* s, SlotState to) {
    Check(engine::SlotTransitionAllowed(s->state, to), "request {:#x} in slot {}: {} -> {}",
          s->h.cookie, s->index, engine::SlotStateName(s->state), engine::SlotStateName(to));
    s->state = to;
  }

  void SetLife(Connection* c, ConnLife to) {
    Check(engine::ConnTransitionAllowed(c->life, to), "connection {}: {} -> {}", c->id,
          engine::ConnLifeName(c->life), engine::ConnLifeName(to));
    c->life = to;
  }

  uint32_t NextGen() {
    if (++last_gen == 0) ++last_gen;  // 0 means "free slot"
    return last_gen;
  }

  // ---- tags -----------------------------------------------------------------------------------
  static uint64_t SlotTag(const Slot* s, TagKind kind = TagKind::kIo) {
    return Tag{kind, s->index, s->conn->id, s->gen}.Encode();
  }
  static uint64_t ConnTag(const Connection* c, TagKind kind) {
    return Tag{kind, 0, c->id, c->gen}.Encode();
  }
  Connection* FindConn(uint32_t id) {
    return id < table.size() ? table[id].get() : nullptr;
  }
  // The request a Tag names, or nullptr (counted) when it is gone: its connection was freed or
  // its slot has moved on to another request.
  Slot* ResolveSlot(const Tag& t) {
    Connection* c = FindConn(t.conn);
    if (c && t.slot < kSlotsPerConn && c->slots[t.slot].gen == t.gen && t.gen != 0)
      return &c->slots[t.slot];
    return Stale(t);
  }
  Connection* ResolveConn(const Tag& t) {
    Connection* c = FindConn(t.conn);
    if (c && c->gen == t.gen) return c;
    return Stale(t);
  }
  std::nullptr_t Stale(const Tag& t) {
    self->stale_.fetch_add(1, std::memory_order_relaxed);
    // By construction nothing stale exists: a connection is freed only after its SQEs have
    // completed and its queue entries are removed. Seeing one is a bug, but a harmless one now.
    Check(false, "dropped a stale {} for connection {} slot {} generation {}",
          t.kind == TagKind::kIo ? "request" : "socket operation", t.conn, t.slot, t.gen);
    return nullptr;
  }

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
    io_uring_sqe_set_data64(sqe, Tag{TagKind::kWake}.Encode());
  }

  // How long the ring may sleep: until the earliest throttled request is due, and never longer
  // than kThrottleRecheckNs while any waits (limits may change). -1: no timeout.
  int64_t ThrottleWaitNs() {
    if (throttled.empty()) return -1;
    uint64_t now = MonotonicNowNs();
    uint64_t wait = kThrottleRecheckNs;
    for (uint64_t v : throttled) {
      Slot* s = ResolveSlot(Tag::Decode(v));
      if (s) wait = std::min(wait, s->due_ns > now ? s->due_ns - now : 0);
    }
    return static_cast<int64_t>(wait);
  }

  void Run() {
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
  bool Dispatch(const Tag& t, int res) {
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

  void PublishGauges() {
    self->throttled_.store(throttled.size(), std::memory_order_relaxed);
    self->parked_.store(parked.size(), std::memory_order_relaxed);
  }

  // ---- new connections and shutdown -------------------------------------------------------
  bool OnWake(int res) {
    std::vector<Incoming> batch;
    {
      std::lock_guard lk(mu);
      batch.swap(incoming);
    }
    for (auto& in : batch) AddConnection(std::move(in));
    TakeBackendDones();
    if (close_removed.exchange(false, std::memory_order_acq_rel)) {
      std::vector<Connection*> removed;
      for (auto& c : table)
        if (c && c->served && c->served->removed.load(std::memory_order_acquire))
          removed.push_back(c.get());
      for (Connection* c : removed) Abort(c, "export removed");
    }
    if (!parked.empty()) {
      scratch.swap(parked);  // Execute may park some again
      for (uint64_t v : scratch) {
        if (Slot* s = ResolveSlot(Tag::Decode(v))) Execute(s);
      }
      scratch.clear();
    }
    if (stopping.load(std::memory_order_acquire)) {
      std::vector<Connection*> all;
      for (auto& c : table)
        if (c) all.push_back(c.get());
      for (Connection* c : all) Abort(c, "daemon shutting down");
      // Connections left wait for completions; a backend's come through this eventfd.
      if (live == 0) return false;
    }
    ArmWake();
    return true;
  }

  void AddConnection(Incoming in) {
    const std::string what =
        in.vol ? in.vol->name() : in.served->backend->name() + std::string(kTargetSuffix);
    if (in.served && in.served->removed.load(std::memory_order_acquire)) {
      // Handed over by a handshake that raced with RemoveBackendExport.
      spdlog::debug("worker {}: export {} was removed: closing a connection to it", index, what);
      return in.Refuse();
    }
    std::unique_ptr<Connection> conn(new (std::nothrow) Connection);
    if (!conn || !conn->rbuf.Reserve(kRecvBufSize)) {
      spdlog::error("worker {}: out of memory for a connection to export {}: refusing it", index,
                    what);
      return in.Refuse();
    }
    uint32_t id;
    if (!free_ids.empty()) {
      id = free_ids.back();
      free_ids.pop_back();
    } else if (table.size() < Tag::kMaxConnId) {
      id = static_cast<uint32_t>(table.size());
      table.emplace_back();
    } else {
      spdlog::error("worker {}: {} connections already, refusing one for export {}", index,
                    table.size(), what);
      return in.Refuse();
    }
    table[id] = std::move(conn);
    Connection* c = table[id].get();
    c->id = id;
    c->gen = NextGen();
    c->fd = in.fd;
    c->vol = std::move(in.vol);
    if (c->vol) c->stats = &c->vol->stats();
    c->served = std::move(in.served);
    if (c->served) c->backend = c->served->backend.get();
    c->params.export_size = in.neg.export_info.size;
    c->params.read_only = in.neg.export_info.read_only;
    c->params.structured_replies = in.neg.structured_replies;
    c->params.base_allocation = in.neg.base_allocation;
    c->ctx_id = in.neg.base_allocation_id;
    c->size_mode = in.size_mode;
    c->epoch = in.epoch;
    ++live;
    self->live_.fetch_add(1, std::memory_order_relaxed);
    if (stopping.load(std::memory_order_acquire)) {
      Abort(c, "daemon shutting down");
      return;
    }
    PumpRecv(c);
  }

  // CheckRequest against the size this connection's mode says (see SizeMode).
  static proto::RequestCheck CheckSized(Connection* c, const proto::RequestHeader& h) {
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

  // The connection is finished with: nothing more is read or sent. Requests that hold no SQE
  // are dropped now; SQEs in flight are cancelled where io_uring can, and the connection is
  // freed when the last completion is in (MaybeFree). May free `c`.
  void Abort(Connection* c, const char* why) {
    if (c->life != ConnLife::kAborted) {
      spdlog::debug("nbd: closing connection to {}: {}", c->name(), why);
      SetLife(c, ConnLife::kAborted);
      self->draining_.fetch_add(1, std::memory_order_relaxed);
      // Wakes a pending recv/send with an error so that every socket SQE completes.
      shutdown(c->fd, SHUT_RDWR);
      CancelInFlight(c);
      DropQueued(c);
    }
    MaybeFree(c);
  }

  void CancelInFlight(Connection* c) {
    if (c->recv_inflight || c->send_inflight) {
      io_uring_sqe* sqe = GetSqe();
      io_uring_prep_cancel64(sqe, ConnTag(c, c->recv_inflight ? TagKind::kRecv : TagKind::kSend),
                             IORING_ASYNC_CANCEL_ALL);
      io_uring_sqe_set_data64(sqe, Tag{TagKind::kCancel}.Encode());
      if (c->recv_inflight && c->send_inflight) {
        sqe = GetSqe();
        io_uring_prep_cancel64(sqe, ConnTag(c, TagKind::kSend), IORING_ASYNC_CANCEL_ALL);
        io_uring_sqe_set_data64(sqe, Tag{TagKind::kCancel}.Encode());
      }
    }
    // A backend request cannot be called back: the backend calls done whatever happens, and
    // the connection waits for it (MaybeFree).
    if (c->backend) return;
    // Request I/O on the volume's files: a read or write already running in the block layer
    // cannot be called back and completes normally; one still queued is cancelled (-ECANCELED).
    for (Slot& s : c->slots) {
      if (s.state != SlotState::kExec) continue;
      if (s.gate_held) {
        // The client may resend this write on another connection and then write the same
        // blocks again; this stale copy must not land after that. The volume's writes wait.
        s.orphan = true;
        c->vol->gate().Orphan();
      }
      io_uring_sqe* sqe = GetSqe();
      io_uring_prep_cancel64(sqe, SlotTag(&s), 0);
      io_uring_sqe_set_data64(sqe, Tag{TagKind::kCancel}.Encode());
      self->cancels_.fetch_add(1, std::memory_order_relaxed);
    }
  }

  // Releases every request of `c` that holds no SQE (queued for tokens, parked, payload half
  // received, reply not yet sent) and takes its entries out of the worker's lists.
  void DropQueued(Connection* c) {
    const uint32_t id = c->id;
    auto mine = [id](uint64_t v) { return Tag::Decode(v).conn == id; };
    std::erase_if(throttled, mine);
    std::erase_if(parked, mine);
    c->cur_write = nullptr;
    c->drain_slot = nullptr;
    c->drain_left = 0;
    c->sendq_head = c->sendq_tail = nullptr;
    for (Slot& s : c->slots) {
      if (s.state == SlotState::kFree || engine::SlotHoldsSqe(s.state)) continue;
      Check(!s.gate_held, "request {:#x} holds the write gate in state {}", s.h.cookie,
            engine::SlotStateName(s.state));
      ReleaseSlot(&s, /*abort=*/true);
    }
  }

  void MaybeFree(Connection* c) {
    if (c->sqes > 0 || c->backend_reqs > 0 || c->life == ConnLife::kOpen) return;
    if (c->life == ConnLife::kClosing && (c->busy_slots > 0 || c->send_inflight)) return;
    Check(c->busy_slots == 0 && c->sqes == 0, "freeing connection {} with {} busy slots", c->id,
          c->busy_slots);
    close(c->fd);
    if (c->stats) c->stats->ConnectionClosed();
    if (c->life == ConnLife::kAborted) self->draining_.fetch_sub(1, std::memory_order_relaxed);
    const uint32_t id = c->id;
    table[id].reset();  // c is gone from here on
    free_ids.push_back(id);
    --live;
    self->live_.fetch_sub(1, std::memory_order_relaxed);
  }

  // ---- slots --------------------------------------------------------------------------------
  Slot* TakeSlot(Connection* c, const proto::RequestHeader& h) {
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
  void ReleaseSlot(Slot* s, bool abort = false) {
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

  bool Charge(Connection* c, Slot* s, uint64_t bytes) {
    if (!s->buf.Reserve(bytes)) return false;
    s->charged = bytes;
    c->inflight_bytes += bytes;
    return true;
  }

  // ---- receiving requests -----------------------------------------------------------------
  // Parses whatever the receive buffer holds, then asks for more. Runs after every recv.
  // May free `c` (bad framing, or a closing connection gone idle): callers must not use it after.
  void PumpRecv(Connection* c) {
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
  bool Receive(Connection* c, const proto::RequestHeader& h) {
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
  void StartDrain(Connection* c, Slot* s, uint32_t nbd_error, uint64_t bytes) {
    s->nbd_error = nbd_error;
    Move(s, SlotState::kDraining);
    c->drain_slot = s;
    c->drain_left = bytes;
  }

  void SubmitRecv(Connection* c) {
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

  void OnRecv(Connection* c, int res) {
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
  void Admit(Slot* s) {
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
  void RunThrottled() {
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
  void Execute(Slot* s) {
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
  io_uring_sqe* PrepareIo(Slot* s) {
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
  void Fenced(Slot* s) {
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

  void PrepareSpaceOp(Slot* s, io_uring_sqe* sqe) {
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
  void BlockStatus(Slot* s) {
    const proto::RequestHeader& h = s->h;
    std::array<proto::Extent, kMaxExtents> ext;
    bool req_one = h.flags & proto::kCmdFlagReqOne;
    int n = MapExtents(s->conn->vol->buffered_fd(), h.offset, h.length, ext.data(), ext.size(),
                       req_one);
    if (n <= 0) return Fail(s, n < 0 ? -n : EIO);
    ReplyExtents(s, ext.data(), static_cast<size_t>(n));
  }

  void ReplyExtents(Slot* s, const proto::Extent* ext, size_t n) {
    const proto::RequestHeader& h = s->h;
    size_t cap = 64 + kMaxExtents * 8;
    if (!s->buf.Reserve(cap)) return Fail(s, ENOMEM);
    size_t len = proto::EncodeBlockStatusReply(s->buf.data, cap, h.cookie, s->conn->ctx_id, ext, n);
    if (!len) return Fail(s, EIO);
    s->hdr_len = 0;
    s->data_len = static_cast<uint32_t>(len);
    QueueReply(s);
  }

  void OnIo(Slot* s, int res) {
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
  void SubmitToBackend(Slot* s) {
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
  void PostBackendDone(uint64_t tag, int res) {
    std::lock_guard lk(done_mu);
    const bool wake = done_posted.empty();
    done_posted.emplace_back(tag, res);
    if (wake) {
      uint64_t one = 1;
      if (write(efd, &one, sizeof one) < 0) {  // eventfd writes only fail on overflow
      }
    }
  }

  void TakeBackendDones() {
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

  void OnBackendDone(Slot* s, int res) {
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
  void EndWrite(Slot* s) {
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
  void Promise(Slot* s) {
    if (!s->conn->vol->CheckDataFile()) return ReplyError(s, proto::kErrIo);
    Complete(s);
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
      spdlog::error("nbd: {}: request type {} offset {} length {} failed: {}", s->conn->name(),
                    s->h.type, s->h.offset, s->h.length, strerror(err));
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
  void FlushSends(Connection* c) {
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

  void SubmitSend(Connection* c) {
    c->msg = msghdr{};
    c->msg.msg_iov = &c->iov[c->iov_idx];
    c->msg.msg_iovlen = c->iov_cnt - c->iov_idx;
    io_uring_sqe* sqe = GetSqe();
    io_uring_prep_sendmsg(sqe, c->fd, &c->msg, MSG_NOSIGNAL);
    io_uring_sqe_set_data64(sqe, ConnTag(c, TagKind::kSend));
    c->send_inflight = true;
    ++c->sqes;
  }

  void ReleaseSending(Connection* c) {
    for (size_t i = 0; i < c->nsending; ++i) ReleaseSlot(c->sending[i]);
    c->nsending = 0;
  }

  void OnSend(Connection* c, int res) {
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
};

Worker::Worker(int index, WorkerOptions opts) : impl_(std::make_unique<Impl>(this, index, opts)) {}

EngineCounters Worker::counters() const {
  EngineCounters c;
  c.stale_dropped = stale_.load(std::memory_order_relaxed);
  c.invariant_violations = violations_.load(std::memory_order_relaxed);
  c.cancels = cancels_.load(std::memory_order_relaxed);
  c.throttled = throttled_.load(std::memory_order_relaxed);
  c.parked = parked_.load(std::memory_order_relaxed);
  c.workers_running = running_.load(std::memory_order_relaxed) ? 1 : 0;
  c.fenced_requests = fenced_.load(std::memory_order_relaxed);
  c.backend_dropped = backend_dropped_.load(std::memory_order_relaxed);
  c.draining_connections = draining_.load(std::memory_order_relaxed);
  return c;
}

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
  EngineCounters c = counters();
  if (c.stale_dropped || c.invariant_violations)
    spdlog::error("worker {}: {} stale completions dropped, {} engine invariant violations", m.index,
                  c.stale_dropped, c.invariant_violations);
}

namespace {

void Post(Worker::Impl& m, Worker::Impl::Incoming in) {
  bool taken = false;
  {
    std::lock_guard lk(m.mu);
    if (!m.exited) {
      m.incoming.push_back(std::move(in));
      taken = true;
    }
  }
  if (!taken) {
    // The worker has stopped: nobody would serve this connection. (The frontend stops
    // accepting before it stops the workers, so this is only a guard.)
    in.Refuse();
    return;
  }
  uint64_t one = 1;
  if (write(m.efd, &one, sizeof one) < 0) spdlog::warn("worker {}: eventfd write failed", m.index);
}

}  // namespace

void Worker::Adopt(int fd, std::shared_ptr<Volume> volume, const nbd::Negotiated& negotiated,
                   SizeMode size_mode, uint64_t epoch) {
  Post(*impl_, Impl::Incoming{fd, std::move(volume), nullptr, negotiated, size_mode, epoch});
}

void Worker::Adopt(int fd, std::shared_ptr<ServedBackend> backend,
                   const nbd::Negotiated& negotiated, SizeMode size_mode) {
  // A backend's size is fixed (backend.h): no window to grow into.
  if (size_mode == SizeMode::kWindow) size_mode = SizeMode::kNegotiated;
  Post(*impl_, Impl::Incoming{fd, nullptr, std::move(backend), negotiated, size_mode, 0});
}

void Worker::CloseRemoved() {
  Impl& m = *impl_;
  m.close_removed.store(true, std::memory_order_release);
  std::lock_guard lk(m.mu);  // as in Post: never write the eventfd of a worker that has exited
  if (m.exited) return;
  uint64_t one = 1;
  if (write(m.efd, &one, sizeof one) < 0) spdlog::warn("worker {}: eventfd write failed", m.index);
}

}  // namespace nbdcsi::datapath
