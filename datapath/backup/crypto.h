// Client-side encryption of a backup target (docs/design.md, "Backups", "Encryption"): the
// target's PREFIX/config.json, the keys a passphrase derives through it, chunk names that do not
// reveal content hashes, and the sealed form of chunks and manifests. OpenSSL EVP only: scrypt
// (EVP_PBE_scrypt), HKDF-SHA256, HMAC-SHA256 and AES-256-GCM; nothing home-made.
//
// config.json, format 1:
//   {"format": 1, "cipher": "aes-256-gcm", "kdf": "scrypt", "salt": "32 hex",
//    "scrypt_n": N, "scrypt_r": R, "scrypt_p": P, "key_check": "64 hex"}
// master   = scrypt(passphrase, salt, N, r, p), 32 bytes
// id key   = HKDF-SHA256(master, info "nbd-csi backup chunk-id v1")   chunk names
// data key = HKDF-SHA256(master, info "nbd-csi backup data v1")       AES-256-GCM
// key_check= HKDF-SHA256(master, info "nbd-csi backup key-check v1")  stored: a wrong passphrase
//            is recognised before anything is read or written. HKDF outputs for different infos
//            are independent, so the check value says nothing about the other two keys.
// Sealed object = nonce (12 random bytes, fresh for every object) || AES-256-GCM ciphertext ||
// tag (16 bytes), with the object's role and name as additional data ("chunk:NAME",
// "manifest:NAME"), so an object moved to another name or role fails authentication.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "common/status.h"

namespace nbdcsi::datapath::backup {

inline constexpr int kEncryptionFormat = 1;
inline constexpr size_t kNonceBytes = 12;
inline constexpr size_t kTagBytes = 16;

struct EncryptionConfig {
  int format = kEncryptionFormat;
  std::string cipher = "aes-256-gcm";
  std::string kdf = "scrypt";
  std::string salt;  // raw bytes (16), hex in the JSON
  // 2^15 * 8 * 128 bytes = 32 MiB and about 0.1 s per derivation: once per operation, not per
  // chunk, and costly enough per guess for an attacker who has the bucket.
  uint64_t scrypt_n = uint64_t{1} << 15;
  uint64_t scrypt_r = 8;
  uint64_t scrypt_p = 1;
  std::string key_check;  // raw bytes (32), hex in the JSON
};

std::string EncryptionConfigToJson(const EncryptionConfig& c);
// EINVAL naming the first problem. The scrypt parameters are bounded (N a power of two in
// 2^10..2^20, r in 1..32, p in 1..16, at most 256 MiB of memory), so a config someone replaced
// in the bucket cannot make the daemon allocate without limit.
StatusOr<EncryptionConfig> ParseEncryptionConfig(std::string_view json);

// Keys of one target, derived from the passphrase. The destructor wipes them.
class TargetKeys {
 public:
  TargetKeys() = default;
  TargetKeys(const TargetKeys&) = delete;
  TargetKeys& operator=(const TargetKeys&) = delete;
  ~TargetKeys();

  // A new config for an empty target: random salt, default parameters, its key check.
  static StatusOr<EncryptionConfig> NewConfig(std::string_view passphrase);
  // EACCES when the passphrase does not match the config's key check (the caller names the
  // target), EINVAL for an empty passphrase.
  Status Derive(const EncryptionConfig& c, std::string_view passphrase);

  // Lower-case hex HMAC-SHA256(id key, data): 64 hex digits, like a SHA-256, so chunk keys keep
  // their shape, but equal only for equal content under the same key.
  std::string ChunkId(std::string_view data) const;
  // nonce || AES-256-GCM(plain) || tag, authenticated with `aad`.
  std::string Seal(std::string_view plain, std::string_view aad) const;
  // The plaintext; EBADMSG when the object is too short or fails authentication (tampered,
  // truncated, written under another key or for another name).
  StatusOr<std::string> Unseal(std::string_view sealed, std::string_view aad) const;

 private:
  unsigned char id_key_[32] = {};
  unsigned char data_key_[32] = {};
};

}  // namespace nbdcsi::datapath::backup
