// Resync: copies ranges of a volume from a source replica to a destination replica (issue 16,
// "Resync"). Two jobs:
//   - RunDirty(bitmap): a returning replica gets only the regions its RegionBitmap marks, and
//     each region's bit is cleared (durably) once its copy is flushed on the destination;
//   - RunFull(): a new replica gets the whole volume, except what the source's BLOCK_STATUS
//     (base:allocation) reports as reading zeroes.
//
// What "done" means: a byte is reported done (progress, bitmap cleared) only after the
// destination acknowledged its WRITE and then a FLUSH issued after that acknowledgement
// returned OK. Holes skipped by RunFull are done at once (nothing was written).
//
// Holes in RunFull: HolePolicy::kSkip assumes the destination reads zeroes wherever it was
// never written (a fresh thin volume from the pool: the normal case of a new or replaced
// replica); HolePolicy::kWriteZeroes sends WRITE_ZEROES for them instead, for a destination that
// may hold stale data (a replica whose bitmap was lost). RunDirty never skips: a region the
// source has trimmed since must be zeroes on the destination too, so it is copied as read.
//
// Concurrent writes: RunDirty calls bitmap.BeginCopy(unit) before it reads a unit and
// bitmap.ClearCopied(unit) after the flush, so a region the target marks while it is being
// copied stays dirty; the caller runs passes until dirty_bytes() is 0 (or small enough to
// finish with writes held). RunFull does not track concurrent writes: for a new replica of a
// live volume the target makes a bitmap, MarkAllDurable(), and runs RunDirty with
// dirty_uses_block_status (holes by options.holes), which tracks them.
//
// Errors: the first failure (a READ, WRITE, WRITE_ZEROES, FLUSH or BLOCK_STATUS error, a
// bitmap error) stops the job: nothing new is issued, everything in flight is awaited (the
// buffers are the job's), and Run returns that errno with the step and the byte range in the
// message; progress().failed names the range. Cancel() ends it the same way with ECANCELED.
// Nothing is reported done that was not flushed.
//
// Threads: Run* blocks the calling thread, which does all the planning; the channels' callbacks
// only queue events for it. Cancel() and progress() may be called from any thread.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <vector>

#include "common/status.h"
#include "datapath/replica/client.h"
#include "datapath/replica/region_bitmap.h"

namespace nbdcsi::replica {

// What Resync needs of a replica: the ReplicaClient calls (ClientBlockChannel below), or a fake in
// unit tests. Same contract as ReplicaClient: an error return means no callback; OK means the
// callback runs exactly once, on any thread, possibly before the call returns.
class BlockChannel {
 public:
  virtual ~BlockChannel() = default;
  virtual const ExportProperties& props() const = 0;
  virtual Status Read(uint64_t offset, std::span<uint8_t> buf, Callback cb) = 0;
  virtual Status Write(uint64_t offset, std::span<const uint8_t> data, Callback cb) = 0;
  virtual Status WriteZeroes(uint64_t offset, uint32_t length, Callback cb) = 0;
  virtual Status Flush(Callback cb) = 0;
  virtual Status BlockStatus(uint64_t offset, uint32_t length, BlockStatusCallback cb) = 0;
};

// A ReplicaClient as a BlockChannel (writes without FUA: the job flushes).
class ClientBlockChannel : public BlockChannel {
 public:
  explicit ClientBlockChannel(ReplicaClient& c) : c_(c) {}
  const ExportProperties& props() const override { return c_.export_properties(); }
  Status Read(uint64_t offset, std::span<uint8_t> buf, Callback cb) override {
    return c_.Read(offset, buf, std::move(cb));
  }
  Status Write(uint64_t offset, std::span<const uint8_t> data, Callback cb) override {
    return c_.Write(offset, data, false, std::move(cb));
  }
  Status WriteZeroes(uint64_t offset, uint32_t length, Callback cb) override {
    return c_.WriteZeroes(offset, length, false, false, std::move(cb));
  }
  Status Flush(Callback cb) override { return c_.Flush(std::move(cb)); }
  Status BlockStatus(uint64_t offset, uint32_t length, BlockStatusCallback cb) override {
    return c_.BlockStatus(offset, length, std::move(cb));
  }

