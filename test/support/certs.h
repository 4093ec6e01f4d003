// A certificate set from test/tls/make-certs.sh (two CAs, server, client and node certificates)
// in a temp dir of its own, removed with it. The script costs a few hundred ms, so suites make one
// set and share it among their tests.
#pragma once

#include <cstdlib>
#include <string>
#include <string_view>

#include "test/support/temp_dir.h"

namespace nbdcsi::test {

// Runs make-certs.sh (from $NBDCSI_SRC, else the working directory) into `out`, its output into
// `log`, with a node certificate for each of the space-separated `nodes`. True when it succeeded.
inline bool MakeCerts(const std::string& out, const std::string& log,
                      std::string_view nodes = "") {
  const char* src = std::getenv("NBDCSI_SRC");
  std::string cmd = std::string(src ? src : ".") + "/test/tls/make-certs.sh " + out + " " +
                    std::string(nodes) + " >" + log + " 2>&1";
  return std::system(cmd.c_str()) == 0;
}

struct TestCerts {
  explicit TestCerts(std::string_view tag, std::string_view nodes = "") : dir(tag) {
    if (dir.ok()) ok = MakeCerts(path(), log(), nodes);
  }
  std::string path() const { return dir / "c"; }              // the make-certs.sh output
  std::string log() const { return dir / "make-certs.log"; }  // what the script said
  // path()/name
  std::string operator()(const std::string& name) const { return path() + "/" + name; }

  TempDir dir;
  bool ok = false;
};

}  // namespace nbdcsi::test
