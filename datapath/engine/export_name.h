// What an NBD export name asks of the datapath: VOLUME, VOLUME@grow (frontend.h
// kGrowableSuffix), VOLUME@epoch=N (fencing, docs/design.md "Fencing") or VOLUME@target (the
// replicated target of VOLUME, served by an ExportBackend: backend.h kTargetSuffix).
//
// '@' is not allowed in volume names (rules.h), so the suffix can never be part of a volume's
// name. N is decimal, 1..kMaxFenceEpoch (2^63-1), with no sign, no leading zeros and no spaces:
// one epoch has exactly one spelling, so two names that differ name different epochs. The two
// suffixes do not combine: a growable window is for a local nbdfuse, an epoch is for a remote
// target's client, and a target is not a pool volume at all (it has no fence epoch of its own
// and a fixed size).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "common/status.h"

namespace nbdcsi::datapath {

inline constexpr std::string_view kEpochSuffix = "@epoch=";

struct ExportName {
  std::string volume;
  bool growable = false;
  uint64_t epoch = 0;  // 0: the name carries no epoch
  bool target = false;  // VOLUME@target: the ExportBackend registered as VOLUME
};

// EINVAL with a message that says what is wrong; a name without '@' is returned as it is (the
// pool decides whether such a volume exists).
StatusOr<ExportName> ParseExportName(std::string_view name);

}  // namespace nbdcsi::datapath
