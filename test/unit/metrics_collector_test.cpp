// The collector folds the per-worker shards of each volume's counters into Prometheus families
// with exact counts; the HTTP endpoint serves them and answers the probes.
#include <cmath>
#include <limits>
#include <thread>
#include <vector>

#include <gtest/gtest.h>
#include <prometheus/text_serializer.h>

#include "common/metrics/server.h"
#include "datapath/metrics/collector.h"
#include "test/support/free_port.h"
#include "test/support/http_get.h"
#include "test/support/pool.h"
#include "test/support/temp_dir.h"

namespace nbdcsi::datapath {
namespace {

using prometheus::ClientMetric;
using prometheus::MetricFamily;

constexpr uint64_t kMiB = 1 << 20;

const MetricFamily* FindFamily(const std::vector<MetricFamily>& fams, const std::string& name) {
  for (const auto& f : fams)
    if (f.name == name) return &f;
  return nullptr;
}

// The series of `family` whose labels include every pair of `want`; nullptr if none.
const ClientMetric* Find(const std::vector<MetricFamily>& fams, const std::string& family,
                         const std::vector<std::pair<std::string, std::string>>& want) {
  const MetricFamily* f = FindFamily(fams, family);
  if (!f) return nullptr;
  for (const auto& m : f->metric) {
    bool all = true;
    for (const auto& [k, v] : want) {
      bool hit = false;
      for (const auto& l : m.label) hit = hit || (l.name == k && l.value == v);
      all = all && hit;
    }
    if (all) return &m;
  }
  return nullptr;
}

double Counter(const std::vector<MetricFamily>& fams, const std::string& family,
               const std::vector<std::pair<std::string, std::string>>& want) {
  const ClientMetric* m = Find(fams, family, want);
  EXPECT_NE(m, nullptr) << family;
  return m ? m->counter.value : -1;
}

double Gauge(const std::vector<MetricFamily>& fams, const std::string& family,
             const std::vector<std::pair<std::string, std::string>>& want = {}) {
  const ClientMetric* m = Find(fams, family, want);
  EXPECT_NE(m, nullptr) << family;
  return m ? m->gauge.value : -1;
}

class CollectorTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(dir_.ok()) << dir_.error();
    ASSERT_TRUE(test::OpenPool(test::PoolIn(dir_.path()), &pool_));
    ASSERT_TRUE(pool_->Create("v", 64 * kMiB, {}).ok());
    ASSERT_TRUE(pool_->Create("w", 32 * kMiB, {}).ok());
  }
  test::TempDir dir_{"metrics-collector"};
  std::unique_ptr<Pool> pool_;
};

