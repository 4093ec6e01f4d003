#include "datapath/engine/export_name.h"

#include "datapath/engine/backend.h"
#include "datapath/engine/frontend.h"
#include "datapath/pool/rules.h"

namespace nbdcsi::datapath {

StatusOr<ExportName> ParseExportName(std::string_view name) {
  const size_t at = name.find('@');
  if (at == std::string_view::npos) return ExportName{std::string(name), false, 0};
  const std::string_view base = name.substr(0, at), suffix = name.substr(at);
  if (base.empty()) {
    return Error(EINVAL, "export name \"{}\" has no volume before '{}'", name, suffix);
  }
  if (suffix == kGrowableSuffix) return ExportName{std::string(base), true, 0};
  if (suffix == kTargetSuffix) return ExportName{std::string(base), false, 0, true};
  if (!suffix.starts_with(kEpochSuffix)) {
    if (suffix.starts_with(kGrowableSuffix) && suffix.find(kEpochSuffix) != std::string::npos) {
      return Error(EINVAL, "export name \"{}\": {} and {}N cannot be combined", name,
                   kGrowableSuffix, kEpochSuffix);
    }
    // The target is the only client of its replicas' epochs and is never a growable window:
    // either combination is a caller's mistake, said as such rather than as an unknown suffix.
    const bool has_target = suffix.find(kTargetSuffix) != std::string_view::npos;
    const bool known_first =
        suffix.starts_with(kTargetSuffix) || suffix.starts_with(kGrowableSuffix);
    if (has_target && known_first && suffix.find('@', 1) != std::string_view::npos) {
      return Error(EINVAL, "export name \"{}\": {} cannot be combined with another suffix", name,
                   kTargetSuffix);
    }
    return Error(EINVAL, "export name \"{}\": unknown suffix \"{}\" (expected {}, {} or {}N)", name,
                 suffix, kGrowableSuffix, kTargetSuffix, kEpochSuffix);
  }
  const std::string_view digits = suffix.substr(kEpochSuffix.size());
  if (digits.find(kTargetSuffix) != std::string_view::npos) {
    return Error(EINVAL, "export name \"{}\": {} cannot be combined with another suffix", name,
                 kTargetSuffix);
  }
  if (digits.find('@') != std::string_view::npos) {
    return Error(EINVAL, "export name \"{}\": {}N cannot be combined with another suffix", name,
                 kEpochSuffix);
  }
  auto bad = [&](const char* why) {
    return Error(EINVAL, "export name \"{}\": epoch \"{}\" {} (a decimal number 1..{} with no "
                 "sign or leading zeros)", name, digits, why, kMaxFenceEpoch);
  };
  if (digits.empty()) return bad("is empty");
  uint64_t epoch = 0;
  for (char ch : digits) {
    if (ch < '0' || ch > '9') return bad("is not a decimal number");
    const uint64_t d = static_cast<uint64_t>(ch - '0');
    if (epoch > (kMaxFenceEpoch - d) / 10) return bad("is too large");
    epoch = epoch * 10 + d;
  }
  if (digits.front() == '0') return bad(epoch == 0 ? "is 0" : "has a leading zero");
  return ExportName{std::string(base), false, epoch};
}

}  // namespace nbdcsi::datapath
