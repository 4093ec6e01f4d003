#include "csi/ids.h"

#include <string>

#include <gtest/gtest.h>

namespace nbdcsi::csi {
namespace {

std::string PoolName(std::string_view csi_name) { return PoolNameForCsiName(csi_name).value(); }

TEST(CsiIds, VolumeRoundTrip) {
  for (auto [node, name] : std::vector<std::pair<std::string, std::string>>{
           {"node-1", "pvc-0b1c2d3e-aaaa-bbbb-cccc-0123456789ab"},
           {"a", "v"},
           {"worker.example.com", "Vol_1.data-x"},
           {"0", "0"},
           {std::string(253, 'n'), std::string(kMaxPoolNameLen, 'x')}}) {
    auto id = FormatVolumeId(node, name);
    ASSERT_TRUE(id.ok()) << id.status().message();
    EXPECT_EQ(*id, "v1:" + node + ":" + name);
    auto ref = ParseVolumeId(*id);
    ASSERT_TRUE(ref.ok()) << ref.status().message();
    EXPECT_EQ(ref->node_id, node);
    EXPECT_EQ(ref->pool_name, name);
  }
}

TEST(CsiIds, SnapshotRoundTrip) {
  auto id = FormatSnapshotId("node-2", "snapshot-1234");
  ASSERT_TRUE(id.ok());
  EXPECT_EQ(*id, "s1:node-2:snapshot-1234");
  auto ref = ParseSnapshotId(*id);
  ASSERT_TRUE(ref.ok());
  EXPECT_EQ(*ref, (SnapshotRef{"node-2", "snapshot-1234"}));
}

TEST(CsiIds, KindsDoNotMix) {
  auto v = ParseVolumeId("s1:node:snap");
  ASSERT_FALSE(v.ok());
  EXPECT_EQ(v.status().code(), EINVAL);
  EXPECT_NE(v.status().message().find("\"s1:node:snap\""), std::string::npos)
      << v.status().message();
  EXPECT_FALSE(ParseSnapshotId("v1:node:vol").ok());
}

struct BadId {
  const char* id;
  const char* why;  // a fragment the message must contain
};

TEST(CsiIds, BadVolumeIds) {
  const std::string long_node(254, 'a');
  const std::string long_name(kMaxPoolNameLen + 1, 'a');
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"", "must not be empty"},
      {"vol", "not an nbd.csi.io volume id"},
      {"v2:node:vol", "not an nbd.csi.io volume id"},
      {"V1:node:vol", "not an nbd.csi.io volume id"},
      {"v1:", "missing ':'"},
      {"v1:nodevol", "missing ':'"},
      {"v1::vol", "node id is empty"},
      {"v1:node:", "volume name must not be empty"},
      {"v1:Node:vol", "not allowed"},
      {"v1:node_1:vol", "not allowed"},
      {"v1:-node:vol", "must start and end"},
      {"v1:node.:vol", "must start and end"},
      {"v1:" + long_node + ":vol", "at most 253"},
      {"v1:node:" + long_name, "the limit is 64"},
      {"v1:node:.hidden", "must not start with '.'"},
      {"v1:node:-opt", "must not start with '-'"},
      {"v1:node:a/b", "contains \"/\""},
      {"v1:node:a:b", "contains \":\""},
      {"v1:node:a b", "contains \" \""},
      {std::string("v1:node:a\x01", 10), "\\x01"},
      {std::string("v1:no\0de:a", 10), "not allowed"},
  };
  for (const auto& [id, why] : cases) {
    auto r = ParseVolumeId(id);
    ASSERT_FALSE(r.ok()) << "accepted: " << id;
    EXPECT_EQ(r.status().code(), EINVAL) << id;
    EXPECT_NE(r.status().message().find(why), std::string::npos)
        << "id " << id << ": message \"" << r.status().message() << "\" lacks \"" << why << "\"";
  }
}

TEST(CsiIds, FormatRejectsBadParts) {
  EXPECT_EQ(FormatVolumeId("", "v").status().code(), EINVAL);
  EXPECT_EQ(FormatVolumeId("Node", "v").status().code(), EINVAL);
  EXPECT_EQ(FormatVolumeId("node", "a:b").status().code(), EINVAL);
  EXPECT_EQ(FormatSnapshotId("node", "").status().code(), EINVAL);
  EXPECT_NE(FormatSnapshotId("node", "").status().message().find("snapshot name"),
            std::string::npos);
}

// The message of a huge id stays small (it travels in a gRPC header) and says how long it was.
TEST(CsiIds, HugeIdMessageIsBounded) {
  const std::string id = "v1:node-a:esc" + std::string(5000, '/');
  auto r = ParseVolumeId(id);
  ASSERT_EQ(r.status().code(), EINVAL);
  EXPECT_LT(r.status().message().size(), 400u) << r.status().message();
  EXPECT_NE(r.status().message().find("(5013 bytes)"), std::string::npos) << r.status().message();
  EXPECT_NE(r.status().message().find("\"v1:node-a:esc//"), std::string::npos);
}

TEST(CsiIds, ValidateNodeId) {
  EXPECT_TRUE(ValidateNodeId("ip-10-0-0-1.ec2.internal").ok());
  EXPECT_TRUE(ValidateNodeId(std::string(253, '9')).ok());
  EXPECT_FALSE(ValidateNodeId(std::string(254, '9')).ok());
  EXPECT_FALSE(ValidateNodeId("node:1").ok());
  EXPECT_FALSE(ValidateNodeId(".node").ok());
}

