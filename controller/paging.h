// Paging of ListVolumes and ListSnapshots: entries sorted by id, and a token that is an opaque
// encoding of the last id returned. Ids after it make the next page, so a page boundary survives
// that entry's deletion, and entries created meanwhile show up on a later page when they sort
// after it.
#pragma once

#include <algorithm>
#include <cstdint>
#include <iterator>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <google/protobuf/repeated_ptr_field.h>

#include "common/status.h"
#include "controller/csi_status.h"

namespace nbdcsi::controller {

std::string EncodePageToken(const std::string& last_id);
// nullopt when `token` was not made by EncodePageToken.
std::optional<std::string> DecodePageToken(const std::string& token);

// kForeignPageToken (ABORTED) for a non-empty token that is not ours.
Status CheckPageToken(const std::string& starting_token);

// The page of `all` (id, entry) after `starting_token`, at most `max_entries` (0: all) into
// `out`; *next_token is set when more follow. EINVAL for a negative max_entries.
template <typename Entry>
Status Paginate(std::vector<std::pair<std::string, Entry>> all, int32_t max_entries,
                const std::string& starting_token, google::protobuf::RepeatedPtrField<Entry>* out,
                std::string* next_token) {
  if (max_entries < 0) return Err(EINVAL, "max_entries {} is negative", max_entries);
  if (Status s = CheckPageToken(starting_token); !s.ok()) return s;
  std::sort(all.begin(), all.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
  auto it = all.begin();
  if (!starting_token.empty()) {
    const std::string last = *DecodePageToken(starting_token);
    it = std::upper_bound(all.begin(), all.end(), last,
                          [](const std::string& v, const auto& e) { return v < e.first; });
  }
  for (size_t n = 0; it != all.end(); ++it, ++n) {
    if (max_entries > 0 && n == static_cast<size_t>(max_entries)) {
      *next_token = EncodePageToken(std::prev(it)->first);
      break;
    }
    *out->Add() = std::move(it->second);
  }
  return Status::Ok();
}

}  // namespace nbdcsi::controller