// Four "workers" each write their own shard; the families must hold the exact sums.
TEST_F(CollectorTest, FoldsEveryShardExactly) {
  auto vol = pool_->Acquire("v");
  ASSERT_TRUE(vol);
  constexpr int kThreads = 4, kReads = 20000, kWrites = 5000, kErrors = 7;
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      VolumeStats& s = vol->stats();
      for (int i = 0; i < kReads; ++i) s.Record(t, OpKind::kRead, 4096, 3'000, 0);  // 3 us
      for (int i = 0; i < kWrites; ++i) s.Record(t, OpKind::kWrite, 65536, 300'000, 0);
      for (int i = 0; i < kErrors; ++i) s.Record(t, OpKind::kWrite, 65536, 5'000'000'000, 28);
      s.Record(t, OpKind::kTrim, kMiB, 10'000, 0);
      s.Record(t, OpKind::kWriteZeroes, 2 * kMiB, 10'000, 0);
      s.Record(t, OpKind::kFlush, 0, 10'000, 5);
      s.RecordThrottle(t, 250'000'000);  // 0.25 s
      s.RequestStarted(t);
      s.RequestStarted(t);
      s.RequestEnded(t);
    });
  }
  for (auto& th : threads) th.join();

  DatapathCollector c(*pool_, {}, {}, "test");
  auto fams = c.Collect();
  const std::string v = "v";
  EXPECT_EQ(Counter(fams, "nbdcsi_volume_requests_total", {{"volume", v}, {"op", "read"}}),
            kThreads * kReads);
  EXPECT_EQ(Counter(fams, "nbdcsi_volume_requests_total", {{"volume", v}, {"op", "write"}}),
            kThreads * (kWrites + kErrors));
  EXPECT_EQ(Counter(fams, "nbdcsi_volume_requests_total", {{"volume", v}, {"op", "zero"}}),
            kThreads);
  EXPECT_EQ(Counter(fams, "nbdcsi_volume_requests_total", {{"volume", v}, {"op", "block_status"}}),
            0);
  EXPECT_EQ(Counter(fams, "nbdcsi_volume_request_bytes_total", {{"volume", v}, {"op", "read"}}),
            double(kThreads) * kReads * 4096);
  EXPECT_EQ(Counter(fams, "nbdcsi_volume_request_bytes_total", {{"volume", v}, {"op", "write"}}),
            double(kThreads) * kWrites * 65536)
      << "failed writes move no bytes";
  EXPECT_EQ(Counter(fams, "nbdcsi_volume_request_bytes_total", {{"volume", v}, {"op", "trim"}}),
            double(kThreads) * kMiB);
  EXPECT_EQ(Counter(fams, "nbdcsi_volume_request_bytes_total", {{"volume", v}, {"op", "zero"}}),
            double(kThreads) * 2 * kMiB);
  EXPECT_EQ(Find(fams, "nbdcsi_volume_request_bytes_total", {{"volume", v}, {"op", "flush"}}),
            nullptr);
  EXPECT_EQ(Counter(fams, "nbdcsi_volume_request_errors_total",
                    {{"volume", v}, {"op", "write"}, {"errno", "ENOSPC"}}),
            kThreads * kErrors);
  EXPECT_EQ(Counter(fams, "nbdcsi_volume_request_errors_total",
                    {{"volume", v}, {"op", "flush"}, {"errno", "EIO"}}),
            kThreads);
  EXPECT_EQ(Find(fams, "nbdcsi_volume_request_errors_total", {{"volume", v}, {"op", "read"}}),
            nullptr)
      << "no series for an error that never happened";
  EXPECT_DOUBLE_EQ(Counter(fams, "nbdcsi_volume_qos_throttled_seconds_total", {{"volume", v}}),
                   1.0);
  EXPECT_EQ(Counter(fams, "nbdcsi_volume_qos_delayed_requests_total", {{"volume", v}}), kThreads);
  EXPECT_EQ(Gauge(fams, "nbdcsi_volume_inflight_requests", {{"volume", v}}), kThreads);

  // Read latency: every read took 3 us, bucket "< 4 us" (le 4e-6 s).
  const ClientMetric* h =
      Find(fams, "nbdcsi_volume_request_duration_seconds", {{"volume", v}, {"op", "read"}});
  ASSERT_NE(h, nullptr);
  ASSERT_EQ(h->histogram.bucket.size(), size_t(kLatencyBuckets));
  EXPECT_EQ(h->histogram.sample_count, uint64_t(kThreads) * kReads);
  EXPECT_NEAR(h->histogram.sample_sum, kThreads * kReads * 3e-6, 1e-9);
  for (int i = 0; i < kLatencyBuckets; ++i) {
    const auto& b = h->histogram.bucket[i];
    if (i < kLatencyBuckets - 1) {
      EXPECT_DOUBLE_EQ(b.upper_bound, std::ldexp(1e-6, i));
    }
    EXPECT_EQ(b.cumulative_count, i >= 2 ? uint64_t(kThreads) * kReads : 0u) << "le " << i;
  }
  EXPECT_TRUE(std::isinf(h->histogram.bucket.back().upper_bound));
  // Writes: 300 us (< 512 us, bucket 9) and 5 s failures (beyond 2^22 us: +Inf only).
  h = Find(fams, "nbdcsi_volume_request_duration_seconds", {{"volume", v}, {"op", "write"}});
  ASSERT_NE(h, nullptr);
  EXPECT_EQ(h->histogram.bucket[8].cumulative_count, 0u);
  EXPECT_EQ(h->histogram.bucket[9].cumulative_count, uint64_t(kThreads) * kWrites);
  EXPECT_EQ(h->histogram.bucket[kLatencyBuckets - 2].cumulative_count,
            uint64_t(kThreads) * kWrites);
  EXPECT_EQ(h->histogram.bucket.back().cumulative_count, uint64_t(kThreads) * (kWrites + kErrors));
  EXPECT_EQ(
      Find(fams, "nbdcsi_volume_request_duration_seconds", {{"volume", v}, {"op", "block_status"}}),
      nullptr)
      << "a kind never used has no histogram";

  // The untouched volume has its series at 0.
  EXPECT_EQ(Counter(fams, "nbdcsi_volume_requests_total", {{"volume", "w"}, {"op", "read"}}), 0);
  EXPECT_EQ(Gauge(fams, "nbdcsi_volume_provisioned_bytes", {{"volume", "w"}}), 32.0 * kMiB);
}

// The nbdctl view (Snapshot) and /metrics agree, and the old single-shard API still adds up.
TEST_F(CollectorTest, SnapshotAndMetricsAgree) {
  auto vol = pool_->Acquire("w");
  ASSERT_TRUE(vol);
  vol->stats().RecordOp(OpKind::kRead, 512, 1'000, false);
  vol->stats().Record(3, OpKind::kRead, 512, 1'000, 0);
  vol->stats().RecordOp(OpKind::kRead, 512, 1'000, true);
  VolumeStatsSnapshot s = vol->stats().Snapshot();
  EXPECT_EQ(s.ops[0], 3u);
  EXPECT_EQ(s.bytes_read, 1024u);
  EXPECT_EQ(s.errors_by_errno[0][NbdErrnoIndex(5)], 1u);
  DatapathCollector c(*pool_, {}, {}, "test");
  auto fams = c.Collect();
  EXPECT_EQ(Counter(fams, "nbdcsi_volume_requests_total", {{"volume", "w"}, {"op", "read"}}), 3);
  EXPECT_EQ(Counter(fams, "nbdcsi_volume_request_errors_total",
                    {{"volume", "w"}, {"op", "read"}, {"errno", "EIO"}}),
            1);
}

TEST_F(CollectorTest, PoolEngineAndAttachments) {
  EngineCounters e;
  e.throttled = 3;
  e.cancels = 11;
  e.fenced_requests = 4;
  e.fenced_handshakes = 2;
  e.workers_running = 2;
  AttachmentRecord up, down;
  up.volume = "v";
  up.index = 4;
  down.volume = "w";
  down.index = 5;
  down.link_ok = false;
  down.reconnects = 2;
  DatapathCollector c(
      *pool_, [e] { return e; },
      [up, down] {
        return std::vector<AttachmentRecord>{up, down};
      },
      "1.2.3");
  auto fams = c.Collect();
  PoolInfo info = pool_->Info();
  EXPECT_EQ(Gauge(fams, "nbdcsi_pool_capacity_bytes"), double(info.capacity));
  EXPECT_EQ(Gauge(fams, "nbdcsi_pool_provisioned_bytes"), 96.0 * kMiB);
  EXPECT_EQ(Gauge(fams, "nbdcsi_pool_volumes"), 2);
  EXPECT_EQ(Gauge(fams, "nbdcsi_pool_overcommit_ratio"), 1.0);
  EXPECT_EQ(Gauge(fams, "nbdcsi_pool_provisionable_bytes"), double(info.provisionable()));
  EXPECT_EQ(Gauge(fams, "nbdcsi_engine_throttled_requests"), 3);
  EXPECT_EQ(Gauge(fams, "nbdcsi_engine_workers_running"), 2);
  EXPECT_EQ(Counter(fams, "nbdcsi_engine_cancels_total", {}), 11);
  EXPECT_EQ(Counter(fams, "nbdcsi_engine_fenced_requests_total", {}), 4);
  EXPECT_EQ(Counter(fams, "nbdcsi_engine_fenced_handshakes_total", {}), 2);
  EXPECT_EQ(Gauge(fams, "nbdcsi_attachment_up", {{"volume", "v"}, {"device", "/dev/nbd4"}}), 1);
  EXPECT_EQ(Gauge(fams, "nbdcsi_attachment_up", {{"volume", "w"}, {"mode", "kernel"}}), 0);
  EXPECT_EQ(Counter(fams, "nbdcsi_attachment_reconnects_total", {{"volume", "w"}}), 2);
  EXPECT_EQ(Counter(fams, "nbdcsi_attachment_reconnects_total", {{"volume", "v"}}), 0);
  EXPECT_EQ(Gauge(fams, "nbdcsi_datapath_build_info", {{"version", "1.2.3"}}), 1);
  // Every family serialises; counters end in _total.
  std::string text = prometheus::TextSerializer().Serialize(fams);
  EXPECT_NE(text.find("# TYPE nbdcsi_volume_requests_total counter"), std::string::npos);
  for (const auto& f : fams) {
    if (f.type == prometheus::MetricType::Counter) {
      EXPECT_TRUE(f.name.ends_with("_total")) << f.name;
    }
    EXPECT_TRUE(f.name.starts_with("nbdcsi_")) << f.name;
  }
}

// Replicated volumes' targets (issue 16): absent until the cluster agent runs, then one series
// per target and per replica.
TEST_F(CollectorTest, TargetsAppearOnceSet) {
  DatapathCollector c(*pool_, nullptr, nullptr, "t");
  auto none = c.Collect();
  for (const auto& f : none) EXPECT_FALSE(f.name.starts_with("nbdcsi_target_")) << f.name;
  TargetSample t;
  t.volume = "rv";
  t.epoch = 3;
  t.degraded = true;
  t.acked_degraded = 913;
  t.replicas = {{"node-a", true, 0, 0}, {"node-b", false, 8 * kMiB, 5}};
  c.SetTargets([t] { return std::vector<TargetSample>{t}; });
  auto fams = c.Collect();
  EXPECT_EQ(Gauge(fams, "nbdcsi_target_epoch", {{"volume", "rv"}}), 3);
  EXPECT_EQ(Gauge(fams, "nbdcsi_target_degraded", {{"volume", "rv"}}), 1);
  EXPECT_EQ(Gauge(fams, "nbdcsi_target_stopped", {{"volume", "rv"}}), 0);
  EXPECT_EQ(Counter(fams, "nbdcsi_target_degraded_writes_total", {{"volume", "rv"}}), 913);
  EXPECT_EQ(Gauge(fams, "nbdcsi_target_replica_in_sync", {{"volume", "rv"}, {"node", "node-a"}}),
            1);
  EXPECT_EQ(Gauge(fams, "nbdcsi_target_replica_in_sync", {{"volume", "rv"}, {"node", "node-b"}}),
            0);
  EXPECT_EQ(Gauge(fams, "nbdcsi_target_replica_out_of_sync_bytes",
                  {{"volume", "rv"}, {"node", "node-b"}}),
            8.0 * kMiB);
  EXPECT_EQ(Counter(fams, "nbdcsi_target_replica_errors_total",
                    {{"volume", "rv"}, {"node", "node-b"}}),
            5);
}

// Schedules (issue 18): absent until the runner is set, then per volume and kind the last run's
// time and success and the next fire time; a backup still running has no success sample.
TEST_F(CollectorTest, SchedulesAppearOnceSet) {
  DatapathCollector c(*pool_, nullptr, nullptr, "t");
  for (const auto& f : c.Collect()) EXPECT_FALSE(f.name.starts_with("nbdcsi_schedule_")) << f.name;
  ScheduleRunStatus snap;
  snap.kind = "snapshot";
  snap.last_run_unix_ns = 1'800'000'000'000'000'000;
  snap.result = "error";
  snap.next_fire_unix_ns = 1'800'000'900'000'000'000;
  ScheduleRunStatus backup;
  backup.kind = "backup";
  backup.last_run_unix_ns = 1'800'000'000'000'000'000;
  backup.result = "running";
  backup.next_fire_unix_ns = 1'800'086'400'000'000'000;
  c.SetSchedules([=] {
    return std::vector<std::pair<std::string, ScheduleRunStatus>>{{"v", snap}, {"v", backup}};
  });
  auto fams = c.Collect();
  EXPECT_EQ(Gauge(fams, "nbdcsi_schedule_last_run_timestamp_seconds",
                  {{"volume", "v"}, {"kind", "snapshot"}}),
            1.8e9);
  EXPECT_EQ(Gauge(fams, "nbdcsi_schedule_last_run_success", {{"volume", "v"}, {"kind", "snapshot"}}),
            0);
  EXPECT_EQ(Gauge(fams, "nbdcsi_schedule_next_run_timestamp_seconds",
                  {{"volume", "v"}, {"kind", "backup"}}),
            1800086400.0);
  for (const auto& f : fams) {
    if (f.name != "nbdcsi_schedule_last_run_success") continue;
    EXPECT_EQ(f.metric.size(), 1u) << "the running backup has no success sample";
  }
  c.SetSchedules(nullptr);
  for (const auto& f : c.Collect()) EXPECT_FALSE(f.name.starts_with("nbdcsi_schedule_")) << f.name;
}

// ---- the HTTP endpoint ----------------------------------------------------------------------

std::pair<int, std::string> Get(int port, const std::string& path) {
  return test::HttpGet(port, path);
}

TEST_F(CollectorTest, ServesMetricsAndProbes) {
  int port = test::FreeLoopbackPort();
  ASSERT_GT(port, 0);
  std::atomic<bool> ready{false};
  HealthChecks hc;
  hc.live = [] { return std::string(); };
  hc.ready = [&] {
    return ready.load() ? std::string() : std::string("NBD listeners not started");
  };
  auto coll = std::make_shared<DatapathCollector>(*pool_, nullptr, nullptr, "t");
  auto srv = MetricsServer::Start("127.0.0.1:" + std::to_string(port), coll, hc);
  ASSERT_TRUE(srv.ok()) << srv.status().message();
  EXPECT_EQ((*srv)->port(), port);

  auto [code, body] = Get(port, "/metrics");
  EXPECT_EQ(code, 200);
  EXPECT_NE(body.find("nbdcsi_pool_capacity_bytes "), std::string::npos) << body;
  EXPECT_NE(body.find("nbdcsi_volume_requests_total{volume=\"v\",op=\"read\"} 0"),
            std::string::npos)
      << body;
  EXPECT_EQ(Get(port, "/healthz"), std::make_pair(200, std::string("ok\n")));
  EXPECT_EQ(Get(port, "/readyz"), std::make_pair(503, std::string("NBD listeners not started\n")));
  ready = true;
  EXPECT_EQ(Get(port, "/readyz"), std::make_pair(200, std::string("ok\n")));
  EXPECT_EQ(Get(port, "/nothing").first, 404);

  // A second server on the same port is refused with a clear error, not an exception.
  auto again = MetricsServer::Start("127.0.0.1:" + std::to_string(port), coll, hc);
  EXPECT_FALSE(again.ok());
  srv->reset();
  EXPECT_EQ(Get(port, "/healthz").first, -1) << "stopped means closed";
}

TEST(MetricsListen, Validation) {
  EXPECT_EQ(ParseMetricsListen("0.0.0.0:9821").value(), "0.0.0.0:9821");
  EXPECT_EQ(ParseMetricsListen("127.0.0.1:1").value(), "127.0.0.1:1");
  EXPECT_EQ(ParseMetricsListen("[::1]:9821").value(), "[::1]:9821");
  for (const char* bad : {"", "9821", "localhost:9821", "http://0.0.0.0:9821", "1.2.3.4",
                          "1.2.3.4:0", "1.2.3.4:65536", "1.2.3.4:port", "[::1"}) {
    auto r = ParseMetricsListen(bad);
    EXPECT_FALSE(r.ok()) << bad;
    if (!r.ok()) {
      EXPECT_EQ(r.status().code(), EINVAL) << bad;
    }
  }
}

}  // namespace
}  // namespace nbdcsi::datapath
