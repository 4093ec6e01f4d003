// libFuzzer target for StorageClass parameters (CreateVolume.parameters) and
// VolumeAttributesClass parameters (ControllerModifyVolume.mutable_parameters): csi/params.h, the
// quantities it reads (common/quantity.h), and the controller's layer over them
// (controller/csi_request.h: ParseQos, QosLimitsOf, QosPatchOf).
//
// Input: lines "key=value" (the first '=' splits) for the StorageClass, then a line "---", then
// the VolumeAttributesClass's lines. Checked:
//  - an accepted map sets exactly the fields of the keys it gives, each to the value the key's
//    grammar means (decimal for IOPS and burstMs, a Kubernetes quantity for the Bps keys), and the
//    external-provisioner's "csi.storage.k8s.io/" keys change nothing;
//  - a quantity accepted formats (FormatQuantity) to a text that parses back to the same bytes;
//  - a refusal is EINVAL or ERANGE; and when a key is bad (not the value), the message names it;
//  - the controller's ParseQos agrees with the parser; QosLimitsOf takes each limit from the
//    VolumeAttributesClass when it gives it, else from the StorageClass; QosPatchOf carries exactly
//    the keys given;
//  - the pool's QoS rule (rules.h) refuses those limits only for a burst above its maximum.
#include <cerrno>
#include <charconv>
#include <map>
#include <optional>
#include <string>

#include <google/protobuf/map.h>

#include "common/quantity.h"
#include "controller/csi_request.h"
#include "datapath/api/qos_proto.h"
#include "csi/params.h"
#include "datapath/pool/rules.h"
#include "test/fuzz/fuzz_check.h"

namespace ncsi = nbdcsi::csi;
namespace ctl = nbdcsi::controller;
namespace dp = nbdcsi::datapath;
using nbdcsi::fuzz::Bytes;
using Params = std::map<std::string, std::string>;

