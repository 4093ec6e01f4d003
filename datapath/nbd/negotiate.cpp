#include "datapath/nbd/negotiate.h"

#include <algorithm>

#include "datapath/nbd/codec.h"

namespace nbdcsi::nbd {

namespace {

void Put16(std::vector<uint8_t>& out, uint16_t v) {
  uint8_t b[2];
  StoreBE16(b, v);
  out.insert(out.end(), b, b + 2);
}
void Put32(std::vector<uint8_t>& out, uint32_t v) {
  uint8_t b[4];
  StoreBE32(b, v);
  out.insert(out.end(), b, b + 4);
}
void Put64(std::vector<uint8_t>& out, uint64_t v) {
  uint8_t b[8];
  StoreBE64(b, v);
  out.insert(out.end(), b, b + 8);
}
void PutBytes(std::vector<uint8_t>& out, std::string_view s) {
  out.insert(out.end(), s.begin(), s.end());
}

void ReplyHeader(std::vector<uint8_t>& out, uint32_t option, uint32_t type, uint32_t len) {
  Put64(out, kOptReplyMagic);
  Put32(out, option);
  Put32(out, type);
  Put32(out, len);
}

void Ack(std::vector<uint8_t>& out, uint32_t option) { ReplyHeader(out, option, kRepAck, 0); }

// Error replies carry a short fixed message (the spec allows a human-readable string); we
// never echo client bytes back, so the message is always valid UTF-8 and bounded.
void Err(std::vector<uint8_t>& out, uint32_t option, uint32_t type, std::string_view msg) {
  ReplyHeader(out, option, type, static_cast<uint32_t>(msg.size()));
  PutBytes(out, msg);
}

// Bounds-checked reader over an option payload. Any short read marks the payload malformed.
class Reader {
 public:
  explicit Reader(std::span<const uint8_t> p) : p_(p) {}
  bool U16(uint16_t* v) {
    if (left() < 2) return bad();
    *v = LoadBE16(p_.data() + pos_);
    pos_ += 2;
    return true;
  }
  bool U32(uint32_t* v) {
    if (left() < 4) return bad();
    *v = LoadBE32(p_.data() + pos_);
    pos_ += 4;
    return true;
  }
  bool Str(uint32_t len, std::string_view* s) {
    if (left() < len) return bad();
    *s = std::string_view(reinterpret_cast<const char*>(p_.data() + pos_), len);
    pos_ += len;
    return true;
  }
  size_t left() const { return p_.size() - pos_; }
  bool done() const { return pos_ == p_.size(); }

