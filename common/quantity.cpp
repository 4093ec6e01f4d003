#include "common/quantity.h"

#include <array>
#include <cctype>
#include <cmath>
#include <limits>
#include <optional>
#include <vector>

#include <fmt/format.h>

namespace nbdcsi {
namespace {

// Inputs are bounded (kMaxLen), so an exact little bignum is cheap and removes every
// rounding question: "0.1Ki" must be rejected, "0.5Ki" must be exactly 512.
class BigUint {
 public:
  void MulSmall(uint32_t m) {
    uint64_t carry = 0;
    for (auto& limb : limbs_) {
      uint64_t v = uint64_t{limb} * m + carry;
      limb = static_cast<uint32_t>(v);
      carry = v >> 32;
    }
    if (carry) limbs_.push_back(static_cast<uint32_t>(carry));
  }
  void AddSmall(uint32_t a) {
    uint64_t carry = a;
    for (auto& limb : limbs_) {
      if (!carry) return;
      uint64_t v = uint64_t{limb} + carry;
      limb = static_cast<uint32_t>(v);
      carry = v >> 32;
    }
    if (carry) limbs_.push_back(static_cast<uint32_t>(carry));
  }
  // Divides in place and returns the remainder.
  uint32_t DivSmall(uint32_t d) {
    uint64_t rem = 0;
    for (size_t i = limbs_.size(); i-- > 0;) {
      uint64_t cur = (rem << 32) | limbs_[i];
      limbs_[i] = static_cast<uint32_t>(cur / d);
      rem = cur % d;
    }
    Trim();
    return static_cast<uint32_t>(rem);
  }
  bool IsZero() const { return limbs_.empty(); }
  bool FitsU64() const { return limbs_.size() <= 2; }
  uint64_t ToU64() const {
    uint64_t v = 0;
    if (limbs_.size() > 1) v = uint64_t{limbs_[1]} << 32;
    if (!limbs_.empty()) v |= limbs_[0];
    return v;
  }

