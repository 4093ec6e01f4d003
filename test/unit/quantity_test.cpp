#include "common/quantity.h"

#include <limits>
#include <random>

#include <gtest/gtest.h>

namespace nbdcsi {
namespace {

constexpr uint64_t kMax = std::numeric_limits<uint64_t>::max();

struct Good {
  const char* in;
  uint64_t want;
};

TEST(ParseQuantity, AcceptsKubernetesForms) {
  const Good cases[] = {
      {"0", 0},
      {"1", 1},
      {"+4096", 4096},
      {"007", 7},
      {"1Ki", 1024},
      {"1Mi", 1ull << 20},
      {"1Gi", 1ull << 30},
      {"1Ti", 1ull << 40},
      {"1Pi", 1ull << 50},
      {"1Ei", 1ull << 60},
      {"15Ei", 15ull << 60},
      {"1k", 1000},
      {"1M", 1000000},
      {"1G", 1000000000},
      {"1T", 1000000000000},
      {"1P", 1000000000000000},
      {"1E", 1000000000000000000},
      {"18E", 18000000000000000000ull},
      {"1.5Gi", 1610612736},
      {"0.5Ki", 512},
      {".5Ki", 512},
      {"5.Ki", 5120},
      {"1.25Mi", 1310720},
      {"2.000Gi", 2ull << 30},
      {"0.001k", 1},
      {"1.5k", 1500},
      {"1e9", 1000000000},
      {"1E9", 1000000000},
      {"1e+3", 1000},
      {"15e2", 1500},
      {"2500e-1", 250},
      {"1000m", 1},
      {"2000000u", 2},
      {"3000000000n", 3},
      {"18446744073709551615", kMax},
      {"0Ei", 0},
      {"0.0e99999999", 0},
      {"0000000000000000000000000000000000001", 1},
      {"1.000000000000000000000000000000000000", 1},
      // 2^-60 Ei is exactly one byte; needs more precision than a double or a uint128.
      {"0.000000000000000000867361737988403547205962240695953369140625Ei", 1},
  };
  for (const auto& c : cases) {
    auto r = ParseQuantity(c.in);
    ASSERT_TRUE(r.ok()) << c.in << ": " << r.status().message();
    EXPECT_EQ(*r, c.want) << c.in;
  }
}

struct Bad {
  const char* in;
  int err;
  const char* says;  // a substring of the message
};

TEST(ParseQuantity, RejectsWithClearErrors) {
  const Bad cases[] = {
      {"", EINVAL, "empty"},
      {"-1", EINVAL, "negative"},
      {"-1Gi", EINVAL, "negative"},
      {"1Gx", EINVAL, "unknown suffix \"Gx\""},
      {"1K", EINVAL, "did you mean"},
      {"1GB", EINVAL, "drop the \"B\""},
      {"1GiB", EINVAL, "did you mean \"Gi\""},
      {"1ki", EINVAL, "unknown suffix"},
      {"Gi", EINVAL, "does not start with a number"},
      {".", EINVAL, "does not start with a number"},
      {"abc", EINVAL, "does not start with a number"},
      {"1.2.3", EINVAL, "unexpected \".3\""},
      {"1 Gi", EINVAL, "whitespace"},
      {" 1", EINVAL, "whitespace"},
      {"1\n", EINVAL, "whitespace"},
      {"1e", EINVAL, "unknown suffix \"e\""},
      {"1e+", EINVAL, "exponent has no digits"},
      {"1e3Ki", EINVAL, "after the exponent"},
      {"1.5", EINVAL, "not a whole number"},
      {"0.1Ki", EINVAL, "not a whole number"},
      {"1m", EINVAL, "not a whole number"},
      {"1e-1", EINVAL, "not a whole number"},
      {"1e-999999999", EINVAL, "not a whole number"},
      {"1+1", EINVAL, "unexpected"},
      {"0x10", EINVAL, "unknown suffix"},
      {"18446744073709551616", ERANGE, "too large"},
      {"16Ei", ERANGE, "too large"},
      {"19E", ERANGE, "too large"},
      {"1e20", ERANGE, "too large"},
      {"1e999999999999", ERANGE, "too large"},
      {"99999999999999999999999999999999Ki", ERANGE, "too large"},
  };
  for (const auto& c : cases) {
    auto r = ParseQuantity(c.in);
    ASSERT_FALSE(r.ok()) << "accepted \"" << c.in << "\"";
    EXPECT_EQ(r.status().code(), c.err) << c.in << ": " << r.status().message();
    EXPECT_NE(r.status().message().find(c.says), std::string::npos)
        << c.in << ": " << r.status().message();
    if (*c.in) {
      EXPECT_NE(r.status().message().find(std::string("\"") + c.in), std::string::npos)
          << "message does not quote the input: " << r.status().message();
    }
  }
}

TEST(ParseQuantity, RejectsOverlongInput) {
  auto r = ParseQuantity(std::string(200, '1'));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), EINVAL);
  EXPECT_NE(r.status().message().find("longer than"), std::string::npos);
}

TEST(FormatQuantity, LargestExactBinaryUnit) {
  const Good cases[] = {
      {"0", 0},        {"1", 1},           {"1023", 1023},      {"1Ki", 1024},
      {"4097", 4097},  {"512Mi", 512ull << 20}, {"1536Mi", 1536ull << 20}, {"1Gi", 1ull << 30},
      {"1Ei", 1ull << 60}, {"15Ei", 15ull << 60}, {"18446744073709551615", kMax},
      {"16383Pi", kMax - (1ull << 50) + 1},
  };
  for (const auto& c : cases) EXPECT_EQ(FormatQuantity(c.want), c.in);
}

TEST(FormatQuantity, RoundTripsThroughParse) {
  std::mt19937_64 rng(42);
  for (int i = 0; i < 20000; ++i) {
    uint64_t v = rng() >> (rng() % 64);
    if (i % 3 == 0) v &= ~uint64_t{0} << (10 * (rng() % 7));
    auto r = ParseQuantity(FormatQuantity(v));
    ASSERT_TRUE(r.ok()) << FormatQuantity(v);
    ASSERT_EQ(*r, v) << FormatQuantity(v);
  }
}

TEST(FormatHuman, ReadableUnits) {
  EXPECT_EQ(FormatHuman(0), "0 B");
  EXPECT_EQ(FormatHuman(1023), "1023 B");
  EXPECT_EQ(FormatHuman(1024), "1 KiB");
  EXPECT_EQ(FormatHuman(1536), "1.5 KiB");
  EXPECT_EQ(FormatHuman(1610612736), "1.5 GiB");
  EXPECT_EQ(FormatHuman(1ull << 30), "1 GiB");
  EXPECT_EQ(FormatHuman((1ull << 30) - 1), "1 GiB");  // rounds up a unit, not "1024 MiB"
  EXPECT_EQ(FormatHuman(1288490189), "1.2 GiB");
  EXPECT_EQ(FormatHuman(kMax), "16 EiB");
}

}  // namespace
}  // namespace nbdcsi