 private:
  bool bad() {
    pos_ = p_.size();
    return false;
  }
  std::span<const uint8_t> p_;
  size_t pos_ = 0;
};

// Strings in the protocol MUST NOT contain NUL and MUST NOT exceed 4096 bytes.
bool ValidString(std::string_view s) {
  return s.size() <= kMaxStringLen && s.find('\0') == std::string_view::npos;
}

}  // namespace

void EncodeOptionError(std::vector<uint8_t>& out, uint32_t option, uint32_t error,
                       std::string_view message) {
  Err(out, option, error, message);
}

uint16_t TransmissionFlags(bool read_only, bool structured_replies) {
  uint16_t f = kFlagHasFlags | kFlagSendFlush | kFlagSendFua | kFlagCanMultiConn;
  if (read_only) {
    f |= kFlagReadOnly;
  } else {
    f |= kFlagSendTrim | kFlagSendWriteZeroes | kFlagSendFastZero;
  }
  if (structured_replies) f |= kFlagSendDf;
  return f;
}

Negotiator::Negotiator(ExportCatalog& catalog, TlsPolicy tls)
    : catalog_(catalog), tls_policy_(tls) {}

void Negotiator::Greeting(std::vector<uint8_t>& out) {
  Put64(out, kNbdMagic);
  Put64(out, kIHaveOpt);
  Put16(out, kHandshakeFlagFixedNewstyle | kHandshakeFlagNoZeroes);
}

bool Negotiator::OnClientFlags(uint32_t flags) {
  if (state_ != State::kWantFlags) return false;
  if ((flags & ~kClientFlagsKnown) != 0 || (flags & kClientFlagFixedNewstyle) == 0) {
    state_ = State::kDone;
    return false;
  }
  no_zeroes_ = (flags & kClientFlagNoZeroes) != 0;
  state_ = State::kOptions;
  return true;
}

Negotiator::OptionHeader Negotiator::OnOptionHeader(const uint8_t* in) {
  OptionHeader h{LoadBE32(in + 8), LoadBE32(in + 12), HeaderAction::kReadPayload};
  if (LoadBE64(in) != kIHaveOpt) {
    h.action = HeaderAction::kClose;
  } else if (h.length > kMaxOptionLen) {
    const bool drainable = h.length <= kMaxDrainOptionLen && h.option != kOptExportName &&
                           !(tls_policy_ == TlsPolicy::kRequired && !tls_active_);
    h.action = drainable ? HeaderAction::kDrainThenReply : HeaderAction::kClose;
  }
  return h;
}

Negotiator::Step Negotiator::OnOption(uint32_t option, std::span<const uint8_t> payload,
                                      bool drained, std::vector<uint8_t>& out) {
  if (state_ != State::kOptions) {
    // Out of sequence (e.g. plaintext right behind STARTTLS): the connection is over for good.
    state_ = State::kDone;
    return Step::kClose;
  }
  if (++options_seen_ > kMaxOptionsPerConnection) {
    state_ = State::kDone;
    return Step::kClose;
  }
  if (tls_policy_ == TlsPolicy::kRequired && !tls_active_) {
    return BeforeTls(option, payload, drained, out);
  }

  if (drained) {
    switch (option) {
      case kOptExportName:  // no way to report an error for it
        state_ = State::kDone;
        return Step::kClose;
      case kOptAbort:  // the spec says to ignore ABORT's data; fall through to the ACK
        break;
      default:
        Err(out, option, kRepErrTooBig, "option too long");
        return Step::kContinue;
    }
  }

  switch (option) {
    case kOptExportName:
      return ExportName(payload, out);
    case kOptAbort:
      Ack(out, option);
      state_ = State::kDone;
      return Step::kClose;
    case kOptList:
      List(option, payload, out);
      return Step::kContinue;
    case kOptStartTls:
      StartTlsRefused(option, payload, out);
      return Step::kContinue;
    case kOptInfo:
    case kOptGo:
      return InfoOrGo(option, payload, out);
    case kOptStructuredReply:
      if (!payload.empty()) {
        Err(out, option, kRepErrInvalid, "STRUCTURED_REPLY takes no data");
        return Step::kContinue;
      }
      structured_ = true;
      Ack(out, option);
      return Step::kContinue;
    case kOptListMetaContext:
    case kOptSetMetaContext:
      MetaContext(option, payload, out);
      return Step::kContinue;
    default:
      Err(out, option, kRepErrUnsup, "option not supported");
      return Step::kContinue;
  }
}

Negotiator::Step Negotiator::ExportName(std::span<const uint8_t> payload,
                                        std::vector<uint8_t>& out) {
  std::string_view name(reinterpret_cast<const char*>(payload.data()), payload.size());
  std::optional<ExportInfo> info;
  ExportCatalog::Refusal why;
  if (ValidString(name)) info = catalog_.Resolve(name, why);
  if (!info) {
    // The spec: a server unwilling to allow the export MUST terminate the session.
    state_ = State::kDone;
    return Step::kClose;
  }
  Finish(*info);
  Put64(out, result_.export_info.size);
  Put16(out, result_.transmission_flags);
  if (!no_zeroes_) out.insert(out.end(), kExportNameReplyZeroes, uint8_t{0});
  return Step::kTransmission;
}

void Negotiator::List(uint32_t option, std::span<const uint8_t> payload,
                      std::vector<uint8_t>& out) {
  if (!payload.empty()) {
    Err(out, option, kRepErrInvalid, "LIST takes no data");
    return;
  }
  for (const std::string& name : catalog_.List()) {
    ReplyHeader(out, option, kRepServer, static_cast<uint32_t>(4 + name.size()));
    Put32(out, static_cast<uint32_t>(name.size()));
    PutBytes(out, name);
  }
  Ack(out, option);
}

// Here TLS is either running already (a second STARTTLS is ERR_INVALID in the spec) or not
// offered on this listener (NOTLS mode: ERR_POLICY). Before TLS in REQUIRED mode, BeforeTls
// handles STARTTLS instead.
void Negotiator::StartTlsRefused(uint32_t option, std::span<const uint8_t> payload,
                                 std::vector<uint8_t>& out) {
  if (!payload.empty()) {
    Err(out, option, kRepErrInvalid, "STARTTLS takes no data");
  } else if (tls_active_) {
    Err(out, option, kRepErrInvalid, "TLS is already running");
  } else {
    Err(out, option, kRepErrPolicy, "TLS is not available on this listener");
  }
}

Negotiator::Step Negotiator::BeforeTls(uint32_t option, std::span<const uint8_t> payload,
                                       bool drained, std::vector<uint8_t>& out) {
  if (drained) {  // OnOptionHeader never asks for a drain before TLS
    state_ = State::kDone;
    return Step::kClose;
  }
  switch (option) {
    case kOptStartTls:
      if (!payload.empty()) {
        Err(out, option, kRepErrInvalid, "STARTTLS takes no data");
        return Step::kContinue;
      }
      Ack(out, option);
      state_ = State::kTlsPending;
      return Step::kStartTls;
    case kOptAbort:  // saying goodbye reveals nothing
      Ack(out, option);
      state_ = State::kDone;
      return Step::kClose;
    case kOptExportName:  // it has no error reply: the only refusal is to hang up
      state_ = State::kDone;
      return Step::kClose;
    default:
      // Even LIST and INFO would tell an unauthenticated peer which volumes exist.
      Err(out, option, kRepErrTlsReqd, "TLS is required: send STARTTLS first");
      return Step::kContinue;
  }
}

bool Negotiator::OnTlsEstablished() {
  if (state_ != State::kTlsPending) return false;
  tls_active_ = true;
  state_ = State::kOptions;
  return true;
}

Negotiator::Step Negotiator::InfoOrGo(uint32_t option, std::span<const uint8_t> payload,
                                      std::vector<uint8_t>& out) {
  // Data: name length (32), name, number of info requests (16), requests (16 each).
  Reader r(payload);
  uint32_t name_len = 0;
  std::string_view name;
  uint16_t n_requests = 0;
  if (!r.U32(&name_len) || !r.Str(name_len, &name) || !r.U16(&n_requests) ||
      r.left() != size_t{n_requests} * 2) {
    Err(out, option, kRepErrInvalid, "malformed INFO/GO request");
    return Step::kContinue;
  }
  bool want_name = false;
  bool want_description = false;
  for (uint16_t i = 0; i < n_requests; ++i) {
    uint16_t type = 0;
    r.U16(&type);
    // Unknown types are ignored; EXPORT and BLOCK_SIZE are sent unasked.
    if (type == kInfoName) want_name = true;
    if (type == kInfoDescription) want_description = true;
  }
  if (!ValidString(name)) {
    Err(out, option, kRepErrInvalid, "invalid export name");
    return Step::kContinue;
  }
  ExportCatalog::Refusal why;
  std::optional<ExportInfo> info = catalog_.Resolve(name, why);
  if (!info) {
    Err(out, option, why.error, why.message);
    return Step::kContinue;
  }

  const uint16_t flags = TransmissionFlags(info->read_only, structured_);
  ReplyHeader(out, option, kRepInfo, 12);
  Put16(out, kInfoExport);
  Put64(out, info->size);
  Put16(out, flags);
  // Always sent (it is optional for the client to ask): our constraints are the defaults a
  // client assumes anyway except for the maximum, which it needs to split large requests.
  ReplyHeader(out, option, kRepInfo, 14);
  Put16(out, kInfoBlockSize);
  Put32(out, kMinBlock);
  Put32(out, kPreferredBlock);
  Put32(out, kMaxBlock);
  if (want_name && info->name.size() <= kMaxStringLen) {
    ReplyHeader(out, option, kRepInfo, static_cast<uint32_t>(2 + info->name.size()));
    Put16(out, kInfoName);
    PutBytes(out, info->name);
  }
  if (want_description && !info->description.empty() &&
      info->description.size() <= kMaxStringLen) {
    ReplyHeader(out, option, kRepInfo, static_cast<uint32_t>(2 + info->description.size()));
    Put16(out, kInfoDescription);
    PutBytes(out, info->description);
  }
  Ack(out, option);
  if (option == kOptInfo) return Step::kContinue;
  Finish(*info);
  return Step::kTransmission;
}

void Negotiator::MetaContext(uint32_t option, std::span<const uint8_t> payload,
                             std::vector<uint8_t>& out) {
  const bool set = option == kOptSetMetaContext;
  // SET replaces the previous selection even when it fails.
  if (set) {
    meta_selected_ = false;
    meta_export_.clear();
  }
  if (!structured_) {
    Err(out, option, kRepErrInvalid, "negotiate structured replies first");
    return;
  }
  // Data: name length (32), name, number of queries (32), queries (length (32), string).
  Reader r(payload);
  uint32_t name_len = 0;
  std::string_view name;
  uint32_t n_queries = 0;
  if (!r.U32(&name_len) || !r.Str(name_len, &name) || !r.U32(&n_queries) ||
      n_queries > r.left() / 4) {
    Err(out, option, kRepErrInvalid, "malformed meta context request");
    return;
  }
  bool match = !set && n_queries == 0;  // an empty LIST means "everything"
  for (uint32_t i = 0; i < n_queries; ++i) {
    uint32_t len = 0;
    std::string_view q;
    if (!r.U32(&len) || !r.Str(len, &q)) {
      Err(out, option, kRepErrInvalid, "malformed meta context query");
      return;
    }
    // Every query MUST be "namespace:leaf"; queries of unknown namespaces are ignored.
    const size_t colon = q.find(':');
    if (!ValidString(q) || colon == std::string_view::npos || colon == 0) {
      Err(out, option, kRepErrInvalid, "invalid meta context query");
      return;
    }
    if (q == kMetaBaseAllocation) match = true;
    // "base:" is a wildcard for LIST only; in SET it selects nothing, per spec.
    if (!set && q == "base:") match = true;
  }
  if (!r.done()) {
    Err(out, option, kRepErrInvalid, "trailing data in meta context request");
    return;
  }
  std::optional<ExportInfo> info;
  ExportCatalog::Refusal why;
  if (ValidString(name)) info = catalog_.Resolve(name, why);
  if (!info) {
    Err(out, option, why.error, why.message);
    return;
  }
  if (match) {
    // LIST replies carry id 0 (reserved); SET hands out the id BLOCK_STATUS replies will use.
    const uint32_t id = set ? kBaseAllocationContextId : 0;
    ReplyHeader(out, option, kRepMetaContext,
                static_cast<uint32_t>(4 + kMetaBaseAllocation.size()));
    Put32(out, id);
    PutBytes(out, kMetaBaseAllocation);
    if (set) {
      meta_selected_ = true;
      meta_export_ = info->name;
    }
  }
  Ack(out, option);
}

void Negotiator::Finish(const ExportInfo& info) {
  result_.export_info = info;
  result_.structured_replies = structured_;
  result_.base_allocation = meta_selected_ && meta_export_ == info.name;
  result_.base_allocation_id = result_.base_allocation ? kBaseAllocationContextId : 0;
  result_.transmission_flags = TransmissionFlags(info.read_only, structured_);
  state_ = State::kDone;
}

}  // namespace nbdcsi::nbd
