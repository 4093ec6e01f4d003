// Fault-injection points for crash-safety tests.
//
// A fault point marks a step of a multi-step on-disk operation (see datapath/pool/pool.h).
// When the environment variable NBDCSI_FAULT names the point, the process writes one line to
// stderr and calls _exit(kFaultExitCode) right there: no destructors, no stdio flush, no
// unlock, which is what kill -9 at that instant would leave behind (the kernel still has the
// page cache, so this tests ordering, not power loss).
//
// Unset (production), a fault point costs an atomic load and a getpid() comparison.
#pragma once

#include <string>
#include <vector>

namespace nbdcsi {

inline constexpr int kFaultExitCode = 86;

// `name` must be one of KnownFaultPoints(); an unknown name is logged once as a bug.
void FaultPoint(const char* name);

// Every fault point compiled into the project. Tests iterate this list so that a new point is
// exercised (or reported as uncovered) without editing the test.
const std::vector<std::string>& KnownFaultPoints();

}  // namespace nbdcsi
