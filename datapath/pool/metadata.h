// The schema of the pool's metadata files and their JSON form: DIR/volumes/NAME.json and
// DIR/snapshots/NAME.json (layout in pool.h). Pure functions over bytes, with no file access, so
// the parsers can be fuzzed and unit-tested on any input; writing the files durably is
// commit.cpp's job, finding and reading them load.cpp's.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "common/status.h"
#include "common/volume_schedule.h"
#include "datapath/pool/qos.h"

namespace nbdcsi::datapath {

// Both kinds of file carry it; a file of another version is not loaded (the volume is broken).
inline constexpr int kMetaVersion = 1;

// What NAME.json of a volume holds. The QoS limits are stored as the user gave them (per-GiB keys
// unresolved) so that a resize re-resolves them.
struct VolumeMeta {
  std::string name;
  uint64_t size = 0;
  int64_t created_unix_ns = 0;
  bool read_only = false;
  QosLimits qos;
  std::string source;           // "", "snapshot/NAME" or "volume/NAME"
  std::string state = "ready";  // "ready" | "copying" | "failed"
  std::string error;            // why a background fill failed
  // The highest epoch a target has fenced this volume to (Pool::FenceVolume); 0 = never fenced.
  // Written only when not 0, so files of volumes that never saw an epoch are unchanged. Not
  // carried into snapshots or clones: a new volume starts at 0.
  uint64_t fence_epoch = 0;
  // Recurring snapshots and backups (issue 18; nbd-datapathd's schedule runner). Written only
  // when not empty, so files of volumes without one are unchanged and older files load.
  VolumeSchedule schedule;
};

// What NAME.json of a snapshot holds.
struct SnapshotMeta {
  std::string name;
  std::string source_volume;
  uint64_t size = 0;
  int64_t created_unix_ns = 0;
  std::string method;  // "reflink" | "copy"
  std::string state;   // "ready" | "copying" | "failed"
  std::string error;
};

// The text written to NAME.json (pretty-printed, with a trailing newline).
std::string ToJson(const VolumeMeta& m);
std::string ToJson(const SnapshotMeta& m);

// Parse the bytes of a metadata file whose file name says it is for `expected_name`. Anything the
// pool would not have written is EINVAL with a message that says what is wrong: invalid JSON, not
// an object, a version this build does not read, a missing field or one of the wrong type, a
// record that names another object than its file, or a name, size or QoS limit that breaks the
// pool's rules (rules.h). Fields absent in files written before snapshots existed ("source",
// "state" of volumes) take the values of a blank, ready volume. Never throws.
StatusOr<VolumeMeta> ParseVolumeMetadata(std::string_view json, std::string_view expected_name);
StatusOr<SnapshotMeta> ParseSnapshotMetadata(std::string_view json,
                                             std::string_view expected_name);

}  // namespace nbdcsi::datapath
