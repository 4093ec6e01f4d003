// WriteGate: how the I/O workers and the operations that need a stable image of a volume
// (snapshot, clone) agree on when the volume's data may change.
//
// Workers call TryBegin before they submit any modifying command (WRITE, TRIM, WRITE_ZEROES)
// and End when it completes. A refused request is parked by its worker - never blocking the
// worker thread, so other volumes on that worker carry on - and retried after the gate calls
// the worker's GateWaiter::GateOpened.
//
// Three reasons to refuse:
//  1. The gate is closed (CloseAndDrain): a point-in-time operation is running. CloseAndDrain
//     returns once no modifying request is in flight; the caller makes the data durable, takes
//     its snapshot, then calls Open.
//  2. A copy-before-write preserver is installed (the background-copy snapshot on file systems
//     without reflink): a write touching a chunk the preserver has not copied yet waits until
//     it has. The preserver is asked to copy those chunks first, so the wait is one chunk copy.
//  3. A write of an aborted connection is still running (Orphan below): a newer write must not
//     be overtaken by it.
//
// The fast path (gate open, no preserver, no tracker) is a few atomic operations and no lock.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

namespace nbdcsi::datapath {

class GateWaiter {
 public:
  virtual ~GateWaiter() = default;
  // Called from any thread, possibly with the gate's lock held: must not block and must not
  // call back into the gate. Workers write to their eventfd.
  virtual void GateOpened() = 0;
};

// Copies chunks of the source to the snapshot before they may be overwritten.
class Preserver {
 public:
  virtual ~Preserver() = default;
  virtual uint64_t chunk_size() const = 0;
  // Whether chunk `index` has been preserved. Must be cheap and thread-safe.
  virtual bool Preserved(uint64_t index) const = 0;
  // A writer waits for chunks [first, last]: copy them next. Must not block or call into the gate.
  virtual void Prioritize(uint64_t first, uint64_t last) = 0;
};

// Records which chunks of a volume modifying requests touched while it is installed, so that a
// clone taken while writes flow can be fixed up under a short pause (copy.cpp CloneWhole).
class DirtyTracker {
 public:
  explicit DirtyTracker(uint64_t chunk_size) : chunk_(chunk_size) {}
  void Mark(uint64_t offset, uint64_t length);
  // The marked chunks as merged byte ranges [offset, offset + length), clipped to `limit`.
  std::vector<std::pair<uint64_t, uint64_t>> Ranges(uint64_t limit) const;
  uint64_t chunk_size() const { return chunk_; }

 private:
  uint64_t chunk_;
  mutable std::mutex mu_;
  std::vector<uint64_t> chunks_;  // marked chunk indexes, unsorted, may repeat
};

class WriteGate {
 public:
  // --- worker side -------------------------------------------------------------------------
  // true: the modifying request on [offset, offset + length) may run now; End() must follow.
  // false: park it; `waiter` is told (GateOpened) when it is worth retrying.
  // The gate keeps only a weak reference: a waiter that is gone is simply skipped.
  bool TryBegin(uint64_t offset, uint64_t length, const std::shared_ptr<GateWaiter>& waiter);
  void End();
  // The modifying request that called TryBegin belonged to a connection that was aborted while
  // it ran: its client has given up on it and may already have resent it on another connection
  // (the kernel requeues a timed-out request on a live socket). Until it lands, a newer write
  // to the same blocks could be overtaken by this stale one, so new modifying requests park
  // while any orphan is in flight. EndOrphan (before End) lifts that and wakes them.
  void Orphan();
  void EndOrphan();

  // --- operation side (may block; one operation at a time per volume) ------------------------
  // New modifying requests park; returns when none is in flight.
  void CloseAndDrain();
  // Lets parked requests go again.
  void Open();
  // Installs a copy-before-write preserver (call with the gate closed and drained).
  void SetPreserver(std::shared_ptr<Preserver> p);
  // Removes it (the copy finished or was abandoned) and wakes parked writers.
  void ClearPreserver();
  // The preserver finished some chunks: wake parked writers so they re-check.
  void NotifyPreserved();
  // Every modifying request admitted while a tracker is installed marks its range in it.
  // Install it with the gate closed and drained, so no write escapes it.
  void SetTracker(std::shared_ptr<DirtyTracker> t);
  void ClearTracker();

  // Includes, for an instant, attempts that are about to be refused.
  uint64_t in_flight() const { return inflight_.load(std::memory_order_acquire); }
  bool closed() const { return closed_.load(std::memory_order_acquire); }

 private:
  void WakeAllLocked();

  std::atomic<uint64_t> inflight_{0};
  std::atomic<bool> closed_{false};
  std::atomic<bool> has_preserver_{false};
  std::atomic<bool> has_tracker_{false};
  std::atomic<uint64_t> orphans_{0};
  std::mutex mu_;
  std::condition_variable drained_;
  std::shared_ptr<Preserver> preserver_;  // guarded by mu_
  std::shared_ptr<DirtyTracker> tracker_; // guarded by mu_
  std::vector<std::weak_ptr<GateWaiter>> waiters_;  // guarded by mu_; deduplicated
};

}  // namespace nbdcsi::datapath
