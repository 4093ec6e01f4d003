#include "common/name_locks.h"

#include <atomic>
#include <future>
#include <thread>

#include <gtest/gtest.h>

namespace nbdcsi {
namespace {

TEST(NameLocks, SecondTryOnTheSameNameIsRefusedUntilTheFirstEnds) {
  NameLocks locks;
  {
    auto a = locks.TryAcquire("v1");
    ASSERT_TRUE(a);
    EXPECT_FALSE(locks.TryAcquire("v1"));
    EXPECT_TRUE(locks.TryAcquire("v2"));  // other names are independent
    EXPECT_TRUE(locks.held("v1"));
  }
  EXPECT_FALSE(locks.held("v1"));
  EXPECT_TRUE(locks.TryAcquire("v1"));
}

TEST(NameLocks, SeveralNamesAreTakenAllOrNothing) {
  NameLocks locks;
  auto b = locks.TryAcquire("b");
  ASSERT_TRUE(b);
  EXPECT_FALSE(locks.TryAcquireAll({"a", "b"}));
  EXPECT_FALSE(locks.held("a")) << "a refused multi-name acquire must not keep the free names";
  auto ac = locks.TryAcquireAll({"c", "a", "a"});  // order and repeats do not matter
  ASSERT_TRUE(ac);
  EXPECT_EQ(ac->names(), (std::vector<std::string>{"a", "c"}));
}

TEST(NameLocks, MovedGuardReleasesOnce) {
  NameLocks locks;
  std::optional<NameLocks::Guard> outer;
  {
    auto g = locks.TryAcquire("x");
    ASSERT_TRUE(g);
    outer.emplace(std::move(*g));
  }  // the moved-from guard is destroyed here and must not release "x"
  EXPECT_TRUE(locks.held("x"));
  outer.reset();
  EXPECT_FALSE(locks.held("x"));
}

TEST(NameLocks, AcquireWaitsForTheHolderThenProceeds) {
  NameLocks locks;
  auto first = std::make_optional(locks.AcquireAll({"v", "s"}));
  std::atomic<bool> got{false};
  auto waiter = std::async(std::launch::async, [&] {
    auto g = locks.AcquireAll({"s", "w"});  // overlaps on "s"
    got = true;
  });
  // The waiter cannot get in while "s" is held: it is blocked in Acquire, which a timed wait on
  // its future shows without sleeping for a guessed duration first.
  EXPECT_EQ(waiter.wait_for(std::chrono::milliseconds(50)), std::future_status::timeout);
  EXPECT_FALSE(got);
  first.reset();
  waiter.get();
  EXPECT_TRUE(got);
  EXPECT_FALSE(locks.held("s"));
  EXPECT_FALSE(locks.held("w"));
}

TEST(NameLocks, OppositeOrderMultiAcquiresDoNotDeadlock) {
  NameLocks locks;
  constexpr int kRounds = 2000;
  auto run = [&](std::vector<std::string> names) {
    for (int i = 0; i < kRounds; ++i) auto g = locks.AcquireAll(names);
  };
  auto t1 = std::async(std::launch::async, run, std::vector<std::string>{"snap", "vol"});
  auto t2 = std::async(std::launch::async, run, std::vector<std::string>{"vol", "snap"});
  ASSERT_EQ(t1.wait_for(std::chrono::seconds(30)), std::future_status::ready);
  ASSERT_EQ(t2.wait_for(std::chrono::seconds(30)), std::future_status::ready);
  EXPECT_FALSE(locks.held("vol"));
}

}  // namespace
}  // namespace nbdcsi
