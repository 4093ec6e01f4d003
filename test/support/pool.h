// Opening a pool in a test: one line instead of four, and a failure that says which directory.
#pragma once

#include <memory>
#include <string>

#include <gtest/gtest.h>

#include "datapath/pool/pool.h"

namespace nbdcsi::test {

// Pool options for a pool in DIR/pool, everything else default.
inline datapath::PoolOptions PoolIn(const std::string& dir) {
  datapath::PoolOptions o;
  o.dir = dir + "/pool";
  return o;
}

// Pool::Open(opts) into *out: ASSERT_TRUE(test::OpenPool(opts, &pool_)).
inline ::testing::AssertionResult OpenPool(const datapath::PoolOptions& opts,
                                           std::unique_ptr<datapath::Pool>* out) {
  auto p = datapath::Pool::Open(opts);
  if (!p.ok()) {
    return ::testing::AssertionFailure() << "open pool " << opts.dir << ": " << p.status().message();
  }
  *out = std::move(p.value());
  return ::testing::AssertionSuccess();
}

}  // namespace nbdcsi::test
