#include "common/etcd/etcd_client.h"

#include <grpcpp/create_channel.h>
#include <grpcpp/security/credentials.h>
#include <grpcpp/support/channel_arguments.h>

#include "common/grpc_reconnect.h"
#include "common/node_id.h"

namespace nbdcsi::etcd {

namespace {

using Clock = std::chrono::system_clock;

std::string StripScheme(std::string_view e) {
  for (std::string_view scheme : {"http://", "https://"}) {
    if (e.substr(0, scheme.size()) == scheme) return std::string(e.substr(scheme.size()));
  }
  return std::string(e);
}

// Prompt reconnects (common/grpc_reconnect.h): an etcd member that restarts is dialled again within
// a second.
grpc::ChannelArguments EtcdChannelArgs() {
  grpc::ChannelArguments args;
  SetPromptReconnect(args);
  // A member that vanishes without a reset (power loss, partition) is noticed by pings rather
  // than by the next call's deadline.
  args.SetInt(GRPC_ARG_KEEPALIVE_TIME_MS, 10000);
  args.SetInt(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, 5000);
  args.SetInt(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 0);
  // Each client gets its own connection: two clients in one process (two nodes in a test, or a
  // node's lease next to its store) must not share one TCP stream's fate.
  args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  return args;
}

}  // namespace

std::string PrefixEnd(std::string_view prefix) {
  std::string end(prefix);
  while (!end.empty()) {
    auto& c = reinterpret_cast<unsigned char&>(end.back());
    if (c < 0xff) {
      ++c;
      return end;
    }
    end.pop_back();
  }
  // Every byte was 0xff (or the prefix was empty): the range runs to the end of the key space.
  return std::string(1, '\0');
}

KeyValue FromProto(const mvccpb::KeyValue& kv) {
  return KeyValue{kv.key(),          kv.value(),   kv.create_revision(),
                  kv.mod_revision(), kv.version(), kv.lease()};
}

namespace {

// An EQUAL compare on `target` of `key`; the caller sets the value of the matching oneof field.
etcdserverpb::Compare EqualCompare(std::string_view key,
                                   etcdserverpb::Compare::CompareTarget target) {
  etcdserverpb::Compare c;
  c.set_key(std::string(key));
  c.set_target(target);
  c.set_result(etcdserverpb::Compare::EQUAL);
  return c;
}

}  // namespace

etcdserverpb::Compare KeyAbsent(std::string_view key) {
  auto c = EqualCompare(key, etcdserverpb::Compare::CREATE);
  c.set_create_revision(0);
  return c;
}

etcdserverpb::Compare ModRevisionIs(std::string_view key, int64_t mod_revision) {
  auto c = EqualCompare(key, etcdserverpb::Compare::MOD);
  c.set_mod_revision(mod_revision);
  return c;
}

etcdserverpb::Compare ValueIs(std::string_view key, std::string_view value) {
  auto c = EqualCompare(key, etcdserverpb::Compare::VALUE);
  c.set_value(std::string(value));
  return c;
}

etcdserverpb::Compare LeaseIs(std::string_view key, int64_t lease) {
  auto c = EqualCompare(key, etcdserverpb::Compare::LEASE);
  c.set_lease(lease);
  return c;
}

etcdserverpb::RequestOp PutOp(std::string_view key, std::string_view value, int64_t lease) {
  etcdserverpb::RequestOp op;
  auto* put = op.mutable_request_put();
  put->set_key(std::string(key));
  put->set_value(std::string(value));
  put->set_lease(lease);
  return op;
}

etcdserverpb::RequestOp DeleteOp(std::string_view key) {
  etcdserverpb::RequestOp op;
  op.mutable_request_delete_range()->set_key(std::string(key));
  return op;
}

etcdserverpb::RequestOp GetOp(std::string_view key) {
  etcdserverpb::RequestOp op;
  op.mutable_request_range()->set_key(std::string(key));
  return op;
}

namespace {

// Codes etcd answers with: NOT_FOUND for a lease it does not know, FAILED_PRECONDITION for a
// request it refuses in its current state, RESOURCE_EXHAUSTED for a full quota or an oversized
// request, OUT_OF_RANGE for a compacted revision.
int EtcdCodeToErrno(grpc::StatusCode code) {
  switch (code) {
    case grpc::StatusCode::NOT_FOUND: return ENOENT;
    case grpc::StatusCode::INVALID_ARGUMENT: return EINVAL;
    case grpc::StatusCode::FAILED_PRECONDITION: return EBUSY;
    case grpc::StatusCode::RESOURCE_EXHAUSTED: return ENOSPC;
    case grpc::StatusCode::OUT_OF_RANGE: return ERANGE;
    case grpc::StatusCode::PERMISSION_DENIED:
    case grpc::StatusCode::UNAUTHENTICATED: return EACCES;
    case grpc::StatusCode::CANCELLED: return ECANCELED;
    case grpc::StatusCode::UNIMPLEMENTED: return ENOTSUP;
    default: return EIO;
  }
}

}  // namespace

Status ToStatus(const grpc::Status& s, std::string_view what, std::string_view endpoint) {
  if (s.ok()) return Status::Ok();
  const std::string& msg = s.error_message();
  if (s.error_code() == grpc::StatusCode::UNAVAILABLE) {
    return Error(EAGAIN, "{}: etcd unavailable at {}: {}", what, endpoint, msg);
  }
  if (s.error_code() == grpc::StatusCode::DEADLINE_EXCEEDED) {
    return Error(ETIMEDOUT, "{}: etcd at {} did not answer in time: {}", what, endpoint, msg);
  }
  return Error(EtcdCodeToErrno(s.error_code()), "{}: etcd at {}: {}", what, endpoint, msg);
}

StatusOr<std::unique_ptr<EtcdClient>> EtcdClient::Create(const EtcdOptions& options) {
  if (options.endpoints.empty()) return Error(EINVAL, "etcd: no endpoint given");
  if (options.call_timeout.count() <= 0) {
    return Error(EINVAL, "etcd: call timeout must be positive, not {} ms",
                 options.call_timeout.count());
  }
  if (Status s = options.tls.Validate(); !s.ok()) return Error(EINVAL, "etcd: {}", s.message());
  std::shared_ptr<grpc::ChannelCredentials> creds;
  if (options.tls.insecure) {
    creds = grpc::InsecureChannelCredentials();
  } else {
    auto loaded = TlsCredentials::Load(options.tls);
    if (!loaded.ok()) return loaded.status();
    creds = (*loaded)->Channel();
  }
  std::unique_ptr<EtcdClient> c(new EtcdClient(options));
  c->poller_ = std::thread([cq = &c->poll_cq_] {
    void* tag;
    bool ok;
    // Nothing is ever queued here: AsyncNext returns at its deadline or at Shutdown, and polls
    // gRPC's sockets meanwhile.
    while (cq->AsyncNext(&tag, &ok, Clock::now() + std::chrono::seconds(1)) !=
           grpc::CompletionQueue::SHUTDOWN) {
    }
  });
  for (const std::string& raw : options.endpoints) {
    std::string address = StripScheme(raw);
    if (Status s = ValidateDialAddress(address); !s.ok()) {
      return Error(EINVAL, "etcd endpoint: {}", s.message());
    }
    Endpoint e;
    e.address = address;
    e.channel = grpc::CreateCustomChannel(address, creds, EtcdChannelArgs());
    e.kv = etcdserverpb::KV::NewStub(e.channel);
    e.lease = etcdserverpb::Lease::NewStub(e.channel);
    c->endpoints_.push_back(std::move(e));
  }
  return c;
}

EtcdClient::~EtcdClient() {
  poll_cq_.Shutdown();
  if (poller_.joinable()) poller_.join();
}

std::string EtcdClient::current_endpoint() const {
  return endpoints_[current_.load() % endpoints_.size()].address;
}

template <typename Call>
Status EtcdClient::Invoke(std::string_view what, Call&& call) {
  const auto deadline = Clock::now() + options_.call_timeout;
  const size_t first = current_.load();
  grpc::Status last;
  std::string last_endpoint;
  for (size_t i = 0; i < endpoints_.size(); ++i) {
    const size_t index = (first + i) % endpoints_.size();
    Endpoint& e = endpoints_[index];
    grpc::ClientContext ctx;
    // An endpoint that does not answer at all (a black hole rather than a refusal) must not eat
    // the whole deadline: each gets an equal share of what is left, the last one all of it.
    const auto now = Clock::now();
    if (now >= deadline) break;
    ctx.set_deadline(now + (deadline - now) / static_cast<int>(endpoints_.size() - i));
    last = call(e, ctx);
    last_endpoint = e.address;
    const auto code = last.error_code();
    // A deadline on a share of the time is this endpoint's failure, not the call's, while time
    // remains for the next one.
    if (code != grpc::StatusCode::UNAVAILABLE &&
        !(code == grpc::StatusCode::DEADLINE_EXCEEDED && i + 1 < endpoints_.size())) {
      if (index != first) current_.store(index);
      break;
    }
  }
  if (last.error_code() == grpc::StatusCode::UNAVAILABLE && endpoints_.size() > 1) {
    return Error(EAGAIN, "{}: etcd unavailable at every endpoint (last {}: {})", what,
                 last_endpoint, last.error_message());
  }
  return ToStatus(last, what, last_endpoint);
}

StatusOr<RangeResult> EtcdClient::Range(std::string_view key, std::string_view range_end,
                                        int64_t limit, int64_t revision) {
  etcdserverpb::RangeRequest req;
  req.set_key(std::string(key));
  req.set_range_end(std::string(range_end));
  req.set_limit(limit);
  req.set_revision(revision);
  etcdserverpb::RangeResponse resp;
  Status s = Invoke(fmt::format("etcd range {}", key), [&](Endpoint& e, grpc::ClientContext& ctx) {
    return e.kv->Range(&ctx, req, &resp);
  });
  if (!s.ok()) return s;
  RangeResult r;
  r.more = resp.more();
  r.revision = resp.header().revision();
  r.kvs.reserve(resp.kvs_size());
  for (const auto& kv : resp.kvs()) r.kvs.push_back(FromProto(kv));
  return r;
}

StatusOr<KeyValue> EtcdClient::Get(std::string_view key) {
  auto r = Range(key);
  if (!r.ok()) return r.status();
  if (r->kvs.empty()) return Error(ENOENT, "etcd key {} does not exist", key);
  return std::move(r->kvs.front());
}

Status EtcdClient::Put(std::string_view key, std::string_view value, int64_t lease) {
  etcdserverpb::PutRequest req;
  req.set_key(std::string(key));
  req.set_value(std::string(value));
  req.set_lease(lease);
  etcdserverpb::PutResponse resp;
  return Invoke(fmt::format("etcd put {}", key),
                [&](Endpoint& e, grpc::ClientContext& ctx) { return e.kv->Put(&ctx, req, &resp); });
}

StatusOr<int64_t> EtcdClient::Delete(std::string_view key, std::string_view range_end) {
  etcdserverpb::DeleteRangeRequest req;
  req.set_key(std::string(key));
  req.set_range_end(std::string(range_end));
  etcdserverpb::DeleteRangeResponse resp;
  Status s = Invoke(fmt::format("etcd delete {}", key), [&](Endpoint& e, grpc::ClientContext& ctx) {
    return e.kv->DeleteRange(&ctx, req, &resp);
  });
  if (!s.ok()) return s;
  return resp.deleted();
}

StatusOr<etcdserverpb::TxnResponse> EtcdClient::Txn(const etcdserverpb::TxnRequest& request,
                                                    std::string_view what) {
  etcdserverpb::TxnResponse resp;
  Status s = Invoke(
      what, [&](Endpoint& e, grpc::ClientContext& ctx) { return e.kv->Txn(&ctx, request, &resp); });
  if (!s.ok()) return s;
  return resp;
}

StatusOr<int64_t> EtcdClient::LeaseGrant(int64_t ttl_seconds) {
  if (ttl_seconds <= 0)
    return Error(EINVAL, "etcd lease TTL must be positive, not {}", ttl_seconds);
  etcdserverpb::LeaseGrantRequest req;
  req.set_ttl(ttl_seconds);
  etcdserverpb::LeaseGrantResponse resp;
  Status s = Invoke(
      fmt::format("etcd grant lease of {} s", ttl_seconds),
      [&](Endpoint& e, grpc::ClientContext& ctx) { return e.lease->LeaseGrant(&ctx, req, &resp); });
  if (!s.ok()) return s;
  if (!resp.error().empty()) {
    return Error(EIO, "etcd grant lease at {}: {}", current_endpoint(), resp.error());
  }
  return resp.id();
}

Status EtcdClient::LeaseRevoke(int64_t id) {
  etcdserverpb::LeaseRevokeRequest req;
  req.set_id(id);
  etcdserverpb::LeaseRevokeResponse resp;
  return Invoke(fmt::format("etcd revoke lease {:x}", id),
                [&](Endpoint& e, grpc::ClientContext& ctx) {
                  return e.lease->LeaseRevoke(&ctx, req, &resp);
                });
}

StatusOr<int64_t> EtcdClient::LeaseKeepAliveOnce(int64_t id) {
  // A stream per keepalive rather than one long-lived stream: each round trip then has its own
  // deadline and fails over like any unary call, and a broken stream never needs repairing. At
  // one keepalive per TTL/3 the extra stream setup is noise.
  etcdserverpb::LeaseKeepAliveResponse resp;
  Status s = Invoke(fmt::format("etcd keep lease {:x} alive", id),
                    [&](Endpoint& e, grpc::ClientContext& ctx) {
                      auto stream = e.lease->LeaseKeepAlive(&ctx);
                      etcdserverpb::LeaseKeepAliveRequest req;
                      req.set_id(id);
                      bool ok = stream->Write(req) && stream->Read(&resp);
                      stream->WritesDone();
                      if (ok) {
                        ctx.TryCancel();  // we read our one answer; do not wait for etcd's end
                        (void)stream->Finish();
                        return grpc::Status::OK;
                      }
                      return stream->Finish();
                    });
  if (!s.ok()) return s;
  if (resp.ttl() <= 0) return Error(ENOENT, "etcd lease {:x} has expired", id);
  return resp.ttl();
}

StatusOr<int64_t> EtcdClient::LeaseTimeToLive(int64_t id) {
  etcdserverpb::LeaseTimeToLiveRequest req;
  req.set_id(id);
  etcdserverpb::LeaseTimeToLiveResponse resp;
  Status s = Invoke(fmt::format("etcd time to live of lease {:x}", id),
                    [&](Endpoint& e, grpc::ClientContext& ctx) {
                      return e.lease->LeaseTimeToLive(&ctx, req, &resp);
                    });
  if (!s.ok()) return s;
  // etcd answers an unknown or expired lease with TTL -1 rather than an error.
  if (resp.ttl() <= 0) return Error(ENOENT, "etcd lease {:x} has expired", id);
  return resp.ttl();
}

}  // namespace nbdcsi::etcd
