// The metadata parsers (datapath/pool/metadata.h) fed what a disk, a crash or a careless edit can
// leave in NAME.json: every corrupt or truncated input gives EINVAL and a message that says what
// is wrong, never a crash, and whatever is accepted obeys the pool's rules. The loader uses the
// same parser: a volume with such a file is reported broken with the parser's message.
#include "datapath/pool/metadata.h"

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <limits>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "datapath/pool/pool.h"
#include "datapath/pool/rules.h"
#include "test/support/temp_dir.h"

namespace nbdcsi::datapath {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;
using ::testing::StartsWith;

constexpr uint64_t kGiB = uint64_t{1} << 30;

VolumeMeta SampleVolume() {
  VolumeMeta m;
  m.name = "pvc-1";
  m.size = 2 * kGiB;
  m.created_unix_ns = 1700000000123456789;
  m.read_only = true;
  m.qos.max_iops = 500;
  m.qos.bps_per_gib = 10 << 20;
  m.qos.burst_ms = 250;
  m.source = "snapshot/snap-1";
  m.state = "copying";
  return m;
}

SnapshotMeta SampleSnapshot() {
  return SnapshotMeta{"snap-1", "pvc-1", 2 * kGiB, 42, "copy", "failed", "no space left"};
}

// A volume record as JSON text with one field replaced (or removed, when `value` is empty).
std::string VolumeWith(const std::string& key, const std::string& value) {
  std::string base = R"({"version": 1, "name": "v", "size": 1073741824, "created_unix_ns": 5,
      "read_only": false, "qos": {"max_iops": 10, "burst_ms": 100}, "source": "",
      "state": "ready"})";
  const std::string field = "\"" + key + "\":";
  auto at = base.find(field);
  EXPECT_NE(at, std::string::npos) << key;
  auto end = at + field.size();
  int depth = 0;
  while (end < base.size() && !(depth == 0 && (base[end] == ',' || base[end] == '}'))) {
    if (base[end] == '{') ++depth;
    if (base[end] == '}') --depth;
    ++end;
  }
  if (value.empty()) {
    // Drop the field and the comma after it (or before it, for the last field).
    if (base[end] == ',') return base.erase(at, end + 1 - at);
    auto comma = base.rfind(',', at);
    return base.erase(comma, end - comma);
  }
  return base.replace(at, end - at, field + " " + value);
}

TEST(PoolMetadata, VolumeRoundTrip) {
  const VolumeMeta m = SampleVolume();
  auto back = ParseVolumeMetadata(ToJson(m), m.name);
  ASSERT_TRUE(back.ok()) << back.status().message();
  EXPECT_EQ(back->name, m.name);
  EXPECT_EQ(back->size, m.size);
  EXPECT_EQ(back->created_unix_ns, m.created_unix_ns);
  EXPECT_EQ(back->read_only, m.read_only);
  EXPECT_EQ(back->qos, m.qos);
  EXPECT_EQ(back->source, m.source);
  EXPECT_EQ(back->state, m.state);
  EXPECT_EQ(back->error, m.error);
}

TEST(PoolMetadata, SnapshotRoundTrip) {
  const SnapshotMeta m = SampleSnapshot();
  auto back = ParseSnapshotMetadata(ToJson(m), m.name);
  ASSERT_TRUE(back.ok()) << back.status().message();
  EXPECT_EQ(back->name, m.name);
  EXPECT_EQ(back->source_volume, m.source_volume);
  EXPECT_EQ(back->size, m.size);
  EXPECT_EQ(back->created_unix_ns, m.created_unix_ns);
  EXPECT_EQ(back->method, m.method);
  EXPECT_EQ(back->state, m.state);
  EXPECT_EQ(back->error, m.error);
}

// Written before snapshots existed: no "source", no "state".
TEST(PoolMetadata, OldVolumeRecordIsABlankReadyVolume) {
  auto m = ParseVolumeMetadata(R"({"version": 1, "name": "old", "size": 4096})", "old");
  ASSERT_TRUE(m.ok()) << m.status().message();
  EXPECT_EQ(m->source, "");
  EXPECT_EQ(m->state, "ready");
  EXPECT_TRUE(m->qos.unlimited());
}

