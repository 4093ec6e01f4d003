// Pure helpers of `nbdctl backup`: the JSON and table forms of backups and jobs, a progress line,
// and the AWS-style credentials file parser. Unit-tested without a server.
#pragma once

#include <map>
#include <nlohmann/json.hpp>
#include <string>

#include "common/status.h"
#include "datapath/api/backup.pb.h"

namespace nbdcsi::nbdctl {

namespace bv1 = ::nbdcsi::datapath::v1;

nlohmann::json BackupJson(const bv1::BackupInfo& b);
nlohmann::json BackupJobJson(const bv1::BackupJob& j);
std::string BackupListTable(const bv1::ListBackupsResponse& list);
std::string BackupDetails(const bv1::BackupInfo& b);
std::string BackupJobDetails(const bv1::BackupJob& j);
std::string BackupJobsTable(const bv1::ListBackupJobsResponse& list);
// "backup b1: 45% (460.0 MiB of 1.0 GiB), 120.3 MiB uploaded at 50.1 MiB/s"
std::string ProgressLine(const bv1::BackupJob& j);

struct FileCredentials {
  std::string access_key_id, secret_access_key, session_token;
};
// The AWS shared credentials format: "[profile]" sections of "key = value" lines
// (aws_access_key_id, aws_secret_access_key, aws_session_token); '#' and ';' start comments.
// Lines before any section belong to every profile. EINVAL naming the line for anything else,
// ENOENT when the profile has no key id and secret. Values are never part of a message.
StatusOr<FileCredentials> ParseCredentialsFile(const std::string& text, const std::string& profile);

}  // namespace nbdcsi::nbdctl
