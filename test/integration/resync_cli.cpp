// resync_cli: drives one Resync job between two NBD servers, for bench/resync_bench.sh and by hand.
// Test tooling, not a product command: the target of issue 16 runs Resync in-process.
//
//   resync_cli SRC_ENDPOINT SRC_EXPORT DST_ENDPOINT DST_EXPORT [options]
//     --tls CERT KEY CA     mutual TLS towards TCP endpoints (both peers)
//     --bitmap PATH         RunDirty over that RegionBitmap; without it, RunFull
//     --zeroes              RunFull writes zeroes over holes instead of skipping them
//     --rate BYTES          bytes per second read from the source (0: unlimited)
//     --connections N       per peer (default 4)
//     --in-flight N         chunks in flight (default 8)
//     --chunk BYTES         bytes per chunk (default 1 MiB)
// Progress goes to stderr once a second; the result is one JSON line on stdout. Exit 1 on error.
#include <spdlog/spdlog.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>

#include "datapath/replica/client.h"
#include "datapath/replica/region_bitmap.h"
#include "datapath/replica/resync.h"

using namespace nbdcsi;
using namespace nbdcsi::replica;

namespace {

int Usage() {
  std::fprintf(stderr,
               "usage: resync_cli SRC_ENDPOINT SRC_EXPORT DST_ENDPOINT DST_EXPORT [--tls CERT KEY "
               "CA] [--bitmap PATH] [--zeroes] [--rate B/s] [--connections N] [--in-flight N] "
               "[--chunk BYTES]\n");
  return 2;
}

bool Number(const char* s, uint64_t* out) {
  char* end = nullptr;
  errno = 0;
  *out = std::strtoull(s, &end, 10);
  return errno == 0 && end && *end == '\0' && end != s;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 5) return Usage();
  spdlog::set_level(spdlog::level::warn);
  ClientOptions src, dst;
  auto src_ep = ParseEndpoint(argv[1]);
  auto dst_ep = ParseEndpoint(argv[3]);
  if (!src_ep.ok() || !dst_ep.ok()) {
    std::fprintf(stderr, "resync_cli: %s\n",
                 (!src_ep.ok() ? src_ep.status() : dst_ep.status()).message().c_str());
    return 2;
  }
  src.endpoint = *src_ep;
  src.export_name = argv[2];
  src.read_only = true;
  src.base_allocation = true;
  dst.endpoint = *dst_ep;
  dst.export_name = argv[4];
  src.connections = dst.connections = 4;
  std::string bitmap_path;
  ResyncOptions o;
  uint64_t n = 0;
  for (int i = 5; i < argc; ++i) {
    const std::string a = argv[i];
    auto want = [&](int k) { return i + k < argc; };
    if (a == "--tls" && want(3)) {
      src.tls.cert = dst.tls.cert = argv[++i];
      src.tls.key = dst.tls.key = argv[++i];
      src.tls.ca = dst.tls.ca = argv[++i];
    } else if (a == "--bitmap" && want(1)) {
      bitmap_path = argv[++i];
    } else if (a == "--zeroes") {
      o.holes = HolePolicy::kWriteZeroes;
    } else if (a == "--rate" && want(1) && Number(argv[i + 1], &n)) {
      o.rate_bytes_per_second = n;
      ++i;
    } else if (a == "--connections" && want(1) && Number(argv[i + 1], &n) && n > 0 && n < 65) {
      src.connections = dst.connections = static_cast<int>(n);
      ++i;
    } else if (a == "--in-flight" && want(1) && Number(argv[i + 1], &n) && n > 0 && n < 1025) {
      o.max_in_flight = static_cast<int>(n);
      ++i;
    } else if (a == "--chunk" && want(1) && Number(argv[i + 1], &n) && n > 0 && n <= (64 << 20)) {
      o.chunk_bytes = static_cast<uint32_t>(n);
      ++i;
    } else {
      return Usage();
    }
  }
  if (src.endpoint.kind != Endpoint::Kind::kTcp) src.tls = {};
  if (dst.endpoint.kind != Endpoint::Kind::kTcp) dst.tls = {};

  auto s = ReplicaClient::Connect(src);
  if (!s.ok()) {
    std::fprintf(stderr, "resync_cli: source: %s\n", s.status().message().c_str());
    return 1;
  }
  auto d = ReplicaClient::Connect(dst);
  if (!d.ok()) {
    std::fprintf(stderr, "resync_cli: destination: %s\n", d.status().message().c_str());
    return 1;
  }
  std::unique_ptr<RegionBitmap> bm;
  if (!bitmap_path.empty()) {
    auto b = RegionBitmap::Open(bitmap_path, (*s)->export_properties().size);
    if (!b.ok()) {
      std::fprintf(stderr, "resync_cli: %s\n", b.status().message().c_str());
      return 1;
    }
    bm = std::move(b).value();
  }
  ClientBlockChannel sc(**s), dc(**d);
  Resync job(sc, dc, o);
  std::atomic<bool> over{false};
  std::thread reporter([&] {
    while (!over) {
      // Pacing: a report a second, looking at `over` every 100 ms so the end is not delayed.
      for (int k = 0; k < 10 && !over; ++k) std::this_thread::sleep_for(std::chrono::milliseconds(100));
      if (over) break;
      const ResyncProgress p = job.progress();
      const auto eta = p.eta();
      std::fprintf(stderr, "resync: %.1f%% (%llu of %llu bytes), eta %s\n", p.percent(),
                   static_cast<unsigned long long>(p.done_bytes()),
                   static_cast<unsigned long long>(p.total_bytes),
                   eta ? (std::to_string(eta->count()) + " s").c_str() : "unknown");
    }
  });
  const Status st = bm ? job.RunDirty(*bm) : job.RunFull();
  over = true;
  reporter.join();
  const ResyncProgress p = job.progress();
  const double secs = std::chrono::duration<double>(p.elapsed).count();
  std::printf(
      "{\"mode\":\"%s\",\"ok\":%s,\"total\":%llu,\"copied\":%llu,\"skipped\":%llu,\"zeroed\":%llu,"
      "\"seconds\":%.3f,\"copied_mib_per_s\":%.1f}\n",
      bm ? "dirty" : "full", st.ok() ? "true" : "false",
      static_cast<unsigned long long>(p.total_bytes),
      static_cast<unsigned long long>(p.copied_bytes),
      static_cast<unsigned long long>(p.skipped_bytes),
      static_cast<unsigned long long>(p.zeroed_bytes), secs,
      secs > 0 ? static_cast<double>(p.copied_bytes) / (1 << 20) / secs : 0.0);
  if (!st.ok()) {
    std::fprintf(stderr, "resync_cli: %s\n", st.message().c_str());
    return 1;
  }
  return 0;
}
