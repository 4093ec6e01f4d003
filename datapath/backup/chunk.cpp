#include "datapath/backup/chunk.h"

#include <openssl/evp.h>
#include <zstd.h>

#include <memory>
#include <stdexcept>

namespace nbdcsi::datapath::backup {

std::string Sha256Hex(std::string_view data) {
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  // EVP_Digest is the one-shot form; it fails only on allocation failure.
  if (EVP_Digest(data.data(), data.size(), md, &len, EVP_sha256(), nullptr) != 1) {
    throw std::runtime_error("EVP_Digest(sha256) failed");
  }
  static constexpr char kHex[] = "0123456789abcdef";
  std::string out(len * 2, '0');
  for (unsigned int i = 0; i < len; ++i) {
    out[2 * i] = kHex[md[i] >> 4];
    out[2 * i + 1] = kHex[md[i] & 0xf];
  }
  return out;
}

bool IsSha256Hex(std::string_view s) {
  if (s.size() != 64) return false;
  for (char c : s) {
    if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) return false;
  }
  return true;
}

std::string Compress(std::string_view data, int level) {
  std::string out(ZSTD_compressBound(data.size()), '\0');
  size_t n = ZSTD_compress(out.data(), out.size(), data.data(), data.size(), level);
  if (ZSTD_isError(n)) {
    // Only a bad level or too small a buffer can fail, and the bound rules out the latter.
    throw std::runtime_error(std::string("ZSTD_compress: ") + ZSTD_getErrorName(n));
  }
  out.resize(n);
  return out;
}

StatusOr<std::string> Decompress(std::string_view frame, uint64_t expected_size) {
  unsigned long long content = ZSTD_getFrameContentSize(frame.data(), frame.size());
  if (content == ZSTD_CONTENTSIZE_ERROR) return Error(EINVAL, "not a zstd frame");
  if (content == ZSTD_CONTENTSIZE_UNKNOWN || content != expected_size) {
    return Error(EINVAL, "zstd frame holds {} bytes, the manifest says {}",
                 content == ZSTD_CONTENTSIZE_UNKNOWN ? std::string("an unknown number of")
                                                     : std::to_string(content),
                 expected_size);
  }
  size_t frame_len = ZSTD_findFrameCompressedSize(frame.data(), frame.size());
  if (ZSTD_isError(frame_len) || frame_len != frame.size()) {
    return Error(EINVAL, "zstd frame is truncated or followed by extra bytes");
  }
  std::string out(expected_size, '\0');
  size_t n = ZSTD_decompress(out.data(), out.size(), frame.data(), frame.size());
  if (ZSTD_isError(n)) return Error(EINVAL, "zstd: {}", ZSTD_getErrorName(n));
  if (n != expected_size) {
    return Error(EINVAL, "zstd frame decompressed to {} bytes, expected {}", n, expected_size);
  }
  return out;
}

StatusOr<std::string> DecompressUpTo(std::string_view frame, uint64_t max_size) {
  unsigned long long content = ZSTD_getFrameContentSize(frame.data(), frame.size());
  if (content == ZSTD_CONTENTSIZE_ERROR) return Error(EINVAL, "not a zstd frame");
  if (content == ZSTD_CONTENTSIZE_UNKNOWN || content > max_size) {
    return Error(EINVAL, "zstd frame of an unknown size or more than {} bytes", max_size);
  }
  return Decompress(frame, content);
}

}  // namespace nbdcsi::datapath::backup
