// What every test of the NBD engine checks when it ends, whatever it did: no completion named a
// request that was gone, and no rule of the request life cycle was broken (worker.h
// EngineCounters).
#pragma once

#include <gtest/gtest.h>

#include "datapath/engine/frontend.h"

namespace nbdcsi::test {

inline void ExpectEngineRulesKept(const datapath::NbdFrontend& frontend) {
  const datapath::EngineCounters ec = frontend.counters();
  EXPECT_EQ(ec.stale_dropped, 0u);
  EXPECT_EQ(ec.invariant_violations, 0u);
}

}  // namespace nbdcsi::test
