// What every fuzz target shares: a property check that aborts (so libFuzzer keeps the input as a
// crash reproducer) and cursors over the input bytes for targets that decode structure from them.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>

#define FUZZ_CHECK(cond)                                                                 \
  do {                                                                                   \
    if (!(cond)) {                                                                       \
      std::fprintf(stderr, "invariant failed: %s (%s:%d)\n", #cond, __FILE__, __LINE__); \
      std::abort();                                                                      \
    }                                                                                    \
  } while (0)

// Like FUZZ_CHECK, with a message that says what was seen (e.g. the value that broke the rule).
#define FUZZ_CHECK_MSG(cond, msg)                                                  \
  do {                                                                             \
    if (!(cond)) {                                                                 \
      std::fprintf(stderr, "invariant failed: %s (%s:%d): %s\n", #cond, __FILE__, \
                   __LINE__, std::string(msg).c_str());                            \
      std::abort();                                                                \
    }                                                                              \
  } while (0)

namespace nbdcsi::fuzz {

// Structured decoding of fuzz input: each Take consumes bytes from the front, and once the input
// runs out every Take yields zeros / empty strings, so any input decodes to something.
class Bytes {
 public:
  Bytes(const uint8_t* p, size_t n) : p_(p), n_(n) {}
  bool empty() const { return n_ == 0; }
  size_t size() const { return n_; }
  uint8_t U8() {
    if (n_ == 0) return 0;
    --n_;
    return *p_++;
  }
  uint64_t U64() {
    uint64_t v = 0;
    for (int i = 0; i < 8; ++i) v = (v << 8) | U8();
    return v;
  }
  // A string up to the next `sep` byte (consumed, not returned) or the end of the input.
  std::string Until(uint8_t sep) {
    size_t k = 0;
    while (k < n_ && p_[k] != sep) ++k;
    std::string s(reinterpret_cast<const char*>(p_), k);
    const size_t used = k < n_ ? k + 1 : k;
    p_ += used;
    n_ -= used;
    return s;
  }
  std::string_view Rest() {
    std::string_view s(reinterpret_cast<const char*>(p_), n_);
    p_ += n_;
    n_ = 0;
    return s;
  }

 private:
  const uint8_t* p_;
  size_t n_;
};

// Raw decoding, for targets whose input mirrors a wire format: Take hands out the next `len`
// bytes in place (false, consuming nothing, when fewer are left); Skip drops up to `len` bytes
// and says how many it dropped.
struct Input {
  const uint8_t* p;
  size_t n;
  bool Take(size_t len, const uint8_t** out) {
    if (n < len) return false;
    *out = p;
    p += len;
    n -= len;
    return true;
  }
  size_t Skip(size_t len) {
    const size_t k = len < n ? len : n;
    p += k;
    n -= k;
    return k;
  }
};

}  // namespace nbdcsi::fuzz
