// nbdcsi-node-sim: many simulated node datapaths in one process, for bench/catalogue_bench.sh
// (issue 16: what CreateVolume costs the controller with 1,000 nodes). Everything the controller
// sees is real: each node heartbeats through the Registry RPC with the fields nbd-datapathd sends,
// serves the Datapath API over gRPC on its own loopback port (so the controller keeps one channel
// and one connection per node, as it would in a cluster), and, with --etcd, registers in the
// cluster state under a lease of its own, kept alive like a datapath's. Only the pool is
// simulated: a map of volumes per node, no files.
//
//   nbdcsi-node-sim --nodes N --controller HOST:PORT [--etcd HOST:PORT] [--ready-file PATH] ...
//
// Node ids are node-0001 .. node-N. Every node's Datapath API is one gRPC server listening on N
// ports; a call's :authority (the address the controller dialled) names the node. Methods the
// controller does not use for CreateVolume, GetVolume and DeleteVolume answer UNIMPLEMENTED.
// SIGTERM or SIGINT: stops (leases revoked), prints the calls served per method to stderr.
#include <signal.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <fstream>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <fmt/format.h>
#include <google/protobuf/util/message_differencer.h>
#include <grpcpp/grpcpp.h>
#include <CLI/CLI.hpp>

#include "common/cluster/etcd_cluster_store.h"
#include "common/cluster/keys.h"
#include "common/etcd/etcd_client.h"
#include "common/quantity.h"
#include "datapath/api/datapath.grpc.pb.h"
#include "datapath/api/registry.grpc.pb.h"

namespace {

namespace dpv1 = ::nbdcsi::datapath::v1;
namespace cluster = nbdcsi::cluster;
using Clock = std::chrono::steady_clock;
using namespace std::chrono_literals;

std::atomic<bool> g_stop{false};
void OnSignal(int) { g_stop = true; }

int64_t UnixNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

// One simulated pool: volumes by name and what is provisioned, as the heartbeat reports it.
struct SimNode {
  std::string id;
  std::string api_address;  // 127.0.0.1:PORT, what the node advertises
  mutable std::mutex mu;
  std::map<std::string, dpv1::Volume> volumes;  // guarded by mu
  uint64_t provisioned = 0;                     // guarded by mu
};

struct Counters {
  std::atomic<uint64_t> create{0}, get{0}, del{0}, list{0}, misrouted{0};
  std::atomic<uint64_t> heartbeats{0}, heartbeat_errors{0};
  std::atomic<uint64_t> keepalives{0}, lease_renewals_failed{0};
};

// The Datapath API of every simulated node, told apart by the address the caller dialled. The
// pool's rules that the controller relies on are kept: idempotent create (same size, QoS,
// read_only and source), ALREADY_EXISTS otherwise, RESOURCE_EXHAUSTED beyond capacity,
// NOT_FOUND for a missing volume.
class SimDatapath final : public dpv1::Datapath::CallbackService {
 public:
  SimDatapath(uint64_t capacity, Counters& c) : capacity_(capacity), c_(c) {}

  // Called once the server has bound every port.
  void Route(const std::string& address, SimNode* node) { by_address_[address] = node; }

  grpc::ServerUnaryReactor* CreateVolume(grpc::CallbackServerContext* ctx,
                                         const dpv1::CreateVolumeRequest* req,
                                         dpv1::CreateVolumeResponse* resp) override {
    c_.create++;
    return Answer(ctx, [&](SimNode& n) { return Create(n, *req, resp->mutable_volume()); });
  }

  grpc::ServerUnaryReactor* GetVolume(grpc::CallbackServerContext* ctx,
                                      const dpv1::GetVolumeRequest* req,
                                      dpv1::GetVolumeResponse* resp) override {
    c_.get++;
    return Answer(ctx, [&](SimNode& n) {
      std::lock_guard lock(n.mu);
      auto it = n.volumes.find(req->name());
      if (it == n.volumes.end()) return NotFound(n, req->name());
      *resp->mutable_volume() = it->second;
      return grpc::Status::OK;
    });
  }

  grpc::ServerUnaryReactor* DeleteVolume(grpc::CallbackServerContext* ctx,
                                         const dpv1::DeleteVolumeRequest* req,
                                         dpv1::DeleteVolumeResponse*) override {
    c_.del++;
    return Answer(ctx, [&](SimNode& n) {
      std::lock_guard lock(n.mu);
      auto it = n.volumes.find(req->name());
      if (it == n.volumes.end()) return NotFound(n, req->name());
      n.provisioned -= it->second.size_bytes();
      n.volumes.erase(it);
      return grpc::Status::OK;
    });
  }

