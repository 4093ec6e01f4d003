// csi_bench: drives a running nbd-csi-controller over its CSI socket the way csi-provisioner and
// csi-snapshotter would, and prints latency percentiles and throughput per phase:
//   CreateVolume x N, CreateSnapshot x N (one per volume), DeleteSnapshot x N, DeleteVolume x N.
// "first100/last100 p99" compare the start and the end of a phase: a controller that slows down
// as volumes pile up (the idempotency search lists every node, the pools grow) shows it there.
// bench/csi_bench.sh starts the controller and the datapaths and runs this.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

#include <grpcpp/client_context.h>
#include <grpcpp/create_channel.h>

#include "csi/csi.grpc.pb.h"

namespace v1 = ::csi::v1;
using Clock = std::chrono::steady_clock;

namespace {

struct Phase {
  std::string name;
  std::vector<double> ms;  // per call, in call order
  double wall_s = 0;
  int errors = 0;
};

double Pct(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  size_t i = std::min(v.size() - 1, static_cast<size_t>(p / 100.0 * v.size()));
  return v[i];
}

// Runs fn(i) for i in [0, n) on `par` threads; records each call's latency in index order.
template <typename F>
Phase Run(const std::string& name, int n, int par, F&& fn) {
  Phase ph;
  ph.name = name;
  ph.ms.assign(n, 0);
  std::atomic<int> next{0}, errors{0};
  auto t0 = Clock::now();
  std::vector<std::thread> ts;
  for (int t = 0; t < par; ++t) {
    ts.emplace_back([&] {
      for (int i; (i = next++) < n;) {
        auto a = Clock::now();
        grpc::Status s = fn(i);
        ph.ms[i] = std::chrono::duration<double, std::milli>(Clock::now() - a).count();
        if (!s.ok()) {
          if (errors++ < 5) {
            std::fprintf(stderr, "%s #%d: %d %s\n", name.c_str(), i, s.error_code(),
                         s.error_message().c_str());
          }
        }
      }
    });
  }
  for (auto& t : ts) t.join();
  ph.wall_s = std::chrono::duration<double>(Clock::now() - t0).count();
  ph.errors = errors;
  return ph;
}

void Print(const std::vector<Phase>& phases) {
  std::printf("%-15s %6s %6s %8s %8s %8s %8s %10s %14s %13s\n", "phase", "calls", "errors",
              "p50 ms", "p90 ms", "p99 ms", "max ms", "ops/s", "first100 p99", "last100 p99");
  for (const auto& p : phases) {
    size_t k = std::min<size_t>(100, p.ms.size());
    std::vector<double> first(p.ms.begin(), p.ms.begin() + k);
    std::vector<double> last(p.ms.end() - k, p.ms.end());
    std::printf("%-15s %6zu %6d %8.2f %8.2f %8.2f %8.2f %10.1f %14.2f %13.2f\n", p.name.c_str(),
                p.ms.size(), p.errors, Pct(p.ms, 50), Pct(p.ms, 90), Pct(p.ms, 99),
                Pct(p.ms, 100), p.ms.size() / p.wall_s, Pct(first, 99), Pct(last, 99));
  }
}

}  // namespace

int main(int argc, char** argv) {
  std::string endpoint;
  int n = 1000, par = 1;
  int64_t size = 64 << 20;
  for (int i = 1; i + 1 < argc; i += 2) {
    std::string k = argv[i];
    if (k == "--endpoint") endpoint = argv[i + 1];
    else if (k == "--count") n = std::atoi(argv[i + 1]);
    else if (k == "--parallel") par = std::atoi(argv[i + 1]);
    else if (k == "--size") size = std::atoll(argv[i + 1]);
    else {
      std::fprintf(stderr, "unknown option %s\n", k.c_str());
      return 2;
    }
  }
  if (endpoint.empty() || n <= 0 || par <= 0 || size <= 0) {
    std::fprintf(stderr,
                 "usage: csi_bench --endpoint unix:///path [--count N] [--parallel P] "
                 "[--size BYTES]\n");
    return 2;
  }
  auto stub = v1::Controller::NewStub(grpc::CreateChannel(endpoint,
                                                          grpc::InsecureChannelCredentials()));
  auto ctx = [] {
    auto c = std::make_unique<grpc::ClientContext>();
    c->set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
    return c;
  };
  std::vector<std::string> vols(n), snaps(n);
  int on_a = 0;
  std::vector<Phase> phases;

  phases.push_back(Run("CreateVolume", n, par, [&](int i) {
    v1::CreateVolumeRequest r;
    char name[64];
    std::snprintf(name, sizeof(name), "pvc-bench-%05d", i);
    r.set_name(name);
    r.mutable_capacity_range()->set_required_bytes(size);
    auto* cap = r.add_volume_capabilities();
    cap->mutable_mount()->set_fs_type("ext4");
    cap->mutable_access_mode()->set_mode(v1::VolumeCapability::AccessMode::SINGLE_NODE_WRITER);
    (*r.mutable_parameters())["maxIops"] = "5000";
    v1::CreateVolumeResponse resp;
    grpc::Status s = stub->CreateVolume(ctx().get(), r, &resp);
    vols[i] = resp.volume().volume_id();
    return s;
  }));
  for (const auto& v : vols) on_a += v.rfind("v1:node-a:", 0) == 0;

  phases.push_back(Run("CreateSnapshot", n, par, [&](int i) {
    v1::CreateSnapshotRequest r;
    char name[64];
    std::snprintf(name, sizeof(name), "snapshot-bench-%05d", i);
    r.set_name(name);
    r.set_source_volume_id(vols[i]);
    v1::CreateSnapshotResponse resp;
    grpc::Status s = stub->CreateSnapshot(ctx().get(), r, &resp);
    snaps[i] = resp.snapshot().snapshot_id();
    return s;
  }));

  // Background copies (pools without reflink) must end before a snapshot can be deleted.
  for (int tries = 0; tries < 3000; ++tries) {
    v1::ListSnapshotsResponse resp;
    if (!stub->ListSnapshots(ctx().get(), {}, &resp).ok()) break;
    bool all = true;
    for (const auto& e : resp.entries()) all &= e.snapshot().ready_to_use();
    if (all) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  {
    auto a = Clock::now();
    v1::ListVolumesResponse resp;
    grpc::Status s = stub->ListVolumes(ctx().get(), {}, &resp);
    std::printf("ListVolumes (all %d entries): %.1f ms%s\n", resp.entries_size(),
                std::chrono::duration<double, std::milli>(Clock::now() - a).count(),
                s.ok() ? "" : " FAILED");
  }

  phases.push_back(Run("DeleteSnapshot", n, par, [&](int i) {
    v1::DeleteSnapshotRequest r;
    r.set_snapshot_id(snaps[i]);
    v1::DeleteSnapshotResponse resp;
    return stub->DeleteSnapshot(ctx().get(), r, &resp);
  }));
  phases.push_back(Run("DeleteVolume", n, par, [&](int i) {
    v1::DeleteVolumeRequest r;
    r.set_volume_id(vols[i]);
    v1::DeleteVolumeResponse resp;
    return stub->DeleteVolume(ctx().get(), r, &resp);
  }));

  std::printf("%d volumes of %lld bytes, %d parallel client(s); placement: node-a %d, node-b %d\n",
              n, static_cast<long long>(size), par, on_a, n - on_a);
  Print(phases);
  int errors = 0;
  for (const auto& p : phases) errors += p.errors;
  return errors ? 1 : 0;
}
