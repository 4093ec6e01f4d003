#include "datapath/backup/s3_store.h"

#include <curl/curl.h>

#include <cerrno>
#include <chrono>
#include <ctime>
#include <mutex>
#include <thread>

#include "datapath/backup/chunk.h"

namespace nbdcsi::datapath::backup {

namespace {

// Unreserved characters (RFC 3986) stay; everything else is %XX. In a path '/' stays too. This
// must match what SigV4 canonicalizes, or the server computes another signature: curl signs the
// query string as sent, and S3 (like botocore) canonicalizes a '/' in a query value as %2F.
std::string UriEncode(std::string_view s, bool keep_slash) {
  static constexpr char kHex[] = "0123456789ABCDEF";
  std::string out;
  for (unsigned char c : s) {
    if ((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-' ||
        c == '_' || c == '.' || c == '~' || (keep_slash && c == '/')) {
      out += static_cast<char>(c);
    } else {
      out += '%';
      out += kHex[c >> 4];
      out += kHex[c & 0xf];
    }
  }
  return out;
}

// The text of the first <tag>...</tag> in `xml` at or after `from`; npos-safe.
std::string_view XmlField(std::string_view xml, std::string_view tag, size_t from = 0) {
  std::string open = "<" + std::string(tag) + ">";
  std::string close = "</" + std::string(tag) + ">";
  size_t a = xml.find(open, from);
  if (a == std::string_view::npos) return {};
  a += open.size();
  size_t b = xml.find(close, a);
  if (b == std::string_view::npos) return {};
  return xml.substr(a, b - a);
}

// "2026-12-06T09:00:00.000Z" -> seconds since the epoch (0 when unparsable).
int64_t ParseIso8601(std::string_view s) {
  std::tm tm{};
  std::string str(s);
  if (!strptime(str.c_str(), "%Y-%m-%dT%H:%M:%S", &tm)) return 0;
  return static_cast<int64_t>(timegm(&tm));
}

size_t Collect(char* ptr, size_t size, size_t nmemb, void* userdata) {
  static_cast<std::string*>(userdata)->append(ptr, size * nmemb);
  return size * nmemb;
}

std::once_flag g_curl_init;

}  // namespace

std::string XmlUnescape(std::string_view s) {
  std::string out;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] != '&') {
      out += s[i];
      continue;
    }
    static constexpr std::pair<std::string_view, char> kEntities[] = {
        {"&amp;", '&'}, {"&lt;", '<'}, {"&gt;", '>'}, {"&quot;", '"'}, {"&apos;", '\''}};
    bool done = false;
    for (const auto& [ent, ch] : kEntities) {
      if (s.substr(i, ent.size()) == ent) {
        out += ch;
        i += ent.size() - 1;
        done = true;
        break;
      }
    }
    // Character references, &#39; or &#x27;: s3rver writes a key's ' as &#x27;, and S3 writes
    // control characters that way. Up to U+10FFFF, out as UTF-8.
    if (!done && s.substr(i, 2) == "&#") {
      const bool hex = s.substr(i + 2, 1) == "x" || s.substr(i + 2, 1) == "X";
      size_t j = i + (hex ? 3 : 2);
      uint32_t cp = 0;
      size_t digits = 0;
      for (; j < s.size() && digits <= 8; ++j, ++digits) {
        const char c = s[j];
        int d = -1;
        if (c >= '0' && c <= '9')
          d = c - '0';
        else if (hex && c >= 'a' && c <= 'f')
          d = c - 'a' + 10;
        else if (hex && c >= 'A' && c <= 'F')
          d = c - 'A' + 10;
        if (d < 0) break;
        cp = cp * (hex ? 16 : 10) + static_cast<uint32_t>(d);
      }
      if (digits > 0 && digits <= 8 && j < s.size() && s[j] == ';' && cp > 0 && cp <= 0x10FFFF &&
          (cp < 0xD800 || cp > 0xDFFF)) {
        if (cp < 0x80) {
          out += static_cast<char>(cp);
        } else if (cp < 0x800) {
          out += static_cast<char>(0xC0 | (cp >> 6));
          out += static_cast<char>(0x80 | (cp & 0x3F));
        } else if (cp < 0x10000) {
          out += static_cast<char>(0xE0 | (cp >> 12));
          out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
          out += static_cast<char>(0x80 | (cp & 0x3F));
        } else {
          out += static_cast<char>(0xF0 | (cp >> 18));
          out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
          out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
          out += static_cast<char>(0x80 | (cp & 0x3F));
        }
        i = j;
        done = true;
      }
    }
    if (!done) out += '&';
  }
  return out;
}

