#include "datapath/backup/crypto.h"

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/kdf.h>
#include <openssl/rand.h>

#include <memory>
#include <nlohmann/json.hpp>
#include <stdexcept>

#include "common/json_field.h"

namespace nbdcsi::datapath::backup {

namespace {

using nlohmann::json;

constexpr size_t kSaltBytes = 16;
constexpr size_t kKeyBytes = 32;
constexpr uint64_t kMaxScryptMemory = uint64_t{256} << 20;

std::string Hex(const unsigned char* p, size_t n) {
  static constexpr char kHex[] = "0123456789abcdef";
  std::string out(n * 2, '0');
  for (size_t i = 0; i < n; ++i) {
    out[2 * i] = kHex[p[i] >> 4];
    out[2 * i + 1] = kHex[p[i] & 0xf];
  }
  return out;
}
std::string Hex(std::string_view s) {
  return Hex(reinterpret_cast<const unsigned char*>(s.data()), s.size());
}

// Lower-case hex of exactly `bytes` bytes into *out; false for anything else.
bool Unhex(std::string_view h, size_t bytes, std::string* out) {
  if (h.size() != 2 * bytes) return false;
  auto nib = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return -1;
  };
  out->assign(bytes, '\0');
  for (size_t i = 0; i < bytes; ++i) {
    int hi = nib(h[2 * i]), lo = nib(h[2 * i + 1]);
    if (hi < 0 || lo < 0) return false;
    (*out)[i] = static_cast<char>(hi << 4 | lo);
  }
  return true;
}

struct CtxFree {
  void operator()(EVP_CIPHER_CTX* c) const { EVP_CIPHER_CTX_free(c); }
  void operator()(EVP_PKEY_CTX* c) const { EVP_PKEY_CTX_free(c); }
};

// HKDF-SHA256(ikm, info) -> out[n]. Fails only on allocation failure.
void Hkdf(const unsigned char* ikm, size_t ikm_len, std::string_view info, unsigned char* out,
          size_t n) {
  std::unique_ptr<EVP_PKEY_CTX, CtxFree> ctx(EVP_PKEY_CTX_new_id(EVP_PKEY_HKDF, nullptr));
  size_t len = n;
  if (!ctx || EVP_PKEY_derive_init(ctx.get()) != 1 ||
      EVP_PKEY_CTX_set_hkdf_md(ctx.get(), EVP_sha256()) != 1 ||
      EVP_PKEY_CTX_set1_hkdf_key(ctx.get(), ikm, static_cast<int>(ikm_len)) != 1 ||
      EVP_PKEY_CTX_add1_hkdf_info(ctx.get(), reinterpret_cast<const unsigned char*>(info.data()),
                                  static_cast<int>(info.size())) != 1 ||
      EVP_PKEY_derive(ctx.get(), out, &len) != 1 || len != n) {
    throw std::runtime_error("HKDF-SHA256 failed");
  }
}

struct Derived {
  unsigned char master[kKeyBytes] = {};
  ~Derived() { OPENSSL_cleanse(master, sizeof(master)); }
};

Status Scrypt(const EncryptionConfig& c, std::string_view passphrase, Derived* d) {
  if (passphrase.empty()) return Error(EINVAL, "the encryption key is empty");
  // maxmem: what these parameters need (128 N r, plus 128 r p) with room; bounded by the parser.
  const uint64_t maxmem = 128 * c.scrypt_n * c.scrypt_r + 128 * c.scrypt_r * c.scrypt_p + (1 << 20);
  if (EVP_PBE_scrypt(passphrase.data(), passphrase.size(),
                     reinterpret_cast<const unsigned char*>(c.salt.data()), c.salt.size(),
                     c.scrypt_n, c.scrypt_r, c.scrypt_p, maxmem, d->master, kKeyBytes) != 1) {
    return Error(ENOMEM, "scrypt (N={}, r={}, p={}) failed", c.scrypt_n, c.scrypt_r, c.scrypt_p);
  }
  return Status::Ok();
}

constexpr std::string_view kInfoId = "nbd-csi backup chunk-id v1";
constexpr std::string_view kInfoData = "nbd-csi backup data v1";
constexpr std::string_view kInfoCheck = "nbd-csi backup key-check v1";

}  // namespace

