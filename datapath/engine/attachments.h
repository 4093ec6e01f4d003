// Kernel NBD attachments of pool volumes (/dev/nbdN served by this process over socketpairs), and
// their durable records, which let a restarted nbd-datapathd hand fresh sockets to devices the
// kernel kept alive for it (NBD_CMD_RECONFIGURE within the dead-connection timeout).
//
// Records live in POOL/attachments/NAME.json (the pool's orphan sweep only looks at volumes/ and
// snapshots/, and the pool lock keeps a second daemon away from them). A record is written, with
// index -1, BEFORE the kernel is asked to CONNECT, and completed after: a crash in between leaves
// a record whose cookie Recover() can still find in /sys/block/nbd*/backend, so no device is ever
// attached without a record that names it.
#pragma once

#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "common/status.h"
#include "datapath/engine/kernel_nbd.h"

namespace nbdcsi::datapath {

class NbdFrontend;
class Pool;

struct AttachmentRecord {
  std::string volume;
  int index = -1;  // -1: CONNECT was not confirmed yet
  std::string cookie;  // the device's NBD_ATTR_BACKEND_IDENTIFIER
  unsigned connections = 0;
  uint64_t size_bytes = 0;
  bool read_only = false;

  std::string device() const { return index >= 0 ? NbdDevicePath(index) : std::string(); }
  std::string ToJson() const;
  static StatusOr<AttachmentRecord> FromJson(const std::string& text);
};

// The export side of an attachment: sockets already in the transmission phase, plus what the
// kernel must be told about the export.
struct ServedExport {
  std::vector<int> client_fds;  // owned by the receiver
  uint64_t size_bytes = 0;
  bool read_only = false;
};

class ExportServer {
 public:
  virtual ~ExportServer() = default;
  virtual StatusOr<ServedExport> Serve(const std::string& volume, unsigned connections) = 0;
};

// ExportServer over the real engine (NbdFrontend::ServeSocketPairs) and pool.
std::unique_ptr<ExportServer> MakeFrontendExportServer(Pool& pool, NbdFrontend& frontend);

struct AttachOptions {
  unsigned default_connections = 0;  // 0: min(nproc, 4)
  uint64_t dead_conn_timeout_s = 120;
  uint64_t io_timeout_s = 30;  // see KernelConnectParams::io_timeout_s
  unsigned max_sectors_kb = 1024;
  std::chrono::milliseconds detach_wait{10000};
};

struct RecoverReport {
  std::vector<std::string> reconnected;  // "volume -> /dev/nbdN"
  std::vector<std::string> dropped;      // records of devices that are gone: "volume: why"
  std::vector<std::string> failed;       // kept, for an operator to look at: "volume: why"
};

class AttachmentManager {
 public:
  static constexpr unsigned kMaxConnections = 16;

  // `dir` is the records directory (POOL/attachments); Init() creates it.
  AttachmentManager(std::string dir, KernelNbdInterface& kernel, ExportServer& server,
                    AttachOptions opts = {});

  Status Init();
  // Reconnects every recorded device that the kernel still holds for us; drops the records of
  // devices that are gone or now belong to someone else. Call once, before serving the API.
  RecoverReport Recover();

  // Idempotent: an attachment that is still live (same cookie in sysfs) is returned as is.
  // connections 0 = the default; more than kMaxConnections is EINVAL. ENODEV when the kernel has
  // no nbd module. EALREADY while another Attach/Detach of the same volume runs.
  StatusOr<AttachmentRecord> Attach(const std::string& volume, unsigned connections = 0);
  // Idempotent: detaching a volume that is not attached succeeds. EBUSY while the device is
  // mounted; ETIMEDOUT if the kernel does not let go in time (the record stays, so retry).
  Status Detach(const std::string& volume);

  // The kernel dropped a socket of device `index` while we are alive (KernelNbdInterface::
  // WatchLinkDead): serve fresh sockets and RECONFIGURE, unless the device is not ours or an
  // Attach/Detach of its volume is running (that call decides the device's fate).
  Status OnLinkDead(int index);

  std::vector<AttachmentRecord> List() const;
  std::optional<AttachmentRecord> Get(const std::string& volume) const;
  unsigned DefaultConnections() const;

 private:
  // A per-volume claim so concurrent calls on one volume get EALREADY instead of racing.
  class Claim;
  Status WriteRecord(const AttachmentRecord& r);
  Status RemoveRecord(const std::string& volume);
  std::string RecordPath(const std::string& volume) const;
  // The kernel's current device for a record: its index if the cookie still matches, else -1.
  int LiveIndex(const AttachmentRecord& r);

  std::string dir_;
  KernelNbdInterface& kernel_;
  ExportServer& server_;
  AttachOptions opts_;
  mutable std::mutex mu_;
  std::map<std::string, AttachmentRecord> records_;  // guarded by mu_
  std::set<std::string> busy_;                       // guarded by mu_
};

}  // namespace nbdcsi::datapath
