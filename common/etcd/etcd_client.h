// A small client for etcd's v3 gRPC API (etcd 3.4 and later): the KV calls, transactions and
// leases that nbd-csi's cluster state needs (common/cluster), and the controller's catalogue
// later. Generated types from common/etcd/rpc.proto are used for transactions, so callers can
// build any compare the server understands; the helpers below cover the common ones.
//
// Endpoints: every call goes to the endpoint that answered last; when it is UNAVAILABLE (refused,
// reset, no route) the call moves on to the next one, within the same deadline. A call is never
// retried against the same endpoint, and nothing but UNAVAILABLE moves it on: a member that
// answered with an error has decided.
//
// Errors become a Status once, here (ToStatus): errno style, and the message names the operation,
// the key (or lease) and the endpoint. UNAVAILABLE from every endpoint is EAGAIN ("etcd
// unavailable"), a deadline is ETIMEDOUT, a missing lease is ENOENT.
//
// Thread-safe: one client may serve every thread of a process.
#pragma once

#include <grpcpp/channel.h>
#include <grpcpp/completion_queue.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "common/etcd/rpc.grpc.pb.h"
#include "common/status.h"
#include "common/tls.h"

namespace nbdcsi::etcd {

struct EtcdOptions {
  // "host:port" each (a leading http:// or https:// is accepted and dropped); at least one.
  std::vector<std::string> endpoints;
  // Covers the whole call, every endpoint it tries included.
  std::chrono::milliseconds call_timeout{5000};
  // Client certificate, key and CA for etcd's --client-cert-auth; insecure for plaintext.
  TlsFiles tls{.cert = "", .key = "", .ca = "", .insecure = true};
};

struct KeyValue {
  std::string key;
  std::string value;
  int64_t create_revision = 0;
  int64_t mod_revision = 0;
  int64_t version = 0;
  int64_t lease = 0;
};

struct RangeResult {
  std::vector<KeyValue> kvs;
  bool more = false;     // the limit cut the range short
  int64_t revision = 0;  // the store revision the read saw
};

// The first key after every key that starts with `prefix` (etcd's range_end for a prefix read).
std::string PrefixEnd(std::string_view prefix);

KeyValue FromProto(const mvccpb::KeyValue& kv);

// Compare builders for TxnRequest.compare.
etcdserverpb::Compare KeyAbsent(std::string_view key);  // create_revision == 0
etcdserverpb::Compare ModRevisionIs(std::string_view key, int64_t mod_revision);
etcdserverpb::Compare ValueIs(std::string_view key, std::string_view value);
etcdserverpb::Compare LeaseIs(std::string_view key, int64_t lease);
// RequestOp builders for TxnRequest.success / failure.
etcdserverpb::RequestOp PutOp(std::string_view key, std::string_view value, int64_t lease = 0);
etcdserverpb::RequestOp DeleteOp(std::string_view key);
etcdserverpb::RequestOp GetOp(std::string_view key);

class EtcdClient {
 public:
  // EINVAL for no endpoint or a malformed one; TLS errors as TlsCredentials::Load. Connects
  // lazily: an etcd that is down now is an error of the first call, not of Create.
  static StatusOr<std::unique_ptr<EtcdClient>> Create(const EtcdOptions& options);
  ~EtcdClient();
  EtcdClient(const EtcdClient&) = delete;
  EtcdClient& operator=(const EtcdClient&) = delete;

  // [key, range_end) or only `key` when range_end is empty; limit 0 = no limit; revision 0 =
  // newest. Linearizable.
  StatusOr<RangeResult> Range(std::string_view key, std::string_view range_end = {},
                              int64_t limit = 0, int64_t revision = 0);
  // The key's KeyValue, or ENOENT naming it.
  StatusOr<KeyValue> Get(std::string_view key);
  Status Put(std::string_view key, std::string_view value, int64_t lease = 0);
  // How many keys were deleted (0 when absent: not an error).
  StatusOr<int64_t> Delete(std::string_view key, std::string_view range_end = {});
  // `what` names the transaction in error messages ("claim target of volume pvc-1").
  StatusOr<etcdserverpb::TxnResponse> Txn(const etcdserverpb::TxnRequest& request,
                                          std::string_view what);

  // Returns the lease id; `ttl_seconds` may be raised by the server to its minimum.
  StatusOr<int64_t> LeaseGrant(int64_t ttl_seconds);
  // ENOENT when the lease has already expired or was revoked.
  Status LeaseRevoke(int64_t id);
  // One keepalive round trip on a LeaseKeepAlive stream: the TTL the lease has again, or ENOENT
  // when it has expired (etcd answers TTL <= 0 then).
  StatusOr<int64_t> LeaseKeepAliveOnce(int64_t id);
  // Remaining TTL in seconds; ENOENT when expired or unknown.
  StatusOr<int64_t> LeaseTimeToLive(int64_t id);

  // The endpoint calls go to first (the one that answered last).
  std::string current_endpoint() const;
  const EtcdOptions& options() const { return options_; }

 private:
  struct Endpoint {
    std::string address;
    std::shared_ptr<grpc::Channel> channel;
    std::unique_ptr<etcdserverpb::KV::Stub> kv;
    std::unique_ptr<etcdserverpb::Lease::Stub> lease;
  };

  explicit EtcdClient(EtcdOptions options) : options_(std::move(options)) {}

  // Runs `call(endpoint, context)` against the current endpoint, moving on to the next on
  // UNAVAILABLE while the deadline allows; converts the final gRPC status with ToStatus.
  template <typename Call>
  Status Invoke(std::string_view what, Call&& call);

  EtcdOptions options_;
  std::vector<Endpoint> endpoints_;
  std::atomic<size_t> current_{0};
  // Calls here fail fast: one made while a channel is in TRANSIENT_FAILURE returns at once, so
  // between calls nothing of ours polls the socket of the channel's next connection attempt,
  // and gRPC's backup poller does so only every five seconds. A restarted etcd then looked
  // "unavailable" for 5-20 s (measured). This thread sits in a completion queue that never gets
  // work, which keeps gRPC's sockets polled, so a reconnect completes as soon as etcd answers.
  grpc::CompletionQueue poll_cq_;
  std::thread poller_;
};

// gRPC status of a call to etcd -> errno-style Status; `what` names the operation and its key,
// `endpoint` the member that answered (or the last one tried).
Status ToStatus(const grpc::Status& s, std::string_view what, std::string_view endpoint);

}  // namespace nbdcsi::etcd
