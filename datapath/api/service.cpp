#include "datapath/api/service.h"

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <limits>
#include <mutex>
#include <string_view>
#include <utility>

#include <grpcpp/grpcpp.h>
#include <spdlog/spdlog.h>

#include "common/grpc_status.h"
#include "datapath/api/datapath.grpc.pb.h"
#include "datapath/api/qos_proto.h"
#include "datapath/api/schedule_proto.h"

namespace nbdcsi::datapath {

// v1 (the generated code's namespace) is nested here already; clang refuses an alias of the same
// name (GCC accepts it), and the fuzz targets build this file with clang.

namespace {

// The request as the pool's CreateSpec. Only the shape of the message is checked here (a source
// that names neither kind); every rule about names, sizes and limits is the pool's.
StatusOr<CreateSpec> ToSpec(const v1::CreateVolumeRequest& req) {
  CreateSpec spec;
  spec.name = req.name();
  spec.size = req.size_bytes();
  spec.qos = FromProto(req.qos());
  spec.read_only = req.read_only();
  if (req.has_schedule()) spec.schedule = FromProto(req.schedule());
  if (!req.has_source()) return spec;
  switch (req.source().kind_case()) {
    case v1::VolumeContentSource::kSnapshot:
      spec.source = VolumeSource::FromSnapshot(req.source().snapshot());
      return spec;
    case v1::VolumeContentSource::kVolume:
      spec.source = VolumeSource::FromVolume(req.source().volume());
      return spec;
    case v1::VolumeContentSource::KIND_NOT_SET:
      break;
  }
  return Error(EINVAL, "volume \"{}\": the content source names neither a snapshot nor a volume",
               req.name());
}

grpc::Status Fail(const char* rpc, const Status& s) {
  // The full message goes to the log and to the caller; the code is the lossy part.
  spdlog::warn("api {}: {} (errno {}: {})", rpc, s.message(), s.code(), std::strerror(s.code()));
  return ToGrpc(s);
}

}  // namespace

// Handlers convert the request to the pool's types, make one call into the pool (which checks
// every argument and decides under its own name guard) and map the result through ToGrpc.
// Mutating calls also hold a per-name in-flight mark: a second concurrent call on the same
// volume or snapshot gets ABORTED (EALREADY) at once instead of queueing behind the first in the
// pool, as CSI sidecars expect.
class DatapathService final : public v1::Datapath::Service {
 public:
  DatapathService(Pool& pool, std::shared_ptr<NameLocks> in_flight)
      : pool_(pool), in_flight_(std::move(in_flight)) {}

  grpc::Status CreateVolume(grpc::ServerContext*, const v1::CreateVolumeRequest* req,
                            v1::CreateVolumeResponse* resp) override {
    auto spec = ToSpec(*req);
    if (!spec.ok()) return Fail("CreateVolume", spec.status());
    auto guard = Mark("volume", req->name());
    if (!guard.ok()) return Fail("CreateVolume", guard.status());
    auto r = pool_.Create(*spec);
    if (!r.ok()) return Fail("CreateVolume", r.status());
    spdlog::info("api CreateVolume: volume \"{}\" size {}{}{}{}", r->name, r->size,
                 r->read_only ? " read-only" : "", r->source.empty() ? "" : " from " + r->source,
                 r->ready ? "" : " (copying)");
    Fill(*r, resp->mutable_volume());
    return grpc::Status::OK;
  }

  grpc::Status DeleteVolume(grpc::ServerContext*, const v1::DeleteVolumeRequest* req,
                            v1::DeleteVolumeResponse*) override {
    return DeleteNamed("DeleteVolume", "volume", req->name(),
                       [this](const std::string& n) { return pool_.Delete(n); });
  }

