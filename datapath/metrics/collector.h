// What nbd-datapathd tells Prometheus, read from the live objects at scrape time.
//
// Nothing here runs on the I/O path: the workers only bump their own shard of each volume's
// counters (pool/stats.h), and Collect() folds the shards when Prometheus asks. Names follow
// Prometheus' conventions (nbdcsi_ prefix, _total counters, base units _bytes and _seconds);
// labels are bounded (volume name, op, errno name, attachment mode), never request ids.
#pragma once

#include <functional>
#include <mutex>
#include <string>
#include <vector>

#include <prometheus/collectable.h>
#include <prometheus/metric_family.h>

#include "datapath/attach/record.h"
#include "datapath/engine/worker.h"
#include "datapath/pool/pool.h"
#include "datapath/schedule/status.h"

namespace nbdcsi::datapath {

// The op label of each OpKind.
const char* OpLabel(OpKind kind);

// A replicated volume's target on this node (issue 16), flattened from datapath/replica's
// TargetInfo so that the metrics do not depend on the replica layer.
struct TargetSample {
  struct Replica {
    std::string node;
    bool in_sync = true;
    uint64_t out_of_sync_bytes = 0;  // its bitmap, while out of sync
    uint64_t errors = 0;             // requests that failed on it
  };
  std::string volume;
  uint64_t epoch = 0;
  bool degraded = false;
  bool stopped = false;
  uint64_t acked_degraded = 0;
  std::vector<Replica> replicas;
};

class DatapathCollector : public prometheus::Collectable {
 public:
  // `engine` (the workers' counters) and `attachments` (AttachmentManager::List) may be empty:
  // not started yet, or a unit test without them. What they read must outlive the collector's
  // use: stop the server first.
  DatapathCollector(Pool& pool, std::function<EngineCounters()> engine,
                    std::function<std::vector<AttachmentRecord>()> attachments,
                    std::string version);
  std::vector<prometheus::MetricFamily> Collect() const override;
  // The replicated targets open here; set once the cluster agent runs (any thread, also while
  // scrapes run).
  void SetTargets(std::function<std::vector<TargetSample>()> targets);
  // The schedule runner's last runs (datapath/schedule): per volume and kind, the last run's time
  // and success and the next fire time. Called at scrape time, under the collector's lock.
  void SetSchedules(ScheduleRunsFn runs);

 private:
  void CollectTargets(std::vector<prometheus::MetricFamily>& out) const;
  void CollectSchedules(std::vector<prometheus::MetricFamily>& out) const;

  Pool& pool_;
  std::function<EngineCounters()> engine_;
  std::function<std::vector<AttachmentRecord>()> attachments_;
  std::string version_;
  mutable std::mutex targets_mu_;
  std::function<std::vector<TargetSample>()> targets_;
  mutable std::mutex schedules_mu_;
  ScheduleRunsFn schedules_;  // guarded by schedules_mu_
};

}  // namespace nbdcsi::datapath
