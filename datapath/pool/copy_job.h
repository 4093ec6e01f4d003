// CopyJob: a sparse-aware background copy of one file into another, used for snapshots,
// restores and clones on file systems without reflink (ext4).
//
// Point-in-time without pausing writes for the whole copy: when the source is a live volume,
// the job is installed as the source's copy-before-write Preserver (write_gate.h) while the
// gate is closed and drained. From then on a write may only touch a chunk once the job has
// copied that chunk's old contents; a write to a chunk not copied yet is parked by its worker
// and the chunk jumps the queue, so the writer waits for one chunk copy, not the whole volume.
// The copy therefore equals the source as it was at the instant the gate was closed.
// When the source is immutable (a snapshot), no gate is given and nothing waits.
//
// Holes stay holes: each chunk is mapped with SEEK_DATA/SEEK_HOLE and only data ranges are
// copied (copy_file_range, which the kernel may turn into a server-side or reflink copy).
#pragma once

#include <atomic>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "common/status.h"
#include "datapath/pool/write_gate.h"

namespace nbdcsi::datapath {

class CopyJob final : public Preserver, public std::enable_shared_from_this<CopyJob> {
 public:
  struct Options {
    int src_fd = -1;           // read with pread/copy_file_range (a buffered descriptor)
    int dst_fd = -1;           // already sized (ftruncate) by the caller; sparse
    uint64_t length = 0;       // bytes of the source to copy
    uint64_t chunk_size = uint64_t{1} << 20;
    // The live source's gate, or nullptr for an immutable source. When given, Start installs
    // the job as its Preserver; the caller must hold the gate closed and drained around Start
    // (CloseAndDrain before, Open after) so no write slips between the two.
    WriteGate* gate = nullptr;
    // Called once from the job's thread when the copy has finished (after fsync of dst),
    // failed (e.g. ENOSPC), or was cancelled (ECANCELED). The preserver is already removed
    // from the gate when it runs.
    std::function<void(const Status&)> on_done;
  };

  // Invalid options (negative fd, chunk_size 0) are reported as EINVAL through on_done and
  // the job is never installed in the gate. Throws std::system_error only if no thread can
  // be created (the gate is then left without the preserver).
  // Lifetime: while installed, the gate holds a reference, so the job runs to its end.
  // Without a gate, dropping the last handle cancels and joins (on_done has run when the
  // destructor returns). If on_done drops the last handle, the job's thread detaches itself.
  static std::shared_ptr<CopyJob> Start(Options opts);
  ~CopyJob() override;

  uint64_t total_bytes() const { return opts_.length; }
  uint64_t copied_bytes() const { return copied_.load(std::memory_order_relaxed); }
  // Progress in data, not in address space: a sparse volume's copy spends its time on its
  // allocated ranges, so a percentage of the virtual size would race through the holes and
  // crawl through the data. data_total_bytes() is the source's data (SEEK_DATA ranges) when the
  // copy starts, 0 until the job thread has mapped it (data_known() says which); every data byte
  // the job copies counts once, so data_copied_bytes() ends equal to data_total_bytes().
  bool data_known() const { return data_known_.load(std::memory_order_acquire); }
  uint64_t data_total_bytes() const { return data_total_.load(std::memory_order_relaxed); }
  uint64_t data_copied_bytes() const { return data_copied_.load(std::memory_order_relaxed); }
  bool finished() const { return finished_.load(std::memory_order_acquire); }
  // Stops at the next chunk boundary; on_done gets ECANCELED. Does not wait.
  void Cancel();
  // Blocks until the thread has finished (on_done has returned).
  void Wait();

  // Preserver
  uint64_t chunk_size() const override { return opts_.chunk_size; }
  bool Preserved(uint64_t index) const override;
  void Prioritize(uint64_t first, uint64_t last) override;

 private:
  explicit CopyJob(Options opts);
  void Run();
  uint64_t NextChunk(bool* urgent, bool* notify);
  Status CopyChunk(uint64_t index);
  Status CopyRange(uint64_t off, uint64_t end);
  Status ClearRange(uint64_t off, uint64_t end);
  Status MapData();

  Options opts_;
  uint64_t nchunks_ = 0;
  // Per chunk: 0 = pending, 1 = being copied, 2 = preserved.
  std::unique_ptr<std::atomic<uint8_t>[]> state_;
  std::atomic<uint64_t> copied_{0};
  std::atomic<uint64_t> data_total_{0};
  std::atomic<uint64_t> data_copied_{0};
  std::atomic<bool> data_known_{false};
  std::atomic<bool> cancel_{false};
  std::atomic<bool> finished_{false};
  std::mutex mu_;
  std::deque<uint64_t> urgent_;  // guarded by mu_: chunks writers wait for
  std::vector<bool> queued_;     // guarded by mu_: chunk is in urgent_ (no duplicates)
  // Job thread only.
  bool valid_ = false;           // options passed the checks in Start
  uint64_t cursor_ = 0;          // next chunk in sequential order
  bool use_copy_file_range_ = true;
  std::vector<char> bounce_;     // pread/pwrite fallback buffer, allocated on first use
  std::mutex join_mu_;           // Wait may be called from several threads
  std::thread thread_;
};

}  // namespace nbdcsi::datapath
