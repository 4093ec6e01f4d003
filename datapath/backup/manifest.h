// A backup is its manifest: the list of chunk hashes that rebuild the volume. Pure functions over
// bytes (no store, no file), so the parser can be unit-tested and fuzzed on its own.
//
// JSON, format 1:
//   {"format": 1, "name": "...", "source_volume": "...", "source_snapshot": "...",
//    "created_unix_ns": N, "volume_size": N, "chunk_size": N,
//    "chunks": [{"offset": N, "sha256": "64 hex", "stored_size": N}, ...],
//    "data_bytes": N, "stored_bytes": N, "uploaded_bytes": N}
// Offsets are multiples of chunk_size, strictly increasing, below volume_size. A range with no
// entry was a hole (never written) or all zeros, and is restored as a hole. The chunk at offset
// o holds min(chunk_size, volume_size - o) bytes before compression.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "common/status.h"

namespace nbdcsi::datapath::backup {

inline constexpr int kManifestFormat = 1;
inline constexpr uint64_t kDefaultChunkSize = uint64_t{4} << 20;
// Larger chunks are refused when reading a manifest: a restore holds a few of them in memory.
inline constexpr uint64_t kMaxChunkSize = uint64_t{64} << 20;

struct ChunkRef {
  uint64_t offset = 0;
  std::string sha256;
  uint64_t stored_size = 0;  // compressed bytes of the object (informational)
};

struct Manifest {
  int format = kManifestFormat;
  std::string name;
  std::string source_volume;
  std::string source_snapshot;
  int64_t created_unix_ns = 0;
  uint64_t volume_size = 0;
  uint64_t chunk_size = kDefaultChunkSize;
  std::vector<ChunkRef> chunks;
  uint64_t data_bytes = 0;      // uncompressed bytes of all chunks
  uint64_t stored_bytes = 0;    // compressed bytes of all chunks (shared ones included)
  uint64_t uploaded_bytes = 0;  // compressed bytes this backup uploaded (new chunks only)
  // Not in the JSON: set by Repository::Read when the target is encrypted (then each chunk's
  // "sha256" is its HMAC-SHA256 under the target's id key, crypto.h).
  bool encrypted = false;

  // Bytes of the chunk at `offset` before compression.
  uint64_t ChunkLength(uint64_t offset) const { return std::min(chunk_size, volume_size - offset); }
};

std::string ManifestToJson(const Manifest& m);
// EINVAL naming the first problem: not JSON, unknown format, a bad field, offsets out of order
// or range, a hash that is not 64 hex digits.
StatusOr<Manifest> ParseManifest(std::string_view json);

// Backup names follow the pool's volume-name rules (datapath/pool/rules.h): they become object
// keys and must not hold '/' or anything S3 would encode. EINVAL with the reason.
Status ValidateBackupName(const std::string& name);

}  // namespace nbdcsi::datapath::backup
