// The fixed-newstyle option phase as a pure state machine.
//
// The session owns the socket and feeds this class whole messages: the client flags, each
// 16-byte option header, then each option's payload. The Negotiator appends the bytes to
// send to a caller-owned vector and says what to do next. It never blocks, never logs and
// never touches the network, so transcripts can be unit-tested and fuzzed byte for byte.
//
// Lifecycle per connection:
//   Greeting(out) -> send; read 4 bytes -> OnClientFlags (false: close)
//   loop: read 16 bytes -> OnOptionHeader ->
//     kReadPayload:    read `length` bytes, OnOption(option, payload, false, out)
//     kDrainThenReply: discard `length` bytes, OnOption(option, {}, true, out)
//     kClose:          close
//   OnOption -> send `out`; kContinue: loop; kTransmission: result() is valid, start the
//   transmission phase; kClose: close (after sending `out`, which may hold a final reply);
//   kStartTls: send `out` (the ACK) in plaintext, run the server side of a TLS handshake on
//   the same socket, call OnTlsEstablished, and loop with every later byte inside TLS.
//
// TLS follows the spec's STARTTLS rules (proto.md, "TLS support"). With TlsPolicy::kNone (the
// spec's NOTLS mode) STARTTLS is refused with ERR_POLICY. With kRequired (FORCEDTLS) nothing
// but STARTTLS and ABORT is served before TLS: other options get ERR_TLS_REQD, EXPORT_NAME
// (which has no error reply) closes, and an oversize option closes instead of being drained,
// so an unauthenticated peer cannot make us read more than one small option at a time.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "datapath/nbd/proto.h"

namespace nbdcsi::nbd {

struct ExportInfo {
  std::string name;  // canonical name
  uint64_t size;
  bool read_only;
  std::string description;
};

// What the NBD listener can serve. Lookup may map aliases (e.g. "" for a default export) to
// a canonical ExportInfo::name.
class ExportCatalog {
 public:
  // Why Resolve refused a name: the option error (kRepErr*) and the message the client sees.
  struct Refusal {
    uint32_t error = kRepErrUnknown;
    std::string message = "unknown export";
  };
  virtual ~ExportCatalog() = default;
  virtual std::optional<ExportInfo> Lookup(std::string_view name) = 0;
  // What the Negotiator calls: Lookup, or a refusal with its own error and message (a
  // malformed name, an export the client may not open now). EXPORT_NAME has no error reply,
  // so there a refusal closes the connection like an unknown name.
  virtual std::optional<ExportInfo> Resolve(std::string_view name, Refusal& why) {
    return Lookup(name);
  }
  virtual std::vector<std::string> List() = 0;
};

// An option error reply (kRepErr*) with a message, for a server that decides to refuse an
// export after the Negotiator has accepted it (the frontend's fence can lose a race).
void EncodeOptionError(std::vector<uint8_t>& out, uint32_t option, uint32_t error,
                       std::string_view message);

enum class TlsPolicy { kNone, kRequired };

struct Negotiated {  // valid once Step::kTransmission is returned
  ExportInfo export_info;
  bool structured_replies = false;
  bool base_allocation = false;     // BLOCK_STATUS allowed, with context id below
  uint32_t base_allocation_id = 0;
  uint16_t transmission_flags = 0;
};

// The meta context id we hand out for base:allocation. Any value works (ids are opaque to
// clients); nonzero makes a forgotten initialisation visible in captures.
inline constexpr uint32_t kBaseAllocationContextId = 1;

// Transmission flags we advertise for an export. Read-only exports get READ_ONLY and lose
// TRIM/WRITE_ZEROES/FAST_ZERO (we would refuse them anyway). SEND_DF only with structured
// replies, as the spec requires. CAN_MULTI_CONN holds because every connection to an export
// shares one backing file and FLUSH is an fdatasync of that file.
uint16_t TransmissionFlags(bool read_only, bool structured_replies);

class Negotiator {
 public:
  explicit Negotiator(ExportCatalog& catalog, TlsPolicy tls = TlsPolicy::kNone);

