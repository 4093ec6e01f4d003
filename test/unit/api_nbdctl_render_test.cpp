// nbdctl's output layer: percentiles from the histogram, table alignment, stable JSON keys.
#include "tools/nbdctl/render.h"

#include <limits>

#include <gtest/gtest.h>

namespace nbdcsi::nbdctl {
namespace {

v1::LatencyHistogram Hist(std::initializer_list<std::pair<int, uint64_t>> counts) {
  v1::LatencyHistogram h;
  for (int i = 0; i < 24; ++i) {
    auto* b = h.add_buckets();
    b->set_upper_bound_us(i == 23 ? std::numeric_limits<uint64_t>::max() : 1ull << i);
  }
  for (auto [i, c] : counts) h.mutable_buckets(i)->set_count(c);
  return h;
}

TEST(Percentile, NearestRank) {
  EXPECT_FALSE(PercentileBucket(Hist({}), 0.5).has_value()) << "no samples";
  auto h = Hist({{3, 50}, {5, 40}, {10, 9}, {12, 1}});  // 100 samples
  EXPECT_EQ(PercentileBucket(h, 0.50), 3u);
  EXPECT_EQ(PercentileBucket(h, 0.51), 5u);
  EXPECT_EQ(PercentileBucket(h, 0.90), 5u);
  EXPECT_EQ(PercentileBucket(h, 0.99), 10u);
  EXPECT_EQ(PercentileBucket(h, 1.0), 12u);
  EXPECT_EQ(BucketLatencyUs(h, 3), 8u);
  EXPECT_EQ(BucketLatencyText(h, 3), "<8us");
  EXPECT_EQ(BucketLatencyText(h, 10), "<1.02ms");
  auto slow = Hist({{23, 1}});
  EXPECT_EQ(PercentileBucket(slow, 0.5), 23u);
  EXPECT_EQ(BucketLatencyUs(slow, 23), 1ull << 22) << "open-ended: its lower bound";
  EXPECT_EQ(BucketLatencyText(slow, 23), ">=4.19s");
}

TEST(Table, AlignsColumnsUnderHeader) {
  Table t{{"NAME", "SIZE"}, {{"a", "1Gi"}, {"longer-name", "512Mi"}}};
  EXPECT_EQ(t.Render(),
            "NAME         SIZE\n"
            "a            1Gi\n"
            "longer-name  512Mi\n");
  EXPECT_EQ(RenderKeyValues({{"Name", "x"}, {"Allocated", "0 B"}}),
            "Name:       x\n"
            "Allocated:  0 B\n");
}

TEST(Json, VolumeKeysAreStable) {
  v1::Volume v;
  v.set_name("data");
  v.set_size_bytes(1ull << 30);
  v.set_created_unix_ns(1'700'000'000'000'000'000);
  v.mutable_qos()->set_max_iops(100);
  v.mutable_effective_qos()->set_iops(100);
  auto j = VolumeJson(v);
  EXPECT_EQ(j["name"], "data");
  EXPECT_EQ(j["size"], "1Gi");
  EXPECT_EQ(j["size_bytes"], 1ull << 30);
  EXPECT_EQ(j["created"], "2023-11-14T22:13:20Z");
  EXPECT_EQ(j["qos"]["max_iops"], 100);
  EXPECT_EQ(j["effective_qos"]["iops"], 100);
  for (const char* k : {"allocated_bytes", "created_unix_ns", "read_only", "open_connections",
                        "data_path"}) {
    EXPECT_TRUE(j.contains(k)) << k;
  }
  for (const char* k : {"max_iops", "max_read_iops", "max_write_iops", "max_bps", "max_read_bps",
                        "max_write_bps", "iops_per_gib", "bps_per_gib", "burst_ms"}) {
    EXPECT_TRUE(j["qos"].contains(k)) << k;
  }
}

TEST(Schedule, JsonAndText) {
  v1::Volume v;
  v.set_name("data");
  EXPECT_TRUE(VolumeJson(v)["schedule"].is_null());
  EXPECT_EQ(ScheduleText(v), "volume \"data\" has no schedule\n");
  auto* s = v.mutable_schedule();
  s->set_snapshot_cron("0 */6 * * *");
  s->set_snapshot_retain(4);
  s->set_backup_cron("30 2 * * *");
  s->set_backup_retain(14);
  s->set_backup_target("s3://b/p");
  auto* r = v.add_schedule_runs();
  r->set_kind("snapshot");
  r->set_cron("0 */6 * * *");
  r->set_last_run_unix_ns(1'700'000'000'000'000'000);
  r->set_result("ok");
  r->set_made("auto-20231114T2213-data");
  r->set_pruned(1);
  r->set_next_fire_unix_ns(1'700'000'000'000'000'000 + 3600'000'000'000);
  auto* b = v.add_schedule_runs();
  b->set_kind("backup");
  b->set_cron("30 2 * * *");
  b->set_result("error");
  b->set_error("no credentials for scheduled backups");
  auto j = VolumeJson(v)["schedule"];
  EXPECT_EQ(j["snapshot_cron"], "0 */6 * * *");
  EXPECT_EQ(j["backup_retain"], 14);
  EXPECT_EQ(j["backup_target"], "s3://b/p");
  ASSERT_EQ(j["runs"].size(), 2u);
  EXPECT_EQ(j["runs"][0]["last_run"], "2023-11-14T22:13:20Z");
  EXPECT_EQ(j["runs"][0]["next_fire"], "2023-11-14T23:13:20Z");
  EXPECT_EQ(j["runs"][0]["made"], "auto-20231114T2213-data");
  EXPECT_EQ(j["runs"][0]["pruned"], 1);
  EXPECT_EQ(j["runs"][1]["last_run"], "");
  EXPECT_EQ(j["runs"][1]["error"], "no credentials for scheduled backups");
  const std::string text = ScheduleText(v);
  EXPECT_NE(text.find("Snapshots:  \"0 */6 * * *\" (UTC), keep 4"), std::string::npos) << text;
  EXPECT_NE(text.find("Backups:    \"30 2 * * *\" (UTC), keep 14, to s3://b/p"),
            std::string::npos)
      << text;
  EXPECT_NE(text.find("snapshot  2023-11-14T22:13:20Z  ok      auto-20231114T2213-data  1"),
            std::string::npos)
      << text;
  EXPECT_NE(text.find("backup error: no credentials for scheduled backups\n"), std::string::npos)
      << text;
  EXPECT_NE(VolumeDetails(v).find("Snapshots:"), std::string::npos);
}

TEST(Json, StatsHavePercentilesAndBuckets) {
  v1::GetVolumeStatsResponse s;
  s.set_name("v");
  *s.mutable_stats()->mutable_read_latency() = Hist({{4, 10}});
  *s.mutable_stats()->mutable_write_latency() = Hist({});
  s.mutable_stats()->mutable_read()->set_ops(10);
  auto j = StatsJson(s);
  EXPECT_EQ(j["ops"]["read"]["ops"], 10);
  EXPECT_EQ(j["latency"]["read"]["p50_us"], 16);
  EXPECT_EQ(j["latency"]["read"]["samples"], 10);
  EXPECT_TRUE(j["latency"]["write"]["p99_us"].is_null());
  ASSERT_EQ(j["latency"]["read"]["buckets"].size(), 24u);
  EXPECT_EQ(j["latency"]["read"]["buckets"][0]["lt_us"], 1);
  EXPECT_TRUE(j["latency"]["read"]["buckets"][23]["lt_us"].is_null());
  auto text = StatsText(s);
  EXPECT_NE(text.find("<16us"), std::string::npos) << text;
}

TEST(Text, PoolShowsOrphans) {
  v1::GetPoolInfoResponse p;
  p.set_capacity_bytes(100ull << 30);
  p.set_provisioned_bytes(50ull << 30);
  p.set_overcommit_ratio(1.5);
  p.add_cleaned_orphans("volumes/x.img");
  auto t = PoolText(p);
  EXPECT_NE(t.find("50 GiB (50.0% of capacity)"), std::string::npos) << t;
  EXPECT_NE(t.find("1.5x"), std::string::npos) << t;
  EXPECT_NE(t.find("volumes/x.img"), std::string::npos) << t;
  EXPECT_EQ(PoolJson(p)["cleaned_orphans"][0], "volumes/x.img");
}

TEST(Text, PoolShowsBrokenVolumesOnePerLine) {
  v1::GetPoolInfoResponse p;
  EXPECT_NE(PoolText(p).find("Broken volumes:    none\n"), std::string::npos) << PoolText(p);
  EXPECT_TRUE(PoolJson(p)["broken_volumes"].is_array());
  EXPECT_TRUE(PoolJson(p)["broken_volumes"].empty());
  p.add_broken_volumes("a: /p/volumes/a.json: invalid JSON");
  p.add_broken_volumes("b: data file /p/volumes/b.img is missing");
  auto t = PoolText(p);
  EXPECT_NE(t.find("Broken volumes:    2 (files kept"), std::string::npos) << t;
  EXPECT_NE(t.find("\n  a: /p/volumes/a.json: invalid JSON\n"), std::string::npos) << t;
  EXPECT_NE(t.find("\n  b: data file /p/volumes/b.img is missing\n"), std::string::npos) << t;
  auto j = PoolJson(p)["broken_volumes"];
  ASSERT_EQ(j.size(), 2u);
  EXPECT_EQ(j[1], "b: data file /p/volumes/b.img is missing");
}

}  // namespace
}  // namespace nbdcsi::nbdctl

namespace nbdcsi::nbdctl {
namespace {

TEST(Ready, TextForEveryState) {
  EXPECT_EQ(ReadyText(true, 0, 0), "yes");
  EXPECT_EQ(ReadyText(false, 0, 0), "no");
  EXPECT_EQ(ReadyText(false, 37, 100), "37%");
  // Every byte copied is not "ready": the copy still has to fsync and commit.
  EXPECT_EQ(ReadyText(false, 100, 100), "99%");
  EXPECT_EQ(ReadyText(false, 1, 3), "33%");
  EXPECT_EQ(ReadyText(false, 5, 100, "ENOSPC"), "failed");
}

TEST(Snapshot, JsonKeysAndTables) {
  v1::ListSnapshotsResponse list;
  auto* s = list.add_snapshots();
  s->set_name("snap-1");
  s->set_source_volume("vol");
  s->set_size_bytes(1ull << 30);
  s->set_method("copy");
  s->set_copy_done_bytes(1ull << 29);
  s->set_copy_total_bytes(1ull << 30);
  auto j = SnapshotJson(*s);
  for (const char* k : {"name", "source_volume", "size_bytes", "size", "allocated_bytes", "created",
                        "created_unix_ns", "method", "ready", "copy_done_bytes",
                        "copy_total_bytes", "error", "data_path"}) {
    EXPECT_TRUE(j.contains(k)) << k;
  }
  EXPECT_EQ(j["size"], "1Gi");
  EXPECT_EQ(j["ready"], false);
  std::string t = SnapshotListTable(list);
  EXPECT_EQ(t.substr(0, t.find('\n')), "NAME    VOLUME  SIZE  ALLOCATED  METHOD  READY  CREATED");
  EXPECT_NE(t.find("snap-1  vol     1Gi"), std::string::npos) << t;
  EXPECT_NE(t.find("copy    50%"), std::string::npos) << t;
  EXPECT_NE(SnapshotDetails(*s).find("no, copying 50%"), std::string::npos) << SnapshotDetails(*s);
  // Once the daemon has mapped the source's data, the percentage counts that data: 3 of
  // 4 MiB allocated is 75 %, although the copy is only half way through the address space.
  s->set_copy_data_done_bytes(3ull << 20);
  s->set_copy_data_total_bytes(4ull << 20);
  t = SnapshotListTable(list);
  EXPECT_NE(t.find("copy    75%"), std::string::npos) << t;
  EXPECT_NE(SnapshotDetails(*s).find("no, copying 75% (3 MiB of 4 MiB allocated data)"),
            std::string::npos)
      << SnapshotDetails(*s);
  EXPECT_EQ(SnapshotJson(*s)["copy_data_total_bytes"], 4ull << 20);
  s->clear_copy_data_total_bytes();
  EXPECT_TRUE(SnapshotJson(*s)["copy_data_total_bytes"].is_null()) << "unknown, not 0";
  s->set_error("disk full");
  EXPECT_NE(SnapshotDetails(*s).find("failed: disk full"), std::string::npos);

  v1::Volume v;
  v.set_name("r");
  v.set_source("snapshot/snap-1");
  v.set_ready(true);
  auto vj = VolumeJson(v);
  EXPECT_EQ(vj["source"], "snapshot/snap-1");
  EXPECT_EQ(vj["ready"], true);
  EXPECT_TRUE(vj.contains("copy_done_bytes") && vj.contains("copy_total_bytes"));
  v1::GetPoolInfoResponse p;
  p.set_reflink(true);
  p.set_snapshots(2);
  p.add_abandoned_copies("s9");
  auto pj = PoolJson(p);
  EXPECT_EQ(pj["reflink"], true);
  EXPECT_EQ(pj["snapshots"], 2);
  EXPECT_EQ(pj["abandoned_copies"], nlohmann::json::array({"s9"}));
  EXPECT_NE(PoolText(p).find("s9 (interrupted by a crash, removed)"), std::string::npos);
}

}  // namespace
}  // namespace nbdcsi::nbdctl
