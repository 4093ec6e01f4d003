// libFuzzer target for the NBD codec: the input is what a client would send on one
// connection. It drives a Negotiator through the option phase, then feeds the rest as
// transmission requests through ParseRequestHeader / CheckRequest and the reply encoders,
// checking the invariants the engine relies on (not just "does not crash").
//
// Input layout (mirrors the wire):
//   4 bytes client flags
//   options: 16-byte header, then `length` payload bytes (a short input ends the connection;
//            an oversize option is "drained" from whatever input remains)
//   after GO/EXPORT_NAME: 28-byte requests, each followed by its WRITE payload; after a
//            valid BLOCK_STATUS, one byte (extent count) and 8 bytes per extent to encode.
//
// Every input is negotiated twice: as on the Unix socket (no TLS: STARTTLS is refused) and as
// on the TCP listener (TLS required: only STARTTLS and ABORT are served until the fuzzer,
// standing in for the handshake, calls OnTlsEstablished after kStartTls). The same bytes then
// reach the option handlers in both modes.
//
// nbd_negotiate_fuzz checks what each option reply says; this target checks the framing of a
// whole connection and the transmission phase that follows. It uses only the standard library
// and datapath/nbd.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "datapath/nbd/codec.h"
#include "datapath/nbd/negotiate.h"
#include "test/fuzz/fuzz_check.h"

namespace nbd = nbdcsi::nbd;

namespace {

class Catalog : public nbd::ExportCatalog {
 public:
  Catalog() {
    exports_["disk0"] = {"disk0", 1 << 20, false, "fuzz disk"};
    exports_["ro"] = {"ro", 4099, true, ""};
    exports_["big"] = {"big", UINT64_MAX, false, ""};  // stresses offset overflow paths
  }
  std::optional<nbd::ExportInfo> Lookup(std::string_view name) override {
    auto it = exports_.find(name.empty() ? std::string("disk0") : std::string(name));
    if (it == exports_.end()) return std::nullopt;
    return it->second;
  }
  std::vector<std::string> List() override { return {"disk0", "ro", "big"}; }