StatusOr<S3Url> ParseS3Url(const std::string& url) {
  constexpr std::string_view kScheme = "s3://";
  if (url.rfind(kScheme, 0) != 0) {
    return Error(EINVAL, "backup target \"{}\": expected s3://BUCKET[/PREFIX]", url);
  }
  std::string rest = url.substr(kScheme.size());
  S3Url out;
  size_t slash = rest.find('/');
  out.bucket = rest.substr(0, slash);
  if (slash != std::string::npos) out.prefix = rest.substr(slash + 1);
  while (!out.prefix.empty() && out.prefix.back() == '/') out.prefix.pop_back();
  // Bucket names: 3-63 of [a-z0-9.-] (S3's rule); anything else would only fail later, less
  // clearly, as a signature or DNS error.
  if (out.bucket.size() < 3 || out.bucket.size() > 63 ||
      out.bucket.find_first_not_of("abcdefghijklmnopqrstuvwxyz0123456789.-") != std::string::npos) {
    return Error(EINVAL, "backup target \"{}\": bucket name \"{}\" is not 3-63 of [a-z0-9.-]", url,
                 out.bucket);
  }
  if (out.prefix.find("//") != std::string::npos || (!out.prefix.empty() && out.prefix[0] == '/')) {
    return Error(EINVAL, "backup target \"{}\": empty path segment in the prefix", url);
  }
  return out;
}

struct S3Store::Request {
  const char* method = "GET";
  std::string key;    // object key (path-style, after the bucket); empty for a bucket request
  std::string query;  // already canonical: sorted, encoded
  std::string_view body;
};

struct S3Store::Response {
  long http = 0;
  std::string body;
  int64_t content_length = -1;
  int64_t modified_unix_s = 0;
};

StatusOr<std::unique_ptr<S3Store>> S3Store::Create(S3Config config) {
  if (config.bucket.empty()) return Error(EINVAL, "S3: no bucket given");
  if (config.region.empty()) return Error(EINVAL, "S3: no region given");
  if (config.endpoint.rfind("http://", 0) != 0 && config.endpoint.rfind("https://", 0) != 0) {
    return Error(EINVAL, "S3 endpoint \"{}\": expected http://HOST[:PORT] or https://...",
                 config.endpoint);
  }
  while (!config.endpoint.empty() && config.endpoint.back() == '/') config.endpoint.pop_back();
  if (config.credentials.access_key_id.empty() || config.credentials.secret_access_key.empty()) {
    return Error(EINVAL, "S3: an access key id and a secret access key are required");
  }
  std::call_once(g_curl_init, [] { curl_global_init(CURL_GLOBAL_DEFAULT); });
  return std::unique_ptr<S3Store>(new S3Store(std::move(config)));
}

S3Store::~S3Store() {
  for (void* h : idle_) curl_easy_cleanup(static_cast<CURL*>(h));
}

void* S3Store::TakeHandle() {
  {
    std::lock_guard lk(mu_);
    if (!idle_.empty()) {
      void* h = idle_.back();
      idle_.pop_back();
      return h;
    }
  }
  return curl_easy_init();
}

void S3Store::GiveBack(void* handle) {
  std::lock_guard lk(mu_);
  idle_.push_back(handle);
}

