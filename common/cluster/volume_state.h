// The cluster-wide state of one node-independent volume (issue 16), the unit the ClusterStore
// reads and changes atomically, and its JSON form as stored.
//
// Epoch: rises by one each time a node becomes the volume's target (ClusterStore::ClaimTarget)
// and never otherwise. Replicas refuse writes tagged with an older epoch, so a target that lost
// its claim cannot change data the new target serves.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "common/status.h"

namespace nbdcsi::cluster {

struct VolumeState {
  std::string name;
  uint64_t size_bytes = 0;
  // Node ids holding a replica, sorted, unique.
  std::vector<std::string> replicas;
  // The replicas whose copy is current (sorted, unique, a subset of replicas). Only the target at
  // the current epoch changes it.
  std::vector<std::string> in_sync;
  // The node that holds a live claim on the volume at `epoch`, or empty: the stored value is the
  // last claimant; readers clear it when that claim has lapsed (its lease expired or it released).
  std::string target;
  uint64_t epoch = 0;
  // Set by every ClaimTarget that raises the epoch; cleared only by a clean release
  // (ReleaseTarget with clean: no change in flight, every in-sync replica flushed and identical).
  // A claim that finds it set (or finds the epoch moved past the one it read) follows a target
  // that may have left the in-sync replicas different where writes were in flight: the new
  // target reconciles them (datapath/replica/target.h). Stored only when set ("dirty": true); a
  // state written before the key existed reads as clean.
  bool dirty = false;
  // The CSI id of the snapshot ("s1:NODE:NAME") or single-node volume ("v1:NODE:NAME") the volume
  // was restored or cloned from, "" for a blank one: what CreateVolume's idempotency compares and
  // what the CSI volume reports as its content source. Stored only when set.
  std::string source{};

  bool operator==(const VolumeState&) const = default;
};

// Where a target's claim is recorded (the value of the claim key, attached to its lease).
struct TargetClaim {
  std::string node;
  uint64_t epoch = 0;
  bool operator==(const TargetClaim&) const = default;
};

// The pool's own name rule (common/volume_rules.h), so a cluster volume is always a valid pool
// volume and never contains '/', which would break the key layout. EINVAL naming the rule.
Status ValidateClusterVolumeName(std::string_view name);

// Checks everything the store relies on: the name, node ids (ValidateNodeId), replicas and
// in_sync sorted and unique, in_sync a subset of replicas, target a valid node id or empty.
// EINVAL naming the volume and the broken rule.
Status ValidateVolumeState(const VolumeState& v);

// Sorted and deduplicated copy of `ids`.
std::vector<std::string> SortedUnique(std::vector<std::string> ids);

// Canonical JSON (fixed key order, no whitespace): equal states give equal bytes.
std::string EncodeVolumeState(const VolumeState& v);
// Strict: the value must be an object with exactly the known keys, each of the right type
// (unsigned integers for size_bytes and epoch), and pass ValidateVolumeState. EINVAL saying
// what is wrong; `where` (e.g. the key) leads the message.
StatusOr<VolumeState> DecodeVolumeState(std::string_view json, std::string_view where);

std::string EncodeTargetClaim(const TargetClaim& c);
StatusOr<TargetClaim> DecodeTargetClaim(std::string_view json, std::string_view where);

}  // namespace nbdcsi::cluster
