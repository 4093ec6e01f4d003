#include "csi/params.h"

#include <gtest/gtest.h>

namespace nbdcsi::csi {
namespace {

TEST(CsiParams, EmptyIsEmpty) {
  auto r = ParseQosParameters({});
  ASSERT_TRUE(r.ok());
  EXPECT_TRUE(r->empty());
}

TEST(CsiParams, KeysInTableOrder) {
  EXPECT_EQ(QosParameterKeys(),
            (std::vector<std::string>{"maxIops", "maxReadIops", "maxWriteIops", "maxBps",
                                      "maxReadBps", "maxWriteBps", "iopsPerGiB", "bpsPerGiB",
                                      "burstMs"}));
}

struct Good {
  const char* key;
  const char* value;
  QosParameters want;
};

TEST(CsiParams, EveryKey) {
  auto q = [](auto member, auto v) {
    QosParameters p;
    p.*member = v;
    return p;
  };
  const std::vector<Good> cases = {
      {"maxIops", "1000", q(&QosParameters::max_iops, 1000ull)},
      {"maxReadIops", "0", q(&QosParameters::max_read_iops, 0ull)},
      {"maxWriteIops", "18446744073709551615",
       q(&QosParameters::max_write_iops, 18446744073709551615ull)},
      {"maxBps", "100Mi", q(&QosParameters::max_bps, 100ull << 20)},
      {"maxBps", "1G", q(&QosParameters::max_bps, 1000000000ull)},
      {"maxReadBps", "4096", q(&QosParameters::max_read_bps, 4096ull)},
      {"maxWriteBps", "1.5Gi", q(&QosParameters::max_write_bps, 3ull << 29)},
      {"iopsPerGiB", "10", q(&QosParameters::iops_per_gib, 10ull)},
      {"bpsPerGiB", "1Mi", q(&QosParameters::bps_per_gib, 1ull << 20)},
      {"burstMs", "250", q(&QosParameters::burst_ms, 250u)},
      {"burstMs", "4294967295", q(&QosParameters::burst_ms, 4294967295u)},
  };
  for (const auto& c : cases) {
    auto r = ParseQosParameters({{c.key, c.value}});
    ASSERT_TRUE(r.ok()) << c.key << "=" << c.value << ": " << r.status().message();
    EXPECT_EQ(*r, c.want) << c.key << "=" << c.value;
    EXPECT_FALSE(r->empty());
  }
}

TEST(CsiParams, AllTogether) {
  auto r = ParseQosParameters({{"maxIops", "5000"},
                               {"maxBps", "200Mi"},
                               {"burstMs", "100"},
                               {"csi.storage.k8s.io/pvc/name", "data"},
                               {"csi.storage.k8s.io/fstype", "xfs"}});
  ASSERT_TRUE(r.ok()) << r.status().message();
  EXPECT_EQ(r->max_iops, 5000u);
  EXPECT_EQ(r->max_bps, 200ull << 20);
  EXPECT_EQ(r->burst_ms, 100u);
  EXPECT_FALSE(r->max_read_iops.has_value());
  EXPECT_FALSE(r->iops_per_gib.has_value());
}

TEST(CsiParams, ProvisionerPrefixSkipped) {
  auto r = ParseQosParameters({{"csi.storage.k8s.io/provisioner-secret-name", "x"},
                               {"csi.storage.k8s.io/whatever", "not a number"}});
  ASSERT_TRUE(r.ok()) << r.status().message();
  EXPECT_TRUE(r->empty());
}

TEST(CsiParams, UnknownKeyListsKnownKeys) {
  // Keys are case-sensitive, as in Kubernetes: a near miss is an error, never ignored.
  for (const char* key : {"maxIOPS", "fsType", "csi.storage.k8s.io", "", "other.io/maxIops"}) {
    auto r = ParseQosParameters({{key, "1"}});
    ASSERT_FALSE(r.ok()) << key;
    EXPECT_EQ(r.status().code(), EINVAL);
    EXPECT_EQ(r.status().message(),
              std::string("unknown parameter \"") + key +
                  "\"; known: maxIops, maxReadIops, maxWriteIops, maxBps, maxReadBps, "
                  "maxWriteBps, iopsPerGiB, bpsPerGiB, burstMs");
  }
}

struct Bad {
  const char* key;
  const char* value;
  int code;
};

TEST(CsiParams, BadValues) {
  const std::vector<Bad> cases = {
      {"maxIops", "", EINVAL},
      {"maxIops", "fast", EINVAL},
      {"maxIops", "-1", EINVAL},
      {"maxIops", "+5", EINVAL},
      {"maxIops", " 5", EINVAL},
      {"maxIops", "10k", EINVAL},  // IOPS take plain integers, not quantities
      {"maxIops", "1.5", EINVAL},
      {"maxIops", "18446744073709551616", ERANGE},
      {"iopsPerGiB", "99999999999999999999999", ERANGE},
      {"burstMs", "4294967296", ERANGE},
      {"burstMs", "1s", EINVAL},
      {"maxBps", "fast", EINVAL},
      {"maxBps", "-1Mi", EINVAL},
      {"maxBps", "0.5", EINVAL},  // not a whole number of bytes
      {"maxBps", "100MB", EINVAL},
      {"maxReadBps", "16Ei", ERANGE},
      {"bpsPerGiB", "1Qi", EINVAL},
  };
  for (const auto& c : cases) {
    auto r = ParseQosParameters({{c.key, c.value}});
    ASSERT_FALSE(r.ok()) << c.key << "=\"" << c.value << "\" accepted";
    EXPECT_EQ(r.status().code(), c.code) << c.key << "=" << c.value << ": "
                                         << r.status().message();
    const std::string prefix =
        std::string("parameter ") + c.key + ": bad value \"" + c.value + "\": ";
    EXPECT_EQ(r.status().message().substr(0, prefix.size()), prefix) << r.status().message();
    EXPECT_GT(r.status().message().size(), prefix.size()) << "no reason given";
  }
}

TEST(CsiParams, StorageClassReplicas) {
  auto none = ParseStorageClassParameters({});
  ASSERT_TRUE(none.ok());
  EXPECT_EQ(none->replicas, 1);
  EXPECT_TRUE(none->qos.empty());
  for (int n = 1; n <= kMaxReplicas; ++n) {
    auto p = ParseStorageClassParameters({{"replicas", std::to_string(n)}, {"maxIops", "100"}});
    ASSERT_TRUE(p.ok()) << p.status().message();
    EXPECT_EQ(p->replicas, n);
    EXPECT_EQ(p->qos.max_iops, 100u);
  }
  for (const char* bad : {"0", "4", "", "two", "-1", "2.0", " 2", "99999999999999999999999"}) {
    auto p = ParseStorageClassParameters({{"replicas", bad}});
    ASSERT_FALSE(p.ok()) << bad;
    EXPECT_EQ(p.status().code(), EINVAL);
    EXPECT_NE(p.status().message().find("parameter replicas: bad value"), std::string::npos)
        << p.status().message();
  }
  // QoS errors still come through, and an unknown key lists replicas among the known ones.
  auto unknown = ParseStorageClassParameters({{"replica", "2"}});
  ASSERT_FALSE(unknown.ok());
  EXPECT_NE(unknown.status().message().find("maxIops"), std::string::npos);
  EXPECT_NE(unknown.status().message().find(", replicas"), std::string::npos);
  EXPECT_FALSE(ParseStorageClassParameters({{"maxIops", "x"}, {"replicas", "2"}}).ok());
  // Not mutable: the VolumeAttributesClass parser does not know it.
  EXPECT_EQ(ParseQosParameters({{"replicas", "2"}}).status().code(), EINVAL);
}

TEST(CsiParams, StorageClassSchedules) {
  auto none = ParseStorageClassParameters({});
  ASSERT_TRUE(none.ok());
  EXPECT_TRUE(none->schedule.empty());

  auto full = ParseStorageClassParameters({{"snapshotSchedule", "*/15 * * * *"},
                                           {"snapshotRetain", "4"},
                                           {"backupSchedule", "0 3 * * sun"},
                                           {"backupRetain", "1000"},
                                           {"backupTarget", "s3://bucket/nightly"},
                                           {"maxIops", "100"}});
  ASSERT_TRUE(full.ok()) << full.status().message();
  EXPECT_EQ(full->schedule.snapshot_cron, "*/15 * * * *");
  EXPECT_EQ(full->schedule.snapshot_retain, 4u);
  EXPECT_EQ(full->schedule.backup_cron, "0 3 * * sun");
  EXPECT_EQ(full->schedule.backup_retain, 1000u);
  EXPECT_EQ(full->schedule.backup_target, "s3://bucket/nightly");
  EXPECT_EQ(full->qos.max_iops, 100u);

  auto defaults = ParseStorageClassParameters({{"snapshotSchedule", "@daily"}});
  ASSERT_TRUE(defaults.ok()) << defaults.status().message();
  EXPECT_EQ(defaults->schedule.snapshot_retain, 7u);
  EXPECT_EQ(defaults->schedule.backup_retain, 7u);
  EXPECT_TRUE(defaults->schedule.backup_cron.empty());
  EXPECT_FALSE(defaults->schedule.empty());
}

// A VolumeAttributesClass may carry a schedule: any schedule key makes it the whole new one;
// without one the schedule stays unset (left alone); the StorageClass-only `replicas` is refused.
TEST(CsiParams, AttributesClassSchedules) {
  auto qos_only = ParseAttributesClassParameters({{"maxIops", "100"}});
  ASSERT_TRUE(qos_only.ok()) << qos_only.status().message();
  EXPECT_EQ(qos_only->qos.max_iops, 100u);
  EXPECT_FALSE(qos_only->schedule.has_value());
  auto both = ParseAttributesClassParameters(
      {{"maxIops", "100"}, {"snapshotSchedule", "@hourly"}, {"snapshotRetain", "24"}});
  ASSERT_TRUE(both.ok()) << both.status().message();
  ASSERT_TRUE(both->schedule.has_value());
  EXPECT_EQ(both->schedule->snapshot_cron, "@hourly");
  EXPECT_EQ(both->schedule->snapshot_retain, 24u);
  EXPECT_TRUE(both->schedule->backup_cron.empty());
  EXPECT_EQ(both->qos.max_iops, 100u);
  // The StorageClass's rules apply: a backup schedule needs its target.
  auto bad = ParseAttributesClassParameters({{"backupSchedule", "@daily"}});
  EXPECT_EQ(bad.status().code(), EINVAL);
  EXPECT_NE(bad.status().message().find("backupTarget"), std::string::npos);
  EXPECT_EQ(ParseAttributesClassParameters({{"replicas", "2"}}).status().code(), EINVAL);
  EXPECT_EQ(ParseAttributesClassParameters({{"snapshotSchedule", "61 * * * *"}}).status().code(),
            EINVAL);
}

TEST(CsiParams, StorageClassScheduleErrorsNameTheKey) {
  struct Case {
    std::map<std::string, std::string> params;
    std::string want;  // a substring of the message
  };
  const std::vector<Case> cases = {
      {{{"snapshotSchedule", "* * *"}}, "parameter snapshotSchedule: bad value \"* * *\""},
      {{{"snapshotSchedule", "60 * * * *"}}, "parameter snapshotSchedule: bad value"},
      {{{"snapshotSchedule", "0 0 31 2 *"}}, "never fires"},
      {{{"snapshotSchedule", "@daily"}, {"snapshotRetain", "0"}},
       "parameter snapshotRetain: bad value \"0\": a whole number from 1 to 1000"},
      {{{"snapshotSchedule", "@daily"}, {"snapshotRetain", "1001"}}, "parameter snapshotRetain"},
      {{{"snapshotSchedule", "@daily"}, {"snapshotRetain", "x"}}, "parameter snapshotRetain"},
      {{{"snapshotRetain", "3"}}, "parameter snapshotRetain is set without snapshotSchedule"},
      {{{"backupSchedule", "@daily"}}, "parameter backupSchedule needs backupTarget"},
      {{{"backupSchedule", "0 0 * * 8"}, {"backupTarget", "s3://b"}},
       "parameter backupSchedule: bad value"},
      {{{"backupTarget", "s3://b/p"}}, "parameter backupTarget is set without backupSchedule"},
      {{{"backupSchedule", "@daily"}, {"backupTarget", "http://b/p"}},
       "parameter backupTarget: bad value \"http://b/p\""},
      {{{"backupSchedule", "@daily"}, {"backupTarget", "s3:///p"}}, "parameter backupTarget"},
      {{{"backupSchedule", "@daily"}, {"backupTarget", "s3://b/p/"}}, "parameter backupTarget"},
      {{{"backupSchedule", "@daily"}, {"backupTarget", "s3://b"}, {"backupRetain", "-1"}},
       "parameter backupRetain"},
      {{{"backupRetain", "2"}}, "parameter backupRetain is set without backupSchedule"},
      {{{"snapshotSchedule", "@daily"}, {"replicas", "2"}},
       "schedules are not supported for replicated volumes yet"},
      {{{"backupSchedule", "@daily"}, {"backupTarget", "s3://b"}, {"replicas", "3"}},
       "schedules are not supported for replicated volumes yet"},
      {{{"snapshotschedule", "@daily"}}, "unknown parameter \"snapshotschedule\""},
  };
  for (const auto& c : cases) {
    auto r = ParseStorageClassParameters(c.params);
    ASSERT_FALSE(r.ok()) << c.want;
    EXPECT_EQ(r.status().code(), EINVAL) << r.status().message();
    EXPECT_NE(r.status().message().find(c.want), std::string::npos)
        << "got: " << r.status().message() << "\nwant: " << c.want;
  }
  // The unknown-key message lists the schedule keys among the known ones.
  auto unknown = ParseStorageClassParameters({{"schedule", "x"}});
  EXPECT_NE(unknown.status().message().find(
                "replicas, snapshotSchedule, snapshotRetain, backupSchedule, backupRetain, "
                "backupTarget"),
            std::string::npos)
      << unknown.status().message();
  // Not mutable: the VolumeAttributesClass parser does not know them.
  EXPECT_EQ(ParseQosParameters({{"snapshotSchedule", "@daily"}}).status().code(), EINVAL);
}

}  // namespace
}  // namespace nbdcsi::csi
