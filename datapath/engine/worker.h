// The transmission phase of NBD connections, driven by io_uring.
//
// Each Worker is one thread with one ring. A connection lives on exactly one worker for its whole
// life after the handshake, so its state is touched by a single thread and needs no locks; the
// connections of one export can sit on different workers and run in parallel (CAN_MULTI_CONN).
//
// Every request moves through named, checked states (request_state.h):
//   free -> new -> [payload received] -> [throttled] -> [parked] -> executing -> reply queued
//        -> sending -> free
// Requests are pipelined: many slots per connection are in flight at once, replies go out in
// completion order (NBD allows that) and several replies are gathered into one sendmsg.
// Every SQE names its request by (connection id, slot, generation), never by pointer, and a
// connection is freed only after its last SQE completed: a late completion cannot reach a
// connection or request that reuses the memory.
//
// A connection serves either a pool Volume (file I/O through the ring) or an ExportBackend
// (backend.h: a replicated volume's target). A backend's done callbacks come from any thread;
// they are posted to the worker by the same identity (connection id, slot, generation) and
// completed on the worker's thread, and a connection is freed only after every request it handed
// to the backend is done, as for SQEs.
#pragma once

#include <atomic>
#include <future>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "common/status.h"
#include "datapath/engine/backend.h"
#include "datapath/nbd/negotiate.h"
#include "datapath/pool/pool.h"

namespace nbdcsi::datapath {

// What a worker has seen of the request life cycle. The first two must stay 0: they count
// completions or queue entries that named a request that was gone (dropped, never delivered) and
// broken state-machine rules (in checked builds the first one aborts instead).
struct EngineCounters {
  uint64_t stale_dropped = 0;
  uint64_t invariant_violations = 0;
  uint64_t cancels = 0;    // in-flight I/O of aborted connections asked to cancel
  uint64_t throttled = 0;  // requests waiting for QoS tokens now
  uint64_t parked = 0;     // modifying requests held by a volume's WriteGate now
  uint64_t workers_running = 0;  // worker threads in their loop (liveness: /healthz)
  // Requests refused with EPERM because their connection's epoch is below the volume's fence
  // epoch (an old target after a failover), and handshakes refused for a stale or missing
  // epoch (NbdFrontend's share).
  uint64_t fenced_requests = 0;
  uint64_t fenced_handshakes = 0;
  // Backend completions of requests whose connection was aborted meanwhile (the client left,
  // the export was removed, shutdown): the slot is released and the reply dropped.
  uint64_t backend_dropped = 0;
  // Aborted connections still waiting for their in-flight I/O (SQEs, backend requests) now.
  uint64_t draining_connections = 0;
  EngineCounters& operator+=(const EngineCounters& o) {
    stale_dropped += o.stale_dropped;
    invariant_violations += o.invariant_violations;
    cancels += o.cancels;
    throttled += o.throttled;
    parked += o.parked;
    workers_running += o.workers_running;
    fenced_requests += o.fenced_requests;
    fenced_handshakes += o.fenced_handshakes;
    backend_dropped += o.backend_dropped;
    draining_connections += o.draining_connections;
    return *this;
  }
};

struct WorkerOptions {
  unsigned ring_entries = 256;
  // Tests only (engine_test's fence tests): an eventfd made with EFD_SEMAPHORE, or -1. Each
  // WRITE is then submitted linked behind a read of it, so it stays in flight in the ring
  // (submitted, holding its slot and the volume's write gate) until the test adds 1 to the
  // eventfd for it: the one way to hold a write "already submitted to io_uring" on purpose.
  int test_hold_writes_efd = -1;
};

// An ExportBackend as the engine serves it. The frontend's registry, handshakes in progress and
// every connection serving it each hold a reference, so the last of them to go ends its life:
// NbdFrontend::RemoveBackendExport waits for that (`gone`).
struct ServedBackend {
  explicit ServedBackend(std::shared_ptr<ExportBackend> b) : backend(std::move(b)) {}
  // The backend is let go before `gone` says so: whoever waits for it may destroy the backend
  // (or rely on being its last owner) as soon as it wakes.
  ~ServedBackend() {
    backend.reset();
    gone.set_value();
  }
  ServedBackend(const ServedBackend&) = delete;
  ServedBackend& operator=(const ServedBackend&) = delete;

  std::shared_ptr<ExportBackend> backend;  // set at construction, reset only by the destructor
  // Set when the export is removed: workers close its connections (Worker::CloseRemoved) and
  // refuse those handed over later.
  std::atomic<bool> removed{false};
  std::promise<void> gone;
};

// Which size a connection's requests are checked against.
enum class SizeMode {
  // The size the client was told at the handshake (a volume grown later needs a new connection).
  kNegotiated,
  // The volume's size at each request: for the kernel's socketpairs, whose device learns a new
  // size through NBD_CMD_RECONFIGURE while the connections stay up, and for a replicated
  // target's connections to a replica (VOLUME@epoch=N), which learn it by a fresh handshake.
  kLive,
  // The client was told a larger "window" (the negotiated size) than the volume has, because it
  // can never learn a new size (nbdfuse): reads past the volume's current end return zeroes,
  // and anything that writes past it fails with ENOSPC. The loop device on top limits itself to
  // the volume's size, so those are only read-ahead and bugs. See frontend.h kGrowableSuffix.
  kWindow,
};

class Worker {
 public:
  explicit Worker(int index, WorkerOptions opts = {});
  ~Worker();
  Worker(const Worker&) = delete;
  Worker& operator=(const Worker&) = delete;

  Status Start();
  // Closes every connection (in-flight I/O completes first) and joins the thread.
  void Stop();

  // Hands over a socket whose handshake has finished. Thread-safe; takes ownership of `fd`.
  // `epoch` is the one the client named (VOLUME@epoch=N), 0 for none: once the volume's fence
  // epoch is above it, every request it has not started yet is answered with EPERM.
  void Adopt(int fd, std::shared_ptr<Volume> volume, const nbd::Negotiated& negotiated,
             SizeMode size_mode = SizeMode::kNegotiated, uint64_t epoch = 0);
  // The same for a connection to a backend export (kNegotiated or kLive; the size is the
  // backend's). No QoS, write gate, fence epoch, data-lost check or volume statistics apply:
  // those are the pool's, and the backend's replicas have their own.
  void Adopt(int fd, std::shared_ptr<ServedBackend> backend, const nbd::Negotiated& negotiated,
             SizeMode size_mode = SizeMode::kNegotiated);
  // Closes, at once, every connection whose backend is marked removed (their requests in flight
  // at the backend still complete before the connection is freed). Thread-safe.
  void CloseRemoved();

  // Connections currently served by this worker.
  size_t connections() const { return live_.load(std::memory_order_relaxed); }
  EngineCounters counters() const;

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
  std::atomic<size_t> live_{0};
  // Written by the worker thread only; read by counters() from anywhere.
  std::atomic<uint64_t> stale_{0}, violations_{0}, cancels_{0}, throttled_{0}, parked_{0},
      fenced_{0}, backend_dropped_{0}, draining_{0};
  std::atomic<bool> running_{false};
};

}  // namespace nbdcsi::datapath
