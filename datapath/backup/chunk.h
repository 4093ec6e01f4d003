// What happens to one chunk of a volume on its way to the object store and back: its name is the
// SHA-256 of its uncompressed bytes, its stored form is one zstd frame.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "common/status.h"

namespace nbdcsi::datapath::backup {

// Lower-case hex SHA-256 (64 characters).
std::string Sha256Hex(std::string_view data);

// True for 64 lower-case hex digits: what may appear in a chunk key (manifests come from the
// store and are not trusted).
bool IsSha256Hex(std::string_view s);

// One zstd frame. Level 1: the upload, not the CPU, should bound a backup, and level 1 already
// takes the bulk of what zeros and text give.
std::string Compress(std::string_view data, int level = 1);

// The frame back; EINVAL (a corrupt or foreign object) unless it is exactly one valid frame
// whose content is `expected_size` bytes. The size is checked before anything is allocated, so
// a hostile object cannot make us allocate more than a chunk.
StatusOr<std::string> Decompress(std::string_view frame, uint64_t expected_size);
// A frame whose size is its own business (an encrypted manifest: authenticated before it gets
// here), up to `max_size` bytes.
StatusOr<std::string> DecompressUpTo(std::string_view frame, uint64_t max_size);

}  // namespace nbdcsi::datapath::backup