namespace {

constexpr std::string_view kPrefix = "csi.storage.k8s.io/";

enum class Kind { kCount, kBytes, kMillis };
struct Field {
  const char* key;
  Kind kind;
  std::optional<uint64_t> ncsi::QosParameters::*u64;
  std::optional<uint32_t> ncsi::QosParameters::*u32;
};
// The documented grammar (README's StorageClass table), restated here rather than taken from the
// parser, so that a parser that drifts from it fails.
const Field kFields[] = {
    {"maxIops", Kind::kCount, &ncsi::QosParameters::max_iops, nullptr},
    {"maxReadIops", Kind::kCount, &ncsi::QosParameters::max_read_iops, nullptr},
    {"maxWriteIops", Kind::kCount, &ncsi::QosParameters::max_write_iops, nullptr},
    {"maxBps", Kind::kBytes, &ncsi::QosParameters::max_bps, nullptr},
    {"maxReadBps", Kind::kBytes, &ncsi::QosParameters::max_read_bps, nullptr},
    {"maxWriteBps", Kind::kBytes, &ncsi::QosParameters::max_write_bps, nullptr},
    {"iopsPerGiB", Kind::kCount, &ncsi::QosParameters::iops_per_gib, nullptr},
    {"bpsPerGiB", Kind::kBytes, &ncsi::QosParameters::bps_per_gib, nullptr},
    {"burstMs", Kind::kMillis, nullptr, &ncsi::QosParameters::burst_ms},
};

const Field* FieldOf(const std::string& key) {
  for (const Field& f : kFields) {
    if (key == f.key) return &f;
  }
  return nullptr;
}

std::optional<uint64_t> Decimal(const std::string& v) {
  if (v.empty()) return std::nullopt;
  for (char c : v) {
    if (c < '0' || c > '9') return std::nullopt;
  }
  uint64_t out = 0;
  auto [p, ec] = std::from_chars(v.data(), v.data() + v.size(), out);
  if (ec != std::errc() || p != v.data() + v.size()) return std::nullopt;
  return out;
}

std::optional<uint64_t> Get(const ncsi::QosParameters& q, const Field& f) {
  if (f.u64) return q.*(f.u64);
  if (q.*(f.u32)) return uint64_t{*(q.*(f.u32))};
  return std::nullopt;
}

void CheckParsed(const Params& m, const nbdcsi::StatusOr<ncsi::QosParameters>& r) {
  if (!r.ok()) {
    const nbdcsi::Status& s = r.status();
    FUZZ_CHECK_MSG(s.code() == EINVAL || s.code() == ERANGE, s.message());
    FUZZ_CHECK(!s.message().empty());
    // Some key is unknown or has a value its grammar refuses.
    bool some_bad = false;
    for (const auto& [k, v] : m) {
      if (k.rfind(kPrefix, 0) == 0) continue;
      const Field* f = FieldOf(k);
      if (!f) {
        some_bad = true;
        continue;
      }
      if (f->kind == Kind::kBytes) {
        some_bad |= !nbdcsi::ParseQuantity(v).ok();
      } else {
        auto d = Decimal(v);
        some_bad |= !d || (f->kind == Kind::kMillis && *d > UINT32_MAX);
      }
    }
    FUZZ_CHECK_MSG(some_bad, s.message());
    return;
  }
  const ncsi::QosParameters& q = r.value();
  for (const Field& f : kFields) {
    auto it = m.find(f.key);
    const std::optional<uint64_t> got = Get(q, f);
    if (it == m.end()) {
      FUZZ_CHECK_MSG(!got, f.key);
      continue;
    }
    FUZZ_CHECK_MSG(got.has_value(), f.key);
    if (f.kind == Kind::kBytes) {
      auto want = nbdcsi::ParseQuantity(it->second);
      FUZZ_CHECK(want.ok() && *want == *got);
      auto back = nbdcsi::ParseQuantity(nbdcsi::FormatQuantity(*got));
      FUZZ_CHECK_MSG(back.ok() && *back == *got, nbdcsi::FormatQuantity(*got));
    } else {
      auto want = Decimal(it->second);
      FUZZ_CHECK(want && *want == *got);
      if (f.kind == Kind::kMillis) FUZZ_CHECK(*got <= UINT32_MAX);
    }
  }
  for (const auto& [k, v] : m) FUZZ_CHECK_MSG(k.rfind(kPrefix, 0) == 0 || FieldOf(k), k);
  bool any_key = false;
  for (const Field& f : kFields) any_key |= m.count(f.key) != 0;
  FUZZ_CHECK(q.empty() == !any_key);
}

Params WithoutProvisionerKeys(const Params& m) {
  Params out;
  for (const auto& [k, v] : m) {
    if (k.rfind(kPrefix, 0) != 0) out.emplace(k, v);
  }
  return out;
}

google::protobuf::Map<std::string, std::string> ToProtoMap(const Params& m) {
  google::protobuf::Map<std::string, std::string> out;
  for (const auto& [k, v] : m) out[k] = v;
  return out;
}

nbdcsi::StatusOr<ncsi::QosParameters> ParseBoth(const Params& m) {
  auto r = ncsi::ParseQosParameters(m);
  CheckParsed(m, r);
  auto unprefixed = ncsi::ParseQosParameters(WithoutProvisionerKeys(m));
  FUZZ_CHECK(unprefixed.ok() == r.ok());
  if (r.ok()) FUZZ_CHECK(*unprefixed == *r);
  // A VolumeAttributesClass's parameters (the controller's wrapper, as ModifyVolume sees them):
  // the same answer as the csi parser, and without schedule keys the same QoS as above.
  auto a = ncsi::ParseAttributesClassParameters(m);
  auto c = ctl::ParseAttributes(ToProtoMap(m), "parameters");
  FUZZ_CHECK(c.ok() == a.ok());
  if (a.ok()) {
    FUZZ_CHECK(c->qos == a->qos && c->schedule == a->schedule);
  } else {
    FUZZ_CHECK(c.status().code() == EINVAL);
    FUZZ_CHECK(c.status().message().find(a.status().message()) != std::string::npos);
  }
  if (!a.ok() || !a->schedule) {
    FUZZ_CHECK(a.ok() == r.ok());
    if (r.ok()) FUZZ_CHECK(a->qos == *r);
  }
  return r;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  Bytes in(data, size);
  Params sc, vac;
  Params* cur = &sc;
  while (!in.empty()) {
    std::string line = in.Until('\n');
    if (line == "---") {
      cur = &vac;
      continue;
    }
    const size_t eq = line.find('=');
    if (eq == std::string::npos) (*cur)[line] = "";
    else (*cur)[line.substr(0, eq)] = line.substr(eq + 1);
  }

  auto a = ParseBoth(sc);
  auto b = ParseBoth(vac);
  if (!a.ok() || !b.ok()) return 0;

  const auto limits = ctl::QosLimitsOf(*a, *b);
  const auto patch = ctl::QosPatchOf(*b);
  const auto& refl = *patch.GetReflection();
  const auto& desc = *patch.GetDescriptor();
  for (const Field& f : kFields) {
    const std::optional<uint64_t> from_vac = Get(*b, f);
    const std::optional<uint64_t> from_sc = Get(*a, f);
    const uint64_t want = from_vac ? *from_vac : from_sc.value_or(0);
    // The proto field names are the snake_case of the keys; find the field by its number, in
    // key order (datapath.proto numbers QosLimits / QosPatch fields 1..9 in that order).
    const int number = static_cast<int>(&f - kFields) + 1;
    const auto* lf = limits.GetDescriptor()->FindFieldByNumber(number);
    const auto* pf = desc.FindFieldByNumber(number);
    FUZZ_CHECK(lf && pf);
    const uint64_t got = lf->cpp_type() == google::protobuf::FieldDescriptor::CPPTYPE_UINT32
                             ? limits.GetReflection()->GetUInt32(limits, lf)
                             : limits.GetReflection()->GetUInt64(limits, lf);
    FUZZ_CHECK_MSG(got == want, f.key);
    FUZZ_CHECK_MSG(refl.HasField(patch, pf) == from_vac.has_value(), f.key);
    if (from_vac) {
      const uint64_t pv = pf->cpp_type() == google::protobuf::FieldDescriptor::CPPTYPE_UINT32
                              ? refl.GetUInt32(patch, pf)
                              : refl.GetUInt64(patch, pf);
      FUZZ_CHECK_MSG(pv == *from_vac, f.key);
    }
  }
  const dp::QosLimits q = dp::FromProto(limits);
  FUZZ_CHECK(dp::ValidateQos(q, 0).ok() == (q.burst_ms <= dp::kMaxBurstMs));
  return 0;
}