  grpc::ServerUnaryReactor* ListVolumes(grpc::CallbackServerContext* ctx,
                                        const dpv1::ListVolumesRequest*,
                                        dpv1::ListVolumesResponse* resp) override {
    c_.list++;
    return Answer(ctx, [&](SimNode& n) {
      std::lock_guard lock(n.mu);
      for (const auto& [name, v] : n.volumes) *resp->add_volumes() = v;  // map: sorted by name
      return grpc::Status::OK;
    });
  }

 private:
  template <typename F>
  grpc::ServerUnaryReactor* Answer(grpc::CallbackServerContext* ctx, F&& fn) {
    auto* reactor = ctx->DefaultReactor();
    const std::string authority(ctx->ExperimentalGetAuthority().data(),
                                ctx->ExperimentalGetAuthority().size());
    auto it = by_address_.find(authority);
    if (it == by_address_.end()) {
      c_.misrouted++;
      reactor->Finish(grpc::Status(grpc::StatusCode::FAILED_PRECONDITION,
                                   "no simulated node listens at " + authority));
      return reactor;
    }
    reactor->Finish(fn(*it->second));
    return reactor;
  }

  static grpc::Status NotFound(const SimNode& n, const std::string& name) {
    return grpc::Status(grpc::StatusCode::NOT_FOUND,
                        fmt::format("volume \"{}\" does not exist on {}", name, n.id));
  }

  grpc::Status Create(SimNode& n, const dpv1::CreateVolumeRequest& req, dpv1::Volume* out) {
    if (req.name().empty() || req.size_bytes() == 0) {
      return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "name and size_bytes are required");
    }
    if (req.has_source()) {
      return grpc::Status(grpc::StatusCode::UNIMPLEMENTED,
                          "the simulator has no content to restore or clone");
    }
    std::lock_guard lock(n.mu);
    if (auto it = n.volumes.find(req.name()); it != n.volumes.end()) {
      const dpv1::Volume& v = it->second;
      if (v.size_bytes() != req.size_bytes() || v.read_only() != req.read_only() ||
          !google::protobuf::util::MessageDifferencer::Equals(v.qos(), req.qos())) {
        return grpc::Status(
            grpc::StatusCode::ALREADY_EXISTS,
            fmt::format("volume \"{}\" exists on {} with other attributes", req.name(), n.id));
      }
      *out = v;
      return grpc::Status::OK;
    }
    if (n.provisioned + req.size_bytes() > capacity_) {
      return grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED,
                          fmt::format("pool of {} is full: {} of {} bytes provisioned", n.id,
                                      n.provisioned, capacity_));
    }
    dpv1::Volume v;
    v.set_name(req.name());
    v.set_size_bytes(req.size_bytes());
    v.set_created_unix_ns(UnixNs());
    v.set_read_only(req.read_only());
    *v.mutable_qos() = req.qos();
    v.set_ready(true);
    v.set_data_path(fmt::format("sim://{}/{}", n.id, req.name()));
    n.provisioned += req.size_bytes();
    *out = n.volumes[req.name()] = std::move(v);
    return grpc::Status::OK;
  }

  std::map<std::string, SimNode*> by_address_;  // written before serving, read-only after
  const uint64_t capacity_;
  Counters& c_;
};

// One in-flight Heartbeat call (the callback API needs its state alive until it completes).
struct HeartbeatCall {
  grpc::ClientContext ctx;
  dpv1::HeartbeatRequest req;
  dpv1::HeartbeatResponse resp;
};

