#include "common/volume_rules.h"

namespace nbdcsi {

namespace {

bool NameByteOk(unsigned char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' ||
         c == '_' || c == '-';
}

}  // namespace

Status ValidateObjectName(std::string_view kind, std::string_view name) {
  if (name.empty()) return Error(EINVAL, "{} name must not be empty", kind);
  if (name.size() > kMaxVolumeNameLen) {
    return Error(EINVAL, "{} name is {} bytes, the limit is {}", kind, name.size(),
                 kMaxVolumeNameLen);
  }
  if (name.find('\0') != std::string_view::npos) {
    return Error(EINVAL, "{} name contains NUL", kind);
  }
  if (name.find('/') != std::string_view::npos) {
    return Error(EINVAL, "{} name must not contain '/'", kind);
  }
  if (name[0] == '.') return Error(EINVAL, "{} name \"{}\" must not start with '.'", kind, name);
  if (name[0] == '-') return Error(EINVAL, "{} name \"{}\" must not start with '-'", kind, name);
  for (unsigned char c : name) {
    if (NameByteOk(c)) continue;
    // A printable character is shown as itself; anything else (control bytes, UTF-8) by value,
    // so the message never carries a byte that would garble a terminal or a log line.
    if (c >= 0x21 && c < 0x7f) {
      return Error(EINVAL,
                   "{} name \"{}\" contains invalid character '{}' (allowed: A-Z a-z 0-9 . _ -)",
                   kind, name, static_cast<char>(c));
    }
    return Error(EINVAL, "{} name contains invalid byte 0x{:02x} (allowed: A-Z a-z 0-9 . _ -)",
                 kind, c);
  }
  return Status::Ok();
}

}  // namespace nbdcsi
