// Kubernetes resource.Quantity, restricted to what a byte size can be.
//
// Sizes arrive from operators (nbdctl --size 1Gi), PVC requests and StorageClass parameters,
// so the parser follows the Kubernetes grammar exactly and is strict: a value that is not a
// whole number of bytes, or does not fit in uint64, is rejected rather than rounded.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "common/status.h"

namespace nbdcsi {

// Accepts: plain integers ("4096"), binary suffixes Ki Mi Gi Ti Pi Ei, decimal suffixes
// n u m k M G T P E, decimal fractions ("1.5Gi"), exponents ("1e9", "5E-1k") and a leading '+'.
// Errors: EINVAL for empty, negative, junk, unknown suffix or a non-whole byte count; ERANGE when
// the value does not fit in uint64. The message quotes the input and says what is wrong.
StatusOr<uint64_t> ParseQuantity(std::string_view s);

// The shortest exact form using the largest binary unit that divides the value:
// 1073741824 -> "1Gi", 1610612736 -> "1536Mi", 4097 -> "4097", 0 -> "0".
// ParseQuantity(FormatQuantity(x)) == x for every x.
std::string FormatQuantity(uint64_t bytes);

// For people, not for parsing back: "1.5 GiB", "512 B", "1023.99 MiB" (at most two decimals).
std::string FormatHuman(uint64_t bytes);

}  // namespace nbdcsi
