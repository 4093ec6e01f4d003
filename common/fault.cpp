#include "common/fault.h"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>

namespace nbdcsi {
namespace {

// Keep in sync with the FaultPoint() calls; pool_crash_test fails for any point in this
// list that never fires, and FaultPoint() complains about a name missing from it.
const std::vector<std::string> kKnownPoints = {
    "create.data",          // data file created, sized and fsynced; no metadata yet
    "create.meta_tmp",      // metadata temp file written and fsynced, not yet renamed
    "create.meta_renamed",  // metadata renamed into place, directory not yet fsynced
    "delete.meta",          // metadata unlinked and directory fsynced; data file still there
    "resize.data",          // data file grown and fsynced; metadata still has the old size
    "resize.meta_tmp",
    "resize.meta_renamed",
    "qos.meta_tmp",
    "qos.meta_renamed",
    "schedule.meta_tmp",    // a volume's new schedule in the temp file; the old one in force
    "schedule.meta_renamed",
    "fence.meta_tmp",       // fence epoch in the temp file; the volume still at its old epoch
    "fence.meta_renamed",
    // Snapshots, reflink path.
    "snapshot.cloned",        // FICLONE into the temp file done, writes resumed; not renamed
    "snapshot.data",          // NAME.img renamed into place; no metadata yet
    "snapshot.meta_tmp",
    "snapshot.meta_renamed",
    // Snapshots, copy path.
    "snapshot.copy_data",     // NAME.img created and sized; no metadata yet
    "snapshot.copy_started",  // metadata "copying" committed, copy-before-write job running
    "snapshot.copy_done",     // data copied and fsynced; metadata still "copying"
    "snapshot.delete_meta",   // metadata unlinked and directory fsynced; data file still there
    // Restores from a snapshot and clones of a live volume, same steps as snapshots.
    "restore.cloned",
    "restore.data",
    "restore.meta_tmp",
    "restore.meta_renamed",
    "restore.copy_data",
    "restore.copy_started",
    "restore.copy_done",
    "clone.cloned",
    "clone.data",
    "clone.meta_tmp",
    "clone.meta_renamed",
    "clone.copy_data",
    "clone.copy_started",
    "clone.copy_done",
};

// The armed name is cached per process, not just once: crash tests fork() a child and setenv()
// in it after the parent has already evaluated fault points, so a plain function-local static
// would carry the parent's "unarmed" answer into the child.
std::mutex g_mu;
std::atomic<pid_t> g_cached_pid{0};
std::string g_armed;  // guarded by g_mu until g_cached_pid publishes it

const std::string& Armed() {
  pid_t pid = getpid();
  if (g_cached_pid.load(std::memory_order_acquire) != pid) {
    std::lock_guard lock(g_mu);
    if (g_cached_pid.load(std::memory_order_relaxed) != pid) {
      const char* env = std::getenv("NBDCSI_FAULT");
      g_armed = env ? env : "";
      if (!g_armed.empty() &&
          std::find(kKnownPoints.begin(), kKnownPoints.end(), g_armed) == kKnownPoints.end()) {
        std::fprintf(stderr, "nbdcsi: NBDCSI_FAULT=%s is not a known fault point; it will never fire\n",
                     g_armed.c_str());
      }
      g_cached_pid.store(pid, std::memory_order_release);
    }
  }
  return g_armed;
}

}  // namespace

void FaultPoint(const char* name) {
  const std::string& armed = Armed();
  if (armed.empty()) return;
  if (armed == name) {
    // Raw write(2): stdio buffers would be lost by _exit, and that loss is the point.
    char msg[256];
    int n = std::snprintf(msg, sizeof msg, "nbdcsi: fault point %s hit, exiting with %d\n", name,
                          kFaultExitCode);
    if (n > 0) {
      ssize_t ignored = write(STDERR_FILENO, msg, std::min<size_t>(n, sizeof msg - 1));
      (void)ignored;
    }
    _exit(kFaultExitCode);
  }
  // Only checked while some point is armed (i.e. in tests), so production pays nothing for it.
  if (std::find(kKnownPoints.begin(), kKnownPoints.end(), name) == kKnownPoints.end()) {
    std::fprintf(stderr, "nbdcsi: BUG: fault point %s is missing from KnownFaultPoints()\n", name);
  }
}

const std::vector<std::string>& KnownFaultPoints() { return kKnownPoints; }

}  // namespace nbdcsi
