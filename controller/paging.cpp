#include "controller/paging.h"

namespace nbdcsi::controller {
namespace {

constexpr char kTokenPrefix[] = "p1.";

}  // namespace

std::string EncodePageToken(const std::string& last_id) {
  static const char kHex[] = "0123456789abcdef";
  std::string t = kTokenPrefix;
  for (unsigned char c : last_id) {
    t += kHex[c >> 4];
    t += kHex[c & 15];
  }
  return t;
}

std::optional<std::string> DecodePageToken(const std::string& token) {
  const size_t p = sizeof(kTokenPrefix) - 1;
  if (token.size() <= p || token.compare(0, p, kTokenPrefix) != 0 || (token.size() - p) % 2) {
    return std::nullopt;
  }
  auto nib = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return -1;
  };
  std::string out;
  for (size_t i = p; i < token.size(); i += 2) {
    int hi = nib(token[i]), lo = nib(token[i + 1]);
    if (hi < 0 || lo < 0) return std::nullopt;
    out += static_cast<char>(hi << 4 | lo);
  }
  return out;
}

Status CheckPageToken(const std::string& starting_token) {
  if (starting_token.empty() || DecodePageToken(starting_token)) return Status::Ok();
  return Err(kForeignPageToken, "starting_token \"{}\" is not valid", starting_token);
}

}  // namespace nbdcsi::controller
