// ExportBackend: an export whose requests run somewhere else than on a pool file.
//
// The engine's workers serve pool volumes with inline io_uring file I/O. A replicated volume's
// target (issue 16) serves the kernel, or any NBD client, in the same way, but each request goes
// to a replica set (datapath/replica) that fans writes out to other nodes. This is the seam
// between the two: the engine owns the NBD side (sockets, slots, replies, ordering rules) and
// hands each admitted request to the backend; the backend owns where the bytes go.
//
// Such an export is opened by the name VOLUME + kTargetSuffix ("pvc-1@target"): '@' is not
// allowed in pool names, so it cannot collide with a pool volume of the same name (the target's
// node may hold a local replica of VOLUME, served to the target as "VOLUME@epoch=N").
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <string_view>

namespace nbdcsi::datapath {

inline constexpr std::string_view kTargetSuffix = "@target";

struct BackendRequest {
  enum class Op : uint8_t { kRead, kWrite, kFlush, kTrim, kWriteZeroes };
  Op op = Op::kRead;
  uint64_t offset = 0;
  uint32_t length = 0;      // 0 for kFlush
  uint8_t* data = nullptr;  // kRead: filled by the backend; kWrite: the payload. Valid until done
  bool fua = false;         // kWrite, kTrim, kWriteZeroes: durable before done(0)
  bool no_hole = false;     // kWriteZeroes: the zeroes must be allocated, not punched
};

// done(0) on success, done(-errno) on failure. It is called exactly once per Submit, from any
// thread (the backend's I/O threads, or inline inside Submit); it must be short and must not
// block. Errors the engine maps to NBD errors (EIO, ENOSPC, EPERM for a target that lost its
// claim, EINVAL, ENOTSUP, ESHUTDOWN).
using BackendDone = std::function<void(int)>;

class ExportBackend {
 public:
  virtual ~ExportBackend() = default;
  // For logs and the handshake's description.
  virtual const std::string& name() const = 0;
  // The export's size in bytes; fixed while the backend is exported.
  virtual uint64_t size() const = 0;
  // Every request the engine hands over has passed the NBD checks (in range, length within the
  // advertised maximum block size, known command). Writes the engine has acknowledged are
  // durable at the next successful kFlush, whichever connection sent them (CAN_MULTI_CONN).
  // The buffer stays valid and untouched by the engine until done is called.
  virtual void Submit(const BackendRequest& request, BackendDone done) = 0;
};

}  // namespace nbdcsi::datapath
