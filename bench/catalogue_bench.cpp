// catalogue_bench: COUNT sequential CreateVolume calls on a running nbd-csi-controller's CSI
// socket, as csi-provisioner would make them, timed one by one on the client; then the deletes.
// --replicas 2 sends the StorageClass parameter replicas: "2" (the catalogue in etcd decides
// idempotency and placement); without it the volume is a single-node one (the controller asks
// every live node for the name first). bench/catalogue_bench.sh runs it against 10 to 1,000
// simulated nodes (nbdcsi-node-sim).
//
// Output: one line per phase, "phase calls errors p50_ms p99_ms max_ms", and exit code 1 when a
// call failed (the first few errors go to stderr).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include <grpcpp/client_context.h>
#include <grpcpp/create_channel.h>

#include "csi/csi.grpc.pb.h"

namespace v1 = ::csi::v1;
using Clock = std::chrono::steady_clock;

namespace {

double Pct(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  // Nearest rank: the smallest value with at least p% of the calls at or below it.
  size_t rank = static_cast<size_t>(p / 100.0 * v.size() + 0.999999);
  return v[std::clamp<size_t>(rank, 1, v.size()) - 1];
}

template <typename F>
int Phase(const char* name, int n, F&& fn) {
  std::vector<double> ms;
  int errors = 0;
  for (int i = 0; i < n; ++i) {
    auto t0 = Clock::now();
    grpc::Status s = fn(i);
    ms.push_back(std::chrono::duration<double, std::milli>(Clock::now() - t0).count());
    if (!s.ok() && errors++ < 5) {
      std::fprintf(stderr, "%s #%d: %d %s\n", name, i, s.error_code(), s.error_message().c_str());
    }
  }
  std::printf("%s %d %d %.2f %.2f %.2f\n", name, n, errors, Pct(ms, 50), Pct(ms, 99), Pct(ms, 100));
  return errors;
}

std::unique_ptr<grpc::ClientContext> Ctx() {
  auto c = std::make_unique<grpc::ClientContext>();
  c->set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
  return c;
}

}  // namespace

int main(int argc, char** argv) {
  std::string endpoint, prefix = "pvc-cat";
  int n = 300, replicas = 1, warmup = 3;
  int64_t size = 1 << 30;
  for (int i = 1; i + 1 < argc; i += 2) {
    std::string k = argv[i];
    if (k == "--endpoint")
      endpoint = argv[i + 1];
    else if (k == "--count")
      n = std::atoi(argv[i + 1]);
    else if (k == "--replicas")
      replicas = std::atoi(argv[i + 1]);
    else if (k == "--warmup")
      warmup = std::atoi(argv[i + 1]);
    else if (k == "--name-prefix")
      prefix = argv[i + 1];
    else if (k == "--size")
      size = std::atoll(argv[i + 1]);
    else {
      std::fprintf(stderr, "catalogue_bench: unknown option %s\n", k.c_str());
      return 2;
    }
  }
  if (argc % 2 == 0 || endpoint.empty() || n <= 0 || replicas < 1 || warmup < 0 || size <= 0) {
    std::fprintf(stderr,
                 "usage: catalogue_bench --endpoint unix:///path [--count N] [--replicas R] "
                 "[--warmup W] [--name-prefix P] [--size BYTES]\n");
    return 2;
  }
  auto stub =
      v1::Controller::NewStub(grpc::CreateChannel(endpoint, grpc::InsecureChannelCredentials()));
  const int total = warmup + n;
  std::vector<std::string> ids(total);
  auto create = [&](int i) {
    v1::CreateVolumeRequest r;
    r.set_name(prefix + "-" + std::to_string(i));
    r.mutable_capacity_range()->set_required_bytes(size);
    auto* cap = r.add_volume_capabilities();
    cap->mutable_block();
    cap->mutable_access_mode()->set_mode(v1::VolumeCapability::AccessMode::SINGLE_NODE_WRITER);
    if (replicas > 1) (*r.mutable_parameters())["replicas"] = std::to_string(replicas);
    v1::CreateVolumeResponse resp;
    grpc::Status s = stub->CreateVolume(Ctx().get(), r, &resp);
    ids[i] = resp.volume().volume_id();
    return s;
  };
  auto remove = [&](int i) {
    v1::DeleteVolumeRequest r;
    r.set_volume_id(ids[i]);
    v1::DeleteVolumeResponse resp;
    return stub->DeleteVolume(Ctx().get(), r, &resp);
  };
  // Not timed: the controller dials each node's datapath on first use.
  int errors = 0;
  for (int i = 0; i < warmup; ++i) {
    if (grpc::Status s = create(i); !s.ok()) {
      std::fprintf(stderr, "warm-up CreateVolume: %d %s\n", s.error_code(),
                   s.error_message().c_str());
      return 1;
    }
  }
  errors += Phase("CreateVolume", n, [&](int i) { return create(warmup + i); });
  errors += Phase("DeleteVolume", n, [&](int i) { return remove(warmup + i); });
  for (int i = 0; i < warmup; ++i) (void)remove(i);
  return errors ? 1 : 0;
}
