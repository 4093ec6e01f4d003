// Transmission-phase codec: every CheckRequest rule with its exact error and drain, the
// errno mapping, and byte-exact reply encodings.
#include "datapath/nbd/codec.h"

#include <gtest/gtest.h>

#include <cerrno>
#include <cstring>
#include <ostream>
#include <string>
#include <vector>

namespace nbdcsi::nbd {
namespace {

constexpr uint64_t kSize = 1 << 20;
constexpr uint32_t k64M = 64u << 20;

TransmissionParams Rw() { return {kSize, false, true, true}; }
TransmissionParams Ro() { return {kSize, true, true, true}; }
TransmissionParams Simple() { return {kSize, false, false, false}; }
TransmissionParams NoMeta() { return {kSize, false, true, false}; }
TransmissionParams Huge() { return {UINT64_MAX, false, true, true}; }
TransmissionParams Small() { return {kSize, false, true, true, 4096}; }

struct Case {
  const char* name;
  RequestHeader h;
  TransmissionParams p;
  uint32_t error;
  uint32_t drain;
  bool fatal;
};

std::ostream& operator<<(std::ostream& os, const Case& c) { return os << c.name; }

RequestHeader Req(uint16_t type, uint16_t flags, uint64_t offset, uint32_t length) {
  return {flags, type, 0x1122334455667788ULL, offset, length};
}

const Case kCases[] = {
    // READ
    {"read_ok", Req(kCmdRead, 0, 0, 4096), Rw(), 0, 0, false},
    {"read_to_exact_end", Req(kCmdRead, 0, kSize - 1, 1), Rw(), 0, 0, false},
    {"read_fua_accepted", Req(kCmdRead, kCmdFlagFua, 0, 512), Rw(), 0, 0, false},
    {"read_df_structured", Req(kCmdRead, kCmdFlagDf, 0, 512), Rw(), 0, 0, false},
    {"read_df_without_structured", Req(kCmdRead, kCmdFlagDf, 0, 512), Simple(), kErrInval, 0,
     false},
    {"read_no_hole_flag", Req(kCmdRead, kCmdFlagNoHole, 0, 512), Rw(), kErrInval, 0, false},
    {"read_req_one_flag", Req(kCmdRead, kCmdFlagReqOne, 0, 512), Rw(), kErrInval, 0, false},
    {"read_unknown_flag", Req(kCmdRead, 0x8000, 0, 512), Rw(), kErrInval, 0, false},
    {"read_zero_length", Req(kCmdRead, 0, 0, 0), Rw(), kErrInval, 0, false},
    {"read_past_end", Req(kCmdRead, 0, kSize - 1, 2), Rw(), kErrInval, 0, false},
    {"read_offset_at_end", Req(kCmdRead, 0, kSize, 1), Rw(), kErrInval, 0, false},
    {"read_offset_wraps", Req(kCmdRead, 0, UINT64_MAX - 1, 4096), Huge(), kErrInval, 0, false},
    {"read_max_payload_ok", Req(kCmdRead, 0, 0, kMaxPayload), Huge(), 0, 0, false},
    {"read_over_max_payload", Req(kCmdRead, 0, 0, kMaxPayload + 1), Huge(), kErrInval, 0, false},
    {"read_over_custom_max", Req(kCmdRead, 0, 0, 4097), Small(), kErrInval, 0, false},
    {"read_read_only_ok", Req(kCmdRead, 0, 0, 4096), Ro(), 0, 0, false},
    // WRITE: the payload is drained whatever the verdict, unless it cannot be.
    {"write_ok", Req(kCmdWrite, 0, 4096, 8192), Rw(), 0, 8192, false},
    {"write_fua", Req(kCmdWrite, kCmdFlagFua, 0, 512), Rw(), 0, 512, false},
    {"write_df_flag", Req(kCmdWrite, kCmdFlagDf, 0, 512), Rw(), kErrInval, 512, false},
    {"write_no_hole_flag", Req(kCmdWrite, kCmdFlagNoHole, 0, 512), Rw(), kErrInval, 512, false},
    {"write_read_only", Req(kCmdWrite, 0, 0, 512), Ro(), kErrPerm, 512, false},
    {"write_read_only_past_end", Req(kCmdWrite, 0, kSize, 512), Ro(), kErrPerm, 512, false},
    {"write_zero_length", Req(kCmdWrite, 0, 0, 0), Rw(), kErrInval, 0, false},
    {"write_past_end", Req(kCmdWrite, 0, kSize - 511, 512), Rw(), kErrNoSpc, 512, false},
    {"write_offset_wraps", Req(kCmdWrite, 0, UINT64_MAX, 2), Huge(), kErrNoSpc, 2, false},
    {"write_max_payload_ok", Req(kCmdWrite, 0, 0, kMaxPayload), Huge(), 0, kMaxPayload, false},
    {"write_over_max_drained", Req(kCmdWrite, 0, 0, kMaxPayload + 1), Huge(), kErrInval,
     kMaxPayload + 1, false},
    {"write_at_drain_limit", Req(kCmdWrite, 0, 0, k64M), Huge(), kErrInval, k64M, false},
    {"write_over_drain_limit_fatal", Req(kCmdWrite, 0, 0, k64M + 1), Huge(), kErrInval, 0, true},
    {"write_max_len_fatal", Req(kCmdWrite, 0, 0, UINT32_MAX), Rw(), kErrInval, 0, true},
    {"write_over_custom_max", Req(kCmdWrite, 0, 0, 4097), Small(), kErrInval, 4097, false},
    // DISC: never replied to, always ends the session.
    {"disc", Req(kCmdDisc, 0, 0, 0), Rw(), 0, 0, false},
    {"disc_nonzero_fields", Req(kCmdDisc, 0xff, 7, 7), Rw(), 0, 0, false},
    // FLUSH
    {"flush_ok", Req(kCmdFlush, 0, 0, 0), Rw(), 0, 0, false},
    {"flush_fua", Req(kCmdFlush, kCmdFlagFua, 0, 0), Rw(), 0, 0, false},
    {"flush_read_only", Req(kCmdFlush, 0, 0, 0), Ro(), 0, 0, false},
    {"flush_offset", Req(kCmdFlush, 0, 512, 0), Rw(), kErrInval, 0, false},
    {"flush_length", Req(kCmdFlush, 0, 0, 512), Rw(), kErrInval, 0, false},
    {"flush_df", Req(kCmdFlush, kCmdFlagDf, 0, 0), Rw(), kErrInval, 0, false},
    // TRIM
    {"trim_ok", Req(kCmdTrim, 0, 0, kSize), Rw(), 0, 0, false},
    {"trim_fua", Req(kCmdTrim, kCmdFlagFua, 0, 512), Rw(), 0, 0, false},
    {"trim_longer_than_max_payload", Req(kCmdTrim, 0, 0, UINT32_MAX), Huge(), 0, 0, false},
    {"trim_read_only", Req(kCmdTrim, 0, 0, 512), Ro(), kErrPerm, 0, false},
    {"trim_zero_length", Req(kCmdTrim, 0, 0, 0), Rw(), kErrInval, 0, false},
    {"trim_past_end", Req(kCmdTrim, 0, kSize, 512), Rw(), kErrInval, 0, false},
    {"trim_no_hole", Req(kCmdTrim, kCmdFlagNoHole, 0, 512), Rw(), kErrInval, 0, false},
    // WRITE_ZEROES
    {"zeroes_ok", Req(kCmdWriteZeroes, 0, 0, 512), Rw(), 0, 0, false},
    {"zeroes_all_flags",
     Req(kCmdWriteZeroes, kCmdFlagFua | kCmdFlagNoHole | kCmdFlagFastZero, 0, 512), Rw(), 0, 0,
     false},
    {"zeroes_longer_than_max_payload", Req(kCmdWriteZeroes, 0, 0, UINT32_MAX), Huge(), 0, 0,
     false},
    {"zeroes_read_only", Req(kCmdWriteZeroes, 0, 0, 512), Ro(), kErrPerm, 0, false},
    {"zeroes_zero_length", Req(kCmdWriteZeroes, 0, 0, 0), Rw(), kErrInval, 0, false},
    {"zeroes_past_end", Req(kCmdWriteZeroes, 0, kSize - 1, 2), Rw(), kErrNoSpc, 0, false},
    {"zeroes_df", Req(kCmdWriteZeroes, kCmdFlagDf, 0, 512), Rw(), kErrInval, 0, false},
    {"zeroes_req_one", Req(kCmdWriteZeroes, kCmdFlagReqOne, 0, 512), Rw(), kErrInval, 0, false},
    // BLOCK_STATUS
    {"status_ok", Req(kCmdBlockStatus, 0, 0, kSize), Rw(), 0, 0, false},
    {"status_req_one", Req(kCmdBlockStatus, kCmdFlagReqOne, 0, 512), Rw(), 0, 0, false},
    {"status_read_only", Req(kCmdBlockStatus, 0, 0, 512), Ro(), 0, 0, false},
    {"status_without_meta", Req(kCmdBlockStatus, 0, 0, 512), NoMeta(), kErrInval, 0, false},
    {"status_simple_replies", Req(kCmdBlockStatus, 0, 0, 512), Simple(), kErrInval, 0, false},
    {"status_zero_length", Req(kCmdBlockStatus, 0, 0, 0), Rw(), kErrInval, 0, false},
    {"status_past_end", Req(kCmdBlockStatus, 0, kSize, 1), Rw(), kErrInval, 0, false},
    {"status_df", Req(kCmdBlockStatus, kCmdFlagDf, 0, 512), Rw(), kErrInval, 0, false},
    // Commands we do not serve
    {"cache_not_advertised", Req(kCmdCache, 0, 0, 512), Rw(), kErrInval, 0, false},
    {"resize_unknown", Req(8, 0, 0, 0), Rw(), kErrInval, 0, false},
    {"type_ffff_unknown", Req(0xffff, 0, 0, 512), Rw(), kErrInval, 0, false},
};

class CheckRequestTest : public ::testing::TestWithParam<Case> {};

TEST_P(CheckRequestTest, ErrorDrainFatal) {
  const Case& c = GetParam();
  RequestCheck r = CheckRequest(c.h, c.p);
  EXPECT_EQ(r.nbd_error, c.error);
  EXPECT_EQ(r.drain, c.drain);
  EXPECT_EQ(r.fatal, c.fatal);
}

INSTANTIATE_TEST_SUITE_P(Rules, CheckRequestTest, ::testing::ValuesIn(kCases),
                         [](const auto& info) { return std::string(info.param.name); });

TEST(ParseRequestHeader, DecodesBigEndianFields) {
  const uint8_t in[kRequestHeaderLen] = {
      0x25, 0x60, 0x95, 0x13,                          // magic
      0x00, 0x05,                                      // flags
      0x00, 0x01,                                      // type WRITE
      0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08,  // cookie
      0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x10, 0x00,  // offset
      0x00, 0x02, 0x00, 0x00,                          // length
  };
  RequestHeader h{};
  ASSERT_TRUE(ParseRequestHeader(in, &h));
  EXPECT_EQ(h.flags, 5);
  EXPECT_EQ(h.type, kCmdWrite);
  EXPECT_EQ(h.cookie, 0x0102030405060708ULL);
  EXPECT_EQ(h.offset, 0x0000000100001000ULL);
  EXPECT_EQ(h.length, 0x00020000u);
}

TEST(ParseRequestHeader, RejectsBadMagic) {
  uint8_t in[kRequestHeaderLen] = {};
  StoreBE32(in, kRequestMagic);
  RequestHeader h{};
  EXPECT_TRUE(ParseRequestHeader(in, &h));
  for (int byte = 0; byte < 4; ++byte) {
    uint8_t bad[kRequestHeaderLen];
    std::memcpy(bad, in, sizeof bad);
    bad[byte] ^= 0x01;
    EXPECT_FALSE(ParseRequestHeader(bad, &h)) << "byte " << byte;
  }
  // A simple-reply magic where a request is expected is broken framing too.
  StoreBE32(in, kSimpleReplyMagic);
  EXPECT_FALSE(ParseRequestHeader(in, &h));
}

TEST(ErrnoToNbd, MapsEveryDocumentedErrno) {
  const struct {
    int err;
    uint32_t nbd;
  } kMap[] = {
      {0, 0},
      {EPERM, kErrPerm},       {EROFS, kErrPerm},         {ENOSPC, kErrNoSpc},
      {EDQUOT, kErrNoSpc},     {EFBIG, kErrNoSpc},        {ENOMEM, kErrNoMem},
      {EINVAL, kErrInval},     {EOVERFLOW, kErrOverflow}, {ENOTSUP, kErrNotSup},
      {EOPNOTSUPP, kErrNotSup}, {ESHUTDOWN, kErrShutdown}, {EIO, kErrIo},
      {EBADF, kErrIo},         {EAGAIN, kErrIo},          {ENOENT, kErrIo},
      {-ENOSPC, kErrNoSpc},    {-EIO, kErrIo},            {-EROFS, kErrPerm},
  };
  for (const auto& m : kMap) EXPECT_EQ(ErrnoToNbd(m.err), m.nbd) << "errno " << m.err;
}

std::vector<uint8_t> Bytes(const uint8_t* p, size_t n) { return {p, p + n}; }

TEST(EncodeDoneReply, SimpleSuccessAndError) {
  uint8_t buf[kMaxDoneReplyLen];
  size_t n = EncodeDoneReply(buf, false, 0xa1a2a3a4a5a6a7a8ULL, 0);
  EXPECT_EQ(Bytes(buf, n), (std::vector<uint8_t>{0x67, 0x44, 0x66, 0x98, 0, 0, 0, 0, 0xa1, 0xa2,
                                                 0xa3, 0xa4, 0xa5, 0xa6, 0xa7, 0xa8}));
  n = EncodeDoneReply(buf, false, 7, kErrNoSpc);
  EXPECT_EQ(Bytes(buf, n), (std::vector<uint8_t>{0x67, 0x44, 0x66, 0x98, 0, 0, 0, 28, 0, 0, 0, 0,
                                                 0, 0, 0, 7}));
}

TEST(EncodeDoneReply, StructuredNoneChunk) {
  uint8_t buf[kMaxDoneReplyLen];
  size_t n = EncodeDoneReply(buf, true, 0x0102030405060708ULL, 0);
  EXPECT_EQ(Bytes(buf, n),
            (std::vector<uint8_t>{0x66, 0x8e, 0x33, 0xef, 0x00, 0x01, 0x00, 0x00, 1, 2, 3, 4, 5, 6,
                                  7, 8, 0, 0, 0, 0}));
}

TEST(EncodeDoneReply, StructuredErrorChunk) {
  uint8_t buf[kMaxDoneReplyLen + 8];
  std::memset(buf, 0xee, sizeof buf);
  size_t n = EncodeDoneReply(buf, true, 9, kErrInval);
  ASSERT_EQ(n, kMaxDoneReplyLen);
  EXPECT_EQ(Bytes(buf, n),
            (std::vector<uint8_t>{0x66, 0x8e, 0x33, 0xef, 0x00, 0x01, 0x80, 0x01, 0, 0, 0, 0, 0, 0,
                                  0, 9, 0, 0, 0, 6, 0, 0, 0, 22, 0, 0}));
  EXPECT_EQ(buf[n], 0xee) << "wrote past the returned length";
}

TEST(EncodeReadReplyHeader, SimpleIsZeroErrorSimpleReply) {
  uint8_t buf[kMaxReadReplyHeaderLen];
  size_t n = EncodeReadReplyHeader(buf, false, 3, 4096, 512);
  EXPECT_EQ(Bytes(buf, n), (std::vector<uint8_t>{0x67, 0x44, 0x66, 0x98, 0, 0, 0, 0, 0, 0, 0, 0,
                                                 0, 0, 0, 3}));
}

TEST(EncodeReadReplyHeader, StructuredOffsetDataChunk) {
  uint8_t buf[kMaxReadReplyHeaderLen];
  size_t n = EncodeReadReplyHeader(buf, true, 3, 0x0000000100000200ULL, 512);
  ASSERT_EQ(n, kMaxReadReplyHeaderLen);
  EXPECT_EQ(Bytes(buf, n),
            (std::vector<uint8_t>{0x66, 0x8e, 0x33, 0xef, 0x00, 0x01, 0x00, 0x01, 0, 0, 0, 0, 0, 0,
                                  0, 3, 0x00, 0x00, 0x02, 0x08,  // 512 + 8
                                  0, 0, 0, 1, 0, 0, 2, 0}));
}

TEST(EncodeReadReplyHeader, StructuredRejectsUnrepresentableLengths) {
  uint8_t buf[kMaxReadReplyHeaderLen];
  EXPECT_EQ(EncodeReadReplyHeader(buf, true, 1, 0, 0), 0u);
  EXPECT_EQ(EncodeReadReplyHeader(buf, true, 1, 0, UINT32_MAX - 7), 0u);
  EXPECT_EQ(EncodeReadReplyHeader(buf, true, 1, 0, UINT32_MAX - 8), kMaxReadReplyHeaderLen);
  EXPECT_EQ(LoadBE32(buf + 16), UINT32_MAX);
}

TEST(EncodeBlockStatusReply, TwoExtents) {
  const Extent ext[] = {{4096, kStateHole | kStateZero}, {0x00100000, 0}};
  uint8_t buf[64];
  size_t n = EncodeBlockStatusReply(buf, sizeof buf, 0x10, 1, ext, 2);
  ASSERT_EQ(n, BlockStatusReplyLen(2));
  EXPECT_EQ(Bytes(buf, n),
            (std::vector<uint8_t>{0x66, 0x8e, 0x33, 0xef, 0x00, 0x01, 0x00, 0x05, 0, 0, 0, 0, 0, 0,
                                  0, 0x10, 0, 0, 0, 20,  // 4 + 2 * 8
                                  0, 0, 0, 1,            // context id
                                  0, 0, 0x10, 0, 0, 0, 0, 3, 0, 0x10, 0, 0, 0, 0, 0, 0}));
}

TEST(EncodeBlockStatusReply, RefusesWhatWouldBreakTheProtocol) {
  const Extent ok[] = {{512, 0}, {512, kStateHole}};
  const Extent zero_len[] = {{512, 0}, {0, 0}};
  uint8_t buf[64];
  EXPECT_EQ(EncodeBlockStatusReply(buf, BlockStatusReplyLen(2) - 1, 1, 1, ok, 2), 0u);
  EXPECT_EQ(EncodeBlockStatusReply(buf, BlockStatusReplyLen(2), 1, 1, ok, 2),
            BlockStatusReplyLen(2));
  EXPECT_EQ(EncodeBlockStatusReply(buf, sizeof buf, 1, 1, ok, 0), 0u);
  EXPECT_EQ(EncodeBlockStatusReply(buf, sizeof buf, 1, 1, zero_len, 2), 0u);
}

TEST(EncodeStructuredHeader, OffsetHoleChunkHeader) {
  uint8_t buf[kStructuredReplyHeaderLen];
  size_t n = EncodeStructuredHeader(buf, 0, kReplyTypeOffsetHole, 0xffffffffffffffffULL, 12);
  EXPECT_EQ(Bytes(buf, n),
            (std::vector<uint8_t>{0x66, 0x8e, 0x33, 0xef, 0, 0, 0, 2, 0xff, 0xff, 0xff, 0xff, 0xff,
                                  0xff, 0xff, 0xff, 0, 0, 0, 12}));
}

TEST(Endian, RoundTrips) {
  uint8_t b[8];
  StoreBE16(b, 0xbeef);
  EXPECT_EQ(b[0], 0xbe);
  EXPECT_EQ(LoadBE16(b), 0xbeef);
  StoreBE32(b, 0xdeadbeef);
  EXPECT_EQ(b[0], 0xde);
  EXPECT_EQ(LoadBE32(b), 0xdeadbeefu);
  StoreBE64(b, 0x0123456789abcdefULL);
  EXPECT_EQ(b[0], 0x01);
  EXPECT_EQ(b[7], 0xef);
  EXPECT_EQ(LoadBE64(b), 0x0123456789abcdefULL);
}

}  // namespace
}  // namespace nbdcsi::nbd
