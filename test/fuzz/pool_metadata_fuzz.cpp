// libFuzzer target for the pool's metadata parsers (datapath/pool/metadata.h): what
// DIR/volumes/NAME.json and DIR/snapshots/NAME.json may hold after a crash, a bad disk or a hand
// edit. The loader must turn any bytes into either a record that obeys every pool rule or an
// EINVAL that says why, never a crash or an exception.
//
// Input: 1 byte (bit 0: volume or snapshot file), the file's NAME up to '\n', then the file.
// Checked for every input:
//  - a refusal is EINVAL with a message;
//  - an accepted record names its own file, and its name, size, QoS, source, state and method
//    pass the same rules (rules.h) the pool applies to requests;
//  - ToJson of it parses back to the same record, and ToJson of that is the same text;
//  - that text cut short anywhere before its closing brace is refused (a torn write is never
//    taken for a record).
#include <cerrno>
#include <string>

#include "datapath/pool/metadata.h"
#include "datapath/pool/rules.h"
#include "test/fuzz/fuzz_check.h"

namespace dp = nbdcsi::datapath;
using nbdcsi::fuzz::Bytes;

namespace {

bool Same(const dp::VolumeMeta& a, const dp::VolumeMeta& b) {
  return a.name == b.name && a.size == b.size && a.created_unix_ns == b.created_unix_ns &&
         a.read_only == b.read_only && a.qos == b.qos && a.source == b.source &&
         a.state == b.state && a.error == b.error;
}
bool Same(const dp::SnapshotMeta& a, const dp::SnapshotMeta& b) {
  return a.name == b.name && a.source_volume == b.source_volume && a.size == b.size &&
         a.created_unix_ns == b.created_unix_ns && a.method == b.method && a.state == b.state &&
         a.error == b.error;
}

bool ValidState(const std::string& s) { return s == "ready" || s == "copying" || s == "failed"; }

bool ValidSourceLabel(const std::string& s) {
  if (s.empty()) return true;
  if (s.rfind("snapshot/", 0) == 0) return dp::ValidateSnapshotName(s.substr(9)).ok();
  if (s.rfind("volume/", 0) == 0) return dp::ValidateVolumeName(s.substr(7)).ok();
  return false;
}


// Round trip and truncation, shared by both kinds. `seed` picks the cut points.
// Whether the parser took the file; a refusal must be EINVAL with a message.
template <typename Meta>
bool Parsed(const nbdcsi::StatusOr<Meta>& r) {
  if (r.ok()) return true;
  FUZZ_CHECK_MSG(r.status().code() == EINVAL, r.status().message());
  FUZZ_CHECK(!r.status().message().empty());
  return false;
}

template <typename Meta, typename ParseFn>
void RoundTrip(const Meta& m, const std::string& name, ParseFn parse, uint64_t seed) {
  const std::string text = dp::ToJson(m);
  auto again = parse(text, name);
  FUZZ_CHECK_MSG(again.ok(), again.status().message() + "\n" + text);
  FUZZ_CHECK_MSG(Same(m, *again), text);
  FUZZ_CHECK(dp::ToJson(*again) == text);
  FUZZ_CHECK(text.size() >= 3 && text[text.size() - 2] == '}');
  const size_t cuttable = text.size() - 1;  // prefixes [0, size - 2] lack the closing brace
  for (int i = 0; i < 4; ++i) {
    seed = seed * 6364136223846793005ULL + 1442695040888963407ULL;
    const size_t cut = (seed >> 33) % cuttable;
    auto torn = parse(text.substr(0, cut), name);
    FUZZ_CHECK_MSG(!torn.ok() && torn.status().code() == EINVAL, text.substr(0, cut));
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  Bytes in(data, size);
  const bool snapshot = in.U8() & 1;
  const std::string name = in.Until('\n');
  const std::string_view file = in.Rest();
  uint64_t seed = size;
  for (size_t i = 0; i < size; i += 7) seed = seed * 31 + data[i];

  if (!snapshot) {
    auto r = dp::ParseVolumeMetadata(file, name);
    if (!Parsed(r)) return 0;
    const dp::VolumeMeta& m = *r;
    FUZZ_CHECK(m.name == name);
    FUZZ_CHECK(dp::ValidateVolumeName(m.name).ok());
    FUZZ_CHECK(dp::ValidateVolumeSize(m.size).ok());
    FUZZ_CHECK(dp::ValidateQos(m.qos, m.size).ok());
    FUZZ_CHECK_MSG(ValidSourceLabel(m.source), m.source);
    FUZZ_CHECK(ValidState(m.state));
    RoundTrip(m, name, dp::ParseVolumeMetadata, seed);
  } else {
    auto r = dp::ParseSnapshotMetadata(file, name);
    if (!Parsed(r)) return 0;
    const dp::SnapshotMeta& m = *r;
    FUZZ_CHECK(m.name == name);
    FUZZ_CHECK(dp::ValidateSnapshotName(m.name).ok());
    FUZZ_CHECK(dp::ValidateVolumeName(m.source_volume).ok());
    FUZZ_CHECK(dp::ValidateVolumeSize(m.size).ok());
    FUZZ_CHECK(m.method == "reflink" || m.method == "copy");
    FUZZ_CHECK(ValidState(m.state));
    RoundTrip(m, name, dp::ParseSnapshotMetadata, seed);
  }
  return 0;
}
