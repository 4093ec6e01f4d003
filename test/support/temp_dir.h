// A scratch directory for one test or fixture: made with mkdtemp under $TMPDIR (else /tmp), removed
// with everything in it when the object goes. Tests used to write this by hand, each a little
// differently (some leaked the directory when an assertion returned early).
#pragma once

#include <stdlib.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <string>
#include <string_view>
#include <system_error>

namespace nbdcsi::test {

class TempDir {
 public:
  TempDir() = default;
  // Makes it at once; check ok() (ASSERT_TRUE(dir.ok()) << dir.error()).
  explicit TempDir(std::string_view tag, const std::string& base = "") { Create(tag, base); }
  ~TempDir() { Remove(); }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;

  // Makes BASE/TAG.XXXXXX (BASE: $TMPDIR, else /tmp). False, with the reason in error(), when
  // mkdtemp fails. A directory made earlier by this object is removed first.
  bool Create(std::string_view tag, const std::string& base = "") {
    Remove();
    std::string root = base;
    if (root.empty()) {
      const char* env = std::getenv("TMPDIR");
      root = env && *env ? env : "/tmp";
    }
    std::string tmpl = root + "/" + std::string(tag) + ".XXXXXX";
    if (!mkdtemp(tmpl.data())) {
      error_ = "mkdtemp " + tmpl + ": " + std::strerror(errno);
      return false;
    }
    path_ = tmpl;
    error_.clear();
    return true;
  }

  // Removes the directory and everything below it now. Errors are ignored: a test that left a
  // mount behind has failed already, and removal must not mask that failure.
  void Remove() {
    if (path_.empty()) return;
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
    path_.clear();
  }

  bool ok() const { return !path_.empty(); }
  const std::string& error() const { return error_; }
  const std::string& path() const { return path_; }
  // path()/name
  std::string operator/(std::string_view name) const { return path_ + "/" + std::string(name); }

 private:
  std::string path_;
  std::string error_;
};

}  // namespace nbdcsi::test