// Sleeps until `t` or until stopped; false when stopped.
bool SleepUntil(Clock::time_point t) {
  while (!g_stop) {
    auto now = Clock::now();
    if (now >= t) return true;
    std::this_thread::sleep_for(std::min<Clock::duration>(t - now, 100ms));
  }
  return false;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"nbdcsi-node-sim: many simulated node datapaths (bench/catalogue_bench.sh)"};
  int count = 0;
  std::string controller, etcd_endpoint, ready_file, capacity_text = "100Ti";
  std::string prefix = std::string(cluster::kDefaultPrefix);
  std::string host = "127.0.0.1";
  int64_t lease_ttl = 10;
  uint32_t interval_ms = 2000;
  app.add_option("--nodes", count, "How many nodes (node-0001 ...)")
      ->required()
      ->check(CLI::Range(1, 9999));
  app.add_option("--controller", controller, "The controller's registry HOST:PORT (plaintext)")
      ->required();
  app.add_option("--etcd", etcd_endpoint,
                 "etcd HOST:PORT (plaintext): register every node there under its own lease");
  app.add_option("--prefix", prefix, "Key prefix of the cluster state");
  app.add_option("--cluster-lease-ttl", lease_ttl, "Seconds, as nbd-datapathd's flag")
      ->check(CLI::Range(2, 3600))
      ->capture_default_str();
  app.add_option("--listen-host", host, "Loopback address of the Datapath API ports")
      ->capture_default_str();
  app.add_option("--capacity", capacity_text, "Pool capacity of each node (a quantity)")
      ->capture_default_str();
  app.add_option("--heartbeat-interval", interval_ms,
                 "Milliseconds between heartbeats until the controller names its own")
      ->check(CLI::Range(100u, 600000u))
      ->capture_default_str();
  app.add_option("--ready-file", ready_file,
                 "Written once every node has heartbeated and (with --etcd) registered");
  CLI11_PARSE(app, argc, argv);
  if (host.rfind("127.", 0) != 0) {
    std::fprintf(stderr, "nbdcsi-node-sim: --listen-host %s is not a loopback address\n",
                 host.c_str());
    return 2;
  }
  auto capacity = nbdcsi::ParseQuantity(capacity_text);
  if (!capacity.ok() || *capacity == 0) {
    std::fprintf(stderr, "nbdcsi-node-sim: --capacity '%s': %s\n", capacity_text.c_str(),
                 capacity.ok() ? "must be greater than 0" : capacity.status().message().c_str());
    return 2;
  }
  signal(SIGTERM, OnSignal);
  signal(SIGINT, OnSignal);

  std::vector<std::unique_ptr<SimNode>> nodes;
  for (int i = 1; i <= count; ++i) {
    nodes.push_back(std::make_unique<SimNode>());
    nodes.back()->id = fmt::format("node-{:04d}", i);
  }
  Counters counters;

  // The Datapath API: one server, one port per node.
  SimDatapath service(*capacity, counters);
  grpc::ServerBuilder builder;
  std::vector<int> ports(nodes.size(), 0);
  for (auto& p : ports) {
    builder.AddListeningPort(host + ":0", grpc::InsecureServerCredentials(), &p);
  }
  builder.RegisterService(&service);
  auto server = builder.BuildAndStart();
  if (!server) {
    std::fprintf(stderr, "nbdcsi-node-sim: cannot serve the Datapath API on %s\n", host.c_str());
    return 1;
  }
  for (size_t i = 0; i < nodes.size(); ++i) {
    if (ports[i] == 0) {
      std::fprintf(stderr, "nbdcsi-node-sim: no port for %s\n", nodes[i]->id.c_str());
      return 1;
    }
    nodes[i]->api_address = fmt::format("{}:{}", host, ports[i]);
    service.Route(nodes[i]->api_address, nodes[i].get());
  }

  // The cluster state: one lease per node, registered as a datapath does.
  std::unique_ptr<cluster::EtcdClusterStore> store;
  std::vector<cluster::LeaseId> leases(nodes.size(), 0);
  auto register_node = [&](size_t i) -> nbdcsi::Status {
    auto lease = store->GrantLease(lease_ttl);
    if (!lease.ok()) return lease.status();
    leases[i] = *lease;
    return store->RegisterNode(nodes[i]->id, *lease, "");
  };
  if (!etcd_endpoint.empty()) {
    auto keys = cluster::KeyLayout::Make(prefix);
    if (!keys.ok()) {
      std::fprintf(stderr, "nbdcsi-node-sim: --prefix: %s\n", keys.status().message().c_str());
      return 2;
    }
    auto client = nbdcsi::etcd::EtcdClient::Create(
        {.endpoints = {etcd_endpoint}, .call_timeout = std::chrono::milliseconds(5000)});
    if (!client.ok()) {
      std::fprintf(stderr, "nbdcsi-node-sim: --etcd: %s\n", client.status().message().c_str());
      return 2;
    }
    store = std::make_unique<cluster::EtcdClusterStore>(std::move(*client), *keys);
    for (size_t i = 0; i < nodes.size() && !g_stop; ++i) {
      if (auto s = register_node(i); !s.ok()) {
        std::fprintf(stderr, "nbdcsi-node-sim: registering %s in etcd: %s\n", nodes[i]->id.c_str(),
                     s.message().c_str());
        return 1;
      }
    }
  }

  // Heartbeats: each node on its own connection (a local subchannel pool per channel, so gRPC
  // does not share one), spread evenly over the interval as independent datapaths would be.
  std::vector<std::unique_ptr<dpv1::Registry::Stub>> registry;
  for (size_t i = 0; i < nodes.size(); ++i) {
    grpc::ChannelArguments args;
    args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
    registry.push_back(dpv1::Registry::NewStub(
        grpc::CreateCustomChannel(controller, grpc::InsecureChannelCredentials(), args)));
  }
  const int64_t started_ns = UnixNs();
  std::atomic<uint32_t> interval{interval_ms};
  std::vector<std::atomic<bool>> heard(nodes.size());
  std::atomic<size_t> heard_count{0};
  std::atomic<int> in_flight{0};
  std::thread heartbeats([&] {
    for (auto round = Clock::now(); !g_stop;) {
      const auto period = std::chrono::milliseconds(interval.load());
      for (size_t i = 0; i < nodes.size() && !g_stop; ++i) {
        if (!SleepUntil(round + period * i / nodes.size())) break;
        auto* call = new HeartbeatCall;
        call->ctx.set_deadline(std::chrono::system_clock::now() + period);
        SimNode& n = *nodes[i];
        call->req.set_node_id(n.id);
        call->req.set_api_address(n.api_address);
        {
          std::lock_guard lock(n.mu);
          call->req.set_capacity_bytes(*capacity);
          call->req.set_free_bytes(*capacity);  // sparse: nothing written
          call->req.set_provisionable_bytes(*capacity - n.provisioned);
          call->req.set_provisioned_bytes(n.provisioned);
          call->req.set_volumes(n.volumes.size());
        }
        call->req.set_reflink(true);
        call->req.set_version("node-sim");
        call->req.set_started_unix_ns(started_ns);
        call->req.set_nbd_devices(16);
        in_flight++;
        registry[i]->async()->Heartbeat(
            &call->ctx, &call->req, &call->resp, [&, call, i](grpc::Status s) {
              counters.heartbeats++;
              if (s.ok()) {
                if (call->resp.interval_ms() > 0) interval = call->resp.interval_ms();
                if (!heard[i].exchange(true)) heard_count++;
              } else if (counters.heartbeat_errors++ < 5) {
                std::fprintf(stderr, "nbdcsi-node-sim: heartbeat of %s: %s\n",
                             call->req.node_id().c_str(), s.error_message().c_str());
              }
              delete call;
              in_flight--;
            });
      }
      round += period;
    }
  });

  // Lease keepalives every TTL/3, as cluster::Lease does, on one thread for all nodes; a lost
  // lease is granted and registered again, as a restarted datapath would.
  std::thread keepalives;
  if (store) {
    keepalives = std::thread([&] {
      const auto period = std::chrono::milliseconds(lease_ttl * 1000 / 3);
      for (auto round = Clock::now() + period; !g_stop; round += period) {
        for (size_t i = 0; i < nodes.size() && !g_stop; ++i) {
          if (!SleepUntil(round + period * i / nodes.size())) break;
          auto ttl = store->KeepAliveLease(leases[i]);
          counters.keepalives++;
          if (ttl.ok()) continue;
          counters.lease_renewals_failed++;
          std::fprintf(stderr, "nbdcsi-node-sim: lease of %s: %s\n", nodes[i]->id.c_str(),
                       ttl.status().message().c_str());
          if (ttl.status().code() == ENOENT) {
            if (auto s = register_node(i); !s.ok()) {
              std::fprintf(stderr, "nbdcsi-node-sim: registering %s again: %s\n",
                           nodes[i]->id.c_str(), s.message().c_str());
            }
          }
        }
      }
    });
  }

  bool ready = false;
  while (!g_stop) {
    if (!ready && heard_count == nodes.size()) {
      ready = true;
      std::fprintf(stderr, "nbdcsi-node-sim: %zu nodes registered%s; Datapath API on %s:%d-...\n",
                   nodes.size(), store ? " (and in etcd)" : "", host.c_str(), ports[0]);
      if (!ready_file.empty()) std::ofstream(ready_file) << nodes.size() << "\n";
    }
    std::this_thread::sleep_for(50ms);
  }

  heartbeats.join();
  if (keepalives.joinable()) keepalives.join();
  for (int i = 0; in_flight > 0 && i < 100; ++i) std::this_thread::sleep_for(50ms);
  if (store) {
    for (auto lease : leases) (void)store->RevokeLease(lease);
  }
  server->Shutdown(std::chrono::system_clock::now() + 2s);
  std::fprintf(stderr,
               "nbdcsi-node-sim: served CreateVolume %llu, GetVolume %llu, DeleteVolume %llu, "
               "ListVolumes %llu, misrouted %llu; heartbeats %llu (%llu failed), keepalives %llu "
               "(%llu failed)\n",
               static_cast<unsigned long long>(counters.create.load()),
               static_cast<unsigned long long>(counters.get.load()),
               static_cast<unsigned long long>(counters.del.load()),
               static_cast<unsigned long long>(counters.list.load()),
               static_cast<unsigned long long>(counters.misrouted.load()),
               static_cast<unsigned long long>(counters.heartbeats.load()),
               static_cast<unsigned long long>(counters.heartbeat_errors.load()),
               static_cast<unsigned long long>(counters.keepalives.load()),
               static_cast<unsigned long long>(counters.lease_renewals_failed.load()));
  return 0;
}
