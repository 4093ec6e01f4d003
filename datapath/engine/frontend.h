// The NBD front door: listening sockets, the option-haggling phase, and the hand-off of each
// negotiated connection to an io_uring Worker.
//
// Handshakes run as Boost.Asio coroutines on one thread. They are short, rare and full of small
// reads, so they stay out of the workers' rings; a slow or hostile client in the handshake is cut
// off by a timer and never delays the data path.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "common/endpoint.h"
#include "common/status.h"
#include "datapath/engine/backend.h"
#include "datapath/engine/worker.h"
#include "datapath/pool/pool.h"

namespace nbdcsi::datapath {

// An export name of VOLUME + this suffix opens VOLUME as a growable export: the handshake
// advertises kGrowableWindow bytes instead of the volume's size, and the connection runs in
// SizeMode::kWindow (reads past the volume's end are zeroes, writes there fail with ENOSPC).
// It is for clients that learn the size once and can never be told a new one (nbdfuse under a
// fuse attachment, which a loop device then limits to the volume's real size). '@' is not
// allowed in pool names (ValidateVolumeName), so the name cannot collide with a volume.
inline constexpr std::string_view kGrowableSuffix = "@grow";
inline constexpr uint64_t kGrowableWindow = uint64_t{1} << 50;  // 1 PiB

class NbdTlsContext;

struct FrontendOptions {
  unsigned workers = 2;
  unsigned handshake_timeout_sec = 30;
  // TCP listeners require TLS with this material (the spec's FORCEDTLS mode: STARTTLS before
  // anything else, client certificates verified against its CA); their transmission phase runs
  // through TLS terminator threads. Without it, a TCP listener is refused unless insecure_tcp
  // asks for plaintext. Unix sockets are always plaintext (local, mode 0600).
  std::shared_ptr<NbdTlsContext> tls{};
  bool insecure_tcp = false;
  // How often the TLS files are looked at for a renewal (cert-manager rewrites them in place).
  std::chrono::milliseconds tls_reload_interval{2000};
  // Options of every worker (tests set WorkerOptions::test_hold_writes_efd).
  WorkerOptions worker{};
};

class NbdFrontend {
 public:
  NbdFrontend(Pool& pool, FrontendOptions opts);
  ~NbdFrontend();

  // Binds a listener (call before Start). Unix sockets get mode 0600, a stale socket file is
  // replaced, and a live one is refused. TCP listeners are only opened when asked for, and only
  // with FrontendOptions::tls or insecure_tcp (EINVAL otherwise).
  Status Listen(const Endpoint& endpoint);
  Status Start();
  // Stops accepting, drops handshakes in progress, closes every connection after its in-flight
  // I/O completes (a TLS connection also gets its last replies encrypted and sent, for up to
  // two seconds), and removes the Unix socket files. A backend export's connections wait for
  // their requests' done callbacks (backend.h: the backend must call each one).
  void Stop();

  // Serves `volume` (or a backend export, "NAME@target") over `n` fresh socketpairs, for the
  // kernel NBD driver: the server ends go to the workers straight into the transmission phase,
  // as the kernel never negotiates (so no structured replies and no meta contexts: simple
  // replies only). Returns the client ends, close-on-exec, owned by the caller. ENOENT if the
  // volume (or backend export) is not exported; call after Start.
  // Their size follows the volume's (SizeMode::kLive), so a device resized with
  // NBD_CMD_RECONFIGURE can use its new end at once.
  StatusOr<std::vector<int>> ServeSocketPairs(const std::string& volume, unsigned n);

  // Backend exports (backend.h; issue 16's replicated target). AddBackendExport makes
  // `backend->name()` (a valid volume name: it is the replicated volume's) reachable as
  // NAME@target: by a handshake (any listener), by ServeSocketPairs("NAME@target", n) (SizeMode
  // kLive, which for a backend is its fixed size), and in NBD_OPT_LIST. The export is writable,
  // of backend->size() bytes, described as "nbd-csi replicated volume (target)", with the
  // transmission flags of any writable export (SEND_FLUSH, SEND_FUA, SEND_TRIM,
  // SEND_WRITE_ZEROES, CAN_MULTI_CONN; SEND_FAST_ZERO too, but a FAST_ZERO request is answered
  // ENOTSUP at once, as the spec allows; SEND_DF with structured replies, which holds as reads
  // are never fragmented). base:allocation can be negotiated as for any export; BLOCK_STATUS is
  // then answered with one extent of data for the whole range (the backend has no allocation
  // map). EINVAL for a null backend or a bad name, EEXIST if NAME is registered already.
  // May be called before or after Start, from any thread but the engine's own.
  Status AddBackendExport(std::shared_ptr<ExportBackend> backend);
  // Takes NAME@target away: new handshakes and ServeSocketPairs no longer find it (ENOENT for
  // a name not registered), and every connection serving it is closed (replies to its requests
  // still in flight at the backend are not sent: the client sees its connection end, as on any
  // connection loss) once those requests' done callbacks have been called. Returns when the
  // last connection, and every handshake that had picked the export, is gone: then the engine
  // holds no reference to the backend and will not call it again (if the caller held none
  // either, the backend was destroyed on an engine thread). A backend that never calls
  // done would keep its connection forever: after `timeout` this gives up with ETIMEDOUT (and
  // an error in the log); the export stays removed and the connections are freed whenever the
  // callbacks do come. Blocks: not from the backend's done callbacks or an engine thread.
  Status RemoveBackendExport(const std::string& name,
                             std::chrono::milliseconds timeout = std::chrono::seconds(30));

  // The first Unix socket this front door listens on (as given to Listen), or "" when it has
  // none: where a local NBD client such as nbdfuse connects.
  std::string UnixSocketPath() const;

  // The workers' request life-cycle counters, summed (worker.h EngineCounters).
  EngineCounters counters() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace nbdcsi::datapath
