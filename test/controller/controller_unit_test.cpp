// Pure pieces of the controller, table-driven: CreateVolume's size rules and the pagination
// tokens (everything else runs against real daemons in controller_acceptance_test).
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "common/volume_rules.h"
#include "controller/csi_request.h"
#include "controller/paging.h"

namespace nbdcsi::controller {
namespace {

constexpr uint64_t kGiB = uint64_t{1} << 30;

struct SizeCase {
  int64_t required, limit;  // -2: no capacity_range at all
  uint64_t min_size;
  uint64_t want;  // 0: an error
  int err;
};

TEST(VolumeSizeFor, Table) {
  const SizeCase cases[] = {
      {-2, 0, 0, kGiB, 0},                  // nothing given: the default
      {0, 0, 0, kGiB, 0},                   // an empty range: the default too
      {1, 0, 0, 4096, 0},                   // rounded up to 4 KiB
      {4096, 0, 0, 4096, 0},                // aligned stays
      {5000, 0, 0, 8192, 0},
      {0, 3 * 1048576 + 100, 0, 3 * 1048576, 0},  // only a limit: default brought down
      {0, 100, 0, 0, ERANGE},               // a limit below one block
      {5000, 6000, 0, 0, ERANGE},           // no 4 KiB multiple in the range
      {8192, 8192, 0, 8192, 0},
      {2 * 1048576, 1048576, 0, 0, EINVAL},  // limit < required
      {-1, 0, 0, 0, EINVAL},
      {0, -1, 0, 0, EINVAL},
      {-2, 0, 4 * 1048576, 4 * 1048576, 0},  // a source: never smaller than it
      {1048576, 0, 4 * 1048576, 4 * 1048576, 0},
      {8 * 1048576, 0, 4 * 1048576, 8 * 1048576, 0},  // bigger than the source grows it
      {0, 1048576, 4 * 1048576, 0, ERANGE},           // the source does not fit the limit
      {INT64_MAX, 0, 0, 0x8000000000000000ull, 0},    // rounding near the top does not wrap
  };
  for (const auto& c : cases) {
    ::csi::v1::CapacityRange r;
    if (c.required != -2) {
      r.set_required_bytes(c.required);
      r.set_limit_bytes(c.limit);
    }
    // As CreateVolume calls it: a source's size is also the default.
    auto got = VolumeSizeFor(c.required == -2 ? nullptr : &r, c.min_size ? c.min_size : kGiB,
                             c.min_size);
    SCOPED_TRACE(::testing::Message() << "required " << c.required << " limit " << c.limit
                                      << " min " << c.min_size);
    if (c.err) {
      ASSERT_FALSE(got.ok());
      EXPECT_EQ(got.status().code(), c.err) << got.status().message();
      EXPECT_FALSE(got.status().message().empty());
    } else {
      ASSERT_TRUE(got.ok()) << got.status().message();
      EXPECT_EQ(*got, c.want);
      EXPECT_EQ(*got % kVolumeSizeAlignment, 0u);
    }
  }
}

TEST(PageToken, RoundTripsAndRejectsForeignTokens) {
  const std::vector<std::string> ids = {"v1:node-a:pvc-1", "s1:n:x", std::string("\x00\xff:", 3)};
  for (const std::string& id : ids) {
    auto t = EncodePageToken(id);
    auto back = DecodePageToken(t);
    ASSERT_TRUE(back.has_value()) << t;
    EXPECT_EQ(*back, id);
  }
  for (const char* bad : {"", "invalid-token", "p1.", "p1.a", "p1.zz", "p1.AB", "p2.6162",
                          "6162"}) {
    EXPECT_FALSE(DecodePageToken(bad).has_value()) << bad;
  }
  // Ordering of tokens follows the ids (the controller compares decoded ids, not tokens).
  EXPECT_EQ(*DecodePageToken(EncodePageToken("a")), "a");
}

}  // namespace
}  // namespace nbdcsi::controller