std::string EncryptionConfigToJson(const EncryptionConfig& c) {
  return json{{"format", c.format},     {"cipher", c.cipher},           {"kdf", c.kdf},
              {"salt", Hex(c.salt)},    {"scrypt_n", c.scrypt_n},       {"scrypt_r", c.scrypt_r},
              {"scrypt_p", c.scrypt_p}, {"key_check", Hex(c.key_check)}}
      .dump();
}

StatusOr<EncryptionConfig> ParseEncryptionConfig(std::string_view text) {
  json j = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) {
    return Error(EINVAL, "encryption config: not a JSON object");
  }
  auto field = [&](const char* key, auto* out) {
    return json_field::Read(j, "encryption config", key, *out);
  };
  EncryptionConfig c;
  std::string salt, check;
  if (Status s = field("format", &c.format); !s.ok()) return s;
  if (c.format != kEncryptionFormat) {
    return Error(EINVAL, "encryption config: format {} is not supported (this build reads {})",
                 c.format, kEncryptionFormat);
  }
  for (auto [key, out] : {std::pair{"cipher", &c.cipher}, std::pair{"kdf", &c.kdf},
                          std::pair{"salt", &salt}, std::pair{"key_check", &check}}) {
    if (Status s = field(key, out); !s.ok()) return s;
  }
  for (auto [key, out] : {std::pair{"scrypt_n", &c.scrypt_n}, std::pair{"scrypt_r", &c.scrypt_r},
                          std::pair{"scrypt_p", &c.scrypt_p}}) {
    if (Status s = field(key, out); !s.ok()) return s;
  }
  if (c.cipher != "aes-256-gcm") {
    return Error(EINVAL, "encryption config: cipher \"{}\" is not supported (aes-256-gcm)",
                 c.cipher);
  }
  if (c.kdf != "scrypt") {
    return Error(EINVAL, "encryption config: kdf \"{}\" is not supported (scrypt)", c.kdf);
  }
  if (!Unhex(salt, kSaltBytes, &c.salt)) {
    return Error(EINVAL, "encryption config: salt is not {} hex digits", 2 * kSaltBytes);
  }
  if (!Unhex(check, kKeyBytes, &c.key_check)) {
    return Error(EINVAL, "encryption config: key_check is not {} hex digits", 2 * kKeyBytes);
  }
  const uint64_t n = c.scrypt_n, r = c.scrypt_r, p = c.scrypt_p;
  if (n < (1u << 10) || n > (1u << 20) || (n & (n - 1)) != 0 || r < 1 || r > 32 || p < 1 ||
      p > 16 || 128 * n * r > kMaxScryptMemory) {
    return Error(EINVAL,
                 "encryption config: scrypt parameters N={} r={} p={} are out of bounds (N a "
                 "power of two in 2^10..2^20, r 1..32, p 1..16, 128*N*r at most {} bytes)",
                 n, r, p, kMaxScryptMemory);
  }
  return c;
}

TargetKeys::~TargetKeys() {
  OPENSSL_cleanse(id_key_, sizeof(id_key_));
  OPENSSL_cleanse(data_key_, sizeof(data_key_));
}

StatusOr<EncryptionConfig> TargetKeys::NewConfig(std::string_view passphrase) {
  EncryptionConfig c;
  c.salt.assign(kSaltBytes, '\0');
  if (RAND_bytes(reinterpret_cast<unsigned char*>(c.salt.data()), kSaltBytes) != 1) {
    return Error(EIO, "RAND_bytes failed: no salt for the encryption config");
  }
  Derived d;
  if (Status s = Scrypt(c, passphrase, &d); !s.ok()) return s;
  c.key_check.assign(kKeyBytes, '\0');
  Hkdf(d.master, kKeyBytes, kInfoCheck, reinterpret_cast<unsigned char*>(c.key_check.data()),
       kKeyBytes);
  return c;
}

