// tools/logwrites: logs built byte by byte as the kernel lays them out are parsed, listed as crash
// points and replayed onto a file; corrupt or truncated logs are errors naming the entry.
#include "tools/logwrites/log_writes.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

namespace nbdcsi::logwrites {
namespace {

using ::testing::HasSubstr;
namespace fs = std::filesystem;

void PutLe(std::vector<uint8_t>& b, size_t at, uint64_t v, int bytes) {
  for (int i = 0; i < bytes; ++i) b[at + i] = static_cast<uint8_t>(v >> (8 * i));
}

// Builds a log the way dm-log-writes writes one: superblock in block 0, then for each entry a
// header block followed by its data blocks (none for discards and marks).
class LogBuilder {
 public:
  explicit LogBuilder(uint32_t ss = 512) : ss_(ss), bytes_(ss, 0) {}
  LogBuilder& Write(uint64_t sector, const std::vector<uint8_t>& data, uint64_t flags = 0) {
    Header(sector, data.size() / ss_, flags, "");
    bytes_.insert(bytes_.end(), data.begin(), data.end());
    return *this;
  }
  LogBuilder& Flush() { return Header(0, 0, kFlagFlush, ""); }
  LogBuilder& Discard(uint64_t sector, uint64_t n) { return Header(sector, n, kFlagDiscard, ""); }
  LogBuilder& Mark(const std::string& text) { return Header(0, 0, kFlagMark, text); }
  LogBuilder& Raw(uint64_t sector, uint64_t n, uint64_t flags, uint64_t data_len) {
    size_t at = bytes_.size();
    bytes_.resize(at + ss_, 0);
    PutLe(bytes_, at, sector, 8);
    PutLe(bytes_, at + 8, n, 8);
    PutLe(bytes_, at + 16, flags, 8);
    PutLe(bytes_, at + 24, data_len, 8);
    ++entries_;
    return *this;
  }
  std::vector<uint8_t> Build(uint64_t magic = kLogMagic, uint64_t version = kLogVersion) const {
    std::vector<uint8_t> b = bytes_;
    PutLe(b, 0, magic, 8);
    PutLe(b, 8, version, 8);
    PutLe(b, 16, entries_, 8);
    PutLe(b, 24, ss_, 4);
    return b;
  }
  std::vector<uint8_t> Block(uint8_t fill, uint64_t n = 1) const {
    return std::vector<uint8_t>(n * ss_, fill);
  }

