#include "datapath/backup/engine.h"

#include <fcntl.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <optional>
#include <thread>
#include <vector>

#include "datapath/backup/chunk.h"

namespace nbdcsi::datapath::backup {

bool RateLimiter::Consume(uint64_t bytes, const std::atomic<bool>* cancel) {
  if (rate_ == 0 || bytes == 0) return true;
  std::chrono::steady_clock::time_point start;
  {
    std::lock_guard lk(mu_);
    const auto now = std::chrono::steady_clock::now();
    start = std::max(now, next_);
    // 128-bit: bytes * 1e9 overflows 64 bits past 18 GB.
    next_ = start + std::chrono::nanoseconds(static_cast<int64_t>(
                        static_cast<unsigned __int128>(bytes) * 1'000'000'000ULL / rate_));
  }
  constexpr auto kStep = std::chrono::milliseconds(100);
  for (;;) {
    if (cancel && cancel->load()) return false;
    const auto now = std::chrono::steady_clock::now();
    if (now >= start) return true;
    std::this_thread::sleep_for(std::min<std::chrono::steady_clock::duration>(start - now, kStep));
  }
}

namespace {

// Runs work(i) for i in [0, n) on up to `threads` threads; the first error stops the others at
// their next item and is returned.
template <typename F>
Status ParallelFor(uint64_t n, unsigned threads, F work) {
  std::atomic<uint64_t> next{0};
  std::atomic<bool> failed{false};
  std::mutex mu;
  Status first;
  auto loop = [&] {
    for (;;) {
      if (failed.load()) return;
      uint64_t i = next.fetch_add(1);
      if (i >= n) return;
      Status s = work(i);
      if (!s.ok()) {
        std::lock_guard lk(mu);
        if (!failed.exchange(true)) first = s;
        return;
      }
    }
  };
  threads =
      std::max(1u, std::min<unsigned>(threads, static_cast<unsigned>(std::min<uint64_t>(n, 64))));
  std::vector<std::thread> pool;
  for (unsigned t = 1; t < threads; ++t) pool.emplace_back(loop);
  loop();
  for (auto& t : pool) t.join();
  return first;
}

Status PreadAll(int fd, char* buf, uint64_t len, uint64_t off) {
  while (len > 0) {
    ssize_t n = ::pread(fd, buf, len, static_cast<off_t>(off));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return Error(errno, "read at {}: {}", off, std::strerror(errno));
    if (n == 0) return Error(EIO, "read at {}: the source ended early", off);
    buf += n;
    len -= static_cast<uint64_t>(n);
    off += static_cast<uint64_t>(n);
  }
  return Status::Ok();
}

Status PwriteAll(int fd, const char* buf, uint64_t len, uint64_t off) {
  while (len > 0) {
    ssize_t n = ::pwrite(fd, buf, len, static_cast<off_t>(off));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return Error(errno, "write at {}: {}", off, std::strerror(errno));
    buf += n;
    len -= static_cast<uint64_t>(n);
    off += static_cast<uint64_t>(n);
  }
  return Status::Ok();
}

// Writes the runs of `data` that are not zero, in kZeroBlock blocks, at `off` of a blank
// destination: zeros inside a chunk (a partly written chunk, a file system's zeroed blocks)
// stay holes, so a restored volume allocates about what its source did.
constexpr uint64_t kZeroBlock = 4096;
Status WriteNonZero(int fd, const std::string& data, uint64_t off) {
  static const std::string kZeros(kZeroBlock, '\0');
  uint64_t run = 0, pos = 0;  // [run, pos) is a pending run of non-zero blocks
  while (pos < data.size()) {
    const uint64_t n = std::min<uint64_t>(kZeroBlock, data.size() - pos);
    const bool zero = std::memcmp(data.data() + pos, kZeros.data(), n) == 0;
    if (zero) {
      if (pos > run) {
        if (Status s = PwriteAll(fd, data.data() + run, pos - run, off + run); !s.ok()) return s;
      }
      run = pos + n;
    }
    pos += n;
  }
  if (pos > run) return PwriteAll(fd, data.data() + run, pos - run, off + run);
  return Status::Ok();
}

// True when [off, end) of fd holds no data extent (never written, or punched).
StatusOr<bool> IsHole(int fd, uint64_t off, uint64_t end) {
  off_t r = ::lseek(fd, static_cast<off_t>(off), SEEK_DATA);
  if (r < 0) {
    if (errno == ENXIO) return true;  // only holes up to EOF
    return Error(errno, "SEEK_DATA at {}: {}", off, std::strerror(errno));
  }
  return static_cast<uint64_t>(r) >= end;
}

bool AllZero(const std::string& data) {
  // Compare with a shifted copy of itself: zero iff the first byte is zero and all are equal.
  return data.empty() ||
         (data[0] == 0 && std::memcmp(data.data(), data.data() + 1, data.size() - 1) == 0);
}

// A backup of that name already in the target: returned when it is of the same source (a
// retried call), EEXIST otherwise; nullopt when there is none. The first call that reaches the
// store: bucket, credentials and endpoint fail here, clearly.
StatusOr<std::optional<Manifest>> FindExisting(Repository& repo, const BackupSpec& spec) {
  auto names = repo.ListNames();
  if (!names.ok()) return names.status();
  if (!std::binary_search(names->begin(), names->end(), spec.name)) {
    return std::optional<Manifest>();
  }
  auto existing = repo.Read(spec.name);
  if (!existing.ok()) return existing.status();
  if (existing->source_snapshot == spec.source_snapshot &&
      existing->source_volume == spec.source_volume) {
    return std::optional<Manifest>(std::move(*existing));
  }
  return Error(EEXIST,
               "backup \"{}\" already exists in this target, of snapshot \"{}\" of volume "
               "\"{}\"",
               spec.name, existing->source_snapshot, existing->source_volume);
}

// Which chunks of the source are holes. Mapped first (one lseek pair per chunk), so that
// progress is counted in allocated data from the start and a sparse volume's percentage does
// not race through its holes.
StatusOr<std::vector<bool>> MapHoles(const BackupSpec& spec, uint64_t nchunks, Progress* progress) {
  std::vector<bool> holes(nchunks);
  uint64_t data_total = 0;
  for (uint64_t i = 0; i < nchunks; ++i) {
    const uint64_t off = i * spec.chunk_size;
    const uint64_t len = std::min(spec.chunk_size, spec.size - off);
    auto hole = IsHole(spec.fd, off, off + len);
    if (!hole.ok()) {
      return Error(hole.status().code(), "backup \"{}\": {}", spec.name, hole.status().message());
    }
    holes[i] = *hole;
    if (!*hole) data_total += len;
  }
  if (progress) {
    progress->total_bytes = spec.size;
    progress->data_total_bytes = data_total;
    progress->data_total_known = true;
  }
  return holes;
}

// One backup's chunks on their way to the store, from spec.threads threads.
class ChunkUploader {
 public:
  // `known`: the chunks already stored, with their stored sizes (one listing per backup).
  ChunkUploader(Repository& repo, const BackupSpec& spec, Progress* progress, Lease& lease,
                std::map<std::string, uint64_t> known, uint64_t nchunks)
      : repo_(repo),
        spec_(spec),
        progress_(progress),
        lease_(lease),
        known_(std::move(known)),
        limiter_(spec.bandwidth_bytes_per_s),
        refs_(nchunks) {}

  // Chunk i: read, and unless it is all zeroes, hashed and uploaded when the target does not
  // hold that content yet.
  Status Backup(uint64_t i, bool hole) {
    if (spec_.cancel && spec_.cancel->load()) {
      return Error(ECANCELED, "backup \"{}\": cancelled", spec_.name);
    }
    const uint64_t off = i * spec_.chunk_size;
    const uint64_t len = std::min(spec_.chunk_size, spec_.size - off);
    if (!hole) {
      std::string data(len, '\0');
      if (Status s = PreadAll(spec_.fd, data.data(), len, off); !s.ok()) {
        return Error(s.code(), "backup \"{}\": {}", spec_.name, s.message());
      }
      if (!AllZero(data)) {
        ChunkRef ref{off, repo_.ChunkName(data), 0};
        if (Status s = Upload(data, ref); !s.ok()) return s;
        refs_[i] = std::move(ref);
      }
      if (progress_) progress_->data_done_bytes += len;
    }
    if (progress_) progress_->done_bytes += len;
    if (spec_.after_chunk) spec_.after_chunk(off);
    return Status::Ok();
  }

  // Under a lease that must still be live (Lease is not thread-safe).
  Status CheckLease() {
    std::lock_guard lk(lease_mu_);
    return lease_.Check();
  }

  // The manifest of the chunks backed up (nothing of it is written).
  Manifest TakeManifest() {
    Manifest m;
    m.name = spec_.name;
    m.source_volume = spec_.source_volume;
    m.source_snapshot = spec_.source_snapshot;
    m.created_unix_ns = spec_.created_unix_ns;
    m.volume_size = spec_.size;
    m.chunk_size = spec_.chunk_size;
    m.uploaded_bytes = uploaded_.load();
    for (auto& r : refs_) {
      if (!r) continue;
      // A reused chunk: its size from the listing, or from the upload of this run that sent it.
      if (r->stored_size == 0) r->stored_size = known_[r->sha256];
      m.data_bytes += m.ChunkLength(r->offset);
      m.stored_bytes += r->stored_size;
      m.chunks.push_back(std::move(*r));
    }
    return m;
  }

 private:
  // A chunk this backup uploads joins `known_`, so a later chunk with the same content is not
  // sent.
  Status Upload(const std::string& data, ChunkRef& ref) {
    bool present;
    {
      std::lock_guard lk(known_mu_);
      present = !known_.emplace(ref.sha256, 0).second;
    }
    if (present) {
      if (progress_) ++progress_->chunks_reused;
      return Status::Ok();
    }
    std::string frame = repo_.EncodeChunk(ref.sha256, data);
    ref.stored_size = frame.size();
    if (Status s = CheckLease(); !s.ok()) return s;
    if (!limiter_.Consume(frame.size(), spec_.cancel)) {
      return Error(ECANCELED, "backup \"{}\": cancelled", spec_.name);
    }
    if (Status s = repo_.store().Put(repo_.ChunkKey(ref.sha256), frame); !s.ok()) {
      // Another thread may have skipped this hash on our word; the backup fails anyway.
      return s;
    }
    {
      std::lock_guard lk(known_mu_);
      known_[ref.sha256] = frame.size();
    }
    uploaded_ += frame.size();
    if (progress_) {
      progress_->transferred_bytes += frame.size();
      ++progress_->chunks_uploaded;
    }
    return Status::Ok();
  }

  Repository& repo_;
  const BackupSpec& spec_;
  Progress* progress_;
  std::mutex lease_mu_;
  Lease& lease_;
  std::mutex known_mu_;
  std::map<std::string, uint64_t> known_;
  RateLimiter limiter_;
  std::atomic<uint64_t> uploaded_{0};
  std::vector<std::optional<ChunkRef>> refs_;
};

}  // namespace

StatusOr<Manifest> RunBackup(Repository& repo, const BackupSpec& spec, Progress* progress) {
  if (Status s = ValidateBackupName(spec.name); !s.ok()) return s;
  if (spec.fd < 0 || spec.size == 0 || spec.chunk_size == 0 || spec.chunk_size > kMaxChunkSize) {
    return Error(EINVAL, "backup \"{}\": invalid source (fd {}, size {}, chunk size {})", spec.name,
                 spec.fd, spec.size, spec.chunk_size);
  }
  // Plain or encrypted: settled (and an encrypted target's config written if this is its first
  // backup) before anything else.
  if (Status s = repo.Open(/*create=*/true); !s.ok()) return s;
  auto existing = FindExisting(repo, spec);
  if (!existing.ok()) return existing.status();
  if (*existing) return std::move(**existing);

  auto lease = repo.AcquireBackupLease(spec.name);
  if (!lease.ok()) return lease.status();
  auto listed = repo.ChunkSizes();
  if (!listed.ok()) return listed.status();
  const uint64_t nchunks = (spec.size + spec.chunk_size - 1) / spec.chunk_size;
  auto holes = MapHoles(spec, nchunks, progress);
  if (!holes.ok()) return holes.status();

  ChunkUploader up(repo, spec, progress, **lease, std::move(*listed), nchunks);
  Status st = ParallelFor(nchunks, spec.threads,
                          [&](uint64_t i) -> Status { return up.Backup(i, (*holes)[i]); });
  if (!st.ok()) return st;
  Manifest m = up.TakeManifest();
  // The commit point, under a lease that is still live: every chunk it names is in the store and
  // no collection can have removed a reused one meanwhile (repository.h).
  if (Status s = up.CheckLease(); !s.ok()) return s;
  if (Status s = repo.Commit(m); !s.ok()) return s;
  return m;
}

Status RunRestore(Repository& repo, const Manifest& m, const RestoreSpec& spec,
                  Progress* progress) {
  if (spec.fd < 0) return Error(EINVAL, "restore of \"{}\": no destination", m.name);
  if (Status s = repo.Open(/*create=*/false); !s.ok()) return s;
  if (progress) {
    progress->total_bytes = m.volume_size;
    progress->data_total_bytes = m.data_bytes;
    progress->data_total_known = true;
  }
  const uint64_t hole_bytes = m.volume_size - m.data_bytes;
  Status st = ParallelFor(m.chunks.size(), spec.threads, [&](uint64_t i) -> Status {
    if (spec.cancel && spec.cancel->load()) {
      return Error(ECANCELED, "restore of \"{}\": cancelled", m.name);
    }
    const ChunkRef& ref = m.chunks[i];
    const std::string key = repo.ChunkKey(ref.sha256);
    auto frame = repo.store().Get(key);
    if (!frame.ok()) {
      return Error(frame.status().code() == ENOENT ? EIO : frame.status().code(),
                   "restore of \"{}\": chunk at offset {} ({}): {}", m.name, ref.offset, key,
                   frame.status().message());
    }
    const uint64_t len = m.ChunkLength(ref.offset);
    // Decrypted and authenticated (encrypted target), decompressed to exactly its length, and
    // its name (SHA-256 or HMAC) recomputed from the bytes.
    auto data = repo.DecodeChunk(ref.sha256, *frame, len);
    if (!data.ok()) {
      return Error(EIO, "restore of \"{}\": chunk at offset {} ({}) is corrupt: {}", m.name,
                   ref.offset, key, data.status().message());
    }
    if (Status s = WriteNonZero(spec.fd, *data, ref.offset); !s.ok()) {
      return Error(s.code(), "restore of \"{}\": {}", m.name, s.message());
    }
    if (progress) {
      progress->transferred_bytes += frame->size();
      progress->done_bytes += len;
      progress->data_done_bytes += len;
      ++progress->chunks_restored;
    }
    return Status::Ok();
  });
  if (!st.ok()) return st;
  if (::fsync(spec.fd) != 0) {
    return Error(errno, "restore of \"{}\": fsync: {}", m.name, std::strerror(errno));
  }
  if (progress) progress->done_bytes += hole_bytes;
  return Status::Ok();
}

}  // namespace nbdcsi::datapath::backup