TEST(CsiIds, PoolNameForCsiName) {
  // A valid pool name is used as is: operators see the PVC's own name in `nbdctl volume list`.
  EXPECT_EQ(PoolName("pvc-0b1c2d3e-aaaa-bbbb-cccc-0123456789ab"),
            "pvc-0b1c2d3e-aaaa-bbbb-cccc-0123456789ab");
  EXPECT_EQ(PoolName(std::string(64, 'a')), std::string(64, 'a'));
  // Otherwise "h-" + the first 32 hex digits of SHA-256(name), stable across calls.
  EXPECT_EQ(PoolName("abc def"), PoolName("abc def"));
  const std::string hashed = PoolName("my volume/1");
  EXPECT_EQ(hashed.size(), 34u);
  EXPECT_EQ(hashed.substr(0, 2), "h-");
  EXPECT_TRUE(ValidatePoolName("volume", hashed).ok());
  EXPECT_NE(hashed, PoolName("my volume/2"));
  // Too long for a pool name: hashed. Known vector: SHA-256 of 65 'a's.
  EXPECT_EQ(PoolName(std::string(65, 'a')), "h-635361c48bb9eab14198e76ea8ab7f1a");
  EXPECT_EQ(PoolName(".hidden"), PoolName(".hidden"));
  EXPECT_EQ(PoolNameForCsiName(".hidden")->substr(0, 2), "h-");
  EXPECT_EQ(PoolNameForCsiName("").status().code(), EINVAL);
  // Every result makes a valid id.
  EXPECT_TRUE(FormatVolumeId("node", PoolName("ünïcödé name")).ok());
}

TEST(CsiIds, ReplicatedVolumeIds) {
  EXPECT_EQ(FormatReplicatedVolumeId("pvc-1").value(), "r1:pvc-1");
  EXPECT_EQ(ParseReplicatedVolumeId("r1:pvc-1").value(), "pvc-1");
  EXPECT_TRUE(IsReplicatedVolumeId("r1:pvc-1"));
  EXPECT_FALSE(IsReplicatedVolumeId("v1:node:pvc-1"));
  // Not one of the other kinds: each parser refuses the others' ids.
  EXPECT_EQ(ParseVolumeId("r1:pvc-1").status().code(), EINVAL);
  EXPECT_EQ(ParseReplicatedVolumeId("v1:node:pvc-1").status().code(), EINVAL);
  EXPECT_EQ(ParseReplicatedVolumeId("s1:node:snap").status().code(), EINVAL);
  for (const char* bad : {"r1:", "r1:a:b", "r1:.x", "r1:-x", "R1:pvc"}) {
    auto r = ParseReplicatedVolumeId(bad);
    EXPECT_EQ(r.status().code(), EINVAL) << bad;
  }
  EXPECT_NE(ParseReplicatedVolumeId("r1:a b").status().message().find("contains"),
            std::string::npos);
  EXPECT_EQ(ParseReplicatedVolumeId("r1:" + std::string(65, 'a')).status().code(), EINVAL);
  EXPECT_EQ(FormatReplicatedVolumeId("a/b").status().code(), EINVAL);
}

TEST(CsiIds, BackupSnapshotIds) {
  auto id = FormatBackupSnapshotId("s3://backups/cluster-a", "snapshot-1");
  ASSERT_TRUE(id.ok()) << id.status().message();
  EXPECT_EQ(*id, "b1:s3://backups/cluster-a#snapshot-1");
  EXPECT_TRUE(IsBackupSnapshotId(*id));
  EXPECT_EQ(ParseBackupSnapshotId(*id).value(),
            (BackupRef{"s3://backups/cluster-a", "snapshot-1"}));
  // A bucket alone, and a prefix with several levels.
  EXPECT_EQ(ParseBackupSnapshotId("b1:s3://b#n").value(), (BackupRef{"s3://b", "n"}));
  EXPECT_EQ(ParseBackupSnapshotId("b1:s3://b/x/y/z#n").value(), (BackupRef{"s3://b/x/y/z", "n"}));
  // The other kinds' parsers refuse it, and it refuses theirs.
  EXPECT_EQ(ParseSnapshotId(*id).status().code(), EINVAL);
  EXPECT_EQ(ParseBackupSnapshotId("s1:node:snap").status().code(), EINVAL);
  for (const char* bad : {"b1:", "b1:s3://b", "b1:s3://#n", "b1:s3:///x#n", "b1:http://b#n",
                          "b1:s3://b#", "b1:s3://b#.n", "b1:s3://b#a/b", "b1:s3://b c#n"}) {
    EXPECT_EQ(ParseBackupSnapshotId(bad).status().code(), EINVAL) << bad;
  }
  EXPECT_EQ(FormatBackupSnapshotId("s3://b#c", "n").status().code(), EINVAL);
  EXPECT_EQ(FormatBackupSnapshotId("gs://b", "n").status().code(), EINVAL);
  // CSI's 128-byte limit: a target that makes the id longer is refused, saying why.
  auto long_id = FormatBackupSnapshotId("s3://b/" + std::string(120, 'p'), "snapshot-1");
  EXPECT_EQ(long_id.status().code(), EINVAL);
  EXPECT_NE(long_id.status().message().find("CSI allows 128"), std::string::npos)
      << long_id.status().message();
  std::string fits = "s3://b/" + std::string(128 - 3 - 7 - 1 - 1, 'p');
  EXPECT_TRUE(FormatBackupSnapshotId(fits, "n").ok());
  EXPECT_EQ(FormatBackupSnapshotId(fits + "p", "n").status().code(), EINVAL);
}

}  // namespace
}  // namespace nbdcsi::csi
