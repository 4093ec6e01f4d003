#include "datapath/backup/manifest.h"

#include <nlohmann/json.hpp>

#include "common/json_field.h"
#include "datapath/backup/chunk.h"

namespace nbdcsi::datapath::backup {

using nlohmann::json;

std::string ManifestToJson(const Manifest& m) {
  json chunks = json::array();
  for (const ChunkRef& c : m.chunks) {
    chunks.push_back({{"offset", c.offset}, {"sha256", c.sha256}, {"stored_size", c.stored_size}});
  }
  json j = {{"format", m.format},
            {"name", m.name},
            {"source_volume", m.source_volume},
            {"source_snapshot", m.source_snapshot},
            {"created_unix_ns", m.created_unix_ns},
            {"volume_size", m.volume_size},
            {"chunk_size", m.chunk_size},
            {"chunks", std::move(chunks)},
            {"data_bytes", m.data_bytes},
            {"stored_bytes", m.stored_bytes},
            {"uploaded_bytes", m.uploaded_bytes}};
  return j.dump();
}

namespace {

template <typename T>
Status Field(const json& j, const char* key, T* out) {
  return json_field::Read(j, "manifest", key, *out);
}

}  // namespace

StatusOr<Manifest> ParseManifest(std::string_view text) {
  json j = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) return Error(EINVAL, "manifest: not a JSON object");
  Manifest m;
  if (Status s = Field(j, "format", &m.format); !s.ok()) return s;
  if (m.format != kManifestFormat) {
    return Error(EINVAL, "manifest: format {} is not supported (this build reads {})", m.format,
                 kManifestFormat);
  }
  for (auto [key, out] : {std::pair{"name", &m.name}, std::pair{"source_volume", &m.source_volume},
                          std::pair{"source_snapshot", &m.source_snapshot}}) {
    if (Status s = Field(j, key, out); !s.ok()) return s;
  }
  if (Status s = Field(j, "created_unix_ns", &m.created_unix_ns); !s.ok()) return s;
  for (auto [key, out] :
       {std::pair{"volume_size", &m.volume_size}, std::pair{"chunk_size", &m.chunk_size},
        std::pair{"data_bytes", &m.data_bytes}, std::pair{"stored_bytes", &m.stored_bytes},
        std::pair{"uploaded_bytes", &m.uploaded_bytes}}) {
    if (Status s = Field(j, key, out); !s.ok()) return s;
  }
  if (Status s = ValidateBackupName(m.name); !s.ok()) {
    return Error(EINVAL, "manifest: {}", s.message());
  }
  if (m.chunk_size == 0 || m.chunk_size > kMaxChunkSize) {
    return Error(EINVAL, "manifest: chunk_size {} is not in 1..{}", m.chunk_size, kMaxChunkSize);
  }
  auto chunks = j.find("chunks");
  if (chunks == j.end() || !chunks->is_array()) {
    return Error(EINVAL, "manifest: \"chunks\" is missing or not an array");
  }
  bool first = true;
  uint64_t prev = 0;  // the last entry's offset (prev + chunk_size may not fit in 64 bits)
  for (const json& c : *chunks) {
    if (!c.is_object()) return Error(EINVAL, "manifest: a chunk entry is not an object");
    ChunkRef r;
    if (Status s = Field(c, "offset", &r.offset); !s.ok()) return s;
    if (Status s = Field(c, "sha256", &r.sha256); !s.ok()) return s;
    if (Status s = Field(c, "stored_size", &r.stored_size); !s.ok()) return s;
    if (r.offset % m.chunk_size != 0 || (!first && r.offset <= prev) ||
        r.offset >= m.volume_size) {
      return Error(EINVAL,
                   "manifest: chunk offset {} is not a chunk boundary in increasing order below "
                   "the volume size {}",
                   r.offset, m.volume_size);
    }
    if (!IsSha256Hex(r.sha256)) {
      return Error(EINVAL, "manifest: chunk at offset {}: \"{}\" is not a SHA-256", r.offset,
                   r.sha256);
    }
    prev = r.offset;
    first = false;
    m.chunks.push_back(std::move(r));
  }
  return m;
}

Status ValidateBackupName(const std::string& name) {
  if (name.empty() || name.size() > 128) {
    return Error(EINVAL, "backup name \"{}\" must be 1 to 128 bytes", name);
  }
  if (name[0] == '.' || name[0] == '-') {
    return Error(EINVAL, "backup name \"{}\" must not start with '.' or '-'", name);
  }
  for (char c : name) {
    bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '.' || c == '_' || c == '-';
    if (!ok) return Error(EINVAL, "backup name \"{}\" may only hold [A-Za-z0-9._-]", name);
  }
  return Status::Ok();
}

}  // namespace nbdcsi::datapath::backup
