// Reader and replayer for the log that the kernel's dm-log-writes target records.
//
// The format (Documentation/admin-guide/device-mapper/log-writes.rst and the target's source):
// the log device starts with a superblock {le64 magic, le64 version, le64 nr_entries, le32
// sectorsize}. Entries follow from byte `sectorsize` on, each one block of `sectorsize` bytes
// holding {le64 sector, le64 nr_sectors, le64 flags, le64 data_len} (a MARK keeps its text,
// data_len bytes, right after those 32 bytes), then the data written: nr_sectors blocks, none
// for a DISCARD. `sector` and `nr_sectors` count blocks of `sectorsize` bytes (the logical
// block size of the logged device), not 512-byte sectors.
//
// The kernel logs a write only once a FLUSH has made it durable (or at once for FUA), so the
// image made by replaying entries [0, N] is a state the disk could have held after a power cut
// right after entry N. The points worth checking are the FLUSH, FUA and MARK entries (the
// xfstests method): the writes logged between two of them are those the next FLUSH made
// durable, and replaying to each point checks the state with none or all of them.
//
// Everything read from a log is checked before it is used: a corrupt or truncated log is an
// error naming the entry and its byte offset, never a crash or a write outside the target.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "common/status.h"

namespace nbdcsi::logwrites {

inline constexpr uint64_t kLogMagic = 0x6a736677736872ULL;
inline constexpr uint64_t kLogVersion = 1;
inline constexpr uint64_t kFlagFlush = 1u << 0;
inline constexpr uint64_t kFlagFua = 1u << 1;
inline constexpr uint64_t kFlagDiscard = 1u << 2;
inline constexpr uint64_t kFlagMark = 1u << 3;
inline constexpr uint64_t kFlagMetadata = 1u << 4;  // REQ_META: informational only
inline constexpr uint64_t kKnownFlags =
    kFlagFlush | kFlagFua | kFlagDiscard | kFlagMark | kFlagMetadata;
inline constexpr size_t kSuperBytes = 28;
inline constexpr size_t kEntryHeaderBytes = 32;

struct Super {
  uint64_t nr_entries = 0;
  uint32_t sectorsize = 0;
};

struct Entry {
  uint64_t index = 0;   // 0-based position in the log
  uint64_t offset = 0;  // byte offset of its header block in the log
  uint64_t sector = 0;  // in blocks of Super::sectorsize
  uint64_t nr_sectors = 0;
  uint64_t flags = 0;
  uint64_t data_len = 0;
  std::string mark;  // MARK entries only

  bool is_point() const { return flags & (kFlagFlush | kFlagFua | kFlagMark); }
  // Whether replaying it changes the image (a write with data, or a discard).
  bool changes_image() const { return nr_sectors > 0; }
};

// Parses and validates the superblock (magic, version, a power-of-two sectorsize of 512..64K).
StatusOr<Super> ParseSuper(const uint8_t* p, size_t n);
// Parses one entry header block of `sectorsize` bytes. Checks: no unknown flag, a MARK has no
// data and its text fits in the block, only a MARK carries data_len, a DISCARD has no
// FLUSH/FUA, the extent does not overflow. `index`/`offset` only label errors and the result.
StatusOr<Entry> ParseEntry(const uint8_t* p, size_t n, uint32_t sectorsize, uint64_t index,
                           uint64_t offset);
// Bytes the entry occupies in the log: its header block plus its data (none for a DISCARD).
uint64_t EntryLogBytes(const Entry& e, uint32_t sectorsize);
// "FLUSH|FUA", "MARK", "DISCARD|META", or "WRITE" when no flag is set.
std::string FlagNames(uint64_t flags);
// A mark text as one shell word: bytes outside printable ASCII or blanks become '?'.
std::string PrintableMark(const std::string& mark);

// Reads a log sequentially (a regular file or a block device holding one).
class LogReader {
 public:
  static StatusOr<std::unique_ptr<LogReader>> Open(const std::string& path);
  ~LogReader();
  LogReader(const LogReader&) = delete;
  LogReader& operator=(const LogReader&) = delete;

  const Super& super() const { return super_; }
  // The entry at the cursor (and advances it), or nullopt after the last of nr_entries.
  StatusOr<std::optional<Entry>> Next();
  // Moves the cursor to entry `index` whose header is at byte `offset` (a cursor saved from
  // next_index()/next_offset() of an earlier reader of the same log).
  Status Seek(uint64_t index, uint64_t offset);
  // The data blocks of a write entry (empty for marks, bare flushes and discards).
  Status ReadData(const Entry& e, std::vector<uint8_t>& out);
  uint64_t next_index() const { return next_index_; }
  uint64_t next_offset() const { return next_offset_; }

 private:
  LogReader() = default;
  Status ReadAt(uint64_t off, uint8_t* buf, size_t len, const char* what);
  std::string path_;
  int fd_ = -1;
  uint64_t size_ = 0;
  Super super_;
  uint64_t next_index_ = 0;
  uint64_t next_offset_ = 0;
};

// Where a log is replayed: a block device (a DISCARD becomes BLKZEROOUT) or a regular file (a
// DISCARD punches a hole). Both read back zeros where the original device was discarded, which
// is what loop devices on tmpfs, our logged devices, return.
class ReplayTarget {
 public:
  static StatusOr<std::unique_ptr<ReplayTarget>> Open(const std::string& path);
  ~ReplayTarget();
  ReplayTarget(const ReplayTarget&) = delete;
  ReplayTarget& operator=(const ReplayTarget&) = delete;

  uint64_t size() const { return size_; }
  // Applies one entry; `data` is what LogReader::ReadData returned for it. EINVAL (naming the
  // entry) when the extent ends past the target.
  Status Apply(const Entry& e, uint32_t sectorsize, const std::vector<uint8_t>& data);
  Status Sync();

 private:
  ReplayTarget() = default;
  std::string path_;
  int fd_ = -1;
  bool is_block_ = false;
  uint64_t size_ = 0;
};

// A crash point and whether the image there equals the image at the next point (no write or
// discard between them: checking the later point, with its stronger expectations, covers it).
struct Point {
  Entry entry;
  bool same_as_next = false;
};
// The points from the reader's cursor to the end of the log. With `from_mark`, those from the
// first MARK with that text on (ENOENT if there is none).
StatusOr<std::vector<Point>> CrashPoints(LogReader& r, const std::string& from_mark = "");
// Applies the entries from the reader's cursor through entry `to` (inclusive), then syncs.
Status ReplayThrough(LogReader& r, ReplayTarget& t, uint64_t to);

// Inserts a MARK into the log of the dm-log-writes device `dm_name` (what `dmsetup message NAME
// 0 mark TEXT` does, without a process): a DM_TARGET_MSG ioctl on /dev/mapper/control. The mark
// lands after every write that a completed FLUSH has already made durable. `text` must be 1..400
// printable bytes without blanks (the target splits its message on blanks).
Status SendMark(const std::string& dm_name, const std::string& text);
Status ValidateMarkText(const std::string& text);

}  // namespace nbdcsi::logwrites
