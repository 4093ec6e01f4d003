// nbdctl backup's pure helpers: the AWS credentials file parser (profiles, comments, errors that
// never show a value) and the JSON / table forms of backups and jobs.
#include <gtest/gtest.h>

#include "tools/nbdctl/backup_render.h"

namespace nbdcsi::nbdctl {
namespace {

TEST(CredentialsFile, ProfilesAndComments) {
  const std::string text =
      "# comment\n"
      "[default]\n"
      "aws_access_key_id = AKIDEFAULT\n"
      "aws_secret_access_key=secret-default\n"
      "region = eu-west-1\n"
      "\n"
      "[other]\n"
      "  aws_access_key_id = AKIOTHER  \n"
      "aws_secret_access_key = secret other\n"
      "aws_session_token = tok\n"
      "; another comment\n";
  auto d = ParseCredentialsFile(text, "default");
  ASSERT_TRUE(d.ok()) << d.status().message();
  EXPECT_EQ(d->access_key_id, "AKIDEFAULT");
  EXPECT_EQ(d->secret_access_key, "secret-default");
  EXPECT_EQ(d->session_token, "");
  auto o = ParseCredentialsFile(text, "other");
  ASSERT_TRUE(o.ok()) << o.status().message();
  EXPECT_EQ(o->access_key_id, "AKIOTHER");
  EXPECT_EQ(o->secret_access_key, "secret other");
  EXPECT_EQ(o->session_token, "tok");
  // Lines before any section count for every profile.
  auto flat = ParseCredentialsFile("aws_access_key_id=A\naws_secret_access_key=S\n", "x");
  ASSERT_TRUE(flat.ok());
  EXPECT_EQ(flat->access_key_id, "A");
}

TEST(CredentialsFile, ErrorsNameTheLineNotTheValue) {
  auto missing = ParseCredentialsFile("[default]\naws_access_key_id = A\n", "default");
  ASSERT_FALSE(missing.ok());
  EXPECT_EQ(missing.status().code(), ENOENT);
  auto none = ParseCredentialsFile("[default]\naws_access_key_id=A\naws_secret_access_key=S\n",
                                   "prod");
  EXPECT_EQ(none.status().code(), ENOENT);
  auto bad = ParseCredentialsFile("[default]\naws_secret_access_key SECRETVALUE\n", "default");
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().code(), EINVAL);
  EXPECT_NE(bad.status().message().find("line 2"), std::string::npos);
  EXPECT_EQ(bad.status().message().find("SECRETVALUE"), std::string::npos);
  EXPECT_EQ(ParseCredentialsFile("[default\n", "default").status().code(), EINVAL);
}

TEST(BackupRender, JobJsonAndProgress) {
  bv1::BackupJob j;
  j.set_id("backup-3");
  j.set_kind("backup");
  j.set_backup("b1");
  j.set_state("running");
  j.set_total_bytes(200);
  j.set_done_bytes(50);
  j.set_transferred_bytes(3 << 20);
  j.set_rate_bytes_per_s(1 << 20);
  auto js = BackupJobJson(j);
  EXPECT_EQ(js["percent"], 25.0);
  EXPECT_EQ(js["id"], "backup-3");
  EXPECT_EQ(js["finished"], "-");
  EXPECT_EQ(ProgressLine(j),
            "backup backup-3 \"b1\": running 25% (0.0 MiB of 0.0 MiB), 3.0 MiB uploaded at 1.0 "
            "MiB/s");
  j.set_total_bytes(0);  // before the job knows its size
  EXPECT_EQ(BackupJobJson(j)["percent"], 0.0);
  EXPECT_TRUE(BackupJobJson(j)["data_total_bytes"].is_null());

  // Once the daemon has mapped the allocated data, progress is counted in it: 1 GiB volume with
  // 64 MiB of data, 16 MiB of it done, is 25 %, not the 90 % its holes would make it.
  j.set_total_bytes(1ull << 30);
  j.set_done_bytes(900ull << 20);
  j.set_data_total_bytes(64ull << 20);
  j.set_data_done_bytes(16ull << 20);
  js = BackupJobJson(j);
  EXPECT_EQ(js["percent"], 25.0);
  EXPECT_EQ(js["data_total_bytes"], 64ull << 20);
  EXPECT_EQ(js["data_done_bytes"], 16ull << 20);
  EXPECT_EQ(ProgressLine(j),
            "backup backup-3 \"b1\": running 25% (16.0 MiB of 64.0 MiB allocated data), 3.0 MiB "
            "uploaded at 1.0 MiB/s");
  j.set_data_total_bytes(0);  // a volume without data
  j.set_data_done_bytes(0);
  EXPECT_EQ(BackupJobJson(j)["percent"], 100.0);
}

TEST(BackupRender, ListTable) {
  bv1::ListBackupsResponse l;
  auto* b = l.add_backups();
  b->set_name("b1");
  b->set_source_volume("v");
  b->set_source_snapshot("s");
  b->set_volume_size(uint64_t{1} << 30);
  b->set_chunks(3);
  b->set_encrypted(true);
  auto* c = l.add_backups();
  c->set_name("b2");
  c->set_source_volume("v");
  std::string t = BackupListTable(l);
  EXPECT_NE(t.find("snapshot/s"), std::string::npos) << t;
  EXPECT_NE(t.find("volume/v"), std::string::npos) << t;
  EXPECT_NE(t.find("1Gi"), std::string::npos) << t;
  EXPECT_EQ(BackupJson(*b)["volume_size_bytes"], uint64_t{1} << 30);
  EXPECT_EQ(BackupJson(*b)["encrypted"], true);
  EXPECT_EQ(BackupJson(*c)["encrypted"], false);
  EXPECT_NE(t.find("ENCRYPTED"), std::string::npos) << t;
  EXPECT_NE(BackupDetails(*b).find("Encrypted"), std::string::npos);
}

}  // namespace
}  // namespace nbdcsi::nbdctl
