// What nbd-datapathd tells Prometheus, read from the live objects at scrape time.
//
// Nothing here runs on the I/O path: the workers only bump their own shard of each volume's
// counters (pool/stats.h), and Collect() folds the shards when Prometheus asks. Names follow
// Prometheus' conventions (nbdcsi_ prefix, _total counters, base units _bytes and _seconds);
// labels are bounded (volume name, op, errno name, attachment mode), never request ids.
#pragma once

#include <functional>
#include <vector>

#include <prometheus/collectable.h>
#include <prometheus/metric_family.h>

#include "datapath/attach/record.h"
#include "datapath/engine/worker.h"
#include "datapath/pool/pool.h"

namespace nbdcsi::datapath {

// The op label of each OpKind.
const char* OpLabel(OpKind kind);

class DatapathCollector : public prometheus::Collectable {
 public:
  // `engine` (the workers' counters) and `attachments` (AttachmentManager::List) may be empty:
  // not started yet, or a unit test without them. What they read must outlive the collector's
  // use: stop the server first.
  DatapathCollector(Pool& pool, std::function<EngineCounters()> engine,
                    std::function<std::vector<AttachmentRecord>()> attachments,
                    std::string version);
  std::vector<prometheus::MetricFamily> Collect() const override;

 private:
  Pool& pool_;
  std::function<EngineCounters()> engine_;
  std::function<std::vector<AttachmentRecord>()> attachments_;
  std::string version_;
};

}  // namespace nbdcsi::datapath