  grpc::Status ResizeVolume(grpc::ServerContext*, const v1::ResizeVolumeRequest* req,
                            v1::ResizeVolumeResponse* resp) override {
    const std::string& name = req->name();
    auto guard = Mark("volume", name);
    if (!guard.ok()) return Fail("ResizeVolume", guard.status());
    auto r = pool_.Resize(name, req->size_bytes());
    if (!r.ok()) return Fail("ResizeVolume", r.status());
    spdlog::info("api ResizeVolume: volume \"{}\" is {} bytes", name, r->size);
    Fill(*r, resp->mutable_volume());
    return grpc::Status::OK;
  }

  grpc::Status ListVolumes(grpc::ServerContext*, const v1::ListVolumesRequest*,
                           v1::ListVolumesResponse* resp) override {
    auto vols = pool_.List();
    std::sort(vols.begin(), vols.end(),
              [](const VolumeInfo& a, const VolumeInfo& b) { return a.name < b.name; });
    for (const auto& v : vols) Fill(v, resp->add_volumes());
    return grpc::Status::OK;
  }

  grpc::Status GetVolume(grpc::ServerContext*, const v1::GetVolumeRequest* req,
                         v1::GetVolumeResponse* resp) override {
    auto r = pool_.Inspect(req->name());
    if (!r.ok()) return Fail("GetVolume", r.status());
    Fill(*r, resp->mutable_volume());
    return grpc::Status::OK;
  }

  grpc::Status SetQos(grpc::ServerContext*, const v1::SetQosRequest* req,
                      v1::SetQosResponse* resp) override {
    const std::string& name = req->name();
    if (req->change_case() == v1::SetQosRequest::CHANGE_NOT_SET) {
      return Fail("SetQos", Error(EINVAL, "volume \"{}\": SetQos needs either replace or patch",
                                  name));
    }
    auto guard = Mark("volume", name);
    if (!guard.ok()) return Fail("SetQos", guard.status());
    // A patch is applied by the pool to the limits it holds, under its guard: read and write are
    // one step, whoever else changes the volume.
    const QosPatch change =
        req->has_replace() ? QosPatch::All(FromProto(req->replace())) : FromProto(req->patch());
    auto r = pool_.UpdateQos(name, change);
    if (!r.ok()) return Fail("SetQos", r.status());
    spdlog::info("api SetQos: volume \"{}\" limits changed", name);
    Fill(*r, resp->mutable_volume());
    return grpc::Status::OK;
  }

  grpc::Status SetSchedule(grpc::ServerContext*, const v1::SetScheduleRequest* req,
                           v1::SetScheduleResponse* resp) override {
    const std::string& name = req->name();
    auto guard = Mark("volume", name);
    if (!guard.ok()) return Fail("SetSchedule", guard.status());
    const VolumeSchedule s = req->has_schedule() ? FromProto(req->schedule()) : VolumeSchedule{};
    auto r = pool_.SetSchedule(name, s);
    if (!r.ok()) return Fail("SetSchedule", r.status());
    spdlog::info("api SetSchedule: volume \"{}\": {}", name, DescribeSchedule(r->schedule));
    Fill(*r, resp->mutable_volume());
    return grpc::Status::OK;
  }

  void SetScheduleStatus(ScheduleStatusFn fn) {
    std::lock_guard lock(status_mu_);
    schedule_status_ = std::move(fn);
  }

  // No in-flight mark: a fence is not a CSI call to be retried on ABORTED; the pool's name
  // guard orders it after whatever else runs on the volume.
  grpc::Status FenceVolume(grpc::ServerContext*, const v1::FenceVolumeRequest* req,
                           v1::FenceVolumeResponse* resp) override {
    auto r = pool_.FenceVolume(req->name(), req->epoch());
    if (!r.ok()) {
      // A stale epoch is a precondition of the cluster state (a newer target exists), not a
      // fault of the file: FAILED_PRECONDITION, which errno alone does not say.
      if (r.status().code() == ESTALE) {
        Fail("FenceVolume", r.status());
        return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION, r.status().message());
      }
      return Fail("FenceVolume", r.status());
    }
    spdlog::info("api FenceVolume: volume \"{}\" at epoch {}", req->name(), *r);
    resp->set_epoch(*r);
    return grpc::Status::OK;
  }