// Schedules (issue 18): written only when set, read back as written, checked by the pool's
// rules; a record without one (every file written before schedules) has none.
TEST(PoolMetadata, ScheduleRoundTripAndRules) {
  VolumeMeta m = SampleVolume();
  EXPECT_EQ(ToJson(m).find("schedule"), std::string::npos);
  auto none = ParseVolumeMetadata(ToJson(m), m.name);
  ASSERT_TRUE(none.ok());
  EXPECT_TRUE(none->schedule.empty());
  m.schedule.snapshot_cron = "*/15 * * * *";
  m.schedule.snapshot_retain = 4;
  m.schedule.backup_cron = "0 3 * * sun";
  m.schedule.backup_retain = 30;
  m.schedule.backup_target = "s3://b/p";
  auto back = ParseVolumeMetadata(ToJson(m), m.name);
  ASSERT_TRUE(back.ok()) << back.status().message();
  EXPECT_EQ(back->schedule, m.schedule);
  for (const auto& [value, want] : std::vector<std::pair<std::string, std::string>>{
           {R"("daily")", "\"schedule\" is not an object"},
           {R"({"snapshot_cron": 5})", "\"schedule.snapshot_cron\" is not a string"},
           {R"({"snapshot_cron": "61 * * * *"})", "snapshot schedule: field 1 (minute)"},
           {R"({"snapshot_cron": "@daily", "snapshot_retain": 0})", "snapshot retain"},
           {R"({"snapshot_cron": "@daily", "snapshot_retain": 99999999999})", "snapshot retain"},
           {R"({"snapshot_cron": "@daily", "snapshot_retain": -1})", "unsigned integer"},
           {R"({"backup_cron": "@daily"})", "needs a backup target"},
       }) {
    std::string text = VolumeWith("state", R"("ready", "schedule": )" + value);
    auto r = ParseVolumeMetadata(text, "v");
    ASSERT_FALSE(r.ok()) << text;
    EXPECT_EQ(r.status().code(), EINVAL);
    EXPECT_THAT(r.status().message(), HasSubstr(want)) << text;
  }
}

struct Corrupt {
  std::string what;
  std::string text;
  std::string message;  // fragment; the errno is always EINVAL
};

TEST(PoolMetadata, CorruptVolumeRecordsAreClearErrors) {
  const std::vector<Corrupt> cases = {
      {"empty file", "", "metadata is not valid JSON"},
      {"a NUL byte", std::string("{\"version\": 1\0}", 15), "not valid JSON"},
      {"not UTF-8", "{\"version\": 1, \"name\": \"\xff\xfe\"}", "not valid JSON"},
      {"an array", "[1, 2]", "metadata is not a JSON object"},
      {"a string", "\"v\"", "not a JSON object"},
      {"no version", R"({"name": "v"})", "metadata has no integer \"version\""},
      {"version as text", VolumeWith("version", "\"1\""), "no integer \"version\""},
      {"future version", VolumeWith("version", "2"), "metadata version 2 is not supported"},
      {"no name", VolumeWith("name", ""), "metadata has no \"name\" (a string)"},
      {"name a number", VolumeWith("name", "7"), "metadata \"name\" is not a string"},
      {"another name", VolumeWith("name", "\"w\""), "names volume \"w\" but the file is for \"v\""},
      {"no size", VolumeWith("size", ""), "metadata has no \"size\" (an unsigned integer)"},
      {"negative size", VolumeWith("size", "-4096"), "\"size\" is not an unsigned integer"},
      {"fractional size", VolumeWith("size", "4096.5"), "\"size\" is not an unsigned integer"},
      {"size past 64 bits", VolumeWith("size", "18446744073709551616"), "is not an unsigned"},
      {"size 1e400", VolumeWith("size", "1e400"), "not valid JSON"},
      {"size 0", VolumeWith("size", "0"), "metadata: size must be greater than 0"},
      {"misaligned size", VolumeWith("size", "4097"), "metadata: size 4097 is not a multiple"},
      {"created as text", VolumeWith("created_unix_ns", "\"now\""), "is not an integer"},
      {"read_only as text", VolumeWith("read_only", "\"yes\""), "\"read_only\" is not a boolean"},
      {"qos a list", VolumeWith("qos", "[]"), "metadata \"qos\" is not an object"},
      {"negative limit", VolumeWith("qos", R"({"max_iops": -1})"),
       "\"qos.max_iops\" is not an unsigned integer"},
      {"burst too deep", VolumeWith("qos", R"({"burst_ms": 60001})"),
       "metadata: QoS burst_ms 60001 is above the maximum"},
      {"burst past 32 bits", VolumeWith("qos", R"({"burst_ms": 4294967296})"), "burst_ms"},
      {"per-GiB overflow",
       R"({"version": 1, "name": "v", "size": 3221225472,
           "qos": {"bps_per_gib": 9223372036854775808}})",
       "metadata: QoS bps_per_gib 9223372036854775808 times 3 GiB overflows"},
      {"source a number", VolumeWith("source", "1"), "\"source\" is not a string"},
      {"source elsewhere", VolumeWith("source", "\"/etc/passwd\""),
       "metadata \"source\" must be \"\", \"snapshot/NAME\" or \"volume/NAME\""},
      {"source escapes", VolumeWith("source", "\"snapshot/../x\""),
       "metadata \"source\": snapshot name must not contain '/'"},
      {"unknown state", VolumeWith("state", "\"half\""), "\"state\" must be \"ready\""},
      {"error a number", R"({"version": 1, "name": "v", "size": 4096, "error": 5})",
       "\"error\" is not a string"},
  };
  for (const auto& c : cases) {
    auto m = ParseVolumeMetadata(c.text, "v");
    ASSERT_FALSE(m.ok()) << c.what << ": accepted " << c.text;
    EXPECT_EQ(m.status().code(), EINVAL) << c.what;
    EXPECT_THAT(m.status().message(), HasSubstr(c.message)) << c.what;
  }
  // A name that breaks the rules is refused even when the file claims it.
  auto bad = ParseVolumeMetadata(R"({"version": 1, "name": "a/b", "size": 4096})", "a/b");
  EXPECT_EQ(bad.status().code(), EINVAL);
  EXPECT_THAT(bad.status().message(), HasSubstr("metadata: volume name must not contain '/'"));
}