 private:
  ReplicaClient& c_;
};

// Paces bytes to a rate: pure arithmetic over the times it is given (the injectable clock:
// tests drive it with fake time points; Resync gives it steady_clock). Each Acquire(bytes, now)
// returns how long to wait before sending them; the sum of bytes sent by time t never exceeds rate
// * (t - first) + the first chunk.
class RateLimiter {
 public:
  using Clock = std::chrono::steady_clock;
  explicit RateLimiter(uint64_t bytes_per_second) : rate_(bytes_per_second) {}
  Clock::duration Acquire(uint64_t bytes, Clock::time_point now);
  uint64_t rate() const { return rate_; }

 private:
  uint64_t rate_;  // 0: unlimited
  std::optional<Clock::time_point> next_;
};

enum class HolePolicy { kSkip, kWriteZeroes };

struct ResyncProgress {
  uint64_t total_bytes = 0;    // what the job covers (dirty bytes, or the volume)
  uint64_t copied_bytes = 0;   // read from the source, written and flushed on the destination
  uint64_t skipped_bytes = 0;  // holes not written (RunFull, kSkip)
  uint64_t zeroed_bytes = 0;   // holes written as WRITE_ZEROES and flushed (kWriteZeroes)
  std::chrono::steady_clock::duration elapsed{};
  bool finished = false;
  std::optional<ByteRange> failed;  // the range of the first failure

  uint64_t done_bytes() const { return copied_bytes + skipped_bytes + zeroed_bytes; }
  double percent() const {
    return total_bytes == 0 ? 100.0 : 100.0 * static_cast<double>(done_bytes()) / total_bytes;
  }
  // Remaining time at the average speed so far; nothing before the first byte is done.
  std::optional<std::chrono::seconds> eta() const;
};

struct ResyncOptions {
  uint32_t chunk_bytes = 1 << 20;            // per READ/WRITE; capped by both peers' max_block
  int max_in_flight = 8;                     // chunks being read or written at once
  uint64_t rate_bytes_per_second = 0;        // bytes read from the source; 0: unlimited
  uint64_t flush_every_bytes = 64ull << 20;  // written bytes per destination FLUSH
  uint64_t unit_bytes = 4 << 20;             // bytes reported done (and cleared) together
  uint32_t block_status_bytes = 16 << 20;    // span of one BLOCK_STATUS
  HolePolicy holes = HolePolicy::kSkip;      // RunFull, and RunDirty with block status
  // RunDirty asks the source's BLOCK_STATUS too and treats holes by `holes` (a new replica's
  // all-dirty bitmap); off by default, since a returning replica may hold stale data there.
  bool dirty_uses_block_status = false;
  // Called on the Run thread after each flush that completes units (and at the end).
  std::function<void(const ResyncProgress&)> on_progress;
};

class Resync {
 public:
  Resync(BlockChannel& source, BlockChannel& destination, ResyncOptions options = {});
  ~Resync();
  Resync(const Resync&) = delete;
  Resync& operator=(const Resync&) = delete;

  // One pass over the regions dirty when it starts. EINVAL when the bitmap's volume size is not
  // the peers' export size (or the peers disagree). Regions marked during the pass stay dirty.
  Status RunDirty(RegionBitmap& bitmap);
  // The whole volume, holes by options.holes. A source without base:allocation is copied whole
  // (logged).
  Status RunFull();

  // Any thread: the running job stops as after an error, with ECANCELED.
  void Cancel();
  ResyncProgress progress() const;

  struct Job;

 private:
  Status Start(Job& job);

  BlockChannel& src_;
  BlockChannel& dst_;
  ResyncOptions opts_;
  mutable std::mutex mu_;
  ResyncProgress progress_;                        // guarded by mu_
  bool cancel_ = false;                            // guarded by mu_
  Job* job_ = nullptr;                             // guarded by mu_, the one running
  bool running_ = false;                           // guarded by mu_
  std::chrono::steady_clock::time_point started_;  // guarded by mu_
};

}  // namespace nbdcsi::replica
