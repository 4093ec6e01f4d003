// The engine worker's insides (worker.h has the interface), shared by its two translation units:
//   worker.cpp           the thread, its wake-ups (new connections, removed exports, parked
//                        writes, shutdown) and each connection's lifecycle (add, abort, free);
//   worker_requests.cpp  the ring loop and every request's path through it: receive, QoS,
//                        execute on the volume's files or a backend, reply.
// The helpers every step calls (invariant checks, state moves, tags, SQEs) are defined here, in
// the class, so both units inline them as before the split. Private to datapath/engine.
#pragma once

#include <fcntl.h>
#include <liburing.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <spdlog/spdlog.h>

#include "datapath/engine/request_state.h"
#include "datapath/engine/uring_sqe.h"
#include "datapath/engine/worker.h"
#include "datapath/nbd/codec.h"
#include "datapath/nbd/negotiate.h"
#include "datapath/nbd/proto.h"

// For the steps that were inlined into their callers when the worker was one translation unit
// whose types had internal linkage. Split, the types have external linkage, and GCC no longer
// inlines by itself what it then knew to have one caller (PrepareIo into Execute, Receive and
// SubmitRecv into PumpRecv, the completion handlers into Run): forced, the request path keeps the
// code it had, with no call per request added. Each is defined, and used, in one unit only.
#define NBDCSI_WORKER_INLINE [[gnu::always_inline]] inline

namespace nbdcsi::datapath {
namespace worker_internal {

namespace proto = nbd;
using engine::ConnLife;
using engine::SlotState;
using engine::Tag;
using engine::TagKind;

inline constexpr size_t kRecvBufSize = 256 * 1024;
inline constexpr int kSlotsPerConn = 64;
static_assert(kSlotsPerConn <= 256, "a slot index must fit the 8 bits of a Tag");
inline constexpr size_t kIovMax = 64;  // two iovecs (header, data) per reply
// Slot buffers grow to the largest request seen and are reused, so steady-state requests never
// allocate. Buffers above this size (rare huge requests) are given back after the reply.
inline constexpr size_t kKeepBuffer = size_t{4} << 20;
// Requests with data that one connection may have in flight before we stop reading new headers.
inline constexpr uint64_t kMaxInflightBytes = uint64_t{128} << 20;
// O_DIRECT needs offset and length aligned to the device's logical block; 512 is the common case.
// If the device wants more, the kernel returns EINVAL and that request is retried buffered.
inline constexpr uint32_t kDirectAlign = 512;
// A WRITE payload at least this big, with nothing else buffered, is received straight into its
// slot instead of through the connection's receive buffer (saves a copy).
inline constexpr uint32_t kDirectRecvMin = 16 * 1024;
inline constexpr size_t kMaxExtents = 1024;
inline constexpr size_t kZeroChunk = size_t{1} << 20;
// Requests waiting for QoS tokens are looked at again at least this often, so a limit raised or
// removed live (ControllerModifyVolume) frees them within this time.
inline constexpr uint64_t kThrottleRecheckNs = 100'000'000;

// Checked builds (Debug, sanitizers: NBDCSI_STRICT_CHECKS) stop at the first broken invariant of
// the request life cycle, with the state that broke it; release builds count it (the counters
// reach `nbdctl`, tests and logs) and carry on with the safe choice at each site.
#ifdef NBDCSI_STRICT_CHECKS
inline constexpr bool kStrict = true;
#else
inline constexpr bool kStrict = false;
#endif

// Every buffer a connection owns (its receive buffer, its slots' data buffers, the Connection
// itself) is its own anonymous mapping, given back with munmap when the connection goes. Through
// malloc they would live in the worker thread's arena between long-lived allocations, and glibc
// keeps freed arena memory resident: after 1,000 short connections the daemon held 14 MiB more
// than before (malloc_stats: 14 MiB "system", 85 KiB "in use" in the worker's arena), and the
// 256 KiB receive buffers land in the arena too once glibc has raised its mmap threshold past
// them. A mapping is page-granular, which these buffers are anyway (O_DIRECT alignment).
inline void* MapPages(size_t bytes) {
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  return p == MAP_FAILED ? nullptr : p;
}
inline size_t PageRound(size_t n) { return (std::max<size_t>(n, 4096) + 4095) & ~size_t{4095}; }

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

inline datapath::OpKind StatKind(uint16_t type) {
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

inline bool Modifies(uint16_t type) {
  return type == proto::kCmdWrite || type == proto::kCmdTrim || type == proto::kCmdWriteZeroes;
}
}  // namespace worker_internal

struct Worker::Impl {
  using Slot = worker_internal::Slot;
  using Connection = worker_internal::Connection;
  using ConnLife = engine::ConnLife;
  using SlotState = engine::SlotState;
  using Tag = engine::Tag;
  using TagKind = engine::TagKind;

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
  worker_internal::AlignedBuffer zeros;
  uint64_t hold_sink = 0;  // where the test hold's eventfd reads land (WorkerOptions)

