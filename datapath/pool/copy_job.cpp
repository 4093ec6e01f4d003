#include "datapath/pool/copy_job.h"

#include <fcntl.h>
#include <linux/falloc.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <system_error>

#include <spdlog/spdlog.h>

namespace nbdcsi::datapath {

namespace {

constexpr uint8_t kPending = 0;
constexpr uint8_t kCopying = 1;
constexpr uint8_t kPreserved = 2;

// Sequential chunks nobody waits for: waking parked writers after each would be wasted
// work, but an occasional wake lets a writer whose chunk the cursor reached on its own go
// early instead of after its urgent entry is popped.
constexpr uint64_t kNotifyEvery = 16;

// Bounds the work Prioritize does under the gate's lock for a huge request (a TRIM of the
// whole volume). The writer re-parks on the first chunk still missing and asks again.
constexpr uint64_t kMaxQueuedPerCall = 64;

constexpr size_t kBounceSize = size_t{1} << 20;

// Where the next data at or after `off` starts, or `limit` when there is none before it.
StatusOr<uint64_t> NextData(int fd, uint64_t off, uint64_t limit, const char* what) {
  off_t r = ::lseek(fd, static_cast<off_t>(off), SEEK_DATA);
  if (r < 0) {
    if (errno == ENXIO) return limit;  // only a hole (or EOF) from here on
    return Error(errno, "copy: SEEK_DATA on {} at {}: {}", what, off, std::strerror(errno));
  }
  return std::min<uint64_t>(static_cast<uint64_t>(r), limit);
}

StatusOr<uint64_t> NextHole(int fd, uint64_t off, uint64_t limit) {
  off_t r = ::lseek(fd, static_cast<off_t>(off), SEEK_HOLE);
  if (r < 0) {
    // ENXIO means the file shrank under us between SEEK_DATA and SEEK_HOLE.
    return Error(errno, "copy: SEEK_HOLE on source at {}: {}", off, std::strerror(errno));
  }
  return std::min<uint64_t>(static_cast<uint64_t>(r), limit);
}

}  // namespace

CopyJob::CopyJob(Options opts) : opts_(std::move(opts)) {
  if (opts_.chunk_size > 0) nchunks_ = (opts_.length + opts_.chunk_size - 1) / opts_.chunk_size;
  state_ = std::make_unique<std::atomic<uint8_t>[]>(nchunks_);
  for (uint64_t i = 0; i < nchunks_; ++i) state_[i].store(kPending, std::memory_order_relaxed);
  queued_.assign(nchunks_, false);
}

std::shared_ptr<CopyJob> CopyJob::Start(Options opts) {
  std::shared_ptr<CopyJob> job(new CopyJob(std::move(opts)));
  job->valid_ = job->opts_.chunk_size > 0 && job->opts_.src_fd >= 0 && job->opts_.dst_fd >= 0;
  const bool valid = job->valid_;
  // Invalid options are reported through on_done like any other failure, but the job never
  // becomes a preserver: it would refuse writes it is never going to unblock.
  if (valid && job->opts_.gate) job->opts_.gate->SetPreserver(job);
  try {
    // A raw pointer, not a shared_ptr: dropping the last handle must be able to cancel the
    // job, which a self-reference would prevent. ~CopyJob joins, so `this` outlives Run.
    job->thread_ = std::thread([j = job.get()] { j->Run(); });
  } catch (...) {
    if (valid && job->opts_.gate) job->opts_.gate->ClearPreserver();
    job->finished_.store(true, std::memory_order_release);
    throw;
  }
  return job;
}

CopyJob::~CopyJob() {
  Cancel();
  if (!thread_.joinable()) return;
  if (thread_.get_id() == std::this_thread::get_id()) {
    // The last reference was dropped by the job's own thread (inside or right after
    // on_done). Joining ourselves is impossible; Run touches nothing after releasing that
    // reference, so the thread can safely run off on its own.
    thread_.detach();
  } else {
    thread_.join();
  }
}

void CopyJob::Cancel() { cancel_.store(true, std::memory_order_relaxed); }

void CopyJob::Wait() {
  std::lock_guard lk(join_mu_);
  // Waiting for ourselves (Wait from on_done) would deadlock; on_done is the end anyway.
  if (thread_.joinable() && thread_.get_id() != std::this_thread::get_id()) thread_.join();
}

bool CopyJob::Preserved(uint64_t index) const {
  // Chunks past the copied length hold nothing the copy needs.
  return index >= nchunks_ || state_[index].load(std::memory_order_acquire) == kPreserved;
}

void CopyJob::Prioritize(uint64_t first, uint64_t last) {
  if (first >= nchunks_) return;
  last = std::min(last, nchunks_ - 1);
  std::lock_guard lk(mu_);
  uint64_t added = 0;
  for (uint64_t c = first; c <= last && added < kMaxQueuedPerCall; ++c) {
    // A chunk being copied right now is queued too: popping it once it is preserved is what
    // triggers the NotifyPreserved that wakes this writer (see NextChunk).
    if (queued_[c] || state_[c].load(std::memory_order_acquire) == kPreserved) continue;
    queued_[c] = true;
    urgent_.push_back(c);
    ++added;
  }
}

// Picks the next chunk to copy: urgent ones first, then the sequential cursor. Returns
// nchunks_ when everything has been claimed. `notify` is set when a popped urgent chunk is
// already preserved: its writer parked before the copy ended and must be woken now.
uint64_t CopyJob::NextChunk(bool* urgent, bool* notify) {
  {
    std::lock_guard lk(mu_);
    while (!urgent_.empty()) {
      uint64_t c = urgent_.front();
      urgent_.pop_front();
      queued_[c] = false;
      uint8_t expected = kPending;
      if (state_[c].compare_exchange_strong(expected, kCopying, std::memory_order_acq_rel)) {
        *urgent = true;
        return c;
      }
      // Only this thread copies, so a claimed chunk here is always already preserved.
      *notify = true;
    }
  }
  *urgent = false;
  while (cursor_ < nchunks_) {
    uint64_t c = cursor_++;
    uint8_t expected = kPending;
    if (state_[c].compare_exchange_strong(expected, kCopying, std::memory_order_acq_rel)) {
      return c;
    }
  }
  return nchunks_;
}

void CopyJob::Run() {
  Status st;
  if (!valid_) {
    st = Error(EINVAL, "copy: invalid options (src_fd {}, dst_fd {}, chunk_size {})",
               opts_.src_fd, opts_.dst_fd, opts_.chunk_size);
  }
  // First, while every chunk is still pending: a writer to the live source waits for its chunk
  // to be copied, so the data mapped now is exactly the data the copy will find.
  if (st.ok()) st = MapData();
  uint64_t since_notify = 0;
  while (st.ok()) {
    if (cancel_.load(std::memory_order_relaxed)) {
      st = Error(ECANCELED, "copy: cancelled after {} of {} bytes", copied_bytes(),
                 opts_.length);
      break;
    }
    bool urgent = false, notify = false;
    uint64_t c = NextChunk(&urgent, &notify);
    if (notify && opts_.gate) opts_.gate->NotifyPreserved();
    if (c == nchunks_) break;
    st = CopyChunk(c);
    if (!st.ok()) {
      state_[c].store(kPending, std::memory_order_release);
      break;
    }
    state_[c].store(kPreserved, std::memory_order_release);
    ++since_notify;
    if (opts_.gate && (urgent || since_notify >= kNotifyEvery)) {
      opts_.gate->NotifyPreserved();
      since_notify = 0;
    }
  }
  if (st.ok() && ::fsync(opts_.dst_fd) != 0) {
    // fdatasync could skip the size and extent metadata that make the copy readable.
    st = Error(errno, "copy: fsync of destination: {}", std::strerror(errno));
  }
  if (!st.ok() && st.code() != ECANCELED) {
    spdlog::error("{}", st.message());
  }

  // Keep the object alive through ClearPreserver and on_done: the gate's reference may be
  // the last one. If lock() fails, a destructor is already running on another thread and
  // is blocked joining us, so `this` stays valid until we return.
  std::shared_ptr<CopyJob> self = weak_from_this().lock();
  // Before on_done, and on every path: a parked writer must never wait for a job that ended.
  if (valid_ && opts_.gate) opts_.gate->ClearPreserver();
  if (opts_.on_done) opts_.on_done(st);
  finished_.store(true, std::memory_order_release);
  // Nothing may touch `this` after this line: it may run ~CopyJob, which then detaches.
  self.reset();
}

Status CopyJob::CopyChunk(uint64_t index) {
  const uint64_t start = index * opts_.chunk_size;
  const uint64_t end = std::min(start + opts_.chunk_size, opts_.length);

  // A destination that is not blank here (a restore over an existing volume) must get the
  // source's holes too, or old data would show through them. A fresh sparse destination
  // costs one lseek per chunk.
  StatusOr<uint64_t> dst_data = NextData(opts_.dst_fd, start, end, "destination");
  if (!dst_data.ok()) return dst_data.status();
  const bool dst_blank = *dst_data >= end;

  uint64_t off = start;
  while (off < end) {
    StatusOr<uint64_t> data = NextData(opts_.src_fd, off, end, "source");
    if (!data.ok()) return data.status();
    if (!dst_blank && *data > off) {
      Status s = ClearRange(off, *data);
      if (!s.ok()) return s;
    }
    if (*data >= end) break;
    StatusOr<uint64_t> hole = NextHole(opts_.src_fd, *data, end);
    if (!hole.ok()) return hole.status();
    Status s = CopyRange(*data, *hole);
    if (!s.ok()) return s;
    data_copied_.fetch_add(*hole - *data, std::memory_order_relaxed);
    off = *hole;
  }
  copied_.fetch_add(end - start, std::memory_order_relaxed);
  return Status::Ok();
}

Status CopyJob::MapData() {
  uint64_t total = 0, off = 0;
  while (off < opts_.length && !cancel_.load(std::memory_order_relaxed)) {
    StatusOr<uint64_t> data = NextData(opts_.src_fd, off, opts_.length, "source");
    if (!data.ok()) return data.status();
    if (*data >= opts_.length) break;
    StatusOr<uint64_t> hole = NextHole(opts_.src_fd, *data, opts_.length);
    if (!hole.ok()) return hole.status();
    total += *hole - *data;
    off = *hole;
  }
  data_total_.store(total, std::memory_order_relaxed);
  data_known_.store(true, std::memory_order_release);
  return Status::Ok();
}

Status CopyJob::CopyRange(uint64_t off, uint64_t end) {
  while (off < end && use_copy_file_range_) {
    loff_t in = static_cast<loff_t>(off), out = static_cast<loff_t>(off);
    ssize_t n = ::copy_file_range(opts_.src_fd, &in, opts_.dst_fd, &out, end - off, 0);
    if (n > 0) {
      off += static_cast<uint64_t>(n);
      continue;
    }
    if (n == 0) {
      return Error(EIO, "copy: source ended at {} inside a data range (truncated while copying?)",
                   off);
    }
    if (errno == EINTR) continue;
    if (errno == EXDEV || errno == EINVAL || errno == EOPNOTSUPP || errno == ENOSYS) {
      // Different file systems, or one that cannot do it: the plain path works everywhere.
      use_copy_file_range_ = false;
      break;
    }
    return Error(errno, "copy: copy_file_range to destination at {}: {}", off,
                 std::strerror(errno));
  }
  if (off >= end) return Status::Ok();
  if (bounce_.empty()) bounce_.resize(kBounceSize);
  while (off < end) {
    size_t want = static_cast<size_t>(std::min<uint64_t>(end - off, bounce_.size()));
    ssize_t n = ::pread(opts_.src_fd, bounce_.data(), want, static_cast<off_t>(off));
    if (n < 0) {
      if (errno == EINTR) continue;
      return Error(errno, "copy: read of source at {}: {}", off, std::strerror(errno));
    }
    if (n == 0) {
      return Error(EIO, "copy: source ended at {} inside a data range (truncated while copying?)",
                   off);
    }
    size_t done = 0;
    while (done < static_cast<size_t>(n)) {
      ssize_t w = ::pwrite(opts_.dst_fd, bounce_.data() + done, static_cast<size_t>(n) - done,
                           static_cast<off_t>(off + done));
      if (w < 0) {
        if (errno == EINTR) continue;
        return Error(errno, "copy: write of destination at {}: {}", off + done,
                     std::strerror(errno));
      }
      done += static_cast<size_t>(w);
    }
    off += static_cast<uint64_t>(n);
  }
  return Status::Ok();
}

// Makes [off, end) of the destination read as zeros, as a hole where the file system allows.
Status CopyJob::ClearRange(uint64_t off, uint64_t end) {
  StatusOr<uint64_t> d = NextData(opts_.dst_fd, off, end, "destination");
  if (!d.ok()) return d.status();
  if (*d >= end) return Status::Ok();  // already a hole
  if (::fallocate(opts_.dst_fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                  static_cast<off_t>(off), static_cast<off_t>(end - off)) == 0) {
    return Status::Ok();
  }
  if (errno != EOPNOTSUPP) {
    return Error(errno, "copy: punching a hole in the destination at {}: {}", off,
                 std::strerror(errno));
  }
  if (bounce_.empty()) bounce_.resize(kBounceSize);
  std::fill(bounce_.begin(), bounce_.end(), 0);
  while (off < end) {
    size_t want = static_cast<size_t>(std::min<uint64_t>(end - off, bounce_.size()));
    ssize_t w = ::pwrite(opts_.dst_fd, bounce_.data(), want, static_cast<off_t>(off));
    if (w < 0) {
      if (errno == EINTR) continue;
      return Error(errno, "copy: zeroing the destination at {}: {}", off, std::strerror(errno));
    }
    off += static_cast<uint64_t>(w);
  }
  return Status::Ok();
}

}  // namespace nbdcsi::datapath
