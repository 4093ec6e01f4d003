// Data files removed under the running daemon. The volume's open descriptors
// keep the inode alive, so reads and writes go on succeeding, but everything
// written is gone once the last descriptor closes and the next start finds no
// data file: a FLUSH acknowledged meanwhile would be a lie. Two places look:
// the engine after every FLUSH and FUA write (Volume::CheckDataFile, so no such
// promise is made), and the watcher below for every volume each second, so an
// idle volume is reported too. A lost volume is moved to the broken ones,
// exactly like one that failed to load: listed with its reason, not served, its
// name taken until an explicit Delete.
#include <spdlog/spdlog.h>
#include <sys/stat.h>

#include "datapath/pool/pool_impl.h"

namespace nbdcsi::datapath {

namespace {
// How often every volume's data file is looked at: one fstat each, so even
// thousands of volumes cost nothing noticeable, and an idle volume's loss is
// reported within this time.
constexpr auto kWatchPeriod = std::chrono::seconds(1);
}  // namespace

bool Volume::CheckDataFile() {
  if (data_lost()) return false;
  struct stat st {};
  // fstat of an open descriptor fails only for a bad descriptor: not a reason to fence.
  if (fstat(buffered_fd_, &st) != 0 || st.st_nlink > 0) return true;
  if (!data_lost_.exchange(true, std::memory_order_acq_rel)) {
    spdlog::error(
        "volume {}: its data file was removed while the volume was in use; writes and FLUSH "
        "fail with EIO from now on (what was written since the removal cannot be made durable)",
        name_);
  }
  return false;
}

std::string Pool::Impl::LostReason(const std::string& name) const {
  return "data file " + DataPath(name) +
         " was removed while the volume was in use; writes and FLUSH were "
         "refused from then on";
}

void Pool::Impl::StartWatch() {
  watch_thread = std::thread([this] {
    pthread_setname_np(pthread_self(), "pool-watch");
    std::unique_lock lk(watch_mu);
    while (!watch_cv.wait_for(lk, kWatchPeriod, [this] { return watch_stop; })) {
      lk.unlock();
      WatchOnce();
      lk.lock();
    }
  });
}

void Pool::Impl::StopWatch() {
  {
    std::lock_guard lk(watch_mu);
    watch_stop = true;
  }
  watch_cv.notify_all();
  if (watch_thread.joinable()) watch_thread.join();
}

void Pool::Impl::WatchOnce() {
  std::vector<std::pair<std::string, std::shared_ptr<Volume>>> live;
  {
    std::lock_guard lock(mu);
    live.reserve(vols.size());
    for (const auto& [n, e] : vols) live.emplace_back(n, e.vol);
  }
  for (const auto& [n, v] : live) {
    if (!v->CheckDataFile()) FenceLost(n, v);
  }
}

// Moves a lost volume from the live ones to the broken ones, under its name
// guard so no operation on it is half-way. Nothing on disk changes: its
// metadata stays for the operator (and the next start finds the data file
// missing, the same verdict).
void Pool::Impl::FenceLost(const std::string& name, const std::shared_ptr<Volume>& vol) {
  NameGuard guard(*this, {VolKey(name)});
  std::lock_guard lock(mu);
  auto it = vols.find(name);
  if (it == vols.end() || it->second.vol != vol) return;  // deleted or recreated meanwhile
  // A copy to or from it holds its entry (its commit looks the volume up): the
  // flag alone keeps it from being served until the copy ends, then the next
  // round moves it.
  if (copies.count(VolKey(name)) || CopyFromLocked(VolKey(name))) return;
  const std::string why = LostReason(name);
  spdlog::error(
      "pool {}: volume {} is broken: {}; its metadata is kept, "
      "delete the volume to "
      "remove it",
      opts.dir, name, why);
  broken[name] = why;
  vols.erase(it);
}

}  // namespace nbdcsi::datapath
