// libpowercut-fault.so: fault injection for the power-cut test's self-check, loaded with
// LD_PRELOAD into nbd-datapathd by test/vm/powercut.sh only when POWERCUT_FAULT is set. It
// changes nothing in the daemon's code; it lies on the daemon's behalf to prove that the test
// catches an acknowledged write or operation that was not durable.
//
//   NBDCSI_TEST_FAULT=skip-flush[:N]  IORING_OP_FSYNC requests the process submits through
//       liburing become IORING_OP_NOP (every one, or only the N-th): the daemon answers NBD
//       FLUSH as if fdatasync had run.
//   NBDCSI_TEST_FAULT=skip-fsync[:N]  fsync() and fdatasync() return 0 without syncing (every
//       call, or only the N-th): the pool's metadata commits and directory syncs.
// Each skipped call is reported on stderr. Unset or unknown: everything passes through.
#include <dlfcn.h>
#include <liburing.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace {

enum class Mode { kOff, kFlush, kFsync };

struct Config {
  Mode mode = Mode::kOff;
  unsigned long nth = 0;  // 0: every call
};

const Config& Cfg() {
  static const Config cfg = [] {
    Config c;
    const char* v = std::getenv("NBDCSI_TEST_FAULT");
    if (!v) return c;
    const char* colon = std::strchr(v, ':');
    const size_t len = colon ? static_cast<size_t>(colon - v) : std::strlen(v);
    if (len == 10 && std::strncmp(v, "skip-flush", len) == 0) c.mode = Mode::kFlush;
    if (len == 10 && std::strncmp(v, "skip-fsync", len) == 0) c.mode = Mode::kFsync;
    if (colon) c.nth = std::strtoul(colon + 1, nullptr, 10);
    std::fprintf(stderr, "powercut-fault: NBDCSI_TEST_FAULT=%s (%s)\n", v,
                 c.mode == Mode::kOff ? "not understood: no fault" : "active");
    return c;
  }();
  return cfg;
}

std::atomic<unsigned long> g_calls{0};

// Counts one candidate call and says whether this one is skipped.
bool Skip(const char* what) {
  const unsigned long n = ++g_calls;
  const bool skip = Cfg().nth == 0 || n == Cfg().nth;
  if (skip) std::fprintf(stderr, "powercut-fault: skipped %s #%lu\n", what, n);
  return skip;
}

template <typename Fn>
Fn Next(const char* name) {
  void* p = dlsym(RTLD_NEXT, name);
  if (!p) {
    std::fprintf(stderr, "powercut-fault: dlsym(%s): %s\n", name, dlerror());
    std::abort();
  }
  return reinterpret_cast<Fn>(p);
}

// SQEs prepared but not yet submitted sit between sqe_head and sqe_tail.
void RewritePending(io_uring* ring) {
  if (Cfg().mode != Mode::kFlush) return;
  const unsigned mask = ring->sq.ring_mask;
  for (unsigned i = ring->sq.sqe_head; i != ring->sq.sqe_tail; ++i) {
    io_uring_sqe* sqe = &ring->sq.sqes[i & mask];
    if (sqe->opcode == IORING_OP_FSYNC && Skip("io_uring FSYNC")) {
      sqe->opcode = IORING_OP_NOP;
      sqe->fsync_flags = 0;
    }
  }
}

}  // namespace

extern "C" {

int io_uring_submit(io_uring* ring) {
  static auto real = Next<int (*)(io_uring*)>("io_uring_submit");
  RewritePending(ring);
  return real(ring);
}

int io_uring_submit_and_wait(io_uring* ring, unsigned wait_nr) {
  static auto real = Next<int (*)(io_uring*, unsigned)>("io_uring_submit_and_wait");
  RewritePending(ring);
  return real(ring, wait_nr);
}

int io_uring_submit_and_wait_timeout(io_uring* ring, io_uring_cqe** cqe_ptr, unsigned wait_nr,
                                     __kernel_timespec* ts, sigset_t* sigmask) {
  static auto real = Next<int (*)(io_uring*, io_uring_cqe**, unsigned, __kernel_timespec*,
                                  sigset_t*)>("io_uring_submit_and_wait_timeout");
  RewritePending(ring);
  return real(ring, cqe_ptr, wait_nr, ts, sigmask);
}

int fsync(int fd) {
  static auto real = Next<int (*)(int)>("fsync");
  if (Cfg().mode == Mode::kFsync && Skip("fsync")) return 0;
  return real(fd);
}

int fdatasync(int fd) {
  static auto real = Next<int (*)(int)>("fdatasync");
  if (Cfg().mode == Mode::kFsync && Skip("fdatasync")) return 0;
  return real(fd);
}

}  // extern "C"
