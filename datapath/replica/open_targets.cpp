#include "datapath/replica/open_targets.h"

#include <cerrno>
#include <sstream>

#include "common/fs_util.h"

namespace nbdcsi::replica {

StatusOr<std::set<std::string>> OpenTargets::Load() {
  std::lock_guard<std::mutex> lock(mu_);
  return LoadLocked();
}

StatusOr<std::set<std::string>> OpenTargets::LoadLocked() {
  if (dir_.empty()) return std::set<std::string>{};
  auto text = ReadSmallFile(dir_ + "/" + kFileName);
  std::set<std::string> names;
  if (!text.ok()) {
    if (text.status().code() != ENOENT) return text.status();
  } else {
    std::istringstream in(*text);
    for (std::string line; std::getline(in, line);) {
      if (!line.empty()) names.insert(line);
    }
  }
  names_ = names;
  loaded_ = true;
  return names;
}

Status OpenTargets::Add(const std::string& volume) { return Change(volume, true); }

Status OpenTargets::Remove(const std::string& volume) { return Change(volume, false); }

Status OpenTargets::Change(const std::string& volume, bool open) {
  if (dir_.empty()) return Status::Ok();
  std::lock_guard<std::mutex> lock(mu_);
  if (!loaded_) {
    if (auto l = LoadLocked(); !l.ok()) return l.status();
  }
  if (names_.count(volume) == (open ? 1u : 0u)) return Status::Ok();
  auto next = names_;
  if (open) {
    next.insert(volume);
  } else {
    next.erase(volume);
  }
  if (Status s = Write(next); !s.ok()) return s;
  names_ = std::move(next);
  return Status::Ok();
}

Status OpenTargets::Write(const std::set<std::string>& names) {
  if (Status s = MkdirP(dir_); !s.ok()) return s;
  std::string text;
  for (const auto& n : names) text += n + "\n";
  return WriteFileAtomic(dir_, kFileName, text);
}

}  // namespace nbdcsi::replica