  // 18 bytes: NBDMAGIC, IHAVEOPT, handshake flags (FIXED_NEWSTYLE | NO_ZEROES).
  void Greeting(std::vector<uint8_t>& out);

  // 4 bytes of client flags. false -> close: unknown flags, or no FIXED_NEWSTYLE (we require
  // fixed newstyle: plain newstyle cannot report errors).
  bool OnClientFlags(uint32_t flags);

  enum class HeaderAction { kReadPayload, kDrainThenReply, kClose };
  struct OptionHeader {
    uint32_t option;
    uint32_t length;
    HeaderAction action;
  };
  // Parses the 16-byte option header. Bad magic -> kClose. length > kMaxOptionLen ->
  // kDrainThenReply if <= kMaxDrainOptionLen, else kClose; EXPORT_NAME cannot carry an error
  // reply, so an oversize one is always kClose, and so is any oversize option while TLS is
  // required but not yet running.
  OptionHeader OnOptionHeader(const uint8_t* in);

  enum class Step { kContinue, kTransmission, kStartTls, kClose };
  // Handles one option whose payload has been read fully; appends reply bytes to `out`.
  // For a drained oversize option pass an empty payload and drained=true: ERR_TOO_BIG.
  // kTransmission after a successful GO or EXPORT_NAME: `out` then ends with what must be
  // sent before transmission (for EXPORT_NAME: size + flags, then 124 zero bytes unless the
  // client set NO_ZEROES). kClose after ABORT (its ACK is in `out`), for EXPORT_NAME of an
  // unknown export (no reply, per spec), past kMaxOptionsPerConnection options, or when
  // called out of sequence (including between kStartTls and OnTlsEstablished). kStartTls
  // after a STARTTLS the server accepts (`out` holds its ACK).
  Step OnOption(uint32_t option, std::span<const uint8_t> payload, bool drained,
                std::vector<uint8_t>& out);

  // The TLS handshake that kStartTls asked for has succeeded: options resume, inside TLS.
  // No plaintext state carries over, because none exists: before TLS every option but
  // STARTTLS and ABORT is refused, so bytes a man in the middle injected before the handshake
  // cannot shape the session. false (and no change) unless kStartTls was the last step.
  bool OnTlsEstablished();
  bool tls_active() const { return tls_active_; }

  const Negotiated& result() const { return result_; }

 private:
  enum class State { kWantFlags, kOptions, kTlsPending, kDone };

  Step BeforeTls(uint32_t option, std::span<const uint8_t> payload, bool drained,
                 std::vector<uint8_t>& out);
  Step InfoOrGo(uint32_t option, std::span<const uint8_t> payload, std::vector<uint8_t>& out);
  // The option handlers that OnOption dispatches to, one per option with more than a line to it.
  Step ExportName(std::span<const uint8_t> payload, std::vector<uint8_t>& out);
  void List(uint32_t option, std::span<const uint8_t> payload, std::vector<uint8_t>& out);
  void StartTlsRefused(uint32_t option, std::span<const uint8_t> payload,
                       std::vector<uint8_t>& out);
  void MetaContext(uint32_t option, std::span<const uint8_t> payload, std::vector<uint8_t>& out);
  void Finish(const ExportInfo& info);

  ExportCatalog& catalog_;
  const TlsPolicy tls_policy_;
  State state_ = State::kWantFlags;
  bool tls_active_ = false;
  bool no_zeroes_ = false;
  bool structured_ = false;
  uint32_t options_seen_ = 0;
  // base:allocation as selected by the last SET_META_CONTEXT, and for which export
  // (canonical name): GO/EXPORT_NAME of another export voids the selection.
  bool meta_selected_ = false;
  std::string meta_export_;
  Negotiated result_;
};

}  // namespace nbdcsi::nbd
