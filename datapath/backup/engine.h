// Backup of one immutable source (a snapshot's data file) into a Repository, and restore of a
// backup into a blank file. No pool here: datapath/backup/jobs.h finds the files, this file
// moves the bytes.
//
// Backup: the source is cut into fixed chunks (Manifest::chunk_size). A chunk with no data
// (SEEK_DATA finds none in it: never written) or with only zeros is skipped and restores as a
// hole. Every other chunk is hashed (SHA-256 of its bytes; in an encrypted target its HMAC, and
// the stored form sealed, Repository::ChunkName/EncodeChunk), and uploaded zstd-compressed under
// that name unless the target already holds it (one listing of the chunks at the start, taken
// under the backup lease, so no collection can remove what it lists). The manifest is written
// last: a backup that dies before it leaves chunks only, which no listing shows and the next
// collection removes. A few threads read, hash, compress and upload in parallel; the optional
// bandwidth limit paces the compressed bytes sent.
//
// Restore: every chunk is fetched, authenticated (AES-256-GCM tag, encrypted targets),
// decompressed to exactly its length and its name (SHA-256 or HMAC) recomputed and checked
// against the manifest before it is written; a chunk that fails is an EIO naming the offset and
// the key, and the restore stops. Ranges without a chunk, and zero blocks inside a chunk, are
// not written (holes stay holes).
// The destination is fsynced at the end.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <mutex>
#include <string>

#include "datapath/backup/manifest.h"
#include "datapath/backup/repository.h"

namespace nbdcsi::datapath::backup {

// Counters a running job reports (nbdctl backup inspect, the daemon's log).
struct Progress {
  std::atomic<uint64_t> total_bytes{0};        // bytes of the volume to go through
  std::atomic<uint64_t> done_bytes{0};         // of those, done (holes count as done)
  // The same in allocated data (chunks that are not holes): what takes time, so what progress
  // and ETA are counted in. The total is known once the source's holes are mapped (backup) or
  // the manifest is read (restore).
  std::atomic<bool> data_total_known{false};
  std::atomic<uint64_t> data_total_bytes{0};
  std::atomic<uint64_t> data_done_bytes{0};
  std::atomic<uint64_t> transferred_bytes{0};  // compressed bytes uploaded or downloaded
  std::atomic<uint64_t> chunks_uploaded{0};    // new chunks (backup)
  std::atomic<uint64_t> chunks_reused{0};      // chunks the target already held (backup)
  std::atomic<uint64_t> chunks_restored{0};    // restore
};

// Paces a byte stream to `bytes_per_s` (0: unlimited). Thread-safe; a caller sleeps in Consume
// until its bytes fit, so one chunk may go at line rate and the average holds over a few.
class RateLimiter {
 public:
  explicit RateLimiter(uint64_t bytes_per_s) : rate_(bytes_per_s) {}
  // False when `cancel` was set while waiting (checked every 100 ms): a slow limit must not
  // hold up a cancel or a daemon's shutdown.
  bool Consume(uint64_t bytes, const std::atomic<bool>* cancel = nullptr);

 private:
  uint64_t rate_;
  std::mutex mu_;
  std::chrono::steady_clock::time_point next_{};
};

struct BackupSpec {
  std::string name;
  int fd = -1;        // the source, read with pread; must not change while the backup runs
  uint64_t size = 0;  // bytes of it to back up
  std::string source_volume;
  std::string source_snapshot;
  int64_t created_unix_ns = 0;  // the source's point in time
  uint64_t chunk_size = kDefaultChunkSize;
  uint64_t bandwidth_bytes_per_s = 0;
  unsigned threads = 4;
  const std::atomic<bool>* cancel = nullptr;  // ECANCELED at the next chunk when set
  // Tests: called after each chunk is done (from the thread that did it).
  std::function<void(uint64_t offset)> after_chunk;
};

// The written manifest. A manifest of that name that already exists is returned as it is when
// it records the same source snapshot and volume (a retried call), else EEXIST.
StatusOr<Manifest> RunBackup(Repository& repo, const BackupSpec& spec, Progress* progress);

struct RestoreSpec {
  int fd = -1;  // blank (sparse) destination, at least the backup's volume size long
  unsigned threads = 4;
  const std::atomic<bool>* cancel = nullptr;
};

// `manifest` comes from repo.Read (the caller sizes the destination from it first).
Status RunRestore(Repository& repo, const Manifest& manifest, const RestoreSpec& spec,
                  Progress* progress);

}  // namespace nbdcsi::datapath::backup