TEST(PoolMetadata, CorruptSnapshotRecordsAreClearErrors) {
  const std::string ok = ToJson(SampleSnapshot());
  auto replace = [&](const std::string& from, const std::string& to) {
    std::string t = ok;
    auto at = t.find(from);
    EXPECT_NE(at, std::string::npos) << from;
    return t.replace(at, from.size(), to);
  };
  const std::vector<Corrupt> cases = {
      {"no method", replace("\"method\": \"copy\",", ""), "metadata has no \"method\""},
      {"unknown method", replace("\"copy\"", "\"dd\""), "\"method\" must be \"reflink\" or"},
      {"empty source", replace("\"source_volume\": \"pvc-1\"", "\"source_volume\": \"\""),
       "metadata \"source_volume\": volume name must not be empty"},
      {"another name", replace("\"name\": \"snap-1\"", "\"name\": \"snap-2\""),
       "names snapshot \"snap-2\" but the file is for \"snap-1\""},
      {"unknown state", replace("\"failed\"", "\"gone\""), "\"state\" must be"},
      {"size 0", replace("2147483648", "0"), "metadata: size must be greater than 0"},
      {"version 0", replace("\"version\": 1", "\"version\": 0"), "version 0 is not supported"},
  };
  for (const auto& c : cases) {
    auto m = ParseSnapshotMetadata(c.text, "snap-1");
    ASSERT_FALSE(m.ok()) << c.what << ": accepted " << c.text;
    EXPECT_EQ(m.status().code(), EINVAL) << c.what;
    EXPECT_THAT(m.status().message(), HasSubstr(c.message)) << c.what;
  }
}

// A crash can leave any prefix of a file that was never fsynced. Every prefix that ends before
// the closing brace must be refused; only the last one (the text without its newline) is whole.
template <typename Parse>
void ExpectEveryTruncationRefused(const std::string& text, const char* name, Parse parse) {
  for (size_t len = 0; len < text.rfind('}') + 1; ++len) {
    auto m = parse(std::string_view(text).substr(0, len), name);
    ASSERT_FALSE(m.ok()) << name << ": prefix of " << len << " bytes accepted";
    EXPECT_EQ(m.status().code(), EINVAL);
    EXPECT_THAT(m.status().message(), StartsWith("metadata")) << len;
  }
  EXPECT_TRUE(parse(std::string_view(text).substr(0, text.size() - 1), name).ok());
}

