// The NBD front door: listening sockets, the option-haggling phase, and the hand-off of each
// negotiated connection to an io_uring Worker.
//
// Handshakes run as Boost.Asio coroutines on one thread. They are short, rare and full of small
// reads, so they stay out of the workers' rings; a slow or hostile client in the handshake is cut
// off by a timer and never delays the data path.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "common/endpoint.h"
#include "common/status.h"
#include "datapath/pool/pool.h"

namespace nbdcsi::datapath {

struct FrontendOptions {
  unsigned workers = 2;
  unsigned handshake_timeout_sec = 30;
};

class NbdFrontend {
 public:
  NbdFrontend(Pool& pool, FrontendOptions opts);
  ~NbdFrontend();

  // Binds a listener (call before Start). Unix sockets get mode 0600, a stale socket file is
  // replaced, and a live one is refused. TCP listeners are only opened when asked for.
  Status Listen(const Endpoint& endpoint);
  Status Start();
  // Stops accepting, drops handshakes in progress, closes every connection after its in-flight
  // I/O completes, and removes the Unix socket files.
  void Stop();

  // Serves `volume` over `n` fresh socketpairs, for the kernel NBD driver: the server ends go to
  // the workers straight into the transmission phase, as the kernel never negotiates (so no
  // structured replies and no meta contexts: simple replies only). Returns the client ends,
  // close-on-exec, owned by the caller. ENOENT if the volume is not exported; call after Start.
  StatusOr<std::vector<int>> ServeSocketPairs(const std::string& volume, unsigned n);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace nbdcsi::datapath
