// The seam between the backup engine and where backups are kept: a flat namespace of keys to
// immutable byte strings, as S3 offers it. The real implementation is S3Store (s3_store.h); the
// unit tests use an in-memory one (test/unit/backup_memory_store.h).
//
// Errors are errno values with a message that names the key and the cause:
//   ENOENT     no such key (Get, Head); for a missing bucket see S3Store
//   EACCES     the credentials were refused
//   EHOSTUNREACH, ECONNREFUSED, ETIMEDOUT   the endpoint could not be reached
//   EIO        anything else the server answered (its code and message are in the text)
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "common/status.h"

namespace nbdcsi::datapath::backup {

struct ObjectInfo {
  std::string key;
  uint64_t size = 0;
  // The store's own clock (S3 LastModified), seconds since the epoch. Lease ages are computed
  // against this clock only, never against the local one, so node clocks may disagree.
  int64_t modified_unix_s = 0;
};

class ObjectStore {
 public:
  virtual ~ObjectStore() = default;
  // Replaces any object of that key. When it returns OK the object is durable and visible to
  // every later Get, Head and List (S3's strong read-after-write consistency).
  virtual Status Put(const std::string& key, std::string_view data) = 0;
  virtual StatusOr<std::string> Get(const std::string& key) = 0;
  virtual StatusOr<ObjectInfo> Head(const std::string& key) = 0;
  // Every key that starts with `prefix`, in lexicographic order.
  virtual StatusOr<std::vector<ObjectInfo>> List(const std::string& prefix) = 0;
  // Deleting a missing key succeeds (S3 semantics), so a retried delete is harmless.
  virtual Status Delete(const std::string& key) = 0;
};

}  // namespace nbdcsi::datapath::backup