StatusOr<S3Store::Response> S3Store::PerformOnce(const Request& req, bool* retryable) {
  *retryable = false;
  CURL* h = static_cast<CURL*>(TakeHandle());
  if (!h) return Error(ENOMEM, "curl_easy_init failed");
  curl_easy_reset(h);
  std::string url = config_.endpoint + "/" + config_.bucket;
  if (!req.key.empty()) url += "/" + UriEncode(req.key, true);
  if (!req.query.empty()) url += "?" + req.query;
  const std::string method(req.method);
  Response resp;
  struct curl_slist* headers = nullptr;
  headers = curl_slist_append(headers, ("x-amz-content-sha256: " + Sha256Hex(req.body)).c_str());
  if (!config_.credentials.session_token.empty()) {
    headers = curl_slist_append(
        headers, ("x-amz-security-token: " + config_.credentials.session_token).c_str());
  }
  const std::string sigv4 = "aws:amz:" + config_.region + ":s3";
  curl_easy_setopt(h, CURLOPT_URL, url.c_str());
  curl_easy_setopt(h, CURLOPT_AWS_SIGV4, sigv4.c_str());
  curl_easy_setopt(h, CURLOPT_USERNAME, config_.credentials.access_key_id.c_str());
  curl_easy_setopt(h, CURLOPT_PASSWORD, config_.credentials.secret_access_key.c_str());
  curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
  curl_easy_setopt(h, CURLOPT_CONNECTTIMEOUT, config_.connect_timeout_s);
  curl_easy_setopt(h, CURLOPT_LOW_SPEED_LIMIT, 1L);
  curl_easy_setopt(h, CURLOPT_LOW_SPEED_TIME, config_.stall_timeout_s);
  curl_easy_setopt(h, CURLOPT_FILETIME, 1L);
  curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, &Collect);
  curl_easy_setopt(h, CURLOPT_WRITEDATA, &resp.body);
  if (method == "HEAD") {
    curl_easy_setopt(h, CURLOPT_NOBODY, 1L);
  } else if (method == "PUT") {
    // POSTFIELDS with a custom verb sends the buffer as is, with its length, in one go; the
    // content type would otherwise default to a form's.
    headers = curl_slist_append(headers, "Content-Type: application/octet-stream");
    curl_easy_setopt(h, CURLOPT_CUSTOMREQUEST, "PUT");
    curl_easy_setopt(h, CURLOPT_POSTFIELDS, req.body.data());
    curl_easy_setopt(h, CURLOPT_POSTFIELDSIZE_LARGE, static_cast<curl_off_t>(req.body.size()));
  } else if (method != "GET") {
    curl_easy_setopt(h, CURLOPT_CUSTOMREQUEST, req.method);
  }
  curl_easy_setopt(h, CURLOPT_HTTPHEADER, headers);
  CURLcode rc = curl_easy_perform(h);
  curl_slist_free_all(headers);
  if (rc != CURLE_OK) {
    GiveBack(h);
    int err = EIO;
    switch (rc) {
      case CURLE_COULDNT_CONNECT:
        err = ECONNREFUSED;
        break;
      case CURLE_COULDNT_RESOLVE_HOST:
        err = EHOSTUNREACH;
        break;
      case CURLE_OPERATION_TIMEDOUT:
        err = ETIMEDOUT;
        break;
      default:
        break;
    }
    *retryable = true;
    return Error(err, "endpoint {}: {}", config_.endpoint, curl_easy_strerror(rc));
  }
  curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &resp.http);
  curl_off_t len = -1;
  if (curl_easy_getinfo(h, CURLINFO_CONTENT_LENGTH_DOWNLOAD_T, &len) == CURLE_OK) {
    resp.content_length = len;
  }
  curl_off_t filetime = -1;
  if (curl_easy_getinfo(h, CURLINFO_FILETIME_T, &filetime) == CURLE_OK && filetime > 0) {
    resp.modified_unix_s = filetime;
  }
  GiveBack(h);
  *retryable = resp.http >= 500 || resp.http == 429;
  return resp;
}

StatusOr<S3Store::Response> S3Store::Perform(const Request& req, const std::string& what) {
  long backoff_ms = config_.first_backoff_ms;
  for (int attempt = 1;; ++attempt) {
    bool retryable = false;
    StatusOr<Response> r = PerformOnce(req, &retryable);
    if (!retryable || attempt >= config_.attempts) {
      if (!r.ok()) return Error(r.status().code(), "S3 {}: {}", what, r.status().message());
      return r;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(backoff_ms));
    backoff_ms *= 2;
  }
}

