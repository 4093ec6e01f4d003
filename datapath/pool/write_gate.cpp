#include "datapath/pool/write_gate.h"

#include <algorithm>

namespace nbdcsi::datapath {

bool WriteGate::TryBegin(uint64_t offset, uint64_t length,
                         const std::shared_ptr<GateWaiter>& waiter) {
  // Dekker-style handshake with CloseAndDrain: both sides use seq_cst, so either the closer
  // sees our increment (and waits for End) or we see closed_ (and back off).
  inflight_.fetch_add(1, std::memory_order_seq_cst);
  if (!closed_.load(std::memory_order_seq_cst) &&
      !has_preserver_.load(std::memory_order_seq_cst) &&
      !has_tracker_.load(std::memory_order_seq_cst) &&
      !orphans_.load(std::memory_order_seq_cst)) {
    return true;
  }
  std::unique_lock lk(mu_);
  bool go = !closed_.load(std::memory_order_seq_cst) && !orphans_.load(std::memory_order_seq_cst);
  if (go && preserver_ && length > 0) {
    uint64_t cs = preserver_->chunk_size();
    uint64_t first = offset / cs, last = (offset + length - 1) / cs;
    for (uint64_t c = first; c <= last; ++c) {
      if (!preserver_->Preserved(c)) {
        preserver_->Prioritize(first, last);
        go = false;
        break;
      }
    }
  }
  if (go) {
    if (tracker_) tracker_->Mark(offset, length);
    return true;
  }
  bool known = std::any_of(waiters_.begin(), waiters_.end(), [&](const auto& w) {
    return !w.owner_before(waiter) && !waiter.owner_before(w);
  });
  if (!known) waiters_.push_back(waiter);
  if (inflight_.fetch_sub(1, std::memory_order_seq_cst) == 1 && closed_.load()) {
    drained_.notify_all();
  }
  return false;
}

void WriteGate::End() {
  if (inflight_.fetch_sub(1, std::memory_order_seq_cst) == 1 &&
      closed_.load(std::memory_order_seq_cst)) {
    std::lock_guard lk(mu_);
    drained_.notify_all();
  }
}

void WriteGate::Orphan() { orphans_.fetch_add(1, std::memory_order_seq_cst); }

void WriteGate::EndOrphan() {
  // The waker takes mu_ so that a TryBegin that saw the orphan and is about to register its
  // waiter cannot miss this wake-up.
  if (orphans_.fetch_sub(1, std::memory_order_seq_cst) == 1) {
    std::lock_guard lk(mu_);
    WakeAllLocked();
  }
}

void WriteGate::CloseAndDrain() {
  std::unique_lock lk(mu_);
  closed_.store(true, std::memory_order_seq_cst);
  drained_.wait(lk, [this] { return inflight_.load(std::memory_order_seq_cst) == 0; });
}

void WriteGate::Open() {
  std::lock_guard lk(mu_);
  closed_.store(false, std::memory_order_seq_cst);
  WakeAllLocked();
}

void WriteGate::SetPreserver(std::shared_ptr<Preserver> p) {
  std::lock_guard lk(mu_);
  preserver_ = std::move(p);
  has_preserver_.store(preserver_ != nullptr, std::memory_order_seq_cst);
}

void WriteGate::ClearPreserver() {
  std::lock_guard lk(mu_);
  preserver_.reset();
  has_preserver_.store(false, std::memory_order_seq_cst);
  WakeAllLocked();
}

void WriteGate::NotifyPreserved() {
  std::lock_guard lk(mu_);
  WakeAllLocked();
}

void WriteGate::SetTracker(std::shared_ptr<DirtyTracker> t) {
  std::lock_guard lk(mu_);
  tracker_ = std::move(t);
  has_tracker_.store(tracker_ != nullptr, std::memory_order_seq_cst);
}

void WriteGate::ClearTracker() { SetTracker(nullptr); }

void DirtyTracker::Mark(uint64_t offset, uint64_t length) {
  if (!length) return;
  std::lock_guard lk(mu_);
  for (uint64_t c = offset / chunk_; c <= (offset + length - 1) / chunk_; ++c) chunks_.push_back(c);
}

std::vector<std::pair<uint64_t, uint64_t>> DirtyTracker::Ranges(uint64_t limit) const {
  std::vector<uint64_t> c;
  {
    std::lock_guard lk(mu_);
    c = chunks_;
  }
  std::sort(c.begin(), c.end());
  c.erase(std::unique(c.begin(), c.end()), c.end());
  std::vector<std::pair<uint64_t, uint64_t>> out;
  for (uint64_t idx : c) {
    uint64_t start = idx * chunk_;
    if (start >= limit) break;
    uint64_t end = std::min(start + chunk_, limit);
    if (!out.empty() && out.back().first + out.back().second == start) {
      out.back().second += end - start;
    } else {
      out.emplace_back(start, end - start);
    }
  }
  return out;
}

void WriteGate::WakeAllLocked() {
  for (const auto& w : waiters_) {
    if (auto alive = w.lock()) alive->GateOpened();
  }
  waiters_.clear();
}

}  // namespace nbdcsi::datapath
