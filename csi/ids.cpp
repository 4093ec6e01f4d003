#include "csi/ids.h"

#include <openssl/evp.h>

#include <array>

#include <fmt/format.h>

#include "common/node_id.h"

namespace nbdcsi::csi {
namespace {

// Messages quote user input; control bytes would garble a log line, so they are escaped. Long
// input is cut: a message travels back in gRPC's grpc-message header, and one that quotes a
// multi-kilobyte id twice overflows the client's metadata limit, which turns the clear
// INVALID_ARGUMENT into a transport error.
constexpr size_t kMaxQuoted = 80;

std::string Quote(std::string_view s) {
  std::string out = "\"";
  for (unsigned char c : s.substr(0, kMaxQuoted)) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += static_cast<char>(c);
    } else if (c < 0x20 || c == 0x7f) {
      out += fmt::format("\\x{:02x}", c);
    } else {
      out += static_cast<char>(c);
    }
  }
  if (s.size() > kMaxQuoted) return out + fmt::format("\"... ({} bytes)", s.size());
  return out + "\"";
}

template <typename Ref>
StatusOr<Ref> ParseId(std::string_view id, std::string_view prefix, std::string_view kind) {
  const std::string what = fmt::format("{} id {}", kind, Quote(id));
  if (id.empty()) return Error(EINVAL, "{} id must not be empty", kind);
  if (id.substr(0, prefix.size()) != prefix) {
    return Error(EINVAL, "{} is not an nbd.csi.io {} id (expected \"{}<node>:<name>\")", what, kind,
                 prefix);
  }
  std::string_view rest = id.substr(prefix.size());
  size_t colon = rest.find(':');
  if (colon == std::string_view::npos) {
    return Error(EINVAL, "{}: missing ':' between node and name (expected \"{}<node>:<name>\")",
                 what, prefix);
  }
  std::string_view node = rest.substr(0, colon);
  std::string_view name = rest.substr(colon + 1);
  if (Status s = ValidateNodeId(node); !s.ok()) {
    return Error(EINVAL, "{}: {}", what, s.message());
  }
  if (Status s = ValidatePoolName(kind, name); !s.ok()) {
    return Error(EINVAL, "{}: {}", what, s.message());
  }
  return Ref{std::string(node), std::string(name)};
}

StatusOr<std::string> FormatId(std::string_view prefix, std::string_view kind,
                               std::string_view node_id, std::string_view pool_name) {
  if (Status s = ValidateNodeId(node_id); !s.ok()) return s;
  if (Status s = ValidatePoolName(kind, pool_name); !s.ok()) return s;
  return fmt::format("{}{}:{}", prefix, node_id, pool_name);
}

}  // namespace

// One rule for node ids across the project: the datapath registers under the same check.
Status ValidateNodeId(std::string_view node_id) { return ::nbdcsi::ValidateNodeId(node_id); }

Status ValidatePoolName(std::string_view kind, std::string_view name) {
  if (name.empty()) return Error(EINVAL, "{} name must not be empty", kind);
  if (name.size() > kMaxPoolNameLen) {
    return Error(EINVAL, "{} name is {} bytes, the limit is {}", kind, name.size(),
                 kMaxPoolNameLen);
  }
  if (name.front() == '.' || name.front() == '-') {
    return Error(EINVAL, "{} name {} must not start with '{}'", kind, Quote(name), name.front());
  }
  for (char c : name) {
    bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '.' || c == '_' || c == '-';
    if (!ok) {
      return Error(EINVAL, "{} name {} contains {} (allowed: A-Z a-z 0-9 . _ -)", kind, Quote(name),
                   Quote(std::string_view(&c, 1)));
    }
  }
  return Status::Ok();
}

StatusOr<std::string> FormatVolumeId(std::string_view node_id, std::string_view pool_name) {
  return FormatId("v1:", "volume", node_id, pool_name);
}
StatusOr<std::string> FormatSnapshotId(std::string_view node_id, std::string_view pool_name) {
  return FormatId("s1:", "snapshot", node_id, pool_name);
}

StatusOr<VolumeRef> ParseVolumeId(std::string_view id) {
  return ParseId<VolumeRef>(id, "v1:", "volume");
}
StatusOr<SnapshotRef> ParseSnapshotId(std::string_view id) {
  return ParseId<SnapshotRef>(id, "s1:", "snapshot");
}