 private:
  std::map<std::string, nbd::ExportInfo> exports_;
};

using nbdcsi::fuzz::Input;

// Every option reply is magic + the option it answers + type + length + exactly that much
// data; returns the type of the last reply (0 if none).
uint32_t CheckOptionReplies(const std::vector<uint8_t>& out, size_t end, uint32_t option) {
  size_t pos = 0;
  uint32_t last = 0;
  while (pos < end) {
    FUZZ_CHECK(end - pos >= nbd::kOptionReplyHeaderLen);
    FUZZ_CHECK(nbd::LoadBE64(&out[pos]) == nbd::kOptReplyMagic);
    FUZZ_CHECK(nbd::LoadBE32(&out[pos + 8]) == option);
    last = nbd::LoadBE32(&out[pos + 12]);
    const uint32_t len = nbd::LoadBE32(&out[pos + 16]);
    pos += nbd::kOptionReplyHeaderLen;
    FUZZ_CHECK(len <= end - pos);
    if (last == nbd::kRepAck) FUZZ_CHECK(len == 0);
    if (last == nbd::kRepInfo) {
      FUZZ_CHECK(len >= 2);
      const uint16_t info = nbd::LoadBE16(&out[pos]);
      if (info == nbd::kInfoExport) FUZZ_CHECK(len == 12);
      if (info == nbd::kInfoBlockSize) FUZZ_CHECK(len == 14);
    }
    if (last & nbd::kRepFlagError) FUZZ_CHECK(len <= nbd::kMaxStringLen);
    pos += len;
  }
  FUZZ_CHECK(pos == end);
  return last;
}

// Returns the negotiated params, or nullopt if the connection ends during the option phase.
std::optional<nbd::TransmissionParams> Negotiate(Input& in, nbd::TlsPolicy policy) {
  Catalog catalog;
  nbd::Negotiator neg(catalog, policy);
  const bool tls_required = policy == nbd::TlsPolicy::kRequired;
  std::vector<uint8_t> out;
  neg.Greeting(out);
  FUZZ_CHECK(out.size() == nbd::kGreetingLen);

  const uint8_t* b;
  if (!in.Take(4, &b)) return std::nullopt;
  const uint32_t flags = nbd::LoadBE32(b);
  const bool ok = neg.OnClientFlags(flags);
  FUZZ_CHECK(ok == ((flags & ~nbd::kClientFlagsKnown) == 0 &&
                    (flags & nbd::kClientFlagFixedNewstyle) != 0));
  if (!ok) return std::nullopt;

  for (;;) {
    if (!in.Take(nbd::kOptionHeaderLen, &b)) return std::nullopt;
    const auto h = neg.OnOptionHeader(b);
    const bool before_tls = tls_required && !neg.tls_active();
    if (h.action == nbd::Negotiator::HeaderAction::kClose) {
      FUZZ_CHECK(nbd::LoadBE64(b) != nbd::kIHaveOpt || h.length > nbd::kMaxOptionLen);
      return std::nullopt;
    }
    // An unauthenticated peer never makes us drain a long option.
    if (before_tls) FUZZ_CHECK(h.action == nbd::Negotiator::HeaderAction::kReadPayload);
    std::span<const uint8_t> payload;
    const bool drained = h.action == nbd::Negotiator::HeaderAction::kDrainThenReply;
    if (drained) {
      FUZZ_CHECK(h.length > nbd::kMaxOptionLen && h.length <= nbd::kMaxDrainOptionLen);
      in.Skip(h.length);
    } else {
      FUZZ_CHECK(h.length <= nbd::kMaxOptionLen);
      if (!in.Take(h.length, &b)) return std::nullopt;
      payload = std::span<const uint8_t>(b, h.length);
    }
    out.clear();
    const auto step = neg.OnOption(h.option, payload, drained, out);
    if (before_tls && step == nbd::Negotiator::Step::kContinue) {
      // Exactly one refusal, which says nothing about the exports.
      FUZZ_CHECK(out.size() >= nbd::kOptionReplyHeaderLen &&
                 nbd::LoadBE32(&out[16]) == out.size() - nbd::kOptionReplyHeaderLen);
      const uint32_t type = CheckOptionReplies(out, out.size(), h.option);
      FUZZ_CHECK(type == (h.option == nbd::kOptStartTls ? nbd::kRepErrInvalid
                                                        : nbd::kRepErrTlsReqd));
      continue;
    }
    if (step == nbd::Negotiator::Step::kStartTls) {
      FUZZ_CHECK(before_tls && h.option == nbd::kOptStartTls && payload.empty());
      FUZZ_CHECK(out.size() == nbd::kOptionReplyHeaderLen);
      FUZZ_CHECK(CheckOptionReplies(out, out.size(), h.option) == nbd::kRepAck);
      // Here the frontend runs the TLS handshake; the rest of the input is what the client
      // sends inside TLS.
      FUZZ_CHECK(!neg.tls_active());
      FUZZ_CHECK(neg.OnTlsEstablished());
      FUZZ_CHECK(neg.tls_active() && !neg.OnTlsEstablished());
      continue;
    }
    if (step == nbd::Negotiator::Step::kContinue) {
      const uint32_t last = CheckOptionReplies(out, out.size(), h.option);
      FUZZ_CHECK(last != 0);  // every option gets a final reply
      FUZZ_CHECK(last == nbd::kRepAck || (last & nbd::kRepFlagError));
      if (h.option == nbd::kOptStartTls && !drained) {
        // Refused: by policy without TLS, as invalid once TLS runs or when it carries data.
        FUZZ_CHECK(last == (!tls_required && payload.empty() ? nbd::kRepErrPolicy
                                                              : nbd::kRepErrInvalid));
      }
      continue;
    }
    if (step == nbd::Negotiator::Step::kClose) {
      // Only ABORT says goodbye; every other close is silent.
      if (h.option == nbd::kOptAbort) {
        FUZZ_CHECK(CheckOptionReplies(out, out.size(), h.option) == nbd::kRepAck);
      } else {
        FUZZ_CHECK(out.empty());
      }
      return std::nullopt;
    }

    FUZZ_CHECK(!before_tls);  // no export is ever served in plaintext when TLS is required
    const nbd::Negotiated& r = neg.result();
    FUZZ_CHECK(!r.base_allocation || r.structured_replies);
    FUZZ_CHECK(r.transmission_flags ==
               nbd::TransmissionFlags(r.export_info.read_only, r.structured_replies));
    if (h.option == nbd::kOptExportName) {
      const bool zeroes = (flags & nbd::kClientFlagNoZeroes) == 0;
      FUZZ_CHECK(out.size() == 10 + (zeroes ? nbd::kExportNameReplyZeroes : 0));
      FUZZ_CHECK(nbd::LoadBE64(out.data()) == r.export_info.size);
      FUZZ_CHECK(nbd::LoadBE16(out.data() + 8) == r.transmission_flags);
    } else {
      FUZZ_CHECK(h.option == nbd::kOptGo);
      FUZZ_CHECK(CheckOptionReplies(out, out.size(), h.option) == nbd::kRepAck);
    }
    // Once in transmission the negotiator accepts nothing more.
    std::vector<uint8_t> more;
    FUZZ_CHECK(neg.OnOption(nbd::kOptList, {}, false, more) == nbd::Negotiator::Step::kClose);
    FUZZ_CHECK(more.empty());
    return nbd::TransmissionParams{r.export_info.size, r.export_info.read_only,
                                   r.structured_replies, r.base_allocation};
  }
}

void Transmit(Input& in, const nbd::TransmissionParams& p) {
  const uint8_t* b;
  for (int i = 0; i < 4096 && in.Take(nbd::kRequestHeaderLen, &b); ++i) {
    nbd::RequestHeader h;
    if (!nbd::ParseRequestHeader(b, &h)) return;
    const nbd::RequestCheck c = nbd::CheckRequest(h, p);

    FUZZ_CHECK(c.drain <= h.length);
    if (h.type != nbd::kCmdWrite) FUZZ_CHECK(c.drain == 0 && !c.fatal);
    if (h.type == nbd::kCmdWrite && !c.fatal) FUZZ_CHECK(c.drain == h.length);
    if (c.fatal) {
      FUZZ_CHECK(c.nbd_error != 0 && c.drain == 0);
      FUZZ_CHECK(h.length > p.max_payload && h.length > nbd::kMaxWriteDrain);
    }
    FUZZ_CHECK(c.nbd_error == 0 || c.nbd_error == nbd::kErrInval ||
               c.nbd_error == nbd::kErrPerm || c.nbd_error == nbd::kErrNoSpc);

    if (c.nbd_error == 0 && h.type != nbd::kCmdDisc) {
      const bool writes = h.type == nbd::kCmdWrite || h.type == nbd::kCmdTrim ||
                          h.type == nbd::kCmdWriteZeroes;
      FUZZ_CHECK(!(writes && p.read_only));
      FUZZ_CHECK(h.type <= nbd::kCmdBlockStatus && h.type != nbd::kCmdCache);
      if (h.type == nbd::kCmdFlush) {
        FUZZ_CHECK(h.offset == 0 && h.length == 0);
      } else {
        // What the engine may hand to storage: nonempty and inside the export.
        FUZZ_CHECK(h.length > 0);
        FUZZ_CHECK(h.offset <= p.export_size && h.length <= p.export_size - h.offset);
      }
      if (h.type == nbd::kCmdRead || h.type == nbd::kCmdWrite) {
        FUZZ_CHECK(h.length <= p.max_payload);
      }
      if (h.type == nbd::kCmdBlockStatus) FUZZ_CHECK(p.base_allocation);
      if (h.flags & nbd::kCmdFlagDf) FUZZ_CHECK(p.structured_replies && h.type == nbd::kCmdRead);
    }

    // Exactly-sized heap buffers so ASan flags any write past the advertised maximum.
    auto done = std::make_unique<uint8_t[]>(nbd::kMaxDoneReplyLen);
    const size_t dn = nbd::EncodeDoneReply(done.get(), p.structured_replies, h.cookie, c.nbd_error);
    FUZZ_CHECK(dn == nbd::kSimpleReplyLen || dn == nbd::kStructuredReplyHeaderLen ||
               dn == nbd::kMaxDoneReplyLen);
    FUZZ_CHECK(nbd::LoadBE64(done.get() + 8) == h.cookie);

    if (c.nbd_error == 0 && h.type == nbd::kCmdRead) {
      auto rh = std::make_unique<uint8_t[]>(nbd::kMaxReadReplyHeaderLen);
      const size_t rn = nbd::EncodeReadReplyHeader(rh.get(), p.structured_replies, h.cookie,
                                                   h.offset, h.length);
      FUZZ_CHECK(rn == (p.structured_replies ? nbd::kMaxReadReplyHeaderLen : nbd::kSimpleReplyLen));
    }

    if (c.nbd_error == 0 && h.type == nbd::kCmdBlockStatus) {
      const uint8_t* cnt;
      if (!in.Take(1, &cnt)) return;
      const size_t want = *cnt % 17;
      std::vector<nbd::Extent> ext;
      for (size_t k = 0; k < want && in.Take(8, &b); ++k) {
        ext.push_back({nbd::LoadBE32(b), nbd::LoadBE32(b + 4)});
      }
      // Capacity drawn from the cookie so both "too small" and "fits" are exercised.
      const size_t cap = h.cookie % (nbd::BlockStatusReplyLen(ext.size()) + 8);
      auto buf = std::make_unique<uint8_t[]>(cap + 1);
      const size_t bn = nbd::EncodeBlockStatusReply(buf.get(), cap, h.cookie, 1, ext.data(),
                                                    ext.size());
      bool any_zero = false;
      for (const auto& e : ext) any_zero |= e.length == 0;
      if (ext.empty() || any_zero || cap < nbd::BlockStatusReplyLen(ext.size())) {
        FUZZ_CHECK(bn == 0);
      } else {
        FUZZ_CHECK(bn == nbd::BlockStatusReplyLen(ext.size()));
        FUZZ_CHECK(nbd::LoadBE32(buf.get() + 16) == bn - nbd::kStructuredReplyHeaderLen);
      }
    }

    if (c.fatal || h.type == nbd::kCmdDisc) return;
    in.Skip(c.drain);
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  for (auto policy : {nbd::TlsPolicy::kNone, nbd::TlsPolicy::kRequired}) {
    Input in{data, size};
    if (auto p = Negotiate(in, policy)) Transmit(in, *p);
  }
  // Also treat the raw input as a stream of requests under each parameter combination, so
  // the request checker is fuzzed even by inputs that never finish negotiating.
  for (int combo = 0; combo < 8 && size >= nbd::kRequestHeaderLen; ++combo) {
    Input raw{data, size};
    nbd::TransmissionParams p{combo & 1 ? UINT64_MAX : 1 << 20, (combo & 2) != 0,
                              (combo & 4) != 0, (combo & 4) != 0};
    p.max_payload = combo == 3 ? 4096 : nbd::kMaxPayload;
    Transmit(raw, p);
  }
  return 0;
}
