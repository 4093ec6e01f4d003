// libFuzzer target for NBD option haggling (datapath/nbd/negotiate.h, the Negotiator the engine's
// frontend drives on every connection). nbd_codec_fuzz checks the framing of whole transcripts;
// this target checks what each reply says, against a model of the option phase written from the
// NBD protocol (proto.md, "Option types") and the server's documented choices (negotiate.h):
//  - LIST: one SERVER reply per export, carrying its name, then ACK (ERR_INVALID with data);
//  - INFO/GO: ERR_INVALID for a malformed request or name, ERR_UNKNOWN for an unknown export;
//    otherwise INFO_EXPORT with the export's size and flags, INFO_BLOCK_SIZE (min <= preferred
//    <= max, powers of two), INFO_NAME / INFO_DESCRIPTION only when asked, then ACK; GO enters
//    transmission with the canonical export;
//  - STRUCTURED_REPLY: ACK (ERR_INVALID with data); meta contexts need it first (ERR_INVALID);
//    a context reply is always "base:allocation", id 0 for LIST and nonzero for SET; a SET that
//    fails or selects nothing clears the selection; base:allocation is on in transmission
//    exactly when the last SET selected it for the export GO/EXPORT_NAME picks;
//  - EXPORT_NAME: size, flags, and 124 zero bytes unless NO_ZEROES; an unknown one closes
//    silently; ABORT: ACK and close; anything unknown: ERR_UNSUP; an oversize option:
//    ERR_TOO_BIG, and the session goes on;
//  - with TLS required, nothing but STARTTLS and ABORT is served before the handshake, and every
//    refusal reveals nothing about the exports;
//  - no more than kMaxOptionsPerConnection options are answered.
//
// Input: 4 bytes client flags, then options (16-byte header + payload; an oversize option's
// payload is skipped from whatever input remains). Every input is negotiated under both TLS
// policies; under "required", a STARTTLS the server accepts stands for a completed handshake.
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "datapath/nbd/codec.h"
#include "datapath/nbd/negotiate.h"
#include "test/fuzz/fuzz_check.h"

namespace nbd = nbdcsi::nbd;

