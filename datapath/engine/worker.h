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
#pragma once

#include <atomic>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "common/status.h"
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
  EngineCounters& operator+=(const EngineCounters& o) {
    stale_dropped += o.stale_dropped;
    invariant_violations += o.invariant_violations;
    cancels += o.cancels;
    throttled += o.throttled;
    parked += o.parked;
    workers_running += o.workers_running;
    fenced_requests += o.fenced_requests;
    fenced_handshakes += o.fenced_handshakes;
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

// Which size a connection's requests are checked against.
enum class SizeMode {
  // The size the client was told at the handshake (a volume grown later needs a new connection).
  kNegotiated,
  // The volume's size at each request: for the kernel's socketpairs, whose device learns a new
  // size through NBD_CMD_RECONFIGURE while the connections stay up.
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

  // Connections currently served by this worker.
  size_t connections() const { return live_.load(std::memory_order_relaxed); }
  EngineCounters counters() const;

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
  std::atomic<size_t> live_{0};
  // Written by the worker thread only; read by counters() from anywhere.
  std::atomic<uint64_t> stale_{0}, violations_{0}, cancels_{0}, throttled_{0}, parked_{0},
      fenced_{0};
  std::atomic<bool> running_{false};
};

}  // namespace nbdcsi::datapath