Status TargetKeys::Derive(const EncryptionConfig& c, std::string_view passphrase) {
  Derived d;
  if (Status s = Scrypt(c, passphrase, &d); !s.ok()) return s;
  unsigned char check[kKeyBytes];
  Hkdf(d.master, kKeyBytes, kInfoCheck, check, kKeyBytes);
  const bool match =
      c.key_check.size() == kKeyBytes && CRYPTO_memcmp(check, c.key_check.data(), kKeyBytes) == 0;
  OPENSSL_cleanse(check, sizeof(check));
  if (!match) return Error(EACCES, "wrong encryption key");
  Hkdf(d.master, kKeyBytes, kInfoId, id_key_, kKeyBytes);
  Hkdf(d.master, kKeyBytes, kInfoData, data_key_, kKeyBytes);
  return Status::Ok();
}

std::string TargetKeys::ChunkId(std::string_view data) const {
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  if (!HMAC(EVP_sha256(), id_key_, kKeyBytes, reinterpret_cast<const unsigned char*>(data.data()),
            data.size(), md, &len)) {
    throw std::runtime_error("HMAC-SHA256 failed");
  }
  return Hex(md, len);
}

std::string TargetKeys::Seal(std::string_view plain, std::string_view aad) const {
  std::string out(kNonceBytes + plain.size() + kTagBytes, '\0');
  auto* o = reinterpret_cast<unsigned char*>(out.data());
  // A fresh random 96-bit nonce per object: with at most a few billion objects under one key the
  // chance of a repeat stays far below 2^-32 (NIST SP 800-38D's bound for random nonces).
  if (RAND_bytes(o, kNonceBytes) != 1) throw std::runtime_error("RAND_bytes failed");
  std::unique_ptr<EVP_CIPHER_CTX, CtxFree> ctx(EVP_CIPHER_CTX_new());
  int n = 0, fin = 0;
  if (!ctx || EVP_EncryptInit_ex(ctx.get(), EVP_aes_256_gcm(), nullptr, data_key_, o) != 1 ||
      EVP_EncryptUpdate(ctx.get(), nullptr, &n, reinterpret_cast<const unsigned char*>(aad.data()),
                        static_cast<int>(aad.size())) != 1 ||
      EVP_EncryptUpdate(ctx.get(), o + kNonceBytes, &n,
                        reinterpret_cast<const unsigned char*>(plain.data()),
                        static_cast<int>(plain.size())) != 1 ||
      EVP_EncryptFinal_ex(ctx.get(), o + kNonceBytes + n, &fin) != 1 ||
      static_cast<size_t>(n + fin) != plain.size() ||
      EVP_CIPHER_CTX_ctrl(ctx.get(), EVP_CTRL_GCM_GET_TAG, kTagBytes,
                          o + kNonceBytes + plain.size()) != 1) {
    throw std::runtime_error("AES-256-GCM encryption failed");
  }
  return out;
}

StatusOr<std::string> TargetKeys::Unseal(std::string_view sealed, std::string_view aad) const {
  if (sealed.size() < kNonceBytes + kTagBytes) {
    return Error(EBADMSG, "{} bytes are too short for an encrypted object", sealed.size());
  }
  const auto* in = reinterpret_cast<const unsigned char*>(sealed.data());
  const size_t len = sealed.size() - kNonceBytes - kTagBytes;
  std::string out(len, '\0');
  std::unique_ptr<EVP_CIPHER_CTX, CtxFree> ctx(EVP_CIPHER_CTX_new());
  int n = 0, fin = 0;
  if (!ctx || EVP_DecryptInit_ex(ctx.get(), EVP_aes_256_gcm(), nullptr, data_key_, in) != 1 ||
      EVP_DecryptUpdate(ctx.get(), nullptr, &n, reinterpret_cast<const unsigned char*>(aad.data()),
                        static_cast<int>(aad.size())) != 1 ||
      EVP_DecryptUpdate(ctx.get(), reinterpret_cast<unsigned char*>(out.data()), &n,
                        in + kNonceBytes, static_cast<int>(len)) != 1 ||
      EVP_CIPHER_CTX_ctrl(ctx.get(), EVP_CTRL_GCM_SET_TAG, kTagBytes,
                          const_cast<unsigned char*>(in + kNonceBytes + len)) != 1) {
    throw std::runtime_error("AES-256-GCM decryption setup failed");
  }
  if (EVP_DecryptFinal_ex(ctx.get(), reinterpret_cast<unsigned char*>(out.data()) + n, &fin) != 1) {
    return Error(EBADMSG, "authentication failed (tampered, or not written with this key)");
  }
  return out;
}

}  // namespace nbdcsi::datapath::backup