TEST(PoolMetadata, EveryTruncationIsRefused) {
  ExpectEveryTruncationRefused(ToJson(SampleVolume()), "pvc-1", ParseVolumeMetadata);
  ExpectEveryTruncationRefused(ToJson(SampleSnapshot()), "snap-1", ParseSnapshotMetadata);
}

// Every byte of a valid record replaced by bytes a bad sector or a stray write leaves: the
// parser never crashes, refuses with EINVAL and a "metadata" message, or accepts a record that
// still obeys the pool's rules.
TEST(PoolMetadata, ByteDamageIsRefusedOrHarmless) {
  const std::string vol = ToJson(SampleVolume());
  const char damage[] = {'\0', '\xff', '"', '}', '{', '[', ',', '0', '9', '-', ' ', 'x', '\\'};
  int refused = 0;
  for (size_t i = 0; i < vol.size(); ++i) {
    for (char d : damage) {
      std::string t = vol;
      t[i] = d;
      auto m = ParseVolumeMetadata(t, "pvc-1");
      if (!m.ok()) {
        ++refused;
        ASSERT_EQ(m.status().code(), EINVAL) << "byte " << i;
        ASSERT_THAT(m.status().message(), StartsWith("metadata")) << "byte " << i;
        continue;
      }
      EXPECT_EQ(m->name, "pvc-1") << "byte " << i;
      EXPECT_TRUE(ValidateVolumeSize(m->size).ok()) << "byte " << i << ": size " << m->size;
      EXPECT_TRUE(ValidateQos(m->qos, m->size).ok()) << "byte " << i;
      EXPECT_TRUE(m->state == "ready" || m->state == "copying" || m->state == "failed");
    }
  }
  EXPECT_GT(refused, 0);
}

TEST(PoolMetadata, DeepNestingIsAnErrorNotACrash) {
  const std::string open(200000, '[');
  EXPECT_THAT(ParseVolumeMetadata(open, "v").status().message(), HasSubstr("not valid JSON"));
  const std::string closed = open + std::string(200000, ']');
  EXPECT_THAT(ParseVolumeMetadata(closed, "v").status().message(),
              HasSubstr("not a JSON object"));
  const std::string in_qos = VolumeWith("qos", std::string(100000, '[') + std::string(100000, ']'));
  EXPECT_THAT(ParseVolumeMetadata(in_qos, "v").status().message(),
              HasSubstr("\"qos\" is not an object"));
}

// Pool::Open loads through the same parser: a damaged file makes its volume broken, with the
// parser's message, and leaves the other volumes alone.
TEST(PoolMetadata, LoaderReportsTheParsersMessage) {
  test::TempDir tmp("pool_meta");
  ASSERT_TRUE(tmp.ok()) << tmp.error();
  const std::string& root = tmp.path();
  PoolOptions opts;
  opts.dir = root + "/pool";
  {
    auto pool = Pool::Open(opts);
    ASSERT_TRUE(pool.ok()) << pool.status().message();
    ASSERT_TRUE((*pool)->Create("cut", 4096, {}).ok());
    ASSERT_TRUE((*pool)->Create("keep", 4096, {}).ok());
  }
  const std::string path = opts.dir + "/volumes/cut.json";
  std::string text;
  {
    std::ifstream in(path);
    text.assign(std::istreambuf_iterator<char>(in), {});
  }
  const std::string half = text.substr(0, text.size() / 2);
  {
    std::ofstream out(path, std::ios::trunc);
    out << half;
  }
  auto pool = Pool::Open(opts);
  ASSERT_TRUE(pool.ok()) << pool.status().message();
  const PoolInfo info = (*pool)->Info();
  ASSERT_EQ(info.broken_volumes.size(), 1u);
  const std::string want = ParseVolumeMetadata(half, "cut").status().message();
  EXPECT_EQ(info.broken_volumes[0], "cut: " + path + ": " + want);
  EXPECT_TRUE((*pool)->Inspect("keep").ok());
  EXPECT_EQ((*pool)->Inspect("cut").status().code(), EIO);
  pool->reset();
}

}  // namespace
}  // namespace nbdcsi::datapath