namespace {

// The error of a non-2xx answer, from the status and S3's <Error><Code>.
Status HttpError(const std::string& what, const std::string& bucket, long http,
                 const std::string& body) {
  std::string code = XmlUnescape(XmlField(body, "Code"));
  std::string message = XmlUnescape(XmlField(body, "Message"));
  std::string detail = code.empty() ? std::string() : fmt::format(" ({}: {})", code, message);
  if (code == "NoSuchBucket") {
    return Error(ENOENT, "S3 {}: bucket \"{}\" does not exist", what, bucket);
  }
  if (http == 403 || http == 401) {
    return Error(EACCES, "S3 {}: access denied: the credentials were refused{}", what, detail);
  }
  if (http == 404) return Error(ENOENT, "S3 {}: no such object{}", what, detail);
  return Error(EIO, "S3 {}: HTTP {}{}", what, http, detail);
}

}  // namespace

Status S3Store::Put(const std::string& key, std::string_view data) {
  const std::string what = "PUT " + key;
  auto r = Perform({"PUT", key, "", data}, what);
  if (!r.ok()) return r.status();
  if (r->http / 100 != 2) return HttpError(what, config_.bucket, r->http, r->body);
  return Status::Ok();
}

StatusOr<std::string> S3Store::Get(const std::string& key) {
  const std::string what = "GET " + key;
  auto r = Perform({"GET", key, "", {}}, what);
  if (!r.ok()) return r.status();
  if (r->http / 100 != 2) return HttpError(what, config_.bucket, r->http, r->body);
  return std::move(r->body);
}

StatusOr<ObjectInfo> S3Store::Head(const std::string& key) {
  const std::string what = "HEAD " + key;
  auto r = Perform({"HEAD", key, "", {}}, what);
  if (!r.ok()) return r.status();
  // A HEAD answer has no body, so a missing bucket reads as a missing key here; List (which
  // every backup and restore starts with) tells the two apart.
  if (r->http / 100 != 2) return HttpError(what, config_.bucket, r->http, r->body);
  ObjectInfo info;
  info.key = key;
  info.size = r->content_length > 0 ? static_cast<uint64_t>(r->content_length) : 0;
  info.modified_unix_s = r->modified_unix_s;
  return info;
}

StatusOr<std::vector<ObjectInfo>> S3Store::List(const std::string& prefix) {
  std::vector<ObjectInfo> out;
  std::string token;
  const std::string what = "LIST " + prefix;
  for (;;) {
    // Parameters in the sorted order SigV4 canonicalizes them to.
    std::string query;
    if (!token.empty()) query += "continuation-token=" + UriEncode(token, false) + "&";
    query += "list-type=2&prefix=" + UriEncode(prefix, false);
    auto r = Perform({"GET", "", query, {}}, what);
    if (!r.ok()) return r.status();
    if (r->http / 100 != 2) return HttpError(what, config_.bucket, r->http, r->body);
    std::string_view xml = r->body;
    size_t pos = 0;
    while ((pos = xml.find("<Contents>", pos)) != std::string_view::npos) {
      size_t end = xml.find("</Contents>", pos);
      if (end == std::string_view::npos) break;
      std::string_view item = xml.substr(pos, end - pos);
      ObjectInfo info;
      info.key = XmlUnescape(XmlField(item, "Key"));
      info.size = std::strtoull(std::string(XmlField(item, "Size")).c_str(), nullptr, 10);
      info.modified_unix_s = ParseIso8601(XmlField(item, "LastModified"));
      out.push_back(std::move(info));
      pos = end;
    }
    if (XmlField(xml, "IsTruncated") != "true") break;
    token = XmlUnescape(XmlField(xml, "NextContinuationToken"));
    if (token.empty())
      return Error(EIO, "S3 {}: truncated listing without a continuation token", what);
  }
  return out;
}

Status S3Store::Delete(const std::string& key) {
  const std::string what = "DELETE " + key;
  auto r = Perform({"DELETE", key, "", {}}, what);
  if (!r.ok()) return r.status();
  if (r->http == 404) {
    // Deleting a missing object succeeds on S3 (204); a server that says 404 means the same,
    // unless the bucket itself is gone.
    if (XmlField(r->body, "Code") == "NoSuchBucket") {
      return HttpError(what, config_.bucket, r->http, r->body);
    }
    return Status::Ok();
  }
  if (r->http / 100 != 2) return HttpError(what, config_.bucket, r->http, r->body);
  return Status::Ok();
}

}  // namespace nbdcsi::datapath::backup
