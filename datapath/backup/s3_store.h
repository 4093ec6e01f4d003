// ObjectStore on an S3-compatible server (AWS S3, MinIO, Ceph RGW, s3rver), through libcurl.
//
// Requests are signed by libcurl itself (CURLOPT_AWS_SIGV4, "aws:amz:REGION:s3"); this file only
// adds the payload's SHA-256 (x-amz-content-sha256, which S3 requires and signs) and, for
// temporary credentials, x-amz-security-token. Path-style addressing (ENDPOINT/BUCKET/KEY) works
// with every S3-compatible server and with AWS.
//
// Failures: 5xx, 429 (throttling) and network errors are retried with exponential back-off
// (kAttempts tries); everything else is final. The errno of each failure is in object_store.h;
// a missing bucket is ENOENT with "bucket ... does not exist", refused credentials EACCES. The
// secret key is never put in a message or a log line.
#pragma once

#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

#include "datapath/backup/object_store.h"

namespace nbdcsi::datapath::backup {

struct S3Credentials {
  std::string access_key_id;
  std::string secret_access_key;
  std::string session_token;  // optional (temporary credentials)
};

struct S3Config {
  std::string endpoint;  // "https://s3.eu-west-1.amazonaws.com", "http://127.0.0.1:4568"
  std::string region = "us-east-1";
  std::string bucket;
  S3Credentials credentials;
  long connect_timeout_s = 10;
  // A transfer slower than 1 byte/s for this long is abandoned (never a hang on a dead peer).
  long stall_timeout_s = 60;
  int attempts = 4;
  long first_backoff_ms = 200;
};

// "s3://bucket/some/prefix" -> bucket "bucket", prefix "some/prefix" (no leading or trailing
// slash; may be empty). EINVAL with the reason for anything else.
struct S3Url {
  std::string bucket;
  std::string prefix;
};
StatusOr<S3Url> ParseS3Url(const std::string& url);

// XML text -> characters: the five named entities and character references (&#39;, &#x27;,
// out as UTF-8); anything else is kept as it is. Listings' keys and tokens go through it.
std::string XmlUnescape(std::string_view s);

class S3Store final : public ObjectStore {
 public:
  // EINVAL for an empty bucket, endpoint or region, or an endpoint that is not http(s)://.
  static StatusOr<std::unique_ptr<S3Store>> Create(S3Config config);
  ~S3Store() override;

  Status Put(const std::string& key, std::string_view data) override;
  StatusOr<std::string> Get(const std::string& key) override;
  StatusOr<ObjectInfo> Head(const std::string& key) override;
  StatusOr<std::vector<ObjectInfo>> List(const std::string& prefix) override;
  Status Delete(const std::string& key) override;

 private:
  struct Request;
  struct Response;
  explicit S3Store(S3Config config) : config_(std::move(config)) {}
  // One request with retries; `what` names it in errors ("PUT chunks/ab/...").
  StatusOr<Response> Perform(const Request& req, const std::string& what);
  StatusOr<Response> PerformOnce(const Request& req, bool* retryable);
  void* TakeHandle();
  void GiveBack(void* handle);

  S3Config config_;
  std::mutex mu_;
  std::vector<void*> idle_;  // CURL* handles kept for connection reuse; guarded by mu_
};

}  // namespace nbdcsi::datapath::backup
