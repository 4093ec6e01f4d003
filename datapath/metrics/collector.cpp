#include "datapath/metrics/collector.h"

#include <array>
#include <cmath>
#include <limits>
#include <utility>

namespace nbdcsi::datapath {
namespace {

using prometheus::ClientMetric;
using prometheus::MetricFamily;
using prometheus::MetricType;
using Labels = std::vector<ClientMetric::Label>;

MetricFamily Family(std::string name, std::string help, MetricType type) {
  MetricFamily f;
  f.name = std::move(name);
  f.help = std::move(help);
  f.type = type;
  return f;
}

void Add(MetricFamily& f, Labels labels, double value) {
  ClientMetric m;
  m.label = std::move(labels);
  if (f.type == MetricType::Counter) {
    m.counter.value = value;
  } else {
    m.gauge.value = value;
  }
  f.metric.push_back(std::move(m));
}

// Our buckets hold latencies < 2^i us (stats.h); Prometheus' are cumulative "<= le". The bound
// 2^i us is the same edge: a request of exactly 2^i us is counted in the next bucket, one
// microsecond's difference, which is below the resolution of the clock readings anyway.
void AddHistogram(MetricFamily& f, Labels labels,
                  const std::array<uint64_t, kLatencyBuckets>& buckets, uint64_t sum_ns) {
  ClientMetric m;
  m.label = std::move(labels);
  uint64_t cumulative = 0;
  for (int i = 0; i < kLatencyBuckets; ++i) {
    cumulative += buckets[i];
    ClientMetric::Bucket b;
    b.cumulative_count = cumulative;
    b.upper_bound =
        i == kLatencyBuckets - 1 ? std::numeric_limits<double>::infinity() : std::ldexp(1e-6, i);
    m.histogram.bucket.push_back(b);
  }
  m.histogram.sample_count = cumulative;
  m.histogram.sample_sum = static_cast<double>(sum_ns) / 1e9;
  f.metric.push_back(std::move(m));
}

}  // namespace

const char* OpLabel(OpKind kind) {
  // Indexed by OpKind (stats.h: kRead, kWrite, kFlush, kTrim, kWriteZeroes, kBlockStatus).
  static constexpr std::array<const char*, kOpKinds> kLabels = {
      "read", "write", "flush", "trim", "zero", "block_status"};
  static_assert(static_cast<int>(OpKind::kBlockStatus) == kOpKinds - 1);
  const auto i = static_cast<size_t>(kind);
  return i < kLabels.size() ? kLabels[i] : "?";
}

DatapathCollector::DatapathCollector(Pool& pool, std::function<EngineCounters()> engine,
                                     std::function<std::vector<AttachmentRecord>()> attachments,
                                     std::string version)
    : pool_(pool),
      engine_(std::move(engine)),
      attachments_(std::move(attachments)),
      version_(std::move(version)) {}

namespace {

using T = MetricType;

// A family of one unlabelled sample.
void AddSingle(std::vector<MetricFamily>& out, const char* name, const char* help, MetricType type,
               double v) {
  MetricFamily f = Family(name, help, type);
  Add(f, {}, v);
  out.push_back(std::move(f));
}

void CollectPool(const PoolInfo& info, std::vector<MetricFamily>& out) {
  auto gauge = [&out](const char* name, const char* help, double v) {
    AddSingle(out, name, help, T::Gauge, v);
  };
  gauge("nbdcsi_pool_capacity_bytes", "Bytes usable by the pool (--capacity or the file system).",
        static_cast<double>(info.capacity));
  gauge("nbdcsi_pool_free_bytes", "Bytes free on the pool's file system.",
        static_cast<double>(info.free));
  gauge("nbdcsi_pool_free_reserve_bytes",
        "Bytes of the pool's file system kept free (--free-reserve): below it nothing more is "
        "provisioned.",
        static_cast<double>(info.free_reserve));
  gauge("nbdcsi_pool_provisioned_bytes", "Sum of the volumes' sizes.",
        static_cast<double>(info.provisioned));
  gauge("nbdcsi_pool_allocated_bytes", "Bytes the volumes take on disk.",
        static_cast<double>(info.allocated));
  gauge("nbdcsi_pool_provisionable_bytes",
        "Bytes that may still be provisioned: capacity x overcommit ratio - provisioned, at most "
        "(free - reserve) x overcommit ratio.",
        static_cast<double>(info.provisionable()));
  gauge("nbdcsi_pool_overcommit_ratio", "Provisioned bytes may reach capacity times this.",
        info.overcommit_ratio);
  gauge("nbdcsi_pool_volumes", "Volumes in the pool.", static_cast<double>(info.volumes));
  gauge("nbdcsi_pool_broken_volumes", "Volumes that could not be loaded (nbdctl pool info).",
        static_cast<double>(info.broken_volumes.size()));
  gauge("nbdcsi_pool_snapshots", "Snapshots in the pool.", static_cast<double>(info.snapshots));
}

// The per-volume families, in the order they are exported.
struct VolumeFamilies {
  MetricFamily ops =
      Family("nbdcsi_volume_requests_total",
             "NBD requests answered, by kind (counted when the reply is queued).", T::Counter);
  MetricFamily bytes =
      Family("nbdcsi_volume_request_bytes_total",
             "Bytes of the successful requests: read, written, trimmed, zeroed.", T::Counter);
  MetricFamily errors =
      Family("nbdcsi_volume_request_errors_total",
             "Requests answered with an error, by kind and NBD error code.", T::Counter);
  MetricFamily latency =
      Family("nbdcsi_volume_request_duration_seconds",
             "Time from a request's header read to its reply queued on the socket.", T::Histogram);
  MetricFamily inflight =
      Family("nbdcsi_volume_inflight_requests", "Requests read and not yet answered.", T::Gauge);
  MetricFamily throttled_s = Family("nbdcsi_volume_qos_throttled_seconds_total",
                                    "Time requests spent waiting for QoS tokens.", T::Counter);
  MetricFamily delayed = Family("nbdcsi_volume_qos_delayed_requests_total",
                                "Requests that waited for QoS tokens at least once.", T::Counter);
  MetricFamily conns = Family("nbdcsi_volume_connections", "Open NBD connections.", T::Gauge);
  MetricFamily prov = Family("nbdcsi_volume_provisioned_bytes", "The volume's size.", T::Gauge);
  MetricFamily alloc = Family("nbdcsi_volume_allocated_bytes",
                              "Bytes the volume's data file takes on disk.", T::Gauge);
  MetricFamily copying = Family("nbdcsi_copy_jobs",
                                "Background copies running (restores and clones without reflink, "
                                "copy snapshots).",
                                T::Gauge);

