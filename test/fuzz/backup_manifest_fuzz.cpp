// libFuzzer target for the backup manifest parser (datapath/backup/manifest.h): what a restore,
// `nbdctl backup inspect` and the garbage collector read from object storage, which anyone with
// write access to the bucket can have replaced. The parser must turn any bytes into either a
// manifest that a restore can follow without reading or writing out of range, or an EINVAL that
// says why; never a crash or an exception.
//
// Input: the manifest text. Checked for every input:
//  - a refusal is EINVAL with a message;
//  - an accepted manifest has a valid backup name, format 1, a chunk size in 1..kMaxChunkSize,
//    and chunks at chunk boundaries, strictly increasing, each starting below the volume's end,
//    with a 64-hex-digit SHA-256; every chunk's length is in 1..chunk_size;
//  - ManifestToJson of it parses back to the same manifest, and prints the same text again;
//  - that text cut short before its closing brace is refused (a torn upload is never a backup).
// The same bytes also go to the other parsers of what a target holds:
//  - ParseEncryptionConfig (PREFIX/config.json, crypto.h): EINVAL or a config within bounds
//    (cipher, kdf, 16-byte salt, 32-byte key check, scrypt parameters that cannot make the
//    daemon allocate more than 256 MiB) that prints and parses back to itself;
//  - DecompressUpTo (an encrypted manifest after authentication): EINVAL or at most the bound.
#include <cerrno>
#include <string>

#include "datapath/backup/chunk.h"
#include "datapath/backup/crypto.h"
#include "datapath/backup/manifest.h"
#include "test/fuzz/fuzz_check.h"

namespace bk = nbdcsi::datapath::backup;

namespace {

bool Same(const bk::Manifest& a, const bk::Manifest& b) {
  if (a.chunks.size() != b.chunks.size()) return false;
  for (size_t i = 0; i < a.chunks.size(); ++i) {
    const auto &x = a.chunks[i], &y = b.chunks[i];
    if (x.offset != y.offset || x.sha256 != y.sha256 || x.stored_size != y.stored_size) {
      return false;
    }
  }
  return a.format == b.format && a.name == b.name && a.source_volume == b.source_volume &&
         a.source_snapshot == b.source_snapshot && a.created_unix_ns == b.created_unix_ns &&
         a.volume_size == b.volume_size && a.chunk_size == b.chunk_size &&
         a.data_bytes == b.data_bytes && a.stored_bytes == b.stored_bytes &&
         a.uploaded_bytes == b.uploaded_bytes;
}

void CheckConfig(std::string_view text) {
  auto c = bk::ParseEncryptionConfig(text);
  if (!c.ok()) {
    FUZZ_CHECK_MSG(c.status().code() == EINVAL, c.status().message());
    FUZZ_CHECK(!c.status().message().empty());
    return;
  }
  FUZZ_CHECK(c->format == bk::kEncryptionFormat);
  FUZZ_CHECK(c->cipher == "aes-256-gcm" && c->kdf == "scrypt");
  FUZZ_CHECK(c->salt.size() == 16 && c->key_check.size() == 32);
  const uint64_t n = c->scrypt_n, r = c->scrypt_r, p = c->scrypt_p;
  FUZZ_CHECK(n >= 1024 && n <= (1u << 20) && (n & (n - 1)) == 0);
  FUZZ_CHECK(r >= 1 && r <= 32 && p >= 1 && p <= 16 && 128 * n * r <= (uint64_t{256} << 20));
  const std::string out = bk::EncryptionConfigToJson(*c);
  auto again = bk::ParseEncryptionConfig(out);
  FUZZ_CHECK_MSG(again.ok(), again.status().message() + "\n" + out);
  FUZZ_CHECK(bk::EncryptionConfigToJson(*again) == out);
}

void CheckDecompress(std::string_view frame) {
  constexpr uint64_t kBound = 1 << 20;
  auto d = bk::DecompressUpTo(frame, kBound);
  if (!d.ok()) {
    FUZZ_CHECK_MSG(d.status().code() == EINVAL, d.status().message());
    return;
  }
  FUZZ_CHECK(d->size() <= kBound);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  CheckConfig(text);
  CheckDecompress(text);
  auto r = bk::ParseManifest(text);
  if (!r.ok()) {
    FUZZ_CHECK_MSG(r.status().code() == EINVAL, r.status().message());
    FUZZ_CHECK(!r.status().message().empty());
    return 0;
  }
  const bk::Manifest& m = *r;
  FUZZ_CHECK_MSG(bk::ValidateBackupName(m.name).ok(), m.name);
  FUZZ_CHECK(m.format == bk::kManifestFormat);
  FUZZ_CHECK(m.chunk_size >= 1 && m.chunk_size <= bk::kMaxChunkSize);
  bool first = true;
  uint64_t prev = 0;
  for (const auto& c : m.chunks) {
    FUZZ_CHECK(c.offset % m.chunk_size == 0);
    FUZZ_CHECK_MSG(first || c.offset > prev, std::to_string(c.offset));
    FUZZ_CHECK(c.offset < m.volume_size);
    const uint64_t len = m.ChunkLength(c.offset);
    FUZZ_CHECK(len >= 1 && len <= m.chunk_size);
    FUZZ_CHECK(bk::IsSha256Hex(c.sha256));
    prev = c.offset;
    first = false;
  }
  const std::string out = bk::ManifestToJson(m);
  auto again = bk::ParseManifest(out);
  FUZZ_CHECK_MSG(again.ok(), again.status().message() + "\n" + out);
  FUZZ_CHECK_MSG(Same(m, *again), out);
  FUZZ_CHECK(bk::ManifestToJson(*again) == out);
  const size_t brace = out.rfind('}');
  FUZZ_CHECK(brace != std::string::npos);
  for (size_t cut : {size_t{0}, brace / 2, brace}) {
    auto torn = bk::ParseManifest(std::string_view(out).substr(0, cut));
    FUZZ_CHECK_MSG(!torn.ok() && torn.status().code() == EINVAL, out.substr(0, cut));
  }
  return 0;
}
