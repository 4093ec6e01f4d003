// The exit of a test binary whose prerequisites are missing (root, a tool, a kernel module): a
// SKIP (exit 77, the tests' SKIP_RETURN_CODE) on a developer's machine, a failure under CI=true,
// where every prerequisite must be present and a silent skip would hide a broken runner.
#pragma once

#include <cstdio>
#include <cstdlib>
#include <string>

namespace nbdcsi::test {

inline int MissingPrerequisite(const std::string& why) {
  const char* ci = std::getenv("CI");
  if (ci && std::string(ci) == "true") {
    std::fprintf(stderr, "FAIL: %s (CI=true: prerequisites must be present)\n", why.c_str());
    return 1;
  }
  std::fprintf(stderr, "SKIP: %s\n", why.c_str());
  return 77;
}

}  // namespace nbdcsi::test