  // The counters of a volume that serves I/O.
  void AddStats(const std::string& volume, const VolumeStatsSnapshot& s) {
    for (int k = 0; k < kOpKinds; ++k) {
      const char* op = OpLabel(static_cast<OpKind>(k));
      Add(ops, {{"volume", volume}, {"op", op}}, static_cast<double>(s.ops[k]));
      if (k != static_cast<int>(OpKind::kFlush) && k != static_cast<int>(OpKind::kBlockStatus))
        Add(bytes, {{"volume", volume}, {"op", op}}, static_cast<double>(s.bytes[k]));
      // Series appear with their first error: 6 kinds x 9 codes per volume would be mostly 0.
      for (int e = 0; e < kNbdErrnoKinds; ++e) {
        if (s.errors_by_errno[k][e])
          Add(errors, {{"volume", volume}, {"op", op}, {"errno", kNbdErrnoNames[e]}},
              static_cast<double>(s.errors_by_errno[k][e]));
      }
      // Histograms likewise appear once the kind was used (BLOCK_STATUS and TRIM often never).
      if (s.ops[k])
        AddHistogram(latency, {{"volume", volume}, {"op", op}}, s.latency_us[k],
                     s.latency_ns_sum[k]);
    }
    Add(inflight, {{"volume", volume}}, static_cast<double>(s.inflight));
    Add(throttled_s, {{"volume", volume}}, static_cast<double>(s.throttled_ns) / 1e9);
    Add(delayed, {{"volume", volume}}, static_cast<double>(s.throttled_ops));
    Add(conns, {{"volume", volume}}, static_cast<double>(s.connections));
  }