namespace {

struct Export {
  uint64_t size;
  bool read_only;
  std::string description;
};
// Canonical names. "" and "alias" are aliases of disk0, so the model can check that a meta
// context selected under one name holds for GO under the other.
const std::map<std::string, Export> kExports = {
    {"disk0", {1 << 20, false, "fuzz disk"}},
    {"ro", {4099, true, ""}},
    {"big", {UINT64_MAX, false, std::string(5000, 'd')}},  // description over the string limit
};

std::optional<std::string> Canonical(std::string_view name) {
  if (name.empty() || name == "alias") return std::string("disk0");
  if (kExports.count(std::string(name))) return std::string(name);
  return std::nullopt;
}

class Catalog : public nbd::ExportCatalog {
 public:
  std::optional<nbd::ExportInfo> Lookup(std::string_view name) override {
    auto c = Canonical(name);
    if (!c) return std::nullopt;
    const Export& e = kExports.at(*c);
    return nbd::ExportInfo{*c, e.size, e.read_only, e.description};
  }
  std::vector<std::string> List() override { return {"disk0", "ro", "big"}; }
};

struct Reply {
  uint32_t type;
  std::vector<uint8_t> data;
};

// Splits `out` into option replies, checking the framing of each.
std::vector<Reply> Replies(const std::vector<uint8_t>& out, uint32_t option) {
  std::vector<Reply> r;
  size_t pos = 0;
  while (pos < out.size()) {
    FUZZ_CHECK(out.size() - pos >= nbd::kOptionReplyHeaderLen);
    FUZZ_CHECK(nbd::LoadBE64(&out[pos]) == nbd::kOptReplyMagic);
    FUZZ_CHECK(nbd::LoadBE32(&out[pos + 8]) == option);
    const uint32_t type = nbd::LoadBE32(&out[pos + 12]);
    const uint32_t len = nbd::LoadBE32(&out[pos + 16]);
    pos += nbd::kOptionReplyHeaderLen;
    FUZZ_CHECK(len <= out.size() - pos);
    r.push_back({type, std::vector<uint8_t>(out.begin() + pos, out.begin() + pos + len)});
    pos += len;
  }
  return r;
}

void ExpectError(const std::vector<Reply>& r, uint32_t type) {
  FUZZ_CHECK(r.size() == 1);
  FUZZ_CHECK_MSG(r[0].type == type, std::to_string(r[0].type & 0xff));
  FUZZ_CHECK(r[0].data.size() <= nbd::kMaxStringLen);
}

bool ValidString(std::string_view s) {
  return s.size() <= nbd::kMaxStringLen && s.find('\0') == std::string_view::npos;
}

// The INFO/GO payload, parsed by the spec: name length, name, request count, requests.
struct InfoRequest {
  bool well_formed = false;
  std::string name;
  bool want_name = false, want_description = false;
};
InfoRequest ParseInfo(std::span<const uint8_t> p) {
  InfoRequest r;
  if (p.size() < 4) return r;
  const uint32_t n = nbd::LoadBE32(p.data());
  if (p.size() - 4 < n || p.size() - 4 - n < 2) return r;
  r.name.assign(reinterpret_cast<const char*>(p.data() + 4), n);
  const uint16_t k = nbd::LoadBE16(p.data() + 4 + n);
  if (p.size() - 6 - n != size_t{k} * 2) return r;
  for (uint16_t i = 0; i < k; ++i) {
    const uint16_t t = nbd::LoadBE16(p.data() + 6 + n + 2 * i);
    r.want_name |= t == nbd::kInfoName;
    r.want_description |= t == nbd::kInfoDescription;
  }
  r.well_formed = true;
  return r;
}

// The export a meta context request names, when its header parses (the model leaves the query
// grammar to the negotiator and checks the outcome's consistency instead).
std::optional<std::string> MetaExport(std::span<const uint8_t> p) {
  if (p.size() < 4) return std::nullopt;
  const uint32_t n = nbd::LoadBE32(p.data());
  if (p.size() - 4 < n) return std::nullopt;
  return std::string(reinterpret_cast<const char*>(p.data() + 4), n);
}

using nbdcsi::fuzz::Input;

void CheckInfoReplies(const std::vector<Reply>& r, const InfoRequest& req, const Export& e,
                      bool structured) {
  FUZZ_CHECK(r.size() >= 3 && r.back().type == nbd::kRepAck && r.back().data.empty());
  bool saw_export = false, saw_block = false, saw_name = false, saw_desc = false;
  for (size_t i = 0; i + 1 < r.size(); ++i) {
    FUZZ_CHECK(r[i].type == nbd::kRepInfo && r[i].data.size() >= 2);
    const uint8_t* d = r[i].data.data();
    const uint16_t info = nbd::LoadBE16(d);
    if (info == nbd::kInfoExport) {
      FUZZ_CHECK(r[i].data.size() == 12 && !saw_export);
      FUZZ_CHECK(nbd::LoadBE64(d + 2) == e.size);
      FUZZ_CHECK(nbd::LoadBE16(d + 10) == nbd::TransmissionFlags(e.read_only, structured));
      saw_export = true;
    } else if (info == nbd::kInfoBlockSize) {
      FUZZ_CHECK(r[i].data.size() == 14 && !saw_block);
      const uint32_t mn = nbd::LoadBE32(d + 2), pref = nbd::LoadBE32(d + 6),
                     mx = nbd::LoadBE32(d + 10);
      FUZZ_CHECK(mn >= 1 && mn <= pref && pref <= mx);
      FUZZ_CHECK((mn & (mn - 1)) == 0 && (pref & (pref - 1)) == 0 && pref >= 512);
      FUZZ_CHECK(mx == nbd::kMaxPayload);
      saw_block = true;
    } else if (info == nbd::kInfoName) {
      FUZZ_CHECK(req.want_name && !saw_name);
      FUZZ_CHECK(std::string(d + 2, d + r[i].data.size()) == *Canonical(req.name));
      saw_name = true;
    } else if (info == nbd::kInfoDescription) {
      FUZZ_CHECK(req.want_description && !saw_desc);
      FUZZ_CHECK(std::string(d + 2, d + r[i].data.size()) == e.description);
      saw_desc = true;
    } else {
      FUZZ_CHECK_MSG(false, "unexpected info type " + std::to_string(info));
    }
  }
  FUZZ_CHECK(saw_export && saw_block);
  FUZZ_CHECK(saw_name == req.want_name);
  FUZZ_CHECK(saw_desc ==
             (req.want_description && !e.description.empty() &&
              e.description.size() <= nbd::kMaxStringLen));
}

void Negotiate(const uint8_t* data, size_t size, nbd::TlsPolicy policy) {
  Catalog catalog;
  nbd::Negotiator neg(catalog, policy);
  std::vector<uint8_t> out;
  neg.Greeting(out);
  Input in{data, size};
  const uint8_t* b;
  if (!in.Take(4, &b)) return;
  const uint32_t flags = nbd::LoadBE32(b);
  if (!neg.OnClientFlags(flags)) return;
  const bool no_zeroes = flags & nbd::kClientFlagNoZeroes;

  bool structured = false;
  std::optional<std::string> meta_export;  // canonical export base:allocation is selected for
  bool tls = false;
  uint32_t seen = 0;
  for (;;) {
    if (!in.Take(nbd::kOptionHeaderLen, &b)) return;
    const auto h = neg.OnOptionHeader(b);
    const bool before_tls = policy == nbd::TlsPolicy::kRequired && !tls;
    if (h.action == nbd::Negotiator::HeaderAction::kClose) {
      FUZZ_CHECK(nbd::LoadBE64(b) != nbd::kIHaveOpt || h.length > nbd::kMaxOptionLen);
      FUZZ_CHECK(nbd::LoadBE64(b) != nbd::kIHaveOpt || h.length > nbd::kMaxDrainOptionLen ||
                 h.option == nbd::kOptExportName || before_tls);
      return;
    }
    const bool drained = h.action == nbd::Negotiator::HeaderAction::kDrainThenReply;
    std::span<const uint8_t> payload;
    if (drained) {
      in.Skip(h.length);
    } else {
      if (!in.Take(h.length, &b)) return;
      payload = std::span<const uint8_t>(b, h.length);
    }
    out.clear();
    const auto step = neg.OnOption(h.option, payload, drained, out);
    // EXPORT_NAME's success is the only answer that is not option replies.
    const bool export_name_ok =
        h.option == nbd::kOptExportName && step == nbd::Negotiator::Step::kTransmission;
    const auto r = export_name_ok ? std::vector<Reply>{} : Replies(out, h.option);
    if (++seen > nbd::kMaxOptionsPerConnection) {
      FUZZ_CHECK(step == nbd::Negotiator::Step::kClose && out.empty());
      return;
    }
    using Step = nbd::Negotiator::Step;

    if (before_tls) {
      if (h.option == nbd::kOptStartTls && payload.empty()) {
        FUZZ_CHECK(step == Step::kStartTls && r.size() == 1 && r[0].type == nbd::kRepAck);
        FUZZ_CHECK(neg.OnTlsEstablished());
        tls = true;
      } else if (h.option == nbd::kOptAbort) {
        FUZZ_CHECK(step == Step::kClose && r.size() == 1 && r[0].type == nbd::kRepAck);
        return;
      } else if (h.option == nbd::kOptExportName) {
        FUZZ_CHECK(step == Step::kClose && out.empty());
        return;
      } else {
        FUZZ_CHECK(step == Step::kContinue);
        ExpectError(r, h.option == nbd::kOptStartTls ? nbd::kRepErrInvalid : nbd::kRepErrTlsReqd);
      }
      continue;
    }

    if (drained) {
      if (h.option == nbd::kOptAbort) {
        FUZZ_CHECK(step == Step::kClose && r.size() == 1 && r[0].type == nbd::kRepAck);
        return;
      }
      FUZZ_CHECK(h.option != nbd::kOptExportName);
      FUZZ_CHECK(step == Step::kContinue);
      ExpectError(r, nbd::kRepErrTooBig);
      continue;
    }

    switch (h.option) {
      case nbd::kOptExportName: {
        const std::string name(payload.begin(), payload.end());
        const auto c = ValidString(name) ? Canonical(name) : std::nullopt;
        if (!c) {
          FUZZ_CHECK(step == Step::kClose && out.empty());
          return;
        }
        const Export& e = kExports.at(*c);
        FUZZ_CHECK(step == Step::kTransmission);
        FUZZ_CHECK(out.size() == 10 + (no_zeroes ? 0 : nbd::kExportNameReplyZeroes));
        FUZZ_CHECK(nbd::LoadBE64(out.data()) == e.size);
        FUZZ_CHECK(nbd::LoadBE16(out.data() + 8) == nbd::TransmissionFlags(e.read_only, structured));
        for (size_t i = 10; i < out.size(); ++i) FUZZ_CHECK(out[i] == 0);
        const nbd::Negotiated& n = neg.result();
        FUZZ_CHECK(n.export_info.name == *c && n.structured_replies == structured);
        FUZZ_CHECK(n.base_allocation == (meta_export == *c));
        return;
      }
      case nbd::kOptAbort:
        FUZZ_CHECK(step == Step::kClose && r.size() == 1 && r[0].type == nbd::kRepAck);
        return;
      case nbd::kOptList: {
        FUZZ_CHECK(step == Step::kContinue);
        if (!payload.empty()) {
          ExpectError(r, nbd::kRepErrInvalid);
          break;
        }
        const auto names = catalog.List();
        FUZZ_CHECK(r.size() == names.size() + 1 && r.back().type == nbd::kRepAck);
        for (size_t i = 0; i < names.size(); ++i) {
          FUZZ_CHECK(r[i].type == nbd::kRepServer && r[i].data.size() == 4 + names[i].size());
          FUZZ_CHECK(nbd::LoadBE32(r[i].data.data()) == names[i].size());
          FUZZ_CHECK(std::string(r[i].data.begin() + 4, r[i].data.end()) == names[i]);
        }
        break;
      }
      case nbd::kOptStartTls:
        FUZZ_CHECK(step == Step::kContinue);
        ExpectError(r, payload.empty() && !tls ? nbd::kRepErrPolicy : nbd::kRepErrInvalid);
        break;
      case nbd::kOptStructuredReply:
        FUZZ_CHECK(step == Step::kContinue);
        if (!payload.empty()) {
          ExpectError(r, nbd::kRepErrInvalid);
        } else {
          FUZZ_CHECK(r.size() == 1 && r[0].type == nbd::kRepAck && r[0].data.empty());
          structured = true;
        }
        break;
      case nbd::kOptInfo:
      case nbd::kOptGo: {
        const InfoRequest req = ParseInfo(payload);
        const auto c = req.well_formed && ValidString(req.name) ? Canonical(req.name) : std::nullopt;
        if (!req.well_formed || !ValidString(req.name)) {
          FUZZ_CHECK(step == Step::kContinue);
          ExpectError(r, nbd::kRepErrInvalid);
          break;
        }
        if (!c) {
          FUZZ_CHECK(step == Step::kContinue);
          ExpectError(r, nbd::kRepErrUnknown);
          break;
        }
        const Export& e = kExports.at(*c);
        CheckInfoReplies(r, req, e, structured);
        if (h.option == nbd::kOptInfo) {
          FUZZ_CHECK(step == Step::kContinue);
          break;
        }
        FUZZ_CHECK(step == Step::kTransmission);
        const nbd::Negotiated& n = neg.result();
        FUZZ_CHECK(n.export_info.name == *c && n.export_info.size == e.size);
        FUZZ_CHECK(n.structured_replies == structured);
        FUZZ_CHECK(n.base_allocation == (meta_export == *c));
        FUZZ_CHECK(n.base_allocation_id == (n.base_allocation ? nbd::kBaseAllocationContextId : 0));
        FUZZ_CHECK(n.transmission_flags == nbd::TransmissionFlags(e.read_only, structured));
        return;
      }
      case nbd::kOptListMetaContext:
      case nbd::kOptSetMetaContext: {
        const bool set = h.option == nbd::kOptSetMetaContext;
        FUZZ_CHECK(step == Step::kContinue);
        if (set) meta_export.reset();
        if (!structured) {
          ExpectError(r, nbd::kRepErrInvalid);
          break;
        }
        if (r.size() == 1 && (r[0].type & nbd::kRepFlagError)) {
          FUZZ_CHECK(r[0].type == nbd::kRepErrInvalid || r[0].type == nbd::kRepErrUnknown);
          if (r[0].type == nbd::kRepErrUnknown) {
            const auto name = MetaExport(payload);
            FUZZ_CHECK(name && !(ValidString(*name) && Canonical(*name)));
          }
          break;
        }
        FUZZ_CHECK(!r.empty() && r.size() <= 2 && r.back().type == nbd::kRepAck);
        const auto name = MetaExport(payload);
        FUZZ_CHECK(name && ValidString(*name) && Canonical(*name));
        if (r.size() == 2) {
          FUZZ_CHECK(r[0].type == nbd::kRepMetaContext && r[0].data.size() >= 4);
          const uint32_t id = nbd::LoadBE32(r[0].data.data());
          FUZZ_CHECK(set ? id != 0 : id == 0);
          FUZZ_CHECK(std::string(r[0].data.begin() + 4, r[0].data.end()) ==
                     nbd::kMetaBaseAllocation);
          if (set) meta_export = *Canonical(*name);
        }
        break;
      }
      default:
        FUZZ_CHECK(step == Step::kContinue);
        ExpectError(r, nbd::kRepErrUnsup);
        break;
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  Negotiate(data, size, nbd::TlsPolicy::kNone);
  Negotiate(data, size, nbd::TlsPolicy::kRequired);
  return 0;
}