 private:
  LogBuilder& Header(uint64_t sector, uint64_t n, uint64_t flags, const std::string& text) {
    size_t at = bytes_.size();
    Raw(sector, n, flags, text.size());
    std::memcpy(bytes_.data() + at + kEntryHeaderBytes, text.data(), text.size());
    return *this;
  }
  uint32_t ss_;
  std::vector<uint8_t> bytes_;
  uint64_t entries_ = 0;
};

class LogWritesTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const char* base = std::getenv("TMPDIR");
    std::string tmpl = std::string(base ? base : "/tmp") + "/logwrites_test.XXXXXX";
    ASSERT_NE(mkdtemp(tmpl.data()), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override { fs::remove_all(dir_); }

  std::string Put(const std::string& name, const std::vector<uint8_t>& bytes) {
    std::string p = dir_ + "/" + name;
    std::ofstream(p, std::ios::binary)
        .write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
    return p;
  }
  std::string Target(uint64_t bytes, uint8_t fill) {
    return Put("target", std::vector<uint8_t>(bytes, fill));
  }
  static std::vector<uint8_t> Slurp(const std::string& p) {
    std::ifstream in(p, std::ios::binary);
    std::ostringstream ss;
    ss << in.rdbuf();
    std::string s = ss.str();
    return std::vector<uint8_t>(s.begin(), s.end());
  }
  std::vector<Entry> All(const std::string& log) {
    auto r = LogReader::Open(log);
    EXPECT_TRUE(r.ok()) << r.status().message();
    std::vector<Entry> out;
    for (;;) {
      auto e = (*r)->Next();
      EXPECT_TRUE(e.ok()) << e.status().message();
      if (!e.ok() || !e->has_value()) break;
      out.push_back(**e);
    }
    return out;
  }

  std::string dir_;
};

TEST(LogFormat, SuperRejectsWrongMagicVersionAndSectorSize) {
  LogBuilder b;
  auto good = b.Build();
  auto s = ParseSuper(good.data(), good.size());
  ASSERT_TRUE(s.ok()) << s.status().message();
  EXPECT_EQ(s->sectorsize, 512u);
  EXPECT_EQ(s->nr_entries, 0u);

  auto bad_magic = b.Build(0x1234);
  EXPECT_THAT(ParseSuper(bad_magic.data(), bad_magic.size()).status().message(),
              HasSubstr("not a dm-log-writes log"));
  auto bad_version = b.Build(kLogMagic, 2);
  EXPECT_THAT(ParseSuper(bad_version.data(), bad_version.size()).status().message(),
              HasSubstr("version 2"));
  auto odd = good;
  PutLe(odd, 24, 1000, 4);
  EXPECT_THAT(ParseSuper(odd.data(), odd.size()).status().message(),
              HasSubstr("sectorsize 1000"));
  EXPECT_EQ(ParseSuper(good.data(), 27).status().code(), EINVAL);
}

TEST(LogFormat, EntryChecksEveryField) {
  std::vector<uint8_t> blk(512, 0);
  auto parse = [&](uint64_t sector, uint64_t n, uint64_t flags, uint64_t len) {
    std::fill(blk.begin(), blk.end(), 0);
    PutLe(blk, 0, sector, 8);
    PutLe(blk, 8, n, 8);
    PutLe(blk, 16, flags, 8);
    PutLe(blk, 24, len, 8);
    return ParseEntry(blk.data(), blk.size(), 512, 7, 4096);
  };
  EXPECT_TRUE(parse(10, 8, kFlagFlush | kFlagFua | kFlagMetadata, 0).ok());
  EXPECT_THAT(parse(0, 0, 1u << 9, 0).status().message(), HasSubstr("entry 7 (byte 4096)"));
  EXPECT_THAT(parse(0, 0, 1u << 9, 0).status().message(), HasSubstr("unknown flags"));
  EXPECT_THAT(parse(0, 1, kFlagMark, 3).status().message(), HasSubstr("MARK with data"));
  EXPECT_THAT(parse(0, 0, kFlagMark, 481).status().message(), HasSubstr("does not fit"));
  EXPECT_THAT(parse(0, 0, kFlagMark, 0).status().message(), HasSubstr("does not fit"));
  EXPECT_THAT(parse(0, 1, 0, 5).status().message(), HasSubstr("non-MARK"));
  EXPECT_THAT(parse(0, 1, kFlagDiscard | kFlagFlush, 0).status().message(),
              HasSubstr("DISCARD with FLUSH"));
  EXPECT_THAT(parse(UINT64_MAX / 512, 1, 0, 0).status().message(), HasSubstr("overflows"));
  EXPECT_EQ(FlagNames(kFlagFlush | kFlagFua), "FLUSH|FUA");
  EXPECT_EQ(FlagNames(0), "WRITE");
  EXPECT_EQ(PrintableMark("a b\n"), "a?b?");
}

TEST_F(LogWritesTest, ReaderWalksDataDiscardsAndMarks) {
  LogBuilder b;
  b.Write(4, b.Block(0xaa, 2)).Discard(100, 50).Flush().Mark("w12").Write(0, b.Block(0xbb), kFlagFua);
  std::string log = Put("log", b.Build());
  auto es = All(log);
  ASSERT_EQ(es.size(), 5u);
  EXPECT_EQ(es[0].offset, 512u);
  EXPECT_EQ(es[0].nr_sectors, 2u);
  EXPECT_EQ(es[1].offset, 512u + 3 * 512);  // header + 2 data blocks
  EXPECT_EQ(es[1].flags, kFlagDiscard);
  EXPECT_EQ(es[2].offset, es[1].offset + 512);  // a discard carries no data
  EXPECT_EQ(es[3].mark, "w12");
  EXPECT_EQ(es[4].flags, kFlagFua);
  EXPECT_EQ(es[4].index, 4u);
  auto r = LogReader::Open(log);
  ASSERT_TRUE(r.ok());
  std::vector<uint8_t> data;
  ASSERT_TRUE((*r)->ReadData(es[0], data).ok());
  EXPECT_EQ(data, b.Block(0xaa, 2));
  ASSERT_TRUE((*r)->ReadData(es[1], data).ok());
  EXPECT_TRUE(data.empty());
}

TEST_F(LogWritesTest, TruncatedOrCorruptLogNamesTheEntry) {
  LogBuilder b;
  b.Write(0, b.Block(1)).Write(1, b.Block(2, 4));
  auto bytes = b.Build();
  bytes.resize(bytes.size() - 512);  // the second entry's last data block is missing
  auto r = LogReader::Open(Put("short", bytes));
  ASSERT_TRUE(r.ok());
  ASSERT_TRUE((*r)->Next().ok());
  auto e = (*r)->Next();
  ASSERT_FALSE(e.ok());
  EXPECT_THAT(e.status().message(), HasSubstr("entry 1 (byte 1536)"));
  EXPECT_THAT(e.status().message(), HasSubstr("past the end of the log"));

  LogBuilder c;
  c.Raw(0, 0, 1u << 20, 0);
  auto r2 = LogReader::Open(Put("corrupt", c.Build()));
  ASSERT_TRUE(r2.ok());
  EXPECT_THAT((*r2)->Next().status().message(), HasSubstr("unknown flags"));

  EXPECT_THAT(LogReader::Open(Put("empty", {})).status().message(), HasSubstr("truncated"));
  EXPECT_EQ(LogReader::Open(dir_ + "/missing").status().code(), ENOENT);
}

TEST_F(LogWritesTest, ReaderHonoursNrEntriesOverTrailingBytes) {
  // The kernel rewrites nr_entries only on FUA and MARK entries: anything after is not counted.
  LogBuilder b;
  b.Mark("a").Write(0, b.Block(9));
  auto bytes = b.Build();
  PutLe(bytes, 16, 1, 8);
  EXPECT_EQ(All(Put("log", bytes)).size(), 1u);
}

TEST_F(LogWritesTest, CrashPointsAndSameAsNext) {
  LogBuilder b;
  b.Write(0, b.Block(1))       // 0
      .Flush()                 // 1  point; a mark follows with no write between: same
      .Mark("m1")              // 2  point; then a write: differs
      .Write(1, b.Block(2))    // 3
      .Write(2, b.Block(3), kFlagFua | kFlagFlush)  // 4 point with its own data
      .Discard(0, 1)           // 5
      .Mark("m2")              // 6 point, last
      ;
  std::string log = Put("log", b.Build());
  auto r = LogReader::Open(log);
  ASSERT_TRUE(r.ok());
  auto pts = CrashPoints(**r);
  ASSERT_TRUE(pts.ok()) << pts.status().message();
  ASSERT_EQ(pts->size(), 4u);
  EXPECT_EQ((*pts)[0].entry.index, 1u);
  EXPECT_TRUE((*pts)[0].same_as_next);
  EXPECT_EQ((*pts)[1].entry.mark, "m1");
  EXPECT_FALSE((*pts)[1].same_as_next);
  EXPECT_EQ((*pts)[2].entry.index, 4u);
  EXPECT_FALSE((*pts)[2].same_as_next);  // the discard lies between
  EXPECT_EQ((*pts)[3].entry.mark, "m2");
  EXPECT_FALSE((*pts)[3].same_as_next);

  auto r2 = LogReader::Open(log);
  auto from = CrashPoints(**r2, "m1");
  ASSERT_TRUE(from.ok());
  ASSERT_EQ(from->size(), 3u);
  EXPECT_EQ((*from)[0].entry.index, 2u);
  auto r3 = LogReader::Open(log);
  EXPECT_EQ(CrashPoints(**r3, "nope").status().code(), ENOENT);
}

TEST_F(LogWritesTest, ReplayWritesDiscardsAndResumesFromACursor) {
  LogBuilder b;
  b.Write(1, b.Block(0xa1, 2))  // 0: blocks 1-2
      .Flush()                   // 1
      .Discard(2, 2)             // 2: blocks 2-3 -> zero
      .Write(3, b.Block(0xc3))   // 3: block 3
      .Mark("end");              // 4
  std::string log = Put("log", b.Build());
  std::string tgt = Target(8 * 512, 0xee);

  auto r = LogReader::Open(log);
  auto t = ReplayTarget::Open(tgt);
  ASSERT_TRUE(r.ok() && t.ok());
  ASSERT_TRUE(ReplayThrough(**r, **t, 1).ok());
  auto img = Slurp(tgt);
  EXPECT_EQ(img[0], 0xee);
  EXPECT_EQ(img[512], 0xa1);
  EXPECT_EQ(img[3 * 512 - 1], 0xa1);
  EXPECT_EQ(img[3 * 512], 0xee);

  // A second reader resumes where the first stopped, as `logwrites replay --cursor` does.
  auto r2 = LogReader::Open(log);
  ASSERT_TRUE((*r2)->Seek((*r)->next_index(), (*r)->next_offset()).ok());
  ASSERT_TRUE(ReplayThrough(**r2, **t, 4).ok());
  img = Slurp(tgt);
  EXPECT_EQ(img[512], 0xa1);
  EXPECT_EQ(img[2 * 512], 0x00);  // discarded
  EXPECT_EQ(img[3 * 512], 0xc3);
  EXPECT_EQ(img[4 * 512], 0xee);
  EXPECT_EQ(img.size(), 8u * 512);

  EXPECT_EQ((*r2)->Seek(99, 512).code(), EINVAL);
  EXPECT_EQ((*r2)->Seek(0, 100).code(), EINVAL);
}

TEST_F(LogWritesTest, ReplayRefusesAnExtentPastTheTarget) {
  LogBuilder b;
  b.Write(6, b.Block(1, 4));
  auto r = LogReader::Open(Put("log", b.Build()));
  auto t = ReplayTarget::Open(Target(8 * 512, 0));
  ASSERT_TRUE(r.ok() && t.ok());
  Status s = ReplayThrough(**r, **t, 0);
  EXPECT_EQ(s.code(), EINVAL);
  EXPECT_THAT(s.message(), HasSubstr("entry 0: blocks 6+4 end past"));
}

TEST_F(LogWritesTest, FourKSectorsCountInBlocksOfSectorSize) {
  LogBuilder b(4096);
  b.Write(2, b.Block(0x44)).Mark("x");
  std::string log = Put("log", b.Build());
  auto es = All(log);
  ASSERT_EQ(es.size(), 2u);
  EXPECT_EQ(es[0].offset, 4096u);
  EXPECT_EQ(es[1].offset, 3u * 4096);
  std::string tgt = Target(4 * 4096, 0);
  auto r = LogReader::Open(log);
  auto t = ReplayTarget::Open(tgt);
  ASSERT_TRUE(ReplayThrough(**r, **t, 1).ok());
  auto img = Slurp(tgt);
  EXPECT_EQ(img[2 * 4096 - 1], 0);
  EXPECT_EQ(img[2 * 4096], 0x44);
  EXPECT_EQ(img[3 * 4096 - 1], 0x44);
}

TEST(Marks, TextIsValidatedBeforeAnyIoctl) {
  EXPECT_EQ(ValidateMarkText("").code(), EINVAL);
  EXPECT_EQ(ValidateMarkText("two words").code(), EINVAL);
  EXPECT_EQ(ValidateMarkText(std::string(401, 'a')).code(), EINVAL);
  EXPECT_TRUE(ValidateMarkText("w17").ok());
  EXPECT_EQ(SendMark("dev", "bad mark").code(), EINVAL);
  EXPECT_EQ(SendMark(std::string(200, 'n'), "ok").code(), EINVAL);
}

}  // namespace
}  // namespace nbdcsi::logwrites