  grpc::Status GetVolumeStats(grpc::ServerContext*, const v1::GetVolumeStatsRequest* req,
                              v1::GetVolumeStatsResponse* resp) override {
    const std::string& name = req->name();
    auto vol = pool_.Acquire(name);
    if (!vol) {
      // Acquire cannot tell a missing volume from a broken one or a bad name; Inspect can, and
      // a broken volume must not be reported as "not found" (the operator would recreate it).
      auto r = pool_.Inspect(name);
      if (!r.ok()) return Fail("GetVolumeStats", r.status());
      vol = pool_.Acquire(name);  // created between the two calls
      if (!vol) return Fail("GetVolumeStats", Error(ENOENT, "volume \"{}\" not found", name));
    }
    VolumeStatsSnapshot snap = vol->stats().Snapshot();
    vol.reset();
    resp->set_name(name);
    resp->set_sampled_unix_ns(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                  std::chrono::system_clock::now().time_since_epoch())
                                  .count());
    auto* st = resp->mutable_stats();
    auto counters = [&](OpKind k, v1::OpCounters* c) {
      c->set_ops(snap.ops[static_cast<int>(k)]);
      c->set_errors(snap.errors[static_cast<int>(k)]);
    };
    counters(OpKind::kRead, st->mutable_read());
    st->mutable_read()->set_bytes(snap.bytes_read);
    counters(OpKind::kWrite, st->mutable_write());
    st->mutable_write()->set_bytes(snap.bytes_written);
    counters(OpKind::kFlush, st->mutable_flush());
    counters(OpKind::kTrim, st->mutable_trim());
    counters(OpKind::kWriteZeroes, st->mutable_write_zeroes());
    counters(OpKind::kBlockStatus, st->mutable_block_status());
    auto histogram = [](const std::array<uint64_t, kLatencyBuckets>& h,
                        v1::LatencyHistogram* out) {
      for (int i = 0; i < kLatencyBuckets; ++i) {
        auto* b = out->add_buckets();
        b->set_upper_bound_us(i + 1 == kLatencyBuckets ? std::numeric_limits<uint64_t>::max()
                                                       : uint64_t{1} << i);
        b->set_count(h[i]);
      }
    };
    histogram(snap.read_latency_us, st->mutable_read_latency());
    histogram(snap.write_latency_us, st->mutable_write_latency());
    st->set_throttled_ns(snap.throttled_ns);
    st->set_throttled_ops(snap.throttled_ops);
    st->set_open_connections(snap.connections);
    return grpc::Status::OK;
  }

  grpc::Status GetPoolInfo(grpc::ServerContext*, const v1::GetPoolInfoRequest*,
                           v1::GetPoolInfoResponse* resp) override {
    PoolInfo info = pool_.Info();
    resp->set_dir(info.dir);
    resp->set_capacity_bytes(info.capacity);
    resp->set_free_bytes(info.free);
    resp->set_free_reserve_bytes(info.free_reserve);
    resp->set_provisioned_bytes(info.provisioned);
    resp->set_allocated_bytes(info.allocated);
    resp->set_overcommit_ratio(info.overcommit_ratio);
    resp->set_provisionable_bytes(info.provisionable());
    resp->set_volumes(info.volumes);
    for (const auto& o : info.cleaned_orphans) resp->add_cleaned_orphans(o);
    for (const auto& b : info.broken_volumes) resp->add_broken_volumes(b);
    resp->set_fs_type(info.fs_type);
    resp->set_reflink(info.reflink);
    resp->set_snapshots(info.snapshots);
    for (const auto& a : info.abandoned_copies) resp->add_abandoned_copies(a);
    return grpc::Status::OK;
  }

  grpc::Status CreateSnapshot(grpc::ServerContext*, const v1::CreateSnapshotRequest* req,
                              v1::CreateSnapshotResponse* resp) override {
    const std::string& name = req->name();
    // Only the snapshot's name is marked: a volume's own calls (resize, QoS, other snapshots of
    // it) are ordered by the pool, which answers UNAVAILABLE while a copy from it runs.
    auto guard = Mark("snapshot", name);
    if (!guard.ok()) return Fail("CreateSnapshot", guard.status());
    auto r = pool_.CreateSnapshot(name, req->source_volume());
    if (!r.ok()) return Fail("CreateSnapshot", r.status());
    spdlog::info("api CreateSnapshot: snapshot \"{}\" of volume \"{}\" ({}{})", name,
                 r->source_volume, r->method, r->ready ? "" : ", copying");
    Fill(*r, resp->mutable_snapshot());
    return grpc::Status::OK;
  }

  grpc::Status DeleteSnapshot(grpc::ServerContext*, const v1::DeleteSnapshotRequest* req,
                              v1::DeleteSnapshotResponse*) override {
    return DeleteNamed("DeleteSnapshot", "snapshot", req->name(),
                       [this](const std::string& n) { return pool_.DeleteSnapshot(n); });
  }

  grpc::Status ListSnapshots(grpc::ServerContext*, const v1::ListSnapshotsRequest* req,
                             v1::ListSnapshotsResponse* resp) override {
    auto snaps = pool_.ListSnapshots(req->source_volume());
    if (!snaps.ok()) return Fail("ListSnapshots", snaps.status());
    std::sort(snaps->begin(), snaps->end(),
              [](const SnapshotInfo& a, const SnapshotInfo& b) { return a.name < b.name; });
    for (const auto& s : *snaps) Fill(s, resp->add_snapshots());
    return grpc::Status::OK;
  }

  grpc::Status GetSnapshot(grpc::ServerContext*, const v1::GetSnapshotRequest* req,
                           v1::GetSnapshotResponse* resp) override {
    auto r = pool_.InspectSnapshot(req->name());
    if (!r.ok()) return Fail("GetSnapshot", r.status());
    Fill(*r, resp->mutable_snapshot());
    return grpc::Status::OK;
  }

 private:
  // The in-flight mark of `kind` ("volume" or "snapshot") NAME. Volumes and snapshots are
  // separate namespaces, so their marks are too: creating snapshot "a" of volume "a" must not
  // look like a second call on volume "a".
  StatusOr<NameLocks::Guard> Mark(const char* kind, const std::string& name) {
    auto guard = in_flight_->TryAcquire(fmt::format("{}/{}", kind, name));
    if (!guard) {
      return Error(EALREADY, "{} \"{}\": another operation on it is in progress; retry", kind,
                   name);
    }
    return std::move(*guard);
  }

  // DeleteVolume and DeleteSnapshot: the name's guard, the pool's delete, the log line.
  template <typename Delete>
  grpc::Status DeleteNamed(const char* rpc, const char* kind, const std::string& name,
                           Delete del) {
    auto guard = Mark(kind, name);
    if (!guard.ok()) return Fail(rpc, guard.status());
    if (auto s = del(name); !s.ok()) return Fail(rpc, s);
    spdlog::info("api {}: {} \"{}\" deleted", rpc, kind, name);
    return grpc::Status::OK;
  }

  void Fill(const VolumeInfo& info, v1::Volume* out) {
    out->set_name(info.name);
    out->set_size_bytes(info.size);
    out->set_allocated_bytes(info.allocated);
    out->set_created_unix_ns(info.created_unix_ns);
    out->set_read_only(info.read_only);
    ToProto(info.qos, out->mutable_qos());
    EffectiveQos eff = Resolve(info.qos, info.size);
    auto* e = out->mutable_effective_qos();
    e->set_iops(eff.iops);
    e->set_read_iops(eff.read_iops);
    e->set_write_iops(eff.write_iops);
    e->set_bps(eff.bps);
    e->set_read_bps(eff.read_bps);
    e->set_write_bps(eff.write_bps);
    e->set_burst_ms(eff.burst_ms);
    out->set_data_path(info.path);
    out->set_source(info.source);
    out->set_ready(info.ready);
    out->set_copy_done_bytes(info.copy_done);
    out->set_copy_total_bytes(info.copy_total);
    out->set_copy_data_done_bytes(info.copy_data_done);
    if (info.copy_data_total) out->set_copy_data_total_bytes(*info.copy_data_total);
    out->set_fence_epoch(info.fence_epoch);
    if (!info.schedule.empty()) {
      ToProto(info.schedule, out->mutable_schedule());
      // Called under the lock, so that once SetScheduleStatus(nullptr) returns no call is still
      // reading the runner (the daemon destroys it next). It takes the runner's lock briefly.
      std::vector<ScheduleRunStatus> runs;
      {
        std::lock_guard lock(status_mu_);
        if (schedule_status_) runs = schedule_status_(info.name, info.schedule);
      }
      for (const ScheduleRunStatus& r : runs) {
        auto* p = out->add_schedule_runs();
        p->set_kind(r.kind);
        p->set_cron(r.cron);
        p->set_last_run_unix_ns(r.last_run_unix_ns);
        p->set_result(r.result);
        p->set_error(r.error);
        p->set_made(r.made);
        p->set_pruned(r.pruned);
        p->set_next_fire_unix_ns(r.next_fire_unix_ns);
        p->set_job_id(r.job_id);
      }
    }
    if (auto vol = pool_.Acquire(info.name)) {
      out->set_open_connections(vol->stats().connections());
    }
  }

  static void Fill(const SnapshotInfo& info, v1::Snapshot* out) {
    out->set_name(info.name);
    out->set_source_volume(info.source_volume);
    out->set_size_bytes(info.size);
    out->set_allocated_bytes(info.allocated);
    out->set_created_unix_ns(info.created_unix_ns);
    out->set_method(info.method);
    out->set_ready(info.ready);
    out->set_copy_done_bytes(info.copy_done);
    out->set_copy_total_bytes(info.copy_total);
    out->set_copy_data_done_bytes(info.copy_data_done);
    if (info.copy_data_total) out->set_copy_data_total_bytes(*info.copy_data_total);
    out->set_error(info.error);
    out->set_data_path(info.path);
  }

  Pool& pool_;
  std::shared_ptr<NameLocks> in_flight_;
  std::mutex status_mu_;
  ScheduleStatusFn schedule_status_;  // guarded by status_mu_
};

