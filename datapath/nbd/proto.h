// NBD wire constants, transcribed from NetworkBlockDevice/nbd doc/proto.md (fixed newstyle
// handshake, structured replies, metadata contexts), plus the limits this server enforces.
//
// Naming: the spec's NBD_FOO_BAR is kFooBar here. We deliberately do not reuse the spec's
// spelling because <linux/nbd.h> (which the kernel-attach code includes) defines several of
// those names as preprocessor macros and would silently rewrite ours.
//
// All multi-byte fields on the wire are big-endian; see Load/Store helpers in codec.h.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string_view>

namespace nbdcsi::nbd {

// ---- Magics ----
inline constexpr uint64_t kNbdMagic = 0x4e42444d41474943ULL;       // "NBDMAGIC"
inline constexpr uint64_t kIHaveOpt = 0x49484156454f5054ULL;       // "IHAVEOPT"
inline constexpr uint64_t kOptReplyMagic = 0x0003e889045565a9ULL;  // option-haggling replies
inline constexpr uint32_t kRequestMagic = 0x25609513U;
inline constexpr uint32_t kSimpleReplyMagic = 0x67446698U;
inline constexpr uint32_t kStructuredReplyMagic = 0x668e33efU;

// ---- Handshake flags (16 bits, server -> client) ----
inline constexpr uint16_t kHandshakeFlagFixedNewstyle = 1U << 0;
inline constexpr uint16_t kHandshakeFlagNoZeroes = 1U << 1;

// ---- Client flags (32 bits, client -> server) ----
inline constexpr uint32_t kClientFlagFixedNewstyle = 1U << 0;
inline constexpr uint32_t kClientFlagNoZeroes = 1U << 1;
inline constexpr uint32_t kClientFlagsKnown = kClientFlagFixedNewstyle | kClientFlagNoZeroes;

// ---- Options ----
inline constexpr uint32_t kOptExportName = 1;
inline constexpr uint32_t kOptAbort = 2;
inline constexpr uint32_t kOptList = 3;
inline constexpr uint32_t kOptPeekExport = 4;  // withdrawn; answered with ERR_UNSUP
inline constexpr uint32_t kOptStartTls = 5;
inline constexpr uint32_t kOptInfo = 6;
inline constexpr uint32_t kOptGo = 7;
inline constexpr uint32_t kOptStructuredReply = 8;
inline constexpr uint32_t kOptListMetaContext = 9;
inline constexpr uint32_t kOptSetMetaContext = 10;

// ---- Option reply types ----
inline constexpr uint32_t kRepAck = 1;
inline constexpr uint32_t kRepServer = 2;
inline constexpr uint32_t kRepInfo = 3;
inline constexpr uint32_t kRepMetaContext = 4;
inline constexpr uint32_t kRepFlagError = 1U << 31;
inline constexpr uint32_t kRepErrUnsup = kRepFlagError | 1;
inline constexpr uint32_t kRepErrPolicy = kRepFlagError | 2;
inline constexpr uint32_t kRepErrInvalid = kRepFlagError | 3;
inline constexpr uint32_t kRepErrPlatform = kRepFlagError | 4;
inline constexpr uint32_t kRepErrTlsReqd = kRepFlagError | 5;
inline constexpr uint32_t kRepErrUnknown = kRepFlagError | 6;
inline constexpr uint32_t kRepErrShutdown = kRepFlagError | 7;
inline constexpr uint32_t kRepErrBlockSizeReqd = kRepFlagError | 8;
inline constexpr uint32_t kRepErrTooBig = kRepFlagError | 9;

// ---- NBD_REP_INFO information types ----
inline constexpr uint16_t kInfoExport = 0;
inline constexpr uint16_t kInfoName = 1;
inline constexpr uint16_t kInfoDescription = 2;
inline constexpr uint16_t kInfoBlockSize = 3;

// ---- Transmission flags (16 bits) ----
inline constexpr uint16_t kFlagHasFlags = 1U << 0;
inline constexpr uint16_t kFlagReadOnly = 1U << 1;
inline constexpr uint16_t kFlagSendFlush = 1U << 2;
inline constexpr uint16_t kFlagSendFua = 1U << 3;
inline constexpr uint16_t kFlagRotational = 1U << 4;
inline constexpr uint16_t kFlagSendTrim = 1U << 5;
inline constexpr uint16_t kFlagSendWriteZeroes = 1U << 6;
inline constexpr uint16_t kFlagSendDf = 1U << 7;
inline constexpr uint16_t kFlagCanMultiConn = 1U << 8;
inline constexpr uint16_t kFlagSendResize = 1U << 9;
inline constexpr uint16_t kFlagSendCache = 1U << 10;
inline constexpr uint16_t kFlagSendFastZero = 1U << 11;

// ---- Commands ----
inline constexpr uint16_t kCmdRead = 0;
inline constexpr uint16_t kCmdWrite = 1;
inline constexpr uint16_t kCmdDisc = 2;
inline constexpr uint16_t kCmdFlush = 3;
inline constexpr uint16_t kCmdTrim = 4;
inline constexpr uint16_t kCmdCache = 5;
inline constexpr uint16_t kCmdWriteZeroes = 6;
inline constexpr uint16_t kCmdBlockStatus = 7;

// ---- Command flags ----
inline constexpr uint16_t kCmdFlagFua = 1U << 0;
inline constexpr uint16_t kCmdFlagNoHole = 1U << 1;
inline constexpr uint16_t kCmdFlagDf = 1U << 2;
inline constexpr uint16_t kCmdFlagReqOne = 1U << 3;
inline constexpr uint16_t kCmdFlagFastZero = 1U << 4;

// ---- Structured replies ----
inline constexpr uint16_t kReplyFlagDone = 1U << 0;
inline constexpr uint16_t kReplyTypeNone = 0;
inline constexpr uint16_t kReplyTypeOffsetData = 1;
inline constexpr uint16_t kReplyTypeOffsetHole = 2;
inline constexpr uint16_t kReplyTypeBlockStatus = 5;
inline constexpr uint16_t kReplyTypeError = (1U << 15) | 1;
inline constexpr uint16_t kReplyTypeErrorOffset = (1U << 15) | 2;

// ---- base:allocation status flags ----
inline constexpr uint32_t kStateHole = 1U << 0;
inline constexpr uint32_t kStateZero = 1U << 1;
inline constexpr std::string_view kMetaBaseAllocation = "base:allocation";

// ---- Error values carried in replies (not host errno: see ErrnoToNbd) ----
inline constexpr uint32_t kErrPerm = 1;
inline constexpr uint32_t kErrIo = 5;
inline constexpr uint32_t kErrNoMem = 12;
inline constexpr uint32_t kErrInval = 22;
inline constexpr uint32_t kErrNoSpc = 28;
inline constexpr uint32_t kErrOverflow = 75;
inline constexpr uint32_t kErrNotSup = 95;
inline constexpr uint32_t kErrShutdown = 108;

// ---- Fixed sizes on the wire ----
inline constexpr size_t kGreetingLen = 18;          // NBDMAGIC + IHAVEOPT + handshake flags
inline constexpr size_t kClientFlagsLen = 4;
inline constexpr size_t kOptionHeaderLen = 16;      // IHAVEOPT + option + length
inline constexpr size_t kOptionReplyHeaderLen = 20; // magic + option + type + length
inline constexpr size_t kExportNameReplyZeroes = 124;
inline constexpr size_t kRequestHeaderLen = 28;
inline constexpr size_t kSimpleReplyLen = 16;
inline constexpr size_t kStructuredReplyHeaderLen = 20;

// The spec's limit for any string (export names, queries, messages).
inline constexpr size_t kMaxStringLen = 4096;

// ---- Our limits ----
// Option payloads we read into memory. Longer options are answered with ERR_TOO_BIG after
// their payload is skipped, as long as skipping costs at most kMaxDrainOptionLen bytes of
// reading; beyond that the client is treated as hostile and the connection is closed.
inline constexpr uint32_t kMaxOptionLen = 64 * 1024;
inline constexpr uint32_t kMaxDrainOptionLen = 1024 * 1024;
// Options per connection: a well-behaved client needs a handful; this bounds a client that
// loops on errors forever (the spec lets a server hard-disconnect on denial of service).
inline constexpr uint32_t kMaxOptionsPerConnection = 1000;
// Largest READ/WRITE length. 32 MiB is what the Linux nbd driver can issue (65536 sectors)
// and the spec says lengths below 2^25 SHOULD NOT be treated as denial of service.
inline constexpr uint32_t kMaxPayload = 32 * 1024 * 1024;
// A WRITE longer than the advertised maximum is still drained (and failed with EINVAL) up to
// this size so the stream stays in sync; longer ones cannot be skipped cheaply: close.
inline constexpr uint32_t kMaxWriteDrain = 64 * 1024 * 1024;
// NBD_INFO_BLOCK_SIZE. Sparse files accept any alignment, so the minimum is 1; 4096 is the
// page/file system block size below which writes become read-modify-write.
inline constexpr uint32_t kMinBlock = 1;
inline constexpr uint32_t kPreferredBlock = 4096;
inline constexpr uint32_t kMaxBlock = kMaxPayload;

}  // namespace nbdcsi::nbd
