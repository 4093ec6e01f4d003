#include "datapath/api/heartbeat.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <sys/socket.h>
#include <sys/stat.h>

#include <algorithm>
#include <cctype>
#include <cstring>
#include <utility>

#include <grpcpp/create_channel.h>
#include <grpcpp/support/channel_arguments.h>
#include <spdlog/spdlog.h>

#include "common/block_devices.h"
#include "common/node_id.h"

namespace nbdcsi::datapath {

namespace v1 = ::nbdcsi::datapath::v1;
using std::chrono::milliseconds;

namespace {

// Shorter intervals would only load the controller; a heartbeat is not a health probe.
constexpr milliseconds kMinInterval{100};

// "host:port" or "[v6]:port" (already validated) -> host without brackets, port.
std::pair<std::string, std::string> SplitHostPort(const std::string& addr) {
  size_t colon = addr.rfind(':');
  std::string host = addr.substr(0, colon);
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']') host = host.substr(1, host.size() - 2);
  return {host, addr.substr(colon + 1)};
}

bool IsIpLiteral(const std::string& host) {
  in6_addr a6{};
  in_addr a4{};
  return inet_pton(AF_INET, host.c_str(), &a4) == 1 || inet_pton(AF_INET6, host.c_str(), &a6) == 1;
}

class SteadyHeartbeatClock final : public HeartbeatClock {
 public:
  std::chrono::steady_clock::time_point Now() override { return std::chrono::steady_clock::now(); }
  void WaitUntil(std::unique_lock<std::mutex>& lock, std::condition_variable& cv,
                 std::chrono::steady_clock::time_point deadline,
                 const std::function<bool()>& stopped) override {
    cv.wait_until(lock, deadline, stopped);
  }
};

}  // namespace

StatusOr<std::vector<std::string>> ResolveController(const std::string& controller) {
  auto [host, port] = SplitHostPort(controller);
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* res = nullptr;
  int rc = getaddrinfo(host.c_str(), port.c_str(), &hints, &res);
  if (rc != 0) return Error(EHOSTUNREACH, "cannot resolve {}: {}", host, gai_strerror(rc));
  std::set<std::string> out;
  for (addrinfo* ai = res; ai; ai = ai->ai_next) {
    char buf[INET6_ADDRSTRLEN] = {};
    if (ai->ai_family == AF_INET) {
      inet_ntop(AF_INET, &reinterpret_cast<sockaddr_in*>(ai->ai_addr)->sin_addr, buf, sizeof(buf));
      out.insert(fmt::format("{}:{}", buf, port));
    } else if (ai->ai_family == AF_INET6) {
      inet_ntop(AF_INET6, &reinterpret_cast<sockaddr_in6*>(ai->ai_addr)->sin6_addr, buf, sizeof(buf));
      out.insert(fmt::format("[{}]:{}", buf, port));
    }
  }
  freeaddrinfo(res);
  if (out.empty()) return Error(EHOSTUNREACH, "{} resolves to no address", host);
  return std::vector<std::string>(out.begin(), out.end());
}

v1::HeartbeatRequest MakeHeartbeatRequest(const HeartbeatOptions& opts, const PoolInfo& info,
                                          uint32_t nbd_devices) {
  v1::HeartbeatRequest req;
  req.set_node_id(opts.node_id);
  req.set_api_address(opts.advertise);
  req.set_capacity_bytes(info.capacity);
  req.set_free_bytes(info.free);
  req.set_provisionable_bytes(info.provisionable());
  req.set_provisioned_bytes(info.provisioned);
  req.set_volumes(info.volumes);
  req.set_reflink(info.reflink);
  req.set_version(opts.version);
  req.set_started_unix_ns(opts.started_unix_ns);
  req.set_nbd_devices(nbd_devices);
  req.set_nbd_endpoint(opts.nbd_endpoint);
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
  controller_host_ = SplitHostPort(opts_.controller).first;
  if (!opts_.resolve) opts_.resolve = ResolveController;
  if (!opts_.clock) opts_.clock = std::make_shared<SteadyHeartbeatClock>();
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
    for (grpc::ClientContext* ctx : in_flight_) ctx->TryCancel();
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

HeartbeatSender::Counters HeartbeatSender::counters() const {
  std::lock_guard lock(mu_);
  return counters_;
}

std::unique_ptr<HeartbeatSender::Target> HeartbeatSender::MakeTarget(
    const std::string& address) const {
  // gRPC's reconnect backoff grows to two minutes by default; capped at the interval, a
  // restarted controller is dialled again by the next heartbeat. The controller's Registry is
  // this channel's only user, so these settings affect nothing else.
  grpc::ChannelArguments args;
  const int ms = static_cast<int>(std::min<int64_t>(opts_.interval.count(), 1 << 30));
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, std::min(ms, 1000));
  args.SetInt(GRPC_ARG_MIN_RECONNECT_BACKOFF_MS, std::min(ms, 1000));
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, ms);
  args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  // Dialling a replica by its IP, the certificate is still checked against the name the operator
  // gave (the Service's DNS name is what the controller's certificate carries).
  if (!IsIpLiteral(controller_host_)) {
    args.SetString(GRPC_SSL_TARGET_NAME_OVERRIDE_ARG, controller_host_);
  }
  auto t = std::make_unique<Target>();
  t->address = address;
  t->channel = grpc::CreateCustomChannel(address, opts_.creds, args);
  t->stub = v1::Registry::NewStub(t->channel);
  return t;
}

