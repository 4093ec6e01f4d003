// Load generator for bench/replica_client_bench.sh (not a test): 4 KiB random writes through the
// replica client at a fixed queue depth for a fixed time, then one line of figures.
//
//   replica_client_bench ENDPOINT EXPORT QD SECONDS CONNECTIONS [CERT KEY CA]
//   -> "iops=... lat_avg_us=... lat_p50_us=... lat_p99_us=... errors=..."
#include <spdlog/spdlog.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <random>
#include <thread>
#include <vector>

#include "datapath/replica/client.h"

using namespace nbdcsi;
using namespace nbdcsi::replica;
using Clock = std::chrono::steady_clock;

int main(int argc, char** argv) {
  if (argc != 6 && argc != 9) {
    std::fprintf(stderr, "usage: %s ENDPOINT EXPORT QD SECONDS CONNECTIONS [CERT KEY CA]\n",
                 argv[0]);
    return 2;
  }
  spdlog::set_level(spdlog::level::warn);  // stdout carries the one line of figures
  auto ep = ParseEndpoint(argv[1]);
  if (!ep.ok()) {
    std::fprintf(stderr, "%s\n", ep.status().message().c_str());
    return 2;
  }
  ClientOptions o;
  o.endpoint = *ep;
  o.export_name = argv[2];
  const int qd = std::atoi(argv[3]);
  const int seconds = std::atoi(argv[4]);
  o.connections = std::atoi(argv[5]);
  if (argc == 9) {
    o.tls.cert = argv[6];
    o.tls.key = argv[7];
    o.tls.ca = argv[8];
  }
  auto c = ReplicaClient::Connect(o);
  if (!c.ok()) {
    std::fprintf(stderr, "connect: %s\n", c.status().message().c_str());
    return 1;
  }
  ReplicaClient& client = **c;
  const uint64_t blocks = client.export_properties().size / 4096;
  std::vector<uint8_t> data(4096);
  std::mt19937_64 fill(1);
  for (auto& b : data) b = static_cast<uint8_t>(fill());

  std::atomic<bool> measuring{false}, stop{false};
  std::atomic<int> running{qd};
  std::atomic<uint64_t> errors{0};
  std::mutex mu;
  std::vector<double> lat_us;
  lat_us.reserve(1 << 22);
  std::vector<std::mt19937_64> rngs;
  for (int i = 0; i < qd; ++i) rngs.emplace_back(1000 + i);

  std::function<void(int)> issue = [&](int slot) {
    const uint64_t off = (rngs[slot]() % blocks) * 4096;
    const auto t0 = Clock::now();
    Status st = client.Write(off, data, false, [&, slot, t0](const Status& s) {
      if (!s.ok()) {
        if (errors++ == 0) std::fprintf(stderr, "error: %s\n", s.message().c_str());
      } else if (measuring) {
        const double us = std::chrono::duration<double, std::micro>(Clock::now() - t0).count();
        std::lock_guard lk(mu);
        lat_us.push_back(us);
      }
      if (stop || !s.ok()) {
        --running;
      } else {
        issue(slot);
      }
    });
    if (!st.ok()) {
      ++errors;
      --running;
    }
  };
  for (int i = 0; i < qd; ++i) issue(i);
  std::this_thread::sleep_for(std::chrono::seconds(1));  // warm-up
  measuring = true;
  const auto t0 = Clock::now();
  std::this_thread::sleep_for(std::chrono::seconds(seconds));
  measuring = false;
  const double elapsed = std::chrono::duration<double>(Clock::now() - t0).count();
  stop = true;
  while (running.load() > 0) std::this_thread::sleep_for(std::chrono::milliseconds(5));
  client.Close(std::chrono::seconds(5));

  std::vector<double> l;
  {
    std::lock_guard lk(mu);
    l = lat_us;
  }
  std::sort(l.begin(), l.end());
  double sum = 0;
  for (double x : l) sum += x;
  auto pct = [&](double p) {
    return l.empty() ? 0.0 : l[std::min(l.size() - 1, size_t(p * l.size()))];
  };
  std::printf("iops=%.0f lat_avg_us=%.1f lat_p50_us=%.1f lat_p99_us=%.1f errors=%llu\n",
              l.size() / elapsed, l.empty() ? 0.0 : sum / l.size(), pct(0.5), pct(0.99),
              (unsigned long long)errors.load());
  return errors.load() == 0 ? 0 : 1;
}
