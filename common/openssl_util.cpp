#include "common/openssl_util.h"

#include <fmt/format.h>
#include <openssl/err.h>
#include <openssl/x509v3.h>

namespace nbdcsi {

std::string OpenSslReason(const char* fallback) {
  unsigned long e = ERR_peek_last_error();
  std::string r;
  if (e != 0) {
    const char* s = ERR_reason_error_string(e);
    r = s ? s : fmt::format("OpenSSL error {:#x}", e);
  } else {
    r = fallback;
  }
  ERR_clear_error();
  return r;
}

std::vector<std::string> UriSans(X509* cert) {
  std::vector<std::string> out;
  auto* names = static_cast<GENERAL_NAMES*>(
      X509_get_ext_d2i(cert, NID_subject_alt_name, nullptr, nullptr));
  if (!names) return out;
  for (int i = 0; i < sk_GENERAL_NAME_num(names); ++i) {
    const GENERAL_NAME* n = sk_GENERAL_NAME_value(names, i);
    if (n->type != GEN_URI) continue;
    const ASN1_IA5STRING* s = n->d.uniformResourceIdentifier;
    out.emplace_back(reinterpret_cast<const char*>(ASN1_STRING_get0_data(s)),
                     static_cast<size_t>(ASN1_STRING_length(s)));
  }
  GENERAL_NAMES_free(names);
  return out;
}

}  // namespace nbdcsi
