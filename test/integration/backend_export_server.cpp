// Test-only server for integration.backend_export: the real NBD engine (NbdFrontend, its
// io_uring workers, a Unix listener) serving one backend export, NAME@target, whose requests go
// to an in-memory ExportBackend (test/support/memory_backend.h) that completes them from its own
// thread, as a replica set would. External clients (nbdinfo, nbdcopy, fio's nbd engine) then
// talk to it like to any NBD server. The engine needs a pool; an empty one is opened in --pool.
//
//   backend_export_server --socket PATH --pool DIR --name NAME --size BYTES [--workers N]
//
// Prints "ready" on stdout once it accepts connections. On SIGTERM or SIGINT it removes the
// export (waiting for requests in flight at the backend), stops, and exits 0; 1 if any step
// failed or the engine saw a stale completion or a broken invariant.
#include <signal.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>

#include <spdlog/spdlog.h>

#include "common/endpoint.h"
#include "datapath/engine/frontend.h"
#include "datapath/pool/pool.h"
#include "test/support/memory_backend.h"

namespace {

int Usage(const char* why) {
  std::fprintf(stderr,
               "backend_export_server: %s\nusage: backend_export_server --socket PATH "
               "--pool DIR --name NAME --size BYTES [--workers N]\n",
               why);
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  using namespace nbdcsi;
  std::string socket_path, pool_dir, name;
  uint64_t size = 0;
  unsigned workers = 2;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string flag = argv[i], value = argv[i + 1];
    if (flag == "--socket")
      socket_path = value;
    else if (flag == "--pool")
      pool_dir = value;
    else if (flag == "--name")
      name = value;
    else if (flag == "--size")
      size = std::strtoull(value.c_str(), nullptr, 10);
    else if (flag == "--workers")
      workers = static_cast<unsigned>(std::atoi(value.c_str()));
    else
      return Usage(("unknown flag " + flag).c_str());
  }
  if (argc % 2 == 0) return Usage("every flag takes a value");
  if (socket_path.empty() || pool_dir.empty() || name.empty() || size == 0)
    return Usage("--socket, --pool, --name and --size are required");

  // Blocked before any thread starts, so every thread inherits the mask and sigwait below is the
  // only place these signals land.
  sigset_t stop;
  sigemptyset(&stop);
  sigaddset(&stop, SIGTERM);
  sigaddset(&stop, SIGINT);
  pthread_sigmask(SIG_BLOCK, &stop, nullptr);

  datapath::PoolOptions po;
  po.dir = pool_dir;
  auto pool = datapath::Pool::Open(po);
  if (!pool.ok()) {
    spdlog::error("pool {}: {}", pool_dir, pool.status().message());
    return 1;
  }
  datapath::NbdFrontend frontend(**pool, datapath::FrontendOptions{workers, 30});
  Endpoint ep;
  ep.kind = Endpoint::Kind::kUnix;
  ep.path = socket_path;
  auto backend =
      std::make_shared<test::MemoryBackend>(name, size, test::MemoryBackend::Mode::kThread);
  Status st = frontend.Listen(ep);
  if (st.ok()) st = frontend.AddBackendExport(backend);
  if (st.ok()) st = frontend.Start();
  if (!st.ok()) {
    spdlog::error("{}", st.message());
    return 1;
  }
  std::printf("ready\n");
  std::fflush(stdout);

  int sig = 0;
  sigwait(&stop, &sig);
  int rc = 0;
  if (st = frontend.RemoveBackendExport(name); !st.ok()) {
    spdlog::error("removing {}: {}", name, st.message());
    rc = 1;
  }
  const datapath::EngineCounters c = frontend.counters();
  frontend.Stop();
  if (c.stale_dropped || c.invariant_violations) {
    spdlog::error("engine: {} stale completions, {} invariant violations", c.stale_dropped,
                  c.invariant_violations);
    rc = 1;
  }
  spdlog::info("stopped on signal {}: {} backend completions dropped", sig, c.backend_dropped);
  return rc;
}
