#include "datapath/api/heartbeat.h"

#include <dirent.h>
#include <sys/stat.h>

#include <algorithm>
#include <cctype>
#include <cstring>
#include <utility>

#include <grpcpp/create_channel.h>
#include <grpcpp/support/channel_arguments.h>
#include <spdlog/spdlog.h>

#include "common/node_id.h"
#include "datapath/api/service.h"

namespace nbdcsi::datapath {

namespace v1 = ::nbdcsi::datapath::v1;
using std::chrono::milliseconds;

namespace {

// Shorter intervals would only load the controller; a heartbeat is not a health probe.
constexpr milliseconds kMinInterval{100};

bool IsWholeNbdName(const char* name) {
  if (std::strncmp(name, "nbd", 3) != 0 || name[3] == '\0') return false;
  for (const char* p = name + 3; *p; ++p) {
    if (!std::isdigit(static_cast<unsigned char>(*p))) return false;
  }
  return true;
}

}  // namespace

uint32_t CountNbdDevices(const std::string& dev_dir) {
  DIR* d = opendir(dev_dir.c_str());
  if (!d) return 0;
  uint32_t n = 0;
  while (dirent* e = readdir(d)) {
    if (!IsWholeNbdName(e->d_name)) continue;
    struct stat st{};
    if (fstatat(dirfd(d), e->d_name, &st, 0) == 0 && S_ISBLK(st.st_mode)) ++n;
  }
  closedir(d);
  return n;
}

v1::HeartbeatRequest MakeHeartbeatRequest(const HeartbeatOptions& opts, const PoolInfo& info,
                                          uint32_t nbd_devices) {
  v1::HeartbeatRequest req;
  req.set_node_id(opts.node_id);
  req.set_api_address(opts.advertise);
  req.set_capacity_bytes(info.capacity);
  req.set_free_bytes(info.free);
  req.set_provisionable_bytes(ProvisionableBytes(info));
  req.set_provisioned_bytes(info.provisioned);
  req.set_volumes(info.volumes);
  req.set_reflink(info.reflink);
  req.set_version(opts.version);
  req.set_started_unix_ns(opts.started_unix_ns);
  req.set_nbd_devices(nbd_devices);
  return req;
}

HeartbeatSender::HeartbeatSender(Pool& pool, HeartbeatOptions opts)
    : pool_(pool), opts_(std::move(opts)) {}

HeartbeatSender::~HeartbeatSender() { Stop(); }

Status HeartbeatSender::Start() {
  if (thread_.joinable()) return Error(EALREADY, "heartbeat: already started");
  if (Status s = ValidateNodeId(opts_.node_id); !s.ok()) return s;
  if (Status s = ValidateDialAddress(opts_.advertise); !s.ok()) {
    return Error(EINVAL, "advertised {}", s.message());
  }
  if (Status s = ValidateDialAddress(opts_.controller); !s.ok()) {
    return Error(EINVAL, "controller {}", s.message());
  }
  if (!opts_.creds) return Error(EINVAL, "heartbeat: no channel credentials");
  if (opts_.interval < kMinInterval) {
    return Error(EINVAL, "heartbeat interval {} ms is below the minimum {} ms",
                 opts_.interval.count(), kMinInterval.count());
  }
  // gRPC's reconnect backoff grows to two minutes by default; capped at the interval, a
  // restarted controller is dialled again by the next heartbeat. The controller's Registry is
  // this channel's only user, so these settings affect nothing else.
  grpc::ChannelArguments args;
  const int ms = static_cast<int>(std::min<int64_t>(opts_.interval.count(), 1 << 30));
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, std::min(ms, 1000));
  args.SetInt(GRPC_ARG_MIN_RECONNECT_BACKOFF_MS, std::min(ms, 1000));
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, ms);
  args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  channel_ = grpc::CreateCustomChannel(opts_.controller, opts_.creds, args);
  stub_ = v1::Registry::NewStub(channel_);
  {
    std::lock_guard lock(mu_);
    stop_ = false;
  }
  thread_ = std::thread([this] { Run(); });
  return Status::Ok();
}

void HeartbeatSender::Stop() {
  {
    std::lock_guard lock(mu_);
    stop_ = true;
    if (in_flight_) in_flight_->TryCancel();
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

HeartbeatSender::Counters HeartbeatSender::counters() const {
  std::lock_guard lock(mu_);
  return counters_;
}

Status HeartbeatSender::SendOnce(milliseconds* asked) {
  v1::HeartbeatRequest req =
      MakeHeartbeatRequest(opts_, pool_.Info(), CountNbdDevices(opts_.dev_dir));
  v1::HeartbeatResponse resp;
  grpc::ClientContext ctx;
  // Waiting for the channel to connect (within the deadline) rather than failing fast: a call made
  // while gRPC is between reconnect attempts would otherwise fail although the controller is up.
  // The deadline is the interval, so a call never delays the next one.
  ctx.set_wait_for_ready(true);
  ctx.set_deadline(std::chrono::system_clock::now() + opts_.interval);
  {
    std::lock_guard lock(mu_);
    if (stop_) return Error(ECANCELED, "stopping");
    in_flight_ = &ctx;
  }
  grpc::Status st = stub_->Heartbeat(&ctx, req, &resp);
  {
    std::lock_guard lock(mu_);
    in_flight_ = nullptr;
  }
  if (!st.ok()) {
    // Waiting for a connection hides why it never came; the channel state tells the two cases
    // apart well enough to point the operator at the likely cause.
    const char* hint = "";
    if (st.error_code() == grpc::StatusCode::DEADLINE_EXCEEDED &&
        channel_->GetState(false) == GRPC_CHANNEL_TRANSIENT_FAILURE) {
      hint = ": cannot connect (controller down or unreachable, or the TLS handshake failed: "
             "check --tls-ca against the controller's certificate and its SANs)";
    }
    return Error(EIO, "Registry.Heartbeat to {}: {} (code {}){}", opts_.controller,
                 st.error_message(), static_cast<int>(st.error_code()), hint);
  }
  *asked = milliseconds(resp.interval_ms());
  return Status::Ok();
}

void HeartbeatSender::Run() {
  bool ever_ok = false;
  bool ok_state = false;
  bool first = true;
  milliseconds interval = opts_.interval;
  std::unique_lock lock(mu_);
  while (!stop_) {
    lock.unlock();
    const auto started = std::chrono::steady_clock::now();
    milliseconds asked{0};
    Status s = SendOnce(&asked);
    lock.lock();
    if (stop_) break;
    if (s.ok()) {
      ++counters_.ok;
      counters_.connected = true;
      if (!ever_ok) {
        spdlog::info("heartbeat: registered with the controller at {} as node {} (api {})",
                     opts_.controller, opts_.node_id, opts_.advertise);
      } else if (!ok_state) {
        spdlog::info("heartbeat: controller at {} reachable again", opts_.controller);
      }
      ever_ok = ok_state = true;
      // The controller expires nodes by its own clock; when it wants heartbeats more often than
      // we were told, it wins. It never makes us slower than our flag.
      milliseconds want = asked.count() > 0 ? std::max(asked, kMinInterval) : opts_.interval;
      interval = std::min(want, opts_.interval);
    } else {
      ++counters_.failed;
      counters_.connected = false;
      if (first) {
        spdlog::warn("heartbeat: cannot reach the controller yet: {}", s.message());
      } else if (ok_state) {
        spdlog::warn("heartbeat: lost the controller: {}", s.message());
      }
      ok_state = false;
    }
    first = false;
    cv_.wait_until(lock, started + interval, [this] { return stop_; });
  }
}

}  // namespace nbdcsi::datapath
