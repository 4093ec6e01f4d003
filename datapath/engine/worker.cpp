// The engine worker's thread, its wake-ups and each connection's lifecycle (worker_impl.h says how
// the worker is split). Nothing here runs once per request.
#include "datapath/engine/worker.h"

#include <sys/eventfd.h>

#include <future>
#include <new>

#include "datapath/engine/worker_impl.h"

namespace nbdcsi::datapath {

using namespace worker_internal;

// ---- new connections and shutdown -------------------------------------------------------

bool Worker::Impl::OnWake(int res) {
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

void Worker::Impl::AddConnection(Incoming in) {
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

// The connection is finished with: nothing more is read or sent. Requests that hold no SQE
// are dropped now; SQEs in flight are cancelled where io_uring can, and the connection is
// freed when the last completion is in (MaybeFree). May free `c`.
void Worker::Impl::Abort(Connection* c, const char* why) {
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

NBDCSI_WORKER_INLINE void Worker::Impl::CancelInFlight(Connection* c) {
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
NBDCSI_WORKER_INLINE void Worker::Impl::DropQueued(Connection* c) {
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

void Worker::Impl::MaybeFree(Connection* c) {
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
    spdlog::error("worker {}: {} stale completions dropped, {} engine invariant violations",
                  m.index, c.stale_dropped, c.invariant_violations);
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