  Impl(Worker* s, int i, WorkerOptions o) : self(s), index(i), opts(o) {}

  // ---- invariants ---------------------------------------------------------------------------
  // Every broken rule of the request life cycle comes through here. Returns `ok` so call sites
  // read `if (!Check(...)) <safe choice>`.
  template <typename... Args>
  bool Check(bool ok, fmt::format_string<Args...> what, Args&&... args) {
    if (ok) return true;
    std::string msg = fmt::format(what, std::forward<Args>(args)...);
    if constexpr (worker_internal::kStrict) {
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
    if (c && t.slot < worker_internal::kSlotsPerConn && c->slots[t.slot].gen == t.gen && t.gen != 0)
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
  io_uring_sqe* GetSqe() { return engine::GetSqe(ring); }

  void ArmWake() {
    io_uring_sqe* sqe = GetSqe();
    io_uring_prep_read(sqe, efd, &efd_val, sizeof efd_val, 0);
    io_uring_sqe_set_data64(sqe, Tag{TagKind::kWake}.Encode());
  }

  void PublishGauges() {
    self->throttled_.store(throttled.size(), std::memory_order_relaxed);
    self->parked_.store(parked.size(), std::memory_order_relaxed);
  }

  // What follows is defined in worker_requests.cpp, but for the wake-ups and the connections'
  // lifecycle (OnWake to MaybeFree but CheckSized), which are in worker.cpp.

  // ---- the ring loop --------------------------------------------------------------------------
  int64_t ThrottleWaitNs();
  void Run();
  bool Dispatch(const Tag& t, int res);

  // ---- new connections and shutdown -------------------------------------------------------
  bool OnWake(int res);
  void AddConnection(Incoming in);
  static nbd::RequestCheck CheckSized(Connection* c, const nbd::RequestHeader& h);
  void Abort(Connection* c, const char* why);
  void CancelInFlight(Connection* c);
  void DropQueued(Connection* c);
  void MaybeFree(Connection* c);

  // ---- slots --------------------------------------------------------------------------------
  Slot* TakeSlot(Connection* c, const nbd::RequestHeader& h);
  void ReleaseSlot(Slot* s, bool abort = false);
  bool Charge(Connection* c, Slot* s, uint64_t bytes);

  // ---- receiving requests -----------------------------------------------------------------
  void PumpRecv(Connection* c);
  bool Receive(Connection* c, const nbd::RequestHeader& h);
  void StartDrain(Connection* c, Slot* s, uint32_t nbd_error, uint64_t bytes);
  void SubmitRecv(Connection* c);
  void OnRecv(Connection* c, int res);

  // ---- QoS ----------------------------------------------------------------------------------
  void Admit(Slot* s);
  void RunThrottled();

  // ---- executing ----------------------------------------------------------------------------
  void Execute(Slot* s);
  io_uring_sqe* PrepareIo(Slot* s);
  void Fenced(Slot* s);
  void PrepareSpaceOp(Slot* s, io_uring_sqe* sqe);
  void BlockStatus(Slot* s);
  void ReplyExtents(Slot* s, const nbd::Extent* ext, size_t n);
  void OnIo(Slot* s, int res);
  void OnSpaceOp(Slot* s, int res);

  // ---- backend exports ----------------------------------------------------------------------
  void SubmitToBackend(Slot* s);
  void PostBackendDone(uint64_t tag, int res);
  void TakeBackendDones();
  void OnBackendDone(Slot* s, int res);

  // ---- replies ------------------------------------------------------------------------------
  void EndWrite(Slot* s);
  void Promise(Slot* s);
  void Complete(Slot* s);
  void Fail(Slot* s, int err);
  void ReplyError(Slot* s, uint32_t nbd_error);
  void QueueReply(Slot* s);
  void FlushSends(Connection* c);
  void SubmitSend(Connection* c);
  void ReleaseSending(Connection* c);
  void OnSend(Connection* c, int res);
};

}  // namespace nbdcsi::datapath
