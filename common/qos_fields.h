// The nine per-volume QoS limits, in one table. Each row is one limit as every layer spells it:
// the field name (the same in the datapath proto QosLimits/QosPatch, the pool's QosLimits and
// QosPatch, NAME.json and nbdctl's JSON output), the StorageClass / VolumeAttributesClass key,
// the nbdctl flag with its help, and how a value is written. Code that must touch every limit
// expands the table instead of listing the nine names again, so a tenth limit is one new row.
#pragma once

#include <cstddef>
#include <cstdint>
#include <iterator>
#include <string_view>
#include <type_traits>

namespace nbdcsi {

// How a limit's value is written: a plain count (IOPS), bytes per second (a Kubernetes quantity
// is accepted), or milliseconds (the burst depth, 32 bits).
enum class QosKind { kCount, kBytes, kMillis };

// The value type of a limit of kind K.
template <QosKind K>
using QosValue = std::conditional_t<K == QosKind::kMillis, uint32_t, uint64_t>;

// X(field, csi_key, nbdctl_flag, kind, nbdctl_help), in the order the keys are documented.
#define NBDCSI_QOS_FIELDS(X)                                                           \
  X(max_iops, "maxIops", "--max-iops", kCount, "Total IOPS limit (0: none)")           \
  X(max_read_iops, "maxReadIops", "--max-read-iops", kCount, "Read IOPS limit")        \
  X(max_write_iops, "maxWriteIops", "--max-write-iops", kCount, "Write IOPS limit")    \
  X(max_bps, "maxBps", "--max-bps", kBytes, "Total bytes/s limit, a quantity (100Mi)") \
  X(max_read_bps, "maxReadBps", "--max-read-bps", kBytes, "Read bytes/s limit")        \
  X(max_write_bps, "maxWriteBps", "--max-write-bps", kBytes, "Write bytes/s limit")    \
  X(iops_per_gib, "iopsPerGiB", "--iops-per-gib", kCount,                              \
    "IOPS per GiB of size (when no --max-iops)")                                       \
  X(bps_per_gib, "bpsPerGiB", "--bps-per-gib", kBytes,                                 \
    "Bytes/s per GiB of size (when no --max-bps)")                                     \
  X(burst_ms, "burstMs", "--burst-ms", kMillis, "Burst depth in ms of the rate (0: default 100)")

// The table as data, for code that loops at run time (parsers, help, error messages).
struct QosField {
  std::string_view field;
  std::string_view csi_key;
  std::string_view flag;
  QosKind kind;
  std::string_view help;
};

inline constexpr QosField kQosFields[] = {
#define NBDCSI_QOS_ROW(f, key, flag, kind, help) {#f, key, flag, QosKind::kind, help},
    NBDCSI_QOS_FIELDS(NBDCSI_QOS_ROW)
#undef NBDCSI_QOS_ROW
};

inline constexpr size_t kQosFieldCount = std::size(kQosFields);

}  // namespace nbdcsi
