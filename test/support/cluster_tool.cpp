// nbdcsi-cluster-tool: writes and reads the cluster state of replicated volumes in etcd (issue 16)
// for tests and benchmarks that run real daemons before the controller does this itself. It goes
// through the same EtcdClusterStore the daemons use, so the keys and the JSON are theirs.
//
//   nbdcsi-cluster-tool [--etcd HOST:PORT] [--prefix P] create-volume NAME SIZE NODE...
//   nbdcsi-cluster-tool [--etcd HOST:PORT] [--prefix P] get-volume NAME
//
// create-volume records NAME with SIZE bytes (a quantity: 64Mi, 1G, 4096) on the replica nodes
// NODE..., all in sync (the pools' copies are new and equal); repeating it with the same values is
// OK. get-volume prints the state as one JSON object (EncodeVolumeState's form). Exit codes: 0 ok,
// 1 the store refused or failed (the message says why), 2 usage.
#include <chrono>
#include <cstdio>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include "common/cluster/etcd_cluster_store.h"
#include "common/cluster/keys.h"
#include "common/cluster/volume_state.h"
#include "common/etcd/etcd_client.h"
#include "common/quantity.h"

namespace {

using nbdcsi::Status;
using nbdcsi::StatusOr;
namespace cluster = nbdcsi::cluster;
namespace etcd = nbdcsi::etcd;

int Fail(const std::string& what, const Status& s) {
  std::fprintf(stderr, "nbdcsi-cluster-tool: %s: %s\n", what.c_str(), s.message().c_str());
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"nbdcsi-cluster-tool: cluster state of replicated volumes in etcd (tests)"};
  std::string endpoint = "127.0.0.1:2379";
  std::string prefix = std::string(cluster::kDefaultPrefix);
  app.add_option("--etcd", endpoint, "etcd endpoint HOST:PORT (plaintext)");
  app.add_option("--prefix", prefix, "Key prefix of the cluster state");
  app.require_subcommand(1);
  std::string name, size_text;
  std::vector<std::string> nodes;
  auto* create = app.add_subcommand("create-volume", "Record a volume with its replicas, in sync");
  create->add_option("NAME", name)->required();
  create->add_option("SIZE", size_text)->required();
  create->add_option("NODE", nodes)->required();
  auto* get = app.add_subcommand("get-volume", "Print a volume's state as JSON");
  get->add_option("NAME", name)->required();
  CLI11_PARSE(app, argc, argv);

  auto keys = cluster::KeyLayout::Make(prefix);
  if (!keys.ok()) return Fail("--prefix", keys.status());
  auto client = etcd::EtcdClient::Create(
      {.endpoints = {endpoint}, .call_timeout = std::chrono::milliseconds(5000)});
  if (!client.ok()) return Fail("--etcd " + endpoint, client.status());
  cluster::EtcdClusterStore store(std::move(*client), *keys);

  if (*create) {
    auto size = nbdcsi::ParseQuantity(size_text);
    if (!size.ok() || *size == 0) {
      std::fprintf(stderr, "nbdcsi-cluster-tool: SIZE '%s': %s\n", size_text.c_str(),
                   size.ok() ? "must be greater than 0" : size.status().message().c_str());
      return 2;
    }
    cluster::VolumeState v;
    v.name = name;
    v.size_bytes = *size;
    v.replicas = cluster::SortedUnique(nodes);
    v.in_sync = v.replicas;
    if (Status s = cluster::ValidateVolumeState(v); !s.ok()) {
      std::fprintf(stderr, "nbdcsi-cluster-tool: %s\n", s.message().c_str());
      return 2;
    }
    auto made = store.CreateVolume(v);
    if (!made.ok()) return Fail("create-volume " + name, made.status());
    std::printf("%s\n", cluster::EncodeVolumeState(*made).c_str());
    return 0;
  }
  auto v = store.GetVolume(name);
  if (!v.ok()) return Fail("get-volume " + name, v.status());
  std::printf("%s\n", cluster::EncodeVolumeState(*v).c_str());
  return 0;
}