  void MoveTo(std::vector<MetricFamily>& out) {
    for (MetricFamily* f : {&ops, &bytes, &errors, &latency, &inflight, &throttled_s, &delayed,
                            &conns, &prov, &alloc, &copying})
      out.push_back(std::move(*f));
  }
};

void CollectVolumes(Pool& pool, std::vector<MetricFamily>& out) {
  VolumeFamilies f;
  uint64_t volume_copies = 0;
  for (const VolumeInfo& v : pool.List()) {
    Add(f.prov, {{"volume", v.name}}, static_cast<double>(v.size));
    Add(f.alloc, {{"volume", v.name}}, static_cast<double>(v.allocated));
    if (!v.ready) ++volume_copies;
    std::shared_ptr<Volume> vol = pool.Acquire(v.name);
    if (!vol) continue;  // not ready (being filled) or just deleted: it serves no I/O
    f.AddStats(v.name, vol->stats().Snapshot());
  }
  uint64_t snapshot_copies = 0;
  if (auto snaps = pool.ListSnapshots(); snaps.ok()) {
    for (const SnapshotInfo& si : *snaps)
      if (!si.ready && si.error.empty()) ++snapshot_copies;
  }
  Add(f.copying, {{"kind", "volume"}}, static_cast<double>(volume_copies));
  Add(f.copying, {{"kind", "snapshot"}}, static_cast<double>(snapshot_copies));
  f.MoveTo(out);
}

void CollectEngine(const EngineCounters& e, std::vector<MetricFamily>& out) {
  auto gauge = [&out](const char* name, const char* help, uint64_t v) {
    AddSingle(out, name, help, T::Gauge, static_cast<double>(v));
  };
  auto counter = [&out](const char* name, const char* help, uint64_t v) {
    AddSingle(out, name, help, T::Counter, static_cast<double>(v));
  };
  gauge("nbdcsi_engine_workers_running", "io_uring worker threads in their loop.",
        e.workers_running);
  gauge("nbdcsi_engine_throttled_requests", "Requests waiting for QoS tokens now.", e.throttled);
  gauge("nbdcsi_engine_parked_requests",
        "Modifying requests held while a snapshot or clone is taken.", e.parked);
  counter("nbdcsi_engine_cancels_total", "I/O of aborted connections asked to cancel.",
          e.cancels);
  counter("nbdcsi_engine_stale_completions_total",
          "Completions that named a request already gone (a bug when not 0).", e.stale_dropped);
  counter("nbdcsi_engine_invariant_violations_total",
          "Broken request life-cycle rules (a bug when not 0).", e.invariant_violations);
  // Fencing (issue 16): an old target after a failover, refused by this replica.
  counter("nbdcsi_engine_fenced_requests_total",
          "Requests refused with EPERM: their connection's epoch is below the volume's fence.",
          e.fenced_requests);
  counter("nbdcsi_engine_fenced_handshakes_total",
          "Connections refused for a stale epoch, or for none on a fenced volume.",
          e.fenced_handshakes);
}

// Kernel NBD / fuse attachments.
void CollectAttachments(const std::vector<AttachmentRecord>& records,
                        std::vector<MetricFamily>& out) {
  MetricFamily up = Family("nbdcsi_attachment_up",
                           "1 while an attached device's link to the datapath is up, 0 while "
                           "it is down (the kernel queues I/O until the reconnect).",
                           T::Gauge);
  MetricFamily reconnects = Family("nbdcsi_attachment_reconnects_total",
                                   "Times this process gave an attached device fresh sockets "
                                   "(after its start, or when the kernel dropped one).",
                                   T::Counter);
  for (const AttachmentRecord& r : records) {
    Labels l = {{"volume", r.volume}, {"mode", r.mode}, {"device", r.device()}};
    Add(up, l, r.link_ok ? 1 : 0);
    Add(reconnects, l, static_cast<double>(r.reconnects));
  }
  out.push_back(std::move(up));
  out.push_back(std::move(reconnects));
}

}  // namespace

std::vector<MetricFamily> DatapathCollector::Collect() const {
  std::vector<MetricFamily> out;
  MetricFamily build = Family("nbdcsi_datapath_build_info", "nbd-datapathd's version.", T::Gauge);
  Add(build, {{"version", version_}}, 1);
  out.push_back(std::move(build));
  CollectPool(pool_.Info(), out);
  CollectVolumes(pool_, out);
  if (engine_) CollectEngine(engine_(), out);
  if (attachments_) CollectAttachments(attachments_(), out);
  CollectTargets(out);
  CollectSchedules(out);
  return out;
}

void DatapathCollector::SetTargets(std::function<std::vector<TargetSample>()> targets) {
  std::lock_guard<std::mutex> lock(targets_mu_);
  targets_ = std::move(targets);
}

// ---- replicated volumes' targets (issue 16) -----------------------------------------------------
void DatapathCollector::CollectTargets(std::vector<MetricFamily>& out) const {
  std::function<std::vector<TargetSample>()> source;
  {
    std::lock_guard<std::mutex> lock(targets_mu_);
    source = targets_;
  }
  if (!source) return;
  MetricFamily epoch = Family("nbdcsi_target_epoch",
                              "Epoch of the claim under which this node serves the volume.",
                              T::Gauge);
  MetricFamily degraded = Family("nbdcsi_target_degraded",
                                 "1 while a replica of the volume is out of sync.", T::Gauge);
  MetricFamily stopped = Family("nbdcsi_target_stopped",
                                "1 when the target stopped serving (claim lost or fenced): every "
                                "request fails until it is closed and opened again.",
                                T::Gauge);
  MetricFamily degraded_writes =
      Family("nbdcsi_target_degraded_writes_total",
             "Writes acknowledged while some replica missed them (it was out of sync).",
             T::Counter);
  MetricFamily in_sync = Family("nbdcsi_target_replica_in_sync",
                                "1 while the replica is in sync, 0 while it is failing or out.",
                                T::Gauge);
  MetricFamily to_resync = Family("nbdcsi_target_replica_out_of_sync_bytes",
                                  "Bytes an out-of-sync replica is known to miss (its dirty "
                                  "regions): what its resync will copy.",
                                  T::Gauge);
  MetricFamily errors = Family("nbdcsi_target_replica_errors_total",
                               "Requests that failed on the replica (errors and lost "
                               "connections).",
                               T::Counter);
  for (const TargetSample& t : source()) {
    Labels l = {{"volume", t.volume}};
    Add(epoch, l, static_cast<double>(t.epoch));
    Add(degraded, l, t.degraded ? 1 : 0);
    Add(stopped, l, t.stopped ? 1 : 0);
    Add(degraded_writes, l, static_cast<double>(t.acked_degraded));
    for (const auto& r : t.replicas) {
      Labels rl = {{"volume", t.volume}, {"node", r.node}};
      Add(in_sync, rl, r.in_sync ? 1 : 0);
      Add(to_resync, rl, static_cast<double>(r.out_of_sync_bytes));
      Add(errors, rl, static_cast<double>(r.errors));
    }
  }
  for (MetricFamily* f : {&epoch, &degraded, &stopped, &degraded_writes, &in_sync, &to_resync,
                          &errors})
    out.push_back(std::move(*f));
}

void DatapathCollector::SetSchedules(ScheduleRunsFn runs) {
  std::lock_guard<std::mutex> lock(schedules_mu_);
  schedules_ = std::move(runs);
}

// ---- recurring snapshots and backups (issue 18) ---------------------------------------------------
void DatapathCollector::CollectSchedules(std::vector<MetricFamily>& out) const {
  std::vector<std::pair<std::string, ScheduleRunStatus>> runs;
  {
    // Under the lock: once SetSchedules(nullptr) returns, no scrape still reads the runner.
    std::lock_guard<std::mutex> lock(schedules_mu_);
    if (!schedules_) return;
    runs = schedules_();
  }
  MetricFamily last = Family("nbdcsi_schedule_last_run_timestamp_seconds",
                             "When the volume's schedule of this kind last ran (Unix time).",
                             T::Gauge);
  MetricFamily ok = Family("nbdcsi_schedule_last_run_success",
                           "1 when the last run succeeded, 0 when it failed (a backup still "
                           "running has no sample).",
                           T::Gauge);
  MetricFamily next = Family("nbdcsi_schedule_next_run_timestamp_seconds",
                             "The next fire time of the volume's schedule of this kind (Unix "
                             "time).",
                             T::Gauge);
  for (const auto& [volume, r] : runs) {
    Labels l = {{"volume", volume}, {"kind", r.kind}};
    if (r.last_run_unix_ns) Add(last, l, static_cast<double>(r.last_run_unix_ns / 1000000000));
    if (r.result == "ok" || r.result == "error") Add(ok, l, r.result == "ok" ? 1 : 0);
    if (r.next_fire_unix_ns) Add(next, l, static_cast<double>(r.next_fire_unix_ns / 1000000000));
  }
  // Only families with samples: a node without schedules adds nothing to the scrape.
  for (MetricFamily* f : {&last, &ok, &next}) {
    if (!f->metric.empty()) out.push_back(std::move(*f));
  }
}

}  // namespace nbdcsi::datapath