StatusOr<std::string> FormatReplicatedVolumeId(std::string_view pool_name) {
  if (Status s = ValidatePoolName("volume", pool_name); !s.ok()) return s;
  return fmt::format("r1:{}", pool_name);
}

bool IsReplicatedVolumeId(std::string_view id) { return id.starts_with("r1:"); }

StatusOr<std::string> ParseReplicatedVolumeId(std::string_view id) {
  if (!IsReplicatedVolumeId(id)) {
    return Error(EINVAL,
                 "volume id {} is not an nbd.csi.io replicated volume id (expected "
                 "\"r1:<name>\")",
                 Quote(id));
  }
  std::string_view name = id.substr(3);
  if (Status s = ValidatePoolName("volume", name); !s.ok()) {
    return Error(EINVAL, "volume id {}: {}", Quote(id), s.message());
  }
  return std::string(name);
}

bool IsBackupSnapshotId(std::string_view id) { return id.starts_with("b1:"); }

namespace {

// "s3://bucket[/prefix]": the bucket's own rules are the store's to check; here only what keeps
// the id parseable and routable.
Status ValidateBackupUrl(std::string_view url) {
  if (!url.starts_with("s3://") || url.size() == 5 || url[5] == '/') {
    return Error(EINVAL, "backup target {} is not \"s3://BUCKET[/PREFIX]\"", Quote(url));
  }
  for (unsigned char c : url) {
    if (c == '#' || c <= 0x20 || c == 0x7f) {
      return Error(EINVAL, "backup target {} contains {} (not allowed in a snapshot id)",
                   Quote(url), Quote(std::string_view(reinterpret_cast<const char*>(&c), 1)));
    }
  }
  return Status::Ok();
}

}  // namespace

StatusOr<std::string> FormatBackupSnapshotId(std::string_view url, std::string_view name) {
  if (Status s = ValidateBackupUrl(url); !s.ok()) return s;
  if (Status s = ValidatePoolName("backup", name); !s.ok()) return s;
  std::string id = fmt::format("b1:{}#{}", url, name);
  if (id.size() > kMaxIdLen) {
    return Error(EINVAL,
                 "backup target {} is too long: the snapshot id \"b1:<target>#{}\" would be {} "
                 "bytes, CSI allows {}",
                 Quote(url), name, id.size(), kMaxIdLen);
  }
  return id;
}

StatusOr<BackupRef> ParseBackupSnapshotId(std::string_view id) {
  if (!IsBackupSnapshotId(id)) {
    return Error(EINVAL,
                 "snapshot id {} is not an nbd.csi.io backup id (expected "
                 "\"b1:s3://<bucket>/<prefix>#<name>\")",
                 Quote(id));
  }
  std::string_view rest = id.substr(3);
  size_t hash = rest.rfind('#');
  if (hash == std::string_view::npos) {
    return Error(EINVAL, "snapshot id {}: missing '#' between target and name", Quote(id));
  }
  BackupRef ref{std::string(rest.substr(0, hash)), std::string(rest.substr(hash + 1))};
  if (Status s = ValidateBackupUrl(ref.url); !s.ok()) {
    return Error(EINVAL, "snapshot id {}: {}", Quote(id), s.message());
  }
  if (Status s = ValidatePoolName("backup", ref.name); !s.ok()) {
    return Error(EINVAL, "snapshot id {}: {}", Quote(id), s.message());
  }
  return ref;
}

StatusOr<std::string> PoolNameForCsiName(std::string_view csi_name) {
  if (csi_name.empty()) return Error(EINVAL, "name must not be empty");
  if (ValidatePoolName("volume", csi_name).ok()) return std::string(csi_name);
  std::array<unsigned char, EVP_MAX_MD_SIZE> md{};
  unsigned int md_len = 0;
  if (EVP_Digest(csi_name.data(), csi_name.size(), md.data(), &md_len, EVP_sha256(), nullptr) !=
          1 ||
      md_len < 16) {
    return Error(EIO, "SHA-256 of name {} failed (OpenSSL)", Quote(csi_name));
  }
  std::string out = "h-";
  for (unsigned i = 0; i < 16; ++i) out += fmt::format("{:02x}", md[i]);
  return out;
}

}  // namespace nbdcsi::csi
