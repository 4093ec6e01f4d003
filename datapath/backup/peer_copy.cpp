#include "datapath/backup/peer_copy.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "datapath/nbd/proto.h"

namespace nbdcsi::datapath::backup {

namespace {
constexpr uint64_t kDirectAlign = 4096;
}  // namespace

FileBlockChannel::FileBlockChannel(int direct_fd, int buffered_fd, uint64_t size,
                                   const std::atomic<bool>* cancel, int writers)
    : direct_fd_(direct_fd), buffered_fd_(buffered_fd), cancel_(cancel) {
  props_.size = size;
  props_.flags = nbd::kFlagHasFlags | nbd::kFlagSendFlush | nbd::kFlagSendWriteZeroes;
  for (int i = 0; i < std::max(1, writers); ++i) writers_.emplace_back([this] { Writer(); });
}

FileBlockChannel::~FileBlockChannel() {
  {
    std::lock_guard lk(mu_);
    stopping_ = true;
  }
  cv_.notify_all();
  for (auto& t : writers_) t.join();
  for (auto& t : flushes_) t.join();
}

Status FileBlockChannel::Read(uint64_t offset, std::span<uint8_t> buf, replica::Callback cb) {
  size_t done = 0;
  while (done < buf.size()) {
    ssize_t n = ::pread(buffered_fd_, buf.data() + done, buf.size() - done, offset + done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      cb(Error(n < 0 ? errno : EIO, "read at {}: {}", offset + done,
               n < 0 ? std::strerror(errno) : "end of file"));
      return Status::Ok();
    }
    done += static_cast<size_t>(n);
  }
  cb(Status::Ok());
  return Status::Ok();
}

Status FileBlockChannel::Write(uint64_t offset, std::span<const uint8_t> data,
                               replica::Callback cb) {
  if (cancel_ && cancel_->load()) return Error(ECANCELED, "copy cancelled");
  {
    std::lock_guard lk(mu_);
    if (stopping_) return Error(ESHUTDOWN, "the destination is closing");
    queue_.push_back({offset, data, std::move(cb)});
  }
  cv_.notify_one();
  return Status::Ok();
}

void FileBlockChannel::Writer() {
  void* bounce = nullptr;
  size_t cap = 0;
  for (;;) {
    PendingWrite w;
    {
      std::unique_lock lk(mu_);
      cv_.wait(lk, [&] { return stopping_ || !queue_.empty(); });
      // Resync awaits every write it issued before it returns, so a stop finds the queue empty.
      if (queue_.empty()) break;
      w = std::move(queue_.front());
      queue_.pop_front();
    }
    w.cb(WriteNow(w.offset, w.data, bounce, cap));
  }
  std::free(bounce);
}

Status FileBlockChannel::WriteNow(uint64_t offset, std::span<const uint8_t> data, void*& bounce,
                                  size_t& cap) {
  int fd = buffered_fd_;
  const uint8_t* p = data.data();
  if (direct_fd_ != buffered_fd_ && offset % kDirectAlign == 0 && data.size() % kDirectAlign == 0) {
    if (cap < data.size()) {
      std::free(bounce);
      bounce = nullptr;
      cap = 0;
      if (::posix_memalign(&bounce, kDirectAlign, data.size()) != 0) {
        return Error(ENOMEM, "write at {}: no memory for a {} byte buffer", offset, data.size());
      }
      cap = data.size();
    }
    std::memcpy(bounce, data.data(), data.size());
    p = static_cast<const uint8_t*>(bounce);
    fd = direct_fd_;
  }
  size_t done = 0;
  while (done < data.size()) {
    ssize_t n = ::pwrite(fd, p + done, data.size() - done, static_cast<off_t>(offset + done));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return Error(errno, "write at {}: {}", offset + done, std::strerror(errno));
    done += static_cast<size_t>(n);
  }
  return Status::Ok();
}

Status FileBlockChannel::WriteZeroes(uint64_t offset, uint32_t length, replica::Callback cb) {
  if (cancel_ && cancel_->load()) return Error(ECANCELED, "copy cancelled");
  // Punched: the volume is thin, and a hole reads zeroes.
  if (::fallocate(buffered_fd_, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(offset),
                  length) != 0) {
    cb(Error(errno, "punch hole at {}: {}", offset, std::strerror(errno)));
  } else {
    cb(Status::Ok());
  }
  return Status::Ok();
}

Status FileBlockChannel::Flush(replica::Callback cb) {
  // Resync has at most one FLUSH in flight and calls from its one thread: no lock needed here,
  // and the previous flush's thread has called back already (it is ending: joined at once).
  for (auto& t : flushes_) t.join();
  flushes_.clear();
  flushes_.emplace_back([fd = buffered_fd_, cb = std::move(cb)] {
    if (::fdatasync(fd) != 0) {
      cb(Error(errno, "fdatasync: {}", std::strerror(errno)));
    } else {
      cb(Status::Ok());
    }
  });
  return Status::Ok();
}

Status FileBlockChannel::BlockStatus(uint64_t, uint32_t, replica::BlockStatusCallback) {
  return Error(ENOTSUP, "a local destination answers no BLOCK_STATUS");
}

Status CopyFromPeer(replica::ReplicaClient& source, int direct_fd, int buffered_fd,
                    const std::atomic<bool>* cancel,
                    const std::function<void(const PeerCopyProgress&)>& on_progress) {
  replica::ClientBlockChannel src(source);
  FileBlockChannel dst(direct_fd, buffered_fd, source.export_properties().size, cancel);
  replica::ResyncOptions o;
  o.holes = replica::HolePolicy::kSkip;
  o.max_in_flight = 16;
  o.on_progress = [&](const replica::ResyncProgress& p) {
    if (on_progress) on_progress({p.total_bytes, p.done_bytes(), p.copied_bytes});
  };
  replica::Resync copy(src, dst, o);
  if (Status s = copy.RunFull(); !s.ok()) return s;
  // Resync flushed after its last write already; this one is the promise the caller relies on
  // before it marks the volume whole, whatever Resync's flushing policy becomes.
  if (::fdatasync(buffered_fd) != 0) return Error(errno, "fdatasync: {}", std::strerror(errno));
  return Status::Ok();
}

}  // namespace nbdcsi::datapath::backup