void ApiServer::SetScheduleStatus(ScheduleStatusFn fn) {
  local_service_->SetScheduleStatus(fn);
  remote_service_->SetScheduleStatus(std::move(fn));
}

std::unique_ptr<grpc::Service> MakeDatapathService(Pool& pool) {
  return std::make_unique<DatapathService>(pool, std::make_shared<NameLocks>());
}

ApiServer::~ApiServer() {
  Shutdown();
  Wait();
}

void ApiServer::Shutdown(std::chrono::system_clock::time_point deadline) {
  if (shut_down_) return;
  shut_down_ = true;
  for (auto& l : unix_) l->Stop();
  const auto grace = std::chrono::duration_cast<std::chrono::milliseconds>(
      deadline - std::chrono::system_clock::now());
  DrainAndShutdown(calls_, {remote_.get(), local_.get()},
                   std::max(grace, std::chrono::milliseconds(0)));
}

void ApiServer::Wait() {
  if (remote_) remote_->Wait();
  if (local_) local_->Wait();
}

namespace {

// Checks a unix listener's directory and clears a stale socket left by a dead process.
Status PrepareUnix(const Endpoint& ep) {
  size_t slash = ep.path.rfind('/');
  std::string dir = slash == 0 ? std::string("/") : ep.path.substr(0, slash);
  struct stat st{};
  if (stat(dir.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) {
    return Error(ENOENT, "cannot listen on {}: directory {} does not exist", ep.ToString(), dir);
  }
  if (auto s = RemoveStaleUnixSocket(ep.path); !s.ok()) {
    return Error(s.code(), "cannot listen on {}: {}", ep.ToString(), s.message());
  }
  return Status::Ok();
}

// Belt and braces: verify the mode instead of trusting the socket setup.
Status VerifyUnixMode(const Endpoint& ep, mode_t mode) {
  struct stat st{};
  if (chmod(ep.path.c_str(), mode) != 0 || stat(ep.path.c_str(), &st) != 0) {
    int err = errno;
    return Error(err, "cannot secure {}: {}", ep.path, std::strerror(err));
  }
  if (!S_ISSOCK(st.st_mode) || (st.st_mode & 07777) != mode) {
    return Error(EPERM, "{} has mode {:o}, expected a socket with mode {:o}", ep.path,
                 st.st_mode & 07777, mode);
  }
  return Status::Ok();
}

// Every listener is checked before anything binds, so a bad one costs nothing.
StatusOr<std::vector<Endpoint>> CheckListeners(const std::vector<ApiListen>& listens) {
  if (listens.empty()) return Error(EINVAL, "management API: no listener given");
  std::vector<Endpoint> out;
  for (const ApiListen& l : listens) {
    auto ep = ParseEndpoint(l.endpoint);
    if (!ep.ok()) return ep.status();
    if (ep->kind == Endpoint::Kind::kUnix) {
      if (l.creds) {
        return Error(EINVAL, "{}: unix sockets take no TLS credentials (mode 0600 guards them)",
                     ep->ToString());
      }
      if (auto s = PrepareUnix(*ep); !s.ok()) return s;
    } else if (!l.creds && !l.insecure) {
      return Error(EINVAL, "refusing plaintext TCP for the management API on {}: give TLS "
                           "credentials, or set insecure for a trusted loopback test",
                   ep->ToString());
    } else if (!l.creds) {
      spdlog::warn("management API on {} is plaintext TCP without authentication: tests only",
                   ep->ToString());
    }
    out.push_back(*ep);
  }
  return out;
}

}  // namespace

namespace {
std::vector<std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>> Interceptors(
    const CallTracker& calls) {
  std::vector<std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>> v;
  v.push_back(calls.Factory());
  return v;
}
}  // namespace

// TCP first: when it cannot bind, no unix socket is created for nothing. Returns whether the
// TCP side failed.
bool ApiServer::BuildAndStart(const std::vector<ApiListen>& listens,
                              const std::vector<grpc::Service*>& extra,
                              const std::vector<grpc::Service*>& remote_extra) {
  grpc::ServerBuilder local, remote;
  bool any_local = false, any_remote = false;
  for (size_t i = 0; i < listens.size(); ++i) {
    const Endpoint& ep = endpoints_[i];
    if (ep.kind == Endpoint::Kind::kUnix) {
      any_local = true;  // bound in BindUnix, by a UnixPeerListener
    } else {
      auto creds = listens[i].creds ? listens[i].creds : grpc::InsecureServerCredentials();
      remote.AddListeningPort(ep.GrpcTarget(), creds, &ports_[i]);
      any_remote = true;
    }
  }
  if (any_remote) {
    // gRPC sets SO_REUSEPORT by default: a second datapath on the same port would then share
    // the connections with us instead of failing to start.
    remote.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
    remote.RegisterService(remote_service_.get());
    for (grpc::Service* s : remote_extra) remote.RegisterService(s);
    remote.experimental().SetInterceptorCreators(Interceptors(calls_));
    remote_ = remote.BuildAndStart();
  }
  bool remote_failed = any_remote && !remote_;
  for (size_t i = 0; i < listens.size(); ++i) {
    if (endpoints_[i].kind == Endpoint::Kind::kTcp && ports_[i] == 0) remote_failed = true;
  }
  if (any_local && !remote_failed) {
    local.RegisterService(local_service_.get());
    for (grpc::Service* s : extra) local.RegisterService(s);
    local.experimental().SetInterceptorCreators(Interceptors(calls_));
    local_ = local.BuildAndStart();
  }
  return remote_failed;
}

// The unix listeners, bound by UnixPeerListener (mode set before the socket is reachable, and
// every connection's uid checked) and handed to the local server.
Status ApiServer::BindUnix(const std::vector<ApiListen>& listens) {
  for (size_t i = 0; local_ && i < listens.size(); ++i) {
    if (endpoints_[i].kind != Endpoint::Kind::kUnix) continue;
    auto l =
        UnixPeerListener::Bind(endpoints_[i].path, listens[i].peers.SocketMode(), listens[i].peers);
    if (!l.ok()) return l.status();
    if (Status s = (*l)->Serve(local_.get()); !s.ok()) return s;
    unix_.push_back(std::move(*l));
    ports_[i] = 1;
  }
  return Status::Ok();
}

// Every listener is bound (the destructor stops whichever server did start otherwise), and
// every unix socket has the mode its peers call for (0600, or 0666 with --allow-uid).
Status ApiServer::CheckListening(const std::vector<ApiListen>& listens, bool remote_failed) const {
  for (size_t i = 0; i < endpoints_.size(); ++i) {
    const Endpoint& ep = endpoints_[i];
    const bool is_unix = ep.kind == Endpoint::Kind::kUnix;
    if (is_unix && remote_failed) continue;  // never tried; the TCP listener is the one to name
    const bool built = is_unix ? local_ != nullptr : remote_ != nullptr;
    if (!built || ports_[i] == 0) {
      return Error(EADDRNOTAVAIL, "cannot listen on {}: gRPC could not bind it (see its log)",
                   ep.ToString());
    }
  }
  for (size_t i = 0; i < endpoints_.size(); ++i) {
    const Endpoint& ep = endpoints_[i];
    if (ep.kind == Endpoint::Kind::kUnix) {
      if (auto s = VerifyUnixMode(ep, listens[i].peers.SocketMode()); !s.ok()) return s;
    }
  }
  return Status::Ok();
}

StatusOr<std::unique_ptr<ApiServer>> StartApiServer(Pool& pool, std::vector<ApiListen> listens,
                                                    std::vector<grpc::Service*> extra,
                                                    std::vector<grpc::Service*> remote_extra) {
  auto endpoints = CheckListeners(listens);
  if (!endpoints.ok()) return endpoints.status();
  std::unique_ptr<ApiServer> api(new ApiServer());
  api->in_flight_ = std::make_shared<NameLocks>();
  api->local_service_ = std::make_unique<DatapathService>(pool, api->in_flight_);
  api->remote_service_ = std::make_unique<DatapathService>(pool, api->in_flight_);
  api->endpoints_ = std::move(*endpoints);
  api->ports_.assign(listens.size(), 0);
  const bool remote_failed = api->BuildAndStart(listens, extra, remote_extra);
  if (!remote_failed) {
    if (Status s = api->BindUnix(listens); !s.ok()) return s;
  }
  if (Status s = api->CheckListening(listens, remote_failed); !s.ok()) return s;
  for (size_t i = 0; i < listens.size(); ++i) {
    const Endpoint& ep = api->endpoints_[i];
    spdlog::info("management API listening on {}{}", ep.ToString(),
                 ep.kind == Endpoint::Kind::kUnix ? ""
                 : listens[i].creds               ? " (mutual TLS, the controller's services only)"
                                                  : " (plaintext, the controller's services only)");
  }
  return api;
}

StatusOr<std::unique_ptr<ApiServer>> StartApiServer(Pool& pool, const std::string& endpoint,
                                                    std::vector<grpc::Service*> extra) {
  std::vector<ApiListen> listens(1);
  listens[0].endpoint = endpoint;
  listens[0].insecure = true;
  return StartApiServer(pool, std::move(listens), std::move(extra));
}

}  // namespace nbdcsi::datapath