 private:
  void Trim() {
    while (!limbs_.empty() && limbs_.back() == 0) limbs_.pop_back();
  }
  std::vector<uint32_t> limbs_;  // little-endian base 2^32; empty means zero
};

constexpr size_t kMaxLen = 128;

struct Suffix {
  std::string_view text;
  int binary_power;   // multiply by 1024^binary_power
  int decimal_power;  // multiply by 10^decimal_power
};

constexpr std::array<Suffix, 15> kSuffixes = {{
    {"Ki", 1, 0}, {"Mi", 2, 0}, {"Gi", 3, 0}, {"Ti", 4, 0}, {"Pi", 5, 0}, {"Ei", 6, 0},
    {"n", 0, -9}, {"u", 0, -6}, {"m", 0, -3}, {"k", 0, 3}, {"M", 0, 6}, {"G", 0, 9},
    {"T", 0, 12}, {"P", 0, 15}, {"E", 0, 18},
}};

Status Invalid(std::string_view s, std::string_view why) {
  return Error(EINVAL, "invalid quantity \"{}\": {}", s, why);
}

constexpr std::string_view kValidForms =
    "expected a number with an optional suffix Ki Mi Gi Ti Pi Ei, k M G T P E, or an exponent "
    "like 1e9";

}  // namespace

namespace {

// The number part of a quantity: digits, an optional fraction, and what follows them.
struct Mantissa {
  std::string_view int_part, frac_part, rest;
};

// Length, characters and the sign; then the digits. Errors name the whole input.
StatusOr<Mantissa> SplitNumber(std::string_view s) {
  if (s.empty()) return Error(EINVAL, "invalid quantity \"\": empty ({})", kValidForms);
  if (s.size() > kMaxLen) {
    return Error(EINVAL, "invalid quantity \"{}...\": longer than {} characters",
                 s.substr(0, 32), kMaxLen);
  }
  for (char c : s) {
    if (std::isspace(static_cast<unsigned char>(c))) return Invalid(s, "contains whitespace");
    if (!std::isprint(static_cast<unsigned char>(c))) {
      return Invalid(s, "contains a non-printable character");
    }
  }
  size_t i = 0;
  if (s[i] == '-') return Invalid(s, "negative sizes are not allowed");
  if (s[i] == '+') ++i;
  Mantissa m;
  size_t start = i;
  while (i < s.size() && std::isdigit(static_cast<unsigned char>(s[i]))) ++i;
  m.int_part = s.substr(start, i - start);
  if (i < s.size() && s[i] == '.') {
    ++i;
    start = i;
    while (i < s.size() && std::isdigit(static_cast<unsigned char>(s[i]))) ++i;
    m.frac_part = s.substr(start, i - start);
  }
  if (m.int_part.empty() && m.frac_part.empty()) {
    return Invalid(s, fmt::format("does not start with a number ({})", kValidForms));
  }
  m.rest = s.substr(i);
  return m;
}

struct Powers {
  int binary = 0;         // times 1024^binary
  long long decimal = 0;  // times 10^decimal
};

// "1E" is exa, "1E3" and "1e3" are exponents: Kubernetes decides by what follows the 'e'.
// nullopt when `rest` is not an exponent at all.
std::optional<StatusOr<long long>> ParseExponent(std::string_view s, std::string_view rest) {
  if ((rest[0] != 'e' && rest[0] != 'E') || rest.size() < 2) return std::nullopt;
  size_t j = 1;
  bool neg = false;
  if (rest[j] == '+' || rest[j] == '-') neg = rest[j++] == '-';
  size_t digits_start = j;
  long long exp = 0;
  while (j < rest.size() && std::isdigit(static_cast<unsigned char>(rest[j]))) {
    // Saturate: anything beyond this is decided by the range checks later anyway.
    if (exp < 1'000'000) exp = exp * 10 + (rest[j] - '0');
    ++j;
  }
  if (j == rest.size() && j > digits_start) return StatusOr<long long>(neg ? -exp : exp);
  if (j != rest.size() && j > digits_start) {
    return StatusOr<long long>(
        Invalid(s, fmt::format("unexpected \"{}\" after the exponent", rest.substr(j))));
  }
  return StatusOr<long long>(Invalid(s, "exponent has no digits"));
}

// What follows the number: a suffix, an exponent, or an error with a hint for the usual slips.
StatusOr<Powers> ParseSuffix(std::string_view s, std::string_view rest) {
  if (rest.empty()) return Powers{};
  for (const auto& suf : kSuffixes) {
    if (rest == suf.text) return Powers{suf.binary_power, suf.decimal_power};
  }
  if (auto exp = ParseExponent(s, rest)) {
    if (!exp->ok()) return exp->status();
    return Powers{0, **exp};
  }
  if (std::isalpha(static_cast<unsigned char>(rest[0]))) {
    std::string hint;
    if (rest == "K") hint = " (did you mean \"k\" = 1000 or \"Ki\" = 1024?)";
    else if (rest.size() == 2 && rest[1] == 'B') hint = " (bytes are implied: drop the \"B\")";
    else if (rest.size() == 3 && rest.substr(1) == "iB") {
      hint = fmt::format(" (did you mean \"{}\"?)", rest.substr(0, 2));
    }
    return Invalid(s, fmt::format("unknown suffix \"{}\"{}; {}", rest, hint, kValidForms));
  }
  return Invalid(s, fmt::format("unexpected \"{}\" after the number; {}", rest, kValidForms));
}

// value = digits * 1024^binary * 10^(decimal - len(frac_part)), exactly, or an error when it is
// not a whole number of bytes or does not fit in 64 bits.
StatusOr<uint64_t> Scale(std::string_view s, const Mantissa& m, const Powers& p) {
  BigUint v;
  size_t significant = 0;
  for (std::string_view part : {m.int_part, m.frac_part}) {
    for (char c : part) {
      if (significant == 0 && c == '0') continue;
      ++significant;
      v.MulSmall(10);
      v.AddSmall(static_cast<uint32_t>(c - '0'));
    }
  }
  if (v.IsZero()) return uint64_t{0};
  long long exp10 = p.decimal - static_cast<long long>(m.frac_part.size());

  for (int k = 0; k < p.binary; ++k) v.MulSmall(1024);
  if (exp10 > 0) {
    // A non-zero value times 10^20 is already past uint64's 1.8e19.
    if (exp10 > 20) return Error(ERANGE, "quantity \"{}\" is too large for a byte count", s);
    for (long long k = 0; k < exp10; ++k) v.MulSmall(10);
  } else if (exp10 < 0) {
    // digits * 1024^6 < 10^(significant + 19): dividing by more than that leaves 0 < value < 1.
    if (-exp10 > static_cast<long long>(significant) + 19) {
      return Invalid(s, "not a whole number of bytes");
    }
    for (long long k = 0; k < -exp10; ++k) {
      if (v.DivSmall(10) != 0) return Invalid(s, "not a whole number of bytes");
    }
  }
  if (!v.FitsU64()) {
    return Error(ERANGE, "quantity \"{}\" is too large: the maximum is {} bytes", s,
                 std::numeric_limits<uint64_t>::max());
  }
  return v.ToU64();
}

}  // namespace

StatusOr<uint64_t> ParseQuantity(std::string_view s) {
  auto m = SplitNumber(s);
  if (!m.ok()) return m.status();
  auto p = ParseSuffix(s, m->rest);
  if (!p.ok()) return p.status();
  return Scale(s, *m, *p);
}

std::string FormatQuantity(uint64_t bytes) {
  static constexpr std::array<std::string_view, 7> kUnits = {"", "Ki", "Mi", "Gi",
                                                             "Ti", "Pi", "Ei"};
  if (bytes == 0) return "0";
  size_t unit = 0;
  while (unit + 1 < kUnits.size() && bytes % 1024 == 0) {
    bytes /= 1024;
    ++unit;
  }
  return fmt::format("{}{}", bytes, kUnits[unit]);
}

std::string FormatHuman(uint64_t bytes) {
  static constexpr std::array<std::string_view, 7> kUnits = {"B",   "KiB", "MiB", "GiB",
                                                             "TiB", "PiB", "EiB"};
  if (bytes < 1024) return fmt::format("{} B", bytes);
  size_t unit = 0;
  long double v = static_cast<long double>(bytes);
  while (unit + 1 < kUnits.size() && v >= 1024) {
    v /= 1024;
    ++unit;
  }
  // Round to two decimals first so 1023.999 MiB becomes "1 GiB", not "1024 MiB".
  long double rounded = std::round(v * 100) / 100;
  if (rounded >= 1024 && unit + 1 < kUnits.size()) {
    rounded = std::round(rounded / 1024 * 100) / 100;
    ++unit;
  }
  std::string text = fmt::format("{:.2f}", static_cast<double>(rounded));
  while (text.back() == '0') text.pop_back();
  if (text.back() == '.') text.pop_back();
  return fmt::format("{} {}", text, kUnits[unit]);
}

}  // namespace nbdcsi
