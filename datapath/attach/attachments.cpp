#include "datapath/attach/attachments.h"

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <random>
#include <thread>

#include <spdlog/spdlog.h>

#include "common/fs_util.h"
#include "datapath/engine/frontend.h"
#include "datapath/nbd/negotiate.h"

namespace nbdcsi::datapath {
namespace {

Status Sys(int err, const std::string& what) {
  return Error(err, "{}: {}", what, std::strerror(err));
}

void CloseAll(std::vector<int>& fds) {
  for (int fd : fds) close(fd);
  fds.clear();
}

std::string NewCookie(const std::string& volume) {
  // The random part tells this attachment apart from any earlier one of the same volume (another
  // daemon, or a device left over from a lost record), so sysfs can never match the wrong one.
  std::random_device rd;
  uint64_t nonce = (static_cast<uint64_t>(rd()) << 32) | rd();
  return fmt::format("nbd-csi:{}:{:016x}", volume, nonce);
}

// The fuse attachment's identity on its loop device (lo_file_name holds at most 63 bytes): the
// cookie's random part, so it cannot match another attachment, of this volume or any other.
std::string LoopTag(const std::string& cookie) {
  return "nbd-csi:" + cookie.substr(cookie.find_last_of(':') + 1);
}

FuseRef RefOf(const AttachmentRecord& r) {
  return FuseRef{r.fuse_mount, r.fuse_pid, r.index, LoopTag(r.cookie)};
}

}  // namespace

AttachmentManager::AttachmentManager(std::string dir, KernelNbdInterface& kernel,
                                     ExportServer& server, AttachOptions opts)
    : store_(std::move(dir)), kernel_(kernel), server_(server), opts_(std::move(opts)) {}

AttachmentManager::AttachmentManager(std::string dir, KernelNbdInterface& kernel,
                                     FuseLoopInterface& fuse, ExportServer& server,
                                     AttachOptions opts)
    : AttachmentManager(std::move(dir), kernel, server, std::move(opts)) {
  fuse_ = &fuse;
}

AttachmentManager::~AttachmentManager() = default;

FuseLoopInterface& AttachmentManager::Fuse() {
  std::lock_guard lk(mu_);
  if (!fuse_) {
    own_fuse_ = MakeLinuxFuseLoop();
    fuse_ = own_fuse_.get();
  }
  return *fuse_;
}

std::string AttachmentManager::FuseMount(const std::string& volume) const {
  return store_.dir() + "/fuse/" + volume;
}

Status AttachmentManager::Init() { return store_.Init(); }

unsigned AttachmentManager::DefaultConnections() const {
  if (opts_.default_connections) return std::min(opts_.default_connections, kMaxConnections);
  return std::clamp(std::thread::hardware_concurrency(), 1u, 4u);
}

int AttachmentManager::LiveIndex(const AttachmentRecord& r) {
  if (r.index >= 0) return kernel_.Backend(r.index) == r.cookie ? r.index : -1;
  return kernel_.FindByBackend(r.cookie);
}

RecoverReport AttachmentManager::Recover() {
  RecoverReport rep;
  auto loaded = store_.Load();
  if (!loaded.ok()) {
    rep.failed.push_back(loaded.status().message());
    return rep;
  }
  const Status available = kernel_.Available();
  for (auto& l : *loaded) {
    if (l.unreadable) {
      rep.failed.push_back(l.record.status().message());
      continue;
    }
    if (!l.record.ok()) {
      // Never delete what we cannot read: an operator decides.
      spdlog::error("attach: record {} left in place: {}", l.path, l.record.status().message());
      rep.failed.push_back(fmt::format("{}: {}", l.stem, l.record.status().message()));
      continue;
    }
    if (l.record->fuse()) {
      RecoverFuse(std::move(*l.record), rep);
    } else {
      RecoverKernel(std::move(*l.record), available, rep);
    }
  }
  return rep;
}

void AttachmentManager::RecoverKernel(AttachmentRecord r, const Status& available,
                                      RecoverReport& rep) {
  if (!available.ok()) {
    // Without the driver we cannot tell a gone device from an invisible one: keep the record.
    spdlog::error("attach: cannot recover {} ({}): {}", r.volume, r.device(), available.message());
    rep.failed.push_back(fmt::format("{}: {}", r.volume, available.message()));
    return;
  }
  int live = LiveIndex(r);
  if (live < 0) {
    std::string why = r.index < 0 ? "CONNECT never completed and no device has its cookie"
                                  : fmt::format("{} is gone or bound to another backend ('{}')",
                                                r.device(), kernel_.Backend(r.index));
    if (Status s = RemoveRecord(r.volume); !s.ok()) {
      spdlog::error("attach: {}: {}; and the record could not be removed: {}", r.volume, why,
                    s.message());
      rep.failed.push_back(fmt::format("{}: {}", r.volume, s.message()));
      return;
    }
    spdlog::warn("attach: dropped the record of {}: {}", r.volume, why);
    rep.dropped.push_back(fmt::format("{}: {}", r.volume, why));
    return;
  }
  if (r.index != live) {
    r.index = live;
    if (Status s = WriteRecord(r); !s.ok()) {
      spdlog::error("attach: {}: cannot complete its record: {}", r.volume, s.message());
    }
  }
  auto served = ServeExport(r.volume, r.connections, r.target, /*reopen=*/true);
  if (!served.ok()) {
    spdlog::error("attach: cannot serve {}{} for {}: {}", r.volume, r.target ? "@target" : "",
                  r.device(), served.status().message());
    rep.failed.push_back(fmt::format("{}: {}", r.volume, served.status().message()));
    std::lock_guard lk(mu_);
    records_[r.volume] = r;
    link_errors_[r.volume] = fmt::format("cannot serve the {} after the datapath restart: {}",
                                         r.target ? "target" : "volume", served.status().message());
    return;
  }
  if (r.target && served->size_bytes != r.size_bytes) {
    // The device keeps the size it was connected with; a target reopened at another size (the
    // volume was resized meanwhile) would have the kernel address the wrong range.
    CloseAll(served->client_fds);
    std::string why = fmt::format("the target was reopened with {} bytes, the device has {}",
                                  served->size_bytes, r.size_bytes);
    spdlog::error("attach: cannot reconnect {} to the target of {}: {}", r.device(), r.volume, why);
    rep.failed.push_back(fmt::format("{}: {}", r.volume, why));
    std::lock_guard lk(mu_);
    records_[r.volume] = r;
    link_errors_[r.volume] = why;
    return;
  }
  Status s = kernel_.Reconfigure(r.index, served->client_fds, opts_.dead_conn_timeout_s, r.cookie);
  CloseAll(served->client_fds);
  // Sockets beyond the device's dead slots are dropped by the kernel without an error (it turns
  // ENOSPC into success); their server ends just see EOF.
  if (!s.ok()) {
    spdlog::error("attach: RECONFIGURE of {} for {} failed: {}", r.device(), r.volume,
                  s.message());
    rep.failed.push_back(fmt::format("{}: {}", r.volume, s.message()));
    std::lock_guard lk(mu_);
    link_errors_[r.volume] = "reconnecting after the datapath restart failed: " + s.message();
  } else {
    spdlog::info("attach: reconnected {} to volume {} over {} connection(s)", r.device(), r.volume,
                 r.connections);
    rep.reconnected.push_back(fmt::format("{} -> {}", r.volume, r.device()));
    std::lock_guard lk(mu_);
    ++reconnects_[r.volume];
  }
  std::lock_guard lk(mu_);
  records_[r.volume] = r;
}

StatusOr<ServedExport> AttachmentManager::ServeExport(const std::string& volume,
                                                      unsigned connections, bool target,
                                                      bool reopen) {
  if (!target) return server_.Serve(volume, connections);
  if (!opts_.targets) {
    return Error(ENODEV,
                 "the target of volume {} cannot be served: this datapath runs without "
                 "--cluster-etcd, so it opens no targets",
                 volume);
  }
  auto size = opts_.targets->OpenTargetSize(volume);
  if (!size.ok() && size.status().code() == ENOENT && reopen) {
    spdlog::info("attach: reopening the target of {} for its device", volume);
    size = opts_.targets->ReopenTarget(volume);
  }
  if (!size.ok()) return size.status();
  auto fds = server_.ServeTarget(volume, connections);
  if (!fds.ok()) return fds.status();
  ServedExport out;
  out.client_fds = std::move(*fds);
  out.size_bytes = *size;
  return out;
}

StatusOr<AttachmentRecord> AttachmentManager::Attach(const std::string& volume,
                                                     unsigned connections, bool target) {
  if (connections > kMaxConnections) {
    return Error(EINVAL, "{} connections requested; at most {}", connections, kMaxConnections);
  }
  if (connections == 0) connections = DefaultConnections();
  auto claim = busy_.TryAcquire(volume);
  if (!claim) {
    return Error(EALREADY, "another attach, detach or resize of volume {} is in progress", volume);
  }
  auto kept = KeepExisting(volume, connections, target);
  if (!kept.ok()) return kept.status();
  if (*kept) return std::move(**kept);
  Status kernel = kernel_.Available();
  if (kernel.ok()) return AttachKernel(volume, connections, target);
  if (target) {
    return Error(ENODEV,
                 "{}; the target of volume {} attaches only through kernel NBD (the "
                 "nbdfuse fallback does not serve targets: it survives no datapath restart)",
                 kernel.message(), volume);
  }
  return AttachFallback(volume, connections, kernel);
}

StatusOr<std::optional<AttachmentRecord>> AttachmentManager::KeepExisting(
    const std::string& volume, unsigned connections, bool target) {
  std::optional<AttachmentRecord> existing = Find(volume);
  if (existing && existing->target != target) {
    // One device per name: the pool volume and the target of the same name are different data
    // (a local replica is only one copy, and writing it directly would bypass the target).
    return Error(EBUSY, "volume {} is already attached as {} on {}; detach it first", volume,
                 existing->target ? "its replicated target" : "a local volume", existing->device());
  }
  if (existing && existing->fuse()) {
    AttachmentRecord cur = WithLink(*existing);
    if (cur.link_ok) return std::optional<AttachmentRecord>(std::move(cur));
    // Broken (nbdfuse died, or a restart cut its connection): replace it, unless a file system
    // still sits on it; pulling the device from under a mount would lose its dirty data.
    if (cur.index >= 0 && Fuse().LoopBound(RefOf(cur))) {
      if (Status s = Fuse().CheckNotInUse(cur.index); !s.ok()) {
        return Error(EBUSY, "volume {}: its fuse attachment {} is broken ({}) and still in use: "
                     "unmount it, then detach and attach again", volume, cur.device(),
                     cur.link_error);
      }
    }
    spdlog::warn("attach: volume {}: replacing its broken fuse attachment {} ({})", volume,
                 cur.device(), cur.link_error);
    if (Status s = DetachFuse(cur); !s.ok()) return s;
    return std::optional<AttachmentRecord>();
  }
  if (!existing) return std::optional<AttachmentRecord>();
  if (existing->index >= 0 && LiveIndex(*existing) == existing->index) {
    if (existing->connections != connections) {
      spdlog::info("attach: {} is already attached as {} with {} connection(s); keeping it",
                   volume, existing->device(), existing->connections);
    }
    return std::optional<AttachmentRecord>(WithLink(*existing));
  }
  spdlog::warn("attach: the record of {} names {}, which is no longer ours; attaching anew",
               volume, existing->device());
  if (Status s = RemoveRecord(volume); !s.ok()) return s;
  std::lock_guard lk(mu_);
  records_.erase(volume);
  link_errors_.erase(volume);
  reconnects_.erase(volume);
  return std::optional<AttachmentRecord>();
}

StatusOr<AttachmentRecord> AttachmentManager::AttachFallback(const std::string& volume,
                                                             unsigned connections,
                                                             const Status& kernel) {
  if (!opts_.fuse_fallback) {
    return Error(ENODEV, "{}; and the nbdfuse fallback is off (--require-kernel-nbd)",
                 kernel.message());
  }
  if (Status f = Fuse().Available(); !f.ok()) {
    return Error(ENODEV, "{}; and {}", kernel.message(), f.message());
  }
  std::string socket = opts_.nbd_socket.empty() ? server_.UnixSocketPath() : opts_.nbd_socket;
  if (socket.empty()) {
    return Error(ENODEV, "{}; and the nbdfuse fallback needs a Unix NBD listener "
                 "(--nbd-listen unix://PATH)", kernel.message());
  }
  bool first = false;
  {
    std::lock_guard lk(mu_);
    first = !fallback_logged_;
    fallback_logged_ = true;
  }
  if (first) {
    std::string why = kernel.message();
    if (why.rfind("kernel NBD unavailable: ", 0) == 0) why.erase(0, 24);
    spdlog::warn("attach: kernel NBD unavailable ({}): using nbdfuse + loop, slower, does not "
                 "survive a datapath restart", why);
  }
  return AttachFuse(volume, connections, socket);
}

StatusOr<AttachmentRecord> AttachmentManager::AttachKernel(const std::string& volume,
                                                           unsigned connections, bool target) {
  auto served = ServeExport(volume, connections, target);
  if (!served.ok()) return served.status();

  AttachmentRecord r;
  r.volume = volume;
  r.target = target;
  r.cookie = NewCookie(volume);
  r.connections = connections;
  r.size_bytes = served->size_bytes;
  r.read_only = served->read_only;
  if (Status s = WriteRecord(r); !s.ok()) {
    CloseAll(served->client_fds);  // the workers see EOF and drop the connections
    return s;
  }

  KernelConnectParams p;
  p.size_bytes = served->size_bytes;
  p.server_flags = nbd::TransmissionFlags(served->read_only, false);
  p.dead_conn_timeout_s = opts_.dead_conn_timeout_s;
  p.io_timeout_s = opts_.io_timeout_s;
  p.backend_identifier = r.cookie;
  auto index = kernel_.Connect(served->client_fds, p);
  CloseAll(served->client_fds);
  if (!index.ok()) {
    if (Status s = RemoveRecord(volume); !s.ok()) {
      spdlog::error("attach: {}: cannot remove the pending record: {}", volume, s.message());
    }
    return index.status();
  }
  r.index = *index;
  if (Status s = WriteRecord(r); !s.ok()) {
    // A device we could not record durably would be lost at the next restart: undo it. The
    // pending record (index -1, same cookie) still finds the device if this undo fails too.
    spdlog::error("attach: {}: cannot record {}: {}; disconnecting it", volume, r.device(),
                  s.message());
    if (Status d = kernel_.Disconnect(r.index); !d.ok()) {
      spdlog::error("attach: disconnect of {} failed: {}", r.device(), d.message());
    } else if (Status rm = RemoveRecord(volume); !rm.ok()) {
      spdlog::error("attach: {}: {}", volume, rm.message());
    }
    return s;
  }
  if (opts_.max_sectors_kb) {
    auto kb = kernel_.SetMaxSectorsKb(r.index, opts_.max_sectors_kb);
    if (!kb.ok()) {
      spdlog::warn("attach: {}: max_sectors_kb stays at the default: {}", r.device(),
                   kb.status().message());
    }
  }
  {
    std::lock_guard lk(mu_);
    records_[volume] = r;
    link_errors_.erase(volume);
  }
  spdlog::info("attach: {}volume {} attached as {} ({} bytes, {} connection(s), cookie {})",
               target ? "the target of " : "", volume, r.device(), r.size_bytes, r.connections,
               r.cookie);
  return r;
}

Status AttachmentManager::Detach(const std::string& volume) {
  auto claim = busy_.TryAcquire(volume);
  if (!claim) {
    return Error(EALREADY, "another attach or detach of volume {} is in progress", volume);
  }
  std::optional<AttachmentRecord> r = Find(volume);
  if (!r) return Status::Ok();
  if (r->fuse()) return DetachFuse(*r);
  auto forget = [&]() -> Status {
    if (Status s = RemoveRecord(volume); !s.ok()) return s;
    std::lock_guard lk(mu_);
    records_.erase(volume);
    link_errors_.erase(volume);
    reconnects_.erase(volume);
    return Status::Ok();
  };
  if (r->index < 0 || LiveIndex(*r) != r->index) {
    spdlog::info("attach: detach {}: {} is no longer ours; forgetting the record", volume,
                 r->device());
    return forget();
  }
  if (Status s = kernel_.CheckNotInUse(r->index); !s.ok()) {
    return Error(s.code(), "cannot detach volume {}: {}", volume, s.message());
  }
  // A target's connections are not the pool volume's (which, as a local replica, may be serving
  // another node's target): nothing to count, and CloseTarget waits for them anyway.
  const uint64_t open_before = r->target ? 0 : server_.OpenConnections(volume);
  if (Status s = kernel_.Disconnect(r->index); !s.ok()) return s;
  // DISCONNECT returns once the request is queued; the device is torn down when the sockets
  // close. Until then the record must stay, or a restart in between would lose track of it.
  auto deadline = std::chrono::steady_clock::now() + opts_.detach_wait;
  while (kernel_.Connected(r->index)) {
    if (std::chrono::steady_clock::now() >= deadline) {
      return Error(ETIMEDOUT, "{} is still connected {} ms after DISCONNECT; retry later",
                   r->device(), opts_.detach_wait.count());
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  if (!r->target) AwaitEngineClosed(volume, open_before, r->connections);
  if (Status s = forget(); !s.ok()) return s;
  spdlog::info("attach: {}volume {} detached from {}{}", r->target ? "the target of " : "", volume,
               r->device(), r->target ? " (the target stays open)" : "");
  return Status::Ok();
}

// The device has let go of its sockets (the kernel shut them down, or nbdfuse exited); the
// engine notices on its next receive, and until then the volume still counts them. A
// DeleteVolume right after the unstage would then be refused as busy, so a detach returns once
// the count has dropped by the attachment's connections, or after engine_close_wait (another
// client may have come or gone meanwhile: the count is a hint, not a contract).
void AttachmentManager::AwaitEngineClosed(const std::string& volume, uint64_t before,
                                          unsigned ours) {
  const uint64_t target = before > ours ? before - ours : 0;
  const auto deadline = std::chrono::steady_clock::now() + opts_.engine_close_wait;
  uint64_t open = server_.OpenConnections(volume);
  while (open > target) {
    if (std::chrono::steady_clock::now() >= deadline) {
      spdlog::warn("attach: volume {} still has {} NBD connection(s) {} ms after its detach",
                   volume, open, opts_.engine_close_wait.count());
      return;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
    open = server_.OpenConnections(volume);
  }
}

Status AttachmentManager::OnLinkDead(int index) {
  std::optional<AttachmentRecord> r;
  {
    std::lock_guard lk(mu_);
    for (const auto& [name, rec] : records_) {
      if (!rec.fuse() && rec.index == index) r = rec;
    }
  }
  if (!r) return Status::Ok();
  auto claim = busy_.TryAcquire(r->volume);
  if (!claim || LiveIndex(*r) != index || !kernel_.Connected(index)) return Status::Ok();
  auto served = ServeExport(r->volume, r->connections, r->target);
  if (!served.ok()) {
    spdlog::error("attach: {} lost a connection and {} cannot be served: {}", r->device(),
                  r->volume, served.status().message());
    std::lock_guard lk(mu_);
    link_errors_[r->volume] = "the kernel dropped a connection and the volume cannot be served: " +
                              served.status().message();
    return served.status();
  }
  // All sockets, not just one: the kernel fills every dead slot and drops the rest.
  Status s = kernel_.Reconfigure(index, served->client_fds, opts_.dead_conn_timeout_s, r->cookie);
  CloseAll(served->client_fds);
  if (!s.ok()) {
    spdlog::error("attach: {} lost a connection; RECONFIGURE failed: {}", r->device(), s.message());
    std::lock_guard lk(mu_);
    link_errors_[r->volume] = "the kernel dropped a connection and RECONFIGURE failed: " +
                              s.message();
    return s;
  }
  spdlog::warn("attach: the kernel dropped a connection of {} (volume {}): reconnected", r->device(),
               r->volume);
  std::lock_guard lk(mu_);
  link_errors_.erase(r->volume);
  ++reconnects_[r->volume];
  return Status::Ok();
}

std::vector<AttachmentRecord> AttachmentManager::List() const {
  std::vector<AttachmentRecord> out;
  {
    std::lock_guard lk(mu_);
    for (const auto& [name, r] : records_) out.push_back(r);
  }
  for (auto& r : out) r = WithLink(std::move(r));
  return out;
}

Status AttachmentManager::CloseTargetUnlessAttached(const std::string& volume,
                                                    const std::function<Status()>& close) {
  auto claim = busy_.TryAcquire(volume);
  if (!claim) {
    return Error(EALREADY, "an attach, detach or resize of volume {} is in progress; retry",
                 volume);
  }
  if (auto r = Find(volume); r && r->target) {
    return Error(EBUSY,
                 "the target of volume {} is attached as {}: closing it would take the device's "
                 "export away; detach it first (nbdctl detach {})",
                 volume, r->index < 0 ? std::string("a device being attached") : r->device(),
                 volume);
  }
  return close();
}

std::optional<AttachmentRecord> AttachmentManager::Get(const std::string& volume) const {
  auto r = Find(volume);
  if (!r) return std::nullopt;
  return WithLink(std::move(*r));
}

std::optional<AttachmentRecord> AttachmentManager::Find(const std::string& volume) const {
  std::lock_guard lk(mu_);
  auto it = records_.find(volume);
  if (it == records_.end()) return std::nullopt;
  return it->second;
}

AttachmentRecord AttachmentManager::WithLink(AttachmentRecord r) const {
  r.link_ok = false;
  r.link_error.clear();
  if (r.index < 0) {
    r.link_error = r.fuse() ? "the fuse attachment never completed (no loop device)"
                            : "CONNECT was never confirmed";
    return r;
  }
  std::string recorded;
  bool live_here = false;
  FuseLoopInterface* fuse = nullptr;
  {
    std::lock_guard lk(mu_);
    if (auto it = link_errors_.find(r.volume); it != link_errors_.end()) recorded = it->second;
    if (auto it = reconnects_.find(r.volume); it != reconnects_.end()) r.reconnects = it->second;
    live_here = fuse_live_.count(r.volume) > 0;
    fuse = fuse_;
  }
  if (r.fuse()) {
    if (!live_here || !fuse) {
      r.link_error = "nbdfuse lost its NBD connection when the datapath restarted (fuse "
                     "attachments do not survive a restart): unmount, detach and attach again";
      return r;
    }
    r.link_error = fuse->LinkProblem(RefOf(r));
  } else if (kernel_.Backend(r.index) != r.cookie) {
    r.link_error = fmt::format("{} is gone or bound to another backend", r.device());
  } else if (!kernel_.Connected(r.index)) {
    r.link_error = fmt::format("{} is not connected", r.device());
  } else {
    r.link_error = recorded;
  }
  r.link_ok = r.link_error.empty();
  return r;
}

void AttachmentManager::RecoverFuse(AttachmentRecord r, RecoverReport& rep) {
  if (r.index < 0) {
    // Interrupted before the loop device was recorded: nobody was told of a device, so the
    // pieces (nbdfuse, mount, maybe an unrecorded loop device) are only cleaned up.
    Status s = Fuse().Detach(RefOf(r));
    if (s.ok()) s = RemoveRecord(r.volume);
    if (s.ok()) {
      spdlog::warn("attach: dropped the unfinished fuse attachment of {}", r.volume);
      rep.dropped.push_back(fmt::format("{}: the fuse attachment never completed", r.volume));
      return;
    }
    spdlog::error("attach: cannot clean up the unfinished fuse attachment of {}: {}", r.volume,
                  s.message());
    rep.failed.push_back(fmt::format("{}: {}", r.volume, s.message()));
  } else {
    // The device may still carry a mounted file system: keep it for the caller to unmount and
    // detach; until then it reports link_ok=false.
    spdlog::error("attach: {} (volume {}) is a fuse attachment: nbdfuse lost its NBD connection "
                  "with the previous datapath and cannot reconnect; unmount and detach it",
                  r.device(), r.volume);
    rep.failed.push_back(fmt::format("{}: fuse attachment {} cannot be reconnected after a "
                                     "restart; unmount and detach it", r.volume, r.device()));
  }
  std::lock_guard lk(mu_);
  records_[r.volume] = r;
}

StatusOr<AttachmentRecord> AttachmentManager::AttachFuse(const std::string& volume,
                                                         unsigned connections,
                                                         const std::string& socket) {
  auto desc = server_.Describe(volume);
  if (!desc.ok()) return desc.status();
  if (desc->size_bytes > kGrowableWindow) {
    return Error(EFBIG, "volume {} is {} bytes; the fuse attach path handles at most {}", volume,
                 desc->size_bytes, kGrowableWindow);
  }
  const std::string fuse_dir = store_.dir() + "/fuse";
  if (mkdir(fuse_dir.c_str(), 0700) == 0) {
    if (Status s = FsyncDir(store_.dir()); !s.ok()) return s;
  } else if (errno != EEXIST) {
    return Sys(errno, "mkdir " + fuse_dir);
  }
  AttachmentRecord r;
  r.volume = volume;
  r.mode = kModeFuse;
  r.cookie = NewCookie(volume);
  r.connections = connections;
  r.size_bytes = desc->size_bytes;
  r.read_only = desc->read_only;
  r.fuse_mount = FuseMount(volume);
  if (Status s = WriteRecord(r); !s.ok()) return s;

  FuseAttachParams p;
  p.volume = volume;
  p.uri = FuseExportUri(volume + std::string(kGrowableSuffix), socket);
  p.mount_dir = r.fuse_mount;
  p.log_path = fuse_dir + "/" + volume + ".log";
  p.size_bytes = r.size_bytes;
  p.window_bytes = kGrowableWindow;
  p.connections = connections;
  p.read_only = r.read_only;
  p.loop_tag = LoopTag(r.cookie);
  auto att = Fuse().Attach(p, [&](int pid) {
    r.fuse_pid = pid;
    // Best effort: without the pid a cleanup still finds nbdfuse by its command line.
    if (Status s = WriteRecord(r); !s.ok()) {
      spdlog::error("attach: {}: cannot record nbdfuse's pid: {}", volume, s.message());
    }
  });
  if (!att.ok()) {
    if (Status s = RemoveRecord(volume); !s.ok()) {
      spdlog::error("attach: {}: cannot remove the pending record: {}", volume, s.message());
    }
    return att.status();
  }
  r.fuse_pid = att->pid;
  r.index = att->loop_index;
  if (Status s = WriteRecord(r); !s.ok()) {
    spdlog::error("attach: {}: cannot record {}: {}; undoing it", volume, r.device(), s.message());
    if (Status d = Fuse().Detach(RefOf(r)); !d.ok()) {
      spdlog::error("attach: undoing the fuse attachment of {} failed: {}", volume, d.message());
    } else if (Status rm = RemoveRecord(volume); !rm.ok()) {
      spdlog::error("attach: {}: {}", volume, rm.message());
    }
    return s;
  }
  {
    std::lock_guard lk(mu_);
    records_[volume] = r;
    fuse_live_.insert(volume);
    link_errors_.erase(volume);
  }
  spdlog::info("attach: volume {} attached as {} through nbdfuse (pid {}, {} bytes, {} "
               "connection(s))", volume, r.device(), r.fuse_pid, r.size_bytes, r.connections);
  return WithLink(r);
}

Status AttachmentManager::DetachFuse(const AttachmentRecord& r) {
  if (r.index >= 0 && Fuse().LoopBound(RefOf(r))) {
    if (Status s = Fuse().CheckNotInUse(r.index); !s.ok()) {
      return Error(s.code(), "cannot detach volume {}: {}", r.volume, s.message());
    }
  }
  const uint64_t open_before = server_.OpenConnections(r.volume);
  if (Status s = Fuse().Detach(RefOf(r)); !s.ok()) {
    return Error(s.code(), "cannot detach volume {} ({}): {}", r.volume, r.device(), s.message());
  }
  AwaitEngineClosed(r.volume, open_before, r.connections);
  if (Status s = RemoveRecord(r.volume); !s.ok()) return s;
  {
    std::lock_guard lk(mu_);
    records_.erase(r.volume);
    fuse_live_.erase(r.volume);
    link_errors_.erase(r.volume);
    reconnects_.erase(r.volume);
  }
  std::string log = store_.dir() + "/fuse/" + r.volume + ".log";
  unlink(log.c_str());
  spdlog::info("attach: volume {} detached from {} (nbdfuse stopped)", r.volume, r.device());
  return Status::Ok();
}

StatusOr<AttachmentRecord> AttachmentManager::Resize(const std::string& volume) {
  auto claim = busy_.TryAcquire(volume);
  if (!claim) {
    return Error(EALREADY, "another attach, detach or resize of volume {} is in progress", volume);
  }
  std::optional<AttachmentRecord> found = Find(volume);
  if (!found) return Error(ENOENT, "volume {} is not attached", volume);
  AttachmentRecord r = WithLink(*found);
  if (!r.link_ok) {
    return Error(ENODEV, "volume {}: cannot resize {}: its link is down: {}", volume, r.device(),
                 r.link_error);
  }
  uint64_t size = 0;
  if (found->target) {
    // The target learns the expanded size first (its connections' size is live), then the
    // device grows like a local volume's.
    if (!opts_.targets) {
      return Error(ENODEV, "volume {}: {} serves its target, and this datapath opens no targets",
                   volume, found->device());
    }
    auto grown = opts_.targets->GrowTarget(volume);
    if (!grown.ok()) return grown.status();
    size = *grown;
  } else {
    auto desc = server_.Describe(volume);
    if (!desc.ok()) return desc.status();
    size = desc->size_bytes;
  }
  if (size < r.size_bytes) {
    return Error(EINVAL, "volume {} is {} bytes, smaller than its device ({} bytes); devices only "
                 "grow", volume, size, r.size_bytes);
  }
  uint64_t now = 0;
  if (r.fuse()) {
    if (size > kGrowableWindow) {
      return Error(EFBIG, "volume {}: {} bytes is beyond what its fuse attachment can grow to ({})",
                   volume, size, kGrowableWindow);
    }
    if (Status s = Fuse().Resize(r.index, size); !s.ok()) return s;
    now = Fuse().SizeBytes(r.index);
  } else {
    if (Status s = kernel_.Resize(r.index, size, r.cookie); !s.ok()) return s;
    now = kernel_.SizeBytes(r.index);
  }
  if (now != size) {
    return Error(EOPNOTSUPP, "volume {}: {} took the new size {} but reports {} bytes: this kernel "
                 "does not resize the device online", volume, r.device(), size, now);
  }
  if (size != r.size_bytes) {
    AttachmentRecord updated = *found;
    updated.size_bytes = size;
    if (Status s = WriteRecord(updated); !s.ok()) return s;
    {
      std::lock_guard lk(mu_);
      records_[volume] = updated;
    }
    spdlog::info("attach: {} (volume {}) resized from {} to {} bytes", r.device(), volume,
                 r.size_bytes, size);
    r.size_bytes = size;
  }
  return r;
}

}  // namespace nbdcsi::datapath