void HeartbeatSender::SyncTargets() {
  auto addrs = opts_.resolve(opts_.controller);
  if (!addrs.ok() || addrs->empty()) {
    std::string why = addrs.ok() ? "no address" : addrs.status().message();
    if (why != resolve_error_) {
      spdlog::warn("heartbeat: {}; keeping the {} controller address(es) known", why,
                   targets_.size());
    }
    resolve_error_ = why;
    return;
  }
  resolve_error_.clear();
  std::set<std::string> want(addrs->begin(), addrs->end());
  for (auto it = targets_.begin(); it != targets_.end();) {
    if (want.count(it->first)) {
      ++it;
    } else {
      spdlog::info("heartbeat: controller address {} is gone from {}", it->first, opts_.controller);
      it = targets_.erase(it);
    }
  }
  for (const auto& a : want) {
    if (!targets_.count(a)) targets_.emplace(a, MakeTarget(a));
  }
}

Status HeartbeatSender::SendOnce(Target& t, const v1::HeartbeatRequest& req, milliseconds* asked) {
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
    in_flight_.insert(&ctx);
  }
  grpc::Status st = t.stub->Heartbeat(&ctx, req, &resp);
  {
    std::lock_guard lock(mu_);
    in_flight_.erase(&ctx);
  }
  if (!st.ok()) {
    // Waiting for a connection hides why it never came; the channel state tells the two cases
    // apart well enough to point the operator at the likely cause.
    const char* hint = "";
    if (st.error_code() == grpc::StatusCode::DEADLINE_EXCEEDED &&
        t.channel->GetState(false) == GRPC_CHANNEL_TRANSIENT_FAILURE) {
      hint = ": cannot connect (controller down or unreachable, or the TLS handshake failed: "
             "check --tls-ca against the controller's certificate and its SANs)";
    }
    return Error(EIO, "Registry.Heartbeat to {}: {} (code {}){}", t.address, st.error_message(),
                 static_cast<int>(st.error_code()), hint);
  }
  *asked = milliseconds(resp.interval_ms());
  return Status::Ok();
}

void HeartbeatSender::Run() {
  milliseconds interval = opts_.interval;
  std::unique_lock lock(mu_);
  while (!stop_) {
    lock.unlock();
    const auto started = opts_.clock->Now();
    SyncTargets();
    const v1::HeartbeatRequest req =
        MakeHeartbeatRequest(opts_, pool_.Info(), CountNbdDevices(opts_.dev_dir));
    // In parallel: a replica that hangs must not delay the others' heartbeats.
    std::vector<Target*> targets;
    for (auto& [addr, t] : targets_) targets.push_back(t.get());
    std::vector<Status> results(targets.size(), Status::Ok());
    std::vector<milliseconds> asked(targets.size(), milliseconds(0));
    {
      std::vector<std::thread> calls;
      for (size_t i = 1; i < targets.size(); ++i) {
        calls.emplace_back([&, i] { results[i] = SendOnce(*targets[i], req, &asked[i]); });
      }
      if (!targets.empty()) results[0] = SendOnce(*targets[0], req, &asked[0]);
      for (auto& c : calls) c.join();
    }
    lock.lock();
    if (stop_) break;
    bool all_ok = !targets.empty();
    milliseconds want = opts_.interval;
    for (size_t i = 0; i < targets.size(); ++i) {
      Target& t = *targets[i];
      const Status& s = results[i];
      if (s.ok()) {
        ++counters_.ok;
        if (!t.ever_ok) {
          spdlog::info("heartbeat: registered with the controller at {} ({}) as node {} (api {})",
                       t.address, opts_.controller, opts_.node_id, opts_.advertise);
        } else if (!t.ok_state) {
          spdlog::info("heartbeat: controller at {} reachable again", t.address);
        }
        t.ever_ok = t.ok_state = true;
        // The controller expires nodes by its own clock; when it wants heartbeats more often than
        // we were told, it wins. It never makes us slower than our flag.
        if (asked[i].count() > 0) want = std::min(want, std::max(asked[i], kMinInterval));
      } else {
        ++counters_.failed;
        all_ok = false;
        if (t.first) {
          spdlog::warn("heartbeat: cannot reach the controller yet: {}", s.message());
        } else if (t.ok_state) {
          spdlog::warn("heartbeat: lost the controller: {}", s.message());
        }
        t.ok_state = false;
      }
      t.first = false;
    }
    counters_.connected = all_ok;
    counters_.controllers = targets.size();
    interval = want;
    opts_.clock->WaitUntil(lock, cv_, started + interval, [this] { return stop_; });
  }
}

}  // namespace nbdcsi::datapath
