#include "datapath/backup/peer_copy.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "datapath/nbd/proto.h"

namespace nbdcsi::datapath::backup {

FileBlockChannel::FileBlockChannel(int fd, uint64_t size, const std::atomic<bool>* cancel)
    : fd_(fd), cancel_(cancel) {
  props_.size = size;
  props_.flags = nbd::kFlagHasFlags | nbd::kFlagSendFlush | nbd::kFlagSendWriteZeroes;
}

Status FileBlockChannel::Read(uint64_t offset, std::span<uint8_t> buf, replica::Callback cb) {
  size_t done = 0;
  while (done < buf.size()) {
    ssize_t n = ::pread(fd_, buf.data() + done, buf.size() - done, offset + done);
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
  size_t done = 0;
  while (done < data.size()) {
    ssize_t n = ::pwrite(fd_, data.data() + done, data.size() - done, offset + done);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      cb(Error(errno, "write at {}: {}", offset + done, std::strerror(errno)));
      return Status::Ok();
    }
    done += static_cast<size_t>(n);
  }
  cb(Status::Ok());
  return Status::Ok();
}

Status FileBlockChannel::WriteZeroes(uint64_t offset, uint32_t length, replica::Callback cb) {
  if (cancel_ && cancel_->load()) return Error(ECANCELED, "copy cancelled");
  // Punched: the volume is thin, and a hole reads zeroes.
  if (::fallocate(fd_, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(offset),
                  length) != 0) {
    cb(Error(errno, "punch hole at {}: {}", offset, std::strerror(errno)));
  } else {
    cb(Status::Ok());
  }
  return Status::Ok();
}

FileBlockChannel::~FileBlockChannel() {
  for (auto& t : flushes_) t.join();
}

Status FileBlockChannel::Flush(replica::Callback cb) {
  // Resync has at most one FLUSH in flight and calls from its one thread: no lock needed here,
  // and the previous flush's thread has called back already (it is ending: joined at once).
  for (auto& t : flushes_) t.join();
  flushes_.clear();
  flushes_.emplace_back([fd = fd_, cb = std::move(cb)] {
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

Status CopyFromPeer(replica::ReplicaClient& source, int fd, const std::atomic<bool>* cancel,
                    const std::function<void(const PeerCopyProgress&)>& on_progress) {
  replica::ClientBlockChannel src(source);
  FileBlockChannel dst(fd, source.export_properties().size, cancel);
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
  if (::fdatasync(fd) != 0) return Error(errno, "fdatasync: {}", std::strerror(errno));
  return Status::Ok();
}

}  // namespace nbdcsi::datapath::backup
