// nbdcsi-cluster-tool: writes and reads the cluster state of a replicated volume in etcd
// through common/cluster, the same code the daemons use. Until the controller creates replicated
// volumes (issue 16), benches and hand-run experiments make them with this tool.
//
//   nbdcsi-cluster-tool --etcd HOST:PORT [--prefix /nbd-csi/] create-volume NAME SIZE NODE...
//   nbdcsi-cluster-tool --etcd HOST:PORT [--prefix /nbd-csi/] get-volume NAME
//
// create-volume records NAME with replicas = in_sync = the NODEs (each must already hold a pool
// volume NAME of SIZE) and prints the stored state as JSON; get-volume prints it. Plaintext etcd
// only (what a loopback bench runs). Exit 0, or 1 with the store's error on stderr, 2 for usage.
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "common/cluster/etcd_cluster_store.h"
#include "common/cluster/keys.h"
#include "common/cluster/volume_state.h"
#include "common/etcd/etcd_client.h"
#include "common/quantity.h"

namespace {

using nbdcsi::cluster::EtcdClusterStore;
using nbdcsi::cluster::KeyLayout;
using nbdcsi::cluster::VolumeState;

int Usage(const char* why) {
  std::fprintf(stderr,
               "nbdcsi-cluster-tool: %s\n"
               "usage: nbdcsi-cluster-tool --etcd HOST:PORT [--prefix P] create-volume NAME SIZE "
               "NODE...\n"
               "       nbdcsi-cluster-tool --etcd HOST:PORT [--prefix P] get-volume NAME\n",
               why);
  return 2;
}

int Fail(const std::string& what, const nbdcsi::Status& s) {
  std::fprintf(stderr, "nbdcsi-cluster-tool: %s: %s (%s)\n", what.c_str(), s.message().c_str(),
               std::strerror(s.code()));
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  std::string etcd, prefix = "/nbd-csi/";
  std::vector<std::string> rest;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if ((a == "--etcd" || a == "--prefix") && i + 1 < argc) {
      (a == "--etcd" ? etcd : prefix) = argv[++i];
    } else if (a.rfind("--", 0) == 0) {
      return Usage(("unknown flag or missing value: " + a).c_str());
    } else {
      rest.push_back(a);
    }
  }
  if (etcd.empty()) return Usage("--etcd HOST:PORT is required");
  if (rest.empty()) return Usage("no command");
  const std::string cmd = rest[0];
  if (cmd == "create-volume" && rest.size() < 4) return Usage("create-volume NAME SIZE NODE...");
  if (cmd == "get-volume" && rest.size() != 2) return Usage("get-volume NAME");
  if (cmd != "create-volume" && cmd != "get-volume")
    return Usage(("unknown command " + cmd).c_str());

  auto keys = KeyLayout::Make(prefix);
  if (!keys.ok()) return Fail("--prefix", keys.status());
  auto client = nbdcsi::etcd::EtcdClient::Create({.endpoints = {etcd}});
  if (!client.ok()) return Fail("--etcd " + etcd, client.status());
  EtcdClusterStore store(std::move(*client), *keys);

  if (cmd == "get-volume") {
    auto v = store.GetVolume(rest[1]);
    if (!v.ok()) return Fail("get-volume " + rest[1], v.status());
    std::printf("%s\n", nbdcsi::cluster::EncodeVolumeState(*v).c_str());
    return 0;
  }
  auto size = nbdcsi::ParseQuantity(rest[2]);
  if (!size.ok()) return Fail("SIZE", size.status());
  VolumeState v;
  v.name = rest[1];
  v.size_bytes = *size;
  v.replicas = nbdcsi::cluster::SortedUnique({rest.begin() + 3, rest.end()});
  v.in_sync = v.replicas;
  // The store validates the name, node ids and size rules; its error names the broken one.
  auto created = store.CreateVolume(v);
  if (!created.ok()) return Fail("create-volume " + v.name, created.status());
  std::printf("%s\n", nbdcsi::cluster::EncodeVolumeState(*created).c_str());
  return 0;
}
