#include "datapath/attach/record.h"

#include <dirent.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>

#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include "common/fs_util.h"
#include "common/json_field.h"
#include "datapath/attach/fuse_attach.h"
#include "datapath/attach/kernel_nbd.h"

namespace nbdcsi::datapath {
namespace {

constexpr const char* kRecordSuffix = ".json";
constexpr const char* kTempSuffix = ".json.tmp";

bool EndsWith(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

Status Sys(int err, const std::string& what) {
  return Error(err, "{}: {}", what, std::strerror(err));
}

}  // namespace

std::string AttachmentRecord::device() const {
  if (index < 0) return std::string();
  return fuse() ? LoopDevicePath(index) : NbdDevicePath(index);
}

std::string AttachmentRecord::ToJson() const {
  nlohmann::json j = {{"volume", volume},           {"mode", mode},
                      {"index", index},             {"cookie", cookie},
                      {"connections", connections}, {"size_bytes", size_bytes},
                      {"read_only", read_only}};
  if (fuse()) {
    j["fuse_pid"] = fuse_pid;
    j["fuse_mount"] = fuse_mount;
  }
  if (target) j["target"] = true;
  return j.dump(2) + "\n";
}

StatusOr<AttachmentRecord> AttachmentRecord::FromJson(const std::string& text) {
  using json_field::Need;
  using json_field::Read;
  auto j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) {
    return Error(EINVAL, "malformed attachment record: not a JSON object");
  }
  constexpr std::string_view kWhat = "attachment record";
  AttachmentRecord r;
  r.mode = kModeKernel;  // records before fuse had no mode
  uint64_t connections = 0;
  Status s = Read(j, kWhat, "volume", r.volume);
  if (s.ok()) s = Read(j, kWhat, "index", r.index);
  if (s.ok()) s = Read(j, kWhat, "cookie", r.cookie);
  if (s.ok()) s = Read(j, kWhat, "connections", connections);
  if (s.ok()) s = Read(j, kWhat, "size_bytes", r.size_bytes, Need::kOptional);
  if (s.ok()) s = Read(j, kWhat, "read_only", r.read_only, Need::kOptional);
  if (s.ok()) s = Read(j, kWhat, "mode", r.mode, Need::kOptional);
  if (s.ok()) s = Read(j, kWhat, "target", r.target, Need::kOptional);
  if (s.ok() && r.fuse()) s = Read(j, kWhat, "fuse_pid", r.fuse_pid);
  if (s.ok() && r.fuse()) s = Read(j, kWhat, "fuse_mount", r.fuse_mount);
  if (!s.ok()) return Error(EINVAL, "malformed {}", s.message());
  if (connections == 0 || connections > kMaxAttachConnections) {
    return Error(EINVAL, "attachment record of volume '{}' has {} connections (1 to {})",
                 r.volume, connections, kMaxAttachConnections);
  }
  r.connections = static_cast<unsigned>(connections);
  if (r.mode != kModeKernel && r.mode != kModeFuse) {
    return Error(EINVAL, "attachment record has an unknown mode '{}'", r.mode);
  }
  if (r.fuse() && (r.fuse_mount.empty() || r.fuse_mount[0] != '/' || r.fuse_pid < -1)) {
    return Error(EINVAL, "fuse attachment record has invalid fields (mount '{}', pid {})",
                 r.fuse_mount, r.fuse_pid);
  }
  if (r.target && r.fuse()) {
    // Targets attach through kernel NBD only (attachments.h): such a record was never written.
    return Error(EINVAL, "attachment record of volume '{}' is a fuse attachment of a target",
                 r.volume);
  }
  if (r.volume.empty() || r.cookie.empty() || r.index < -1) {
    return Error(EINVAL, "attachment record has invalid fields (volume '{}', index {})", r.volume,
                 r.index);
  }
  return r;
}

RecordStore::RecordStore(std::string dir) : dir_(std::move(dir)) {
  while (dir_.size() > 1 && dir_.back() == '/') dir_.pop_back();
}

Status RecordStore::Init() {
  struct stat st;
  if (stat(dir_.c_str(), &st) == 0) {
    if (!S_ISDIR(st.st_mode)) return Error(ENOTDIR, "{} exists and is not a directory", dir_);
    return Status::Ok();
  }
  if (errno != ENOENT) return Sys(errno, "stat " + dir_);
  if (mkdir(dir_.c_str(), 0700) != 0 && errno != EEXIST) return Sys(errno, "mkdir " + dir_);
  std::string parent = dir_.substr(0, dir_.find_last_of('/'));
  return FsyncDir(parent.empty() ? "/" : parent);
}

Status RecordStore::Write(const AttachmentRecord& r) {
  return WriteFileAtomic(dir_, r.volume + kRecordSuffix, r.ToJson());
}

Status RecordStore::Remove(const std::string& volume) {
  std::string path = dir_ + "/" + volume + kRecordSuffix;
  if (unlink(path.c_str()) != 0 && errno != ENOENT) return Sys(errno, "remove " + path);
  return FsyncDir(dir_);
}

StatusOr<std::vector<LoadedRecord>> RecordStore::Load() const {
  DIR* d = opendir(dir_.c_str());
  if (!d) return Error(errno, "{}: cannot open: {}", dir_, std::strerror(errno));
  std::vector<std::string> files;
  while (dirent* e = readdir(d)) {
    std::string f = e->d_name;
    if (f == "." || f == "..") continue;
    if (EndsWith(f, kTempSuffix)) {
      std::string p = dir_ + "/" + f;
      if (unlink(p.c_str()) == 0) spdlog::warn("attach: removed interrupted record write {}", p);
      continue;
    }
    if (EndsWith(f, kRecordSuffix)) files.push_back(f);
  }
  closedir(d);
  std::sort(files.begin(), files.end());

  std::vector<LoadedRecord> out;
  for (const auto& f : files) {
    std::string stem = f.substr(0, f.size() - std::strlen(kRecordSuffix));
    std::string path = dir_ + "/" + f;
    auto text = ReadSmallFile(path);
    if (!text.ok()) {
      out.push_back({std::move(stem), std::move(path), text.status(), true});
      continue;
    }
    StatusOr<AttachmentRecord> rec = AttachmentRecord::FromJson(*text);
    if (rec.ok() && rec->volume != stem) rec = Error(EINVAL, "names volume '{}'", rec->volume);
    out.push_back({std::move(stem), std::move(path), std::move(rec), false});
  }
  return out;
}

}  // namespace nbdcsi::datapath
