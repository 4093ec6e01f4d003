// A volume copied from another node (issue 16, "Restore and clone work across nodes"): the
// source is a volume on the peer's nbd-datapathd, read over NBD (TCP, mutual TLS with this
// node's certificate) by the replica client; the destination is a new local volume's data file.
// The copy is Resync::RunFull (datapath/replica/resync.h): the source's BLOCK_STATUS holes are
// skipped (the new volume is blank and thin, so they read zeroes already), everything else is
// read and written, and nothing counts as done before an fdatasync of the data file.
#pragma once

#include <atomic>
#include <cstdint>
#include <condition_variable>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#include "common/status.h"
#include "datapath/replica/client.h"
#include "datapath/replica/resync.h"

namespace nbdcsi::datapath::backup {

// A local data file as the destination of a Resync. Writes run on a few threads of their own
// (callbacks from there: the BlockChannel contract allows any thread), each through `direct_fd`
// (O_DIRECT, from an aligned bounce buffer) when it is 4 KiB-aligned: buffered writes of a whole
// volume run into the kernel's dirty-page throttling and went at a fifth of the speed here.
// fdatasync runs on a thread of its own too, so reads and writes keep flowing while the disk
// catches up. `size` is what Resync compares with the source: the source's size, which may be
// less than the file's (a copy into a larger volume; the tail stays a hole). Writes fail with
// ECANCELED once `cancel` is set. The destructor joins every thread.
class FileBlockChannel : public replica::BlockChannel {
 public:
  // `direct_fd` may be `buffered_fd` (a file system without O_DIRECT).
  FileBlockChannel(int direct_fd, int buffered_fd, uint64_t size, const std::atomic<bool>* cancel,
                   int writers = 4);
  ~FileBlockChannel() override;
  const replica::ExportProperties& props() const override { return props_; }
  Status Read(uint64_t offset, std::span<uint8_t> buf, replica::Callback cb) override;
  Status Write(uint64_t offset, std::span<const uint8_t> data, replica::Callback cb) override;
  Status WriteZeroes(uint64_t offset, uint32_t length, replica::Callback cb) override;
  Status Flush(replica::Callback cb) override;
  Status BlockStatus(uint64_t offset, uint32_t length, replica::BlockStatusCallback cb) override;

 private:
  struct PendingWrite {
    uint64_t offset;
    std::span<const uint8_t> data;
    replica::Callback cb;
  };
  void Writer();
  Status WriteNow(uint64_t offset, std::span<const uint8_t> data, void*& bounce, size_t& cap);

  int direct_fd_, buffered_fd_;
  const std::atomic<bool>* cancel_;
  replica::ExportProperties props_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<PendingWrite> queue_;  // guarded by mu_
  bool stopping_ = false;           // guarded by mu_
  std::vector<std::thread> writers_;
  std::vector<std::thread> flushes_;  // Resync's thread only
};

struct PeerCopyProgress {
  uint64_t total_bytes = 0;   // the source's size
  uint64_t done_bytes = 0;    // copied (flushed) plus holes skipped
  uint64_t copied_bytes = 0;  // data read from the peer and made durable here
};

// Copies all of `source` (connected with base_allocation) into the file, then fdatasync. `on_progress`
// runs on the calling thread after each flush. The first error (the peer's, a lost connection,
// a local write) is returned with the step and range in its message.
Status CopyFromPeer(replica::ReplicaClient& source, int direct_fd, int buffered_fd,
                    const std::atomic<bool>* cancel,
                    const std::function<void(const PeerCopyProgress&)>& on_progress);

}  // namespace nbdcsi::datapath::backup
