// The self-describing 4 KiB blocks that powercut-writer writes and powercut-check verifies:
//   [0, 8)      magic "PCUTBLK1"
//   [8, 16)     block number (the block's own position: a block found elsewhere is misplaced)
//   [16, 24)    sequence number of the write (1, 2, ... over the whole run)
//   [24, 32)    writer round the write belongs to
//   [32, 4088)  filler derived from (block, seq): a torn or mixed block fails the checksum
//   [4088, 4096) FNV-1a 64 of bytes [0, 4088)
// All little-endian (the guest is x86-64; both programs run there).
#pragma once

#include <cstdint>
#include <cstring>

namespace nbdcsi::powercut {

inline constexpr uint64_t kBlockSize = 4096;
inline constexpr uint64_t kStampMagic = 0x314b4c4254554350ULL;  // "PCUTBLK1"

struct StampFields {
  uint64_t block = 0, seq = 0, round = 0;
};

inline uint64_t Fnv1a(const uint8_t* p, size_t n) {
  uint64_t h = 0xcbf29ce484222325ULL;
  for (size_t i = 0; i < n; ++i) h = (h ^ p[i]) * 0x100000001b3ULL;
  return h;
}

inline void MakeStamp(uint8_t* buf, uint64_t block, uint64_t seq, uint64_t round) {
  const uint64_t head[4] = {kStampMagic, block, seq, round};
  std::memcpy(buf, head, sizeof(head));
  uint64_t x = (seq * 0x9e3779b97f4a7c15ULL) ^ (block + 1);  // xorshift64 state, never 0
  for (size_t off = sizeof(head); off < kBlockSize - 8; off += 8) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    std::memcpy(buf + off, &x, 8);
  }
  const uint64_t sum = Fnv1a(buf, kBlockSize - 8);
  std::memcpy(buf + kBlockSize - 8, &sum, 8);
}

enum class StampKind { kZero, kValid, kCorrupt };

// kZero: all 4096 bytes are 0 (never written, or a hole). kValid: magic and checksum hold;
// `out` has the fields. kCorrupt: anything else.
inline StampKind ReadStamp(const uint8_t* buf, StampFields* out) {
  uint64_t head[4];
  std::memcpy(head, buf, sizeof(head));
  if (head[0] == kStampMagic) {
    uint64_t sum;
    std::memcpy(&sum, buf + kBlockSize - 8, 8);
    if (sum != Fnv1a(buf, kBlockSize - 8)) return StampKind::kCorrupt;
    *out = StampFields{head[1], head[2], head[3]};
    return StampKind::kValid;
  }
  static const uint8_t kZeros[kBlockSize] = {};
  return std::memcmp(buf, kZeros, kBlockSize) == 0 ? StampKind::kZero : StampKind::kCorrupt;
}

}  // namespace nbdcsi::powercut
