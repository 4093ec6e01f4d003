// The targets opened on this node through the API (OpenTarget), kept across datapath restarts:
// STATE_DIR/.open-targets, one volume name per line (a leading '.', which no volume name has,
// so it never meets a volume's bitmap directory). Written with WriteFileAtomic (temp file
// fsync'd, renamed, directory fsync'd). The cluster agent adds a volume when it opens its
// target, removes it when the target is closed by request (not when the daemon stops), and
// reopens each recorded volume when it starts.
#pragma once

#include <mutex>
#include <set>
#include <string>

#include "common/status.h"

namespace nbdcsi::replica {

class OpenTargets {
 public:
  // Empty `dir`: nothing is kept (every call succeeds and Load returns nothing).
  explicit OpenTargets(std::string dir) : dir_(std::move(dir)) {}

  // The recorded volumes (none when the file does not exist). Also what Add/Remove start from.
  StatusOr<std::set<std::string>> Load();
  Status Add(const std::string& volume);
  Status Remove(const std::string& volume);

  static constexpr const char* kFileName = ".open-targets";

 private:
  StatusOr<std::set<std::string>> LoadLocked();
  // Records `volume` as open (or no longer open), durably, unless it already is (is not).
  Status Change(const std::string& volume, bool open);
  Status Write(const std::set<std::string>& names);  // under mu_

  std::string dir_;
  std::mutex mu_;
  std::set<std::string> names_;  // under mu_
  bool loaded_ = false;          // under mu_
};

}  // namespace nbdcsi::replica
