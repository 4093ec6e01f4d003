// Command-line parsing for the daemons: one exit status for every usage error. CLI11's own codes
// (105 for a failed validator, 109 for an extra argument, ...) mean nothing to a script or to a
// Kubernetes event; every nbd-csi binary exits 2 on bad flags (as nbdctl does) and 0 for --help.
#pragma once

#include <cstdio>
#include <optional>

#include <CLI/CLI.hpp>

namespace nbdcsi {

// nullopt when the flags parsed; otherwise the status to exit with (the message is printed).
inline std::optional<int> ParseCommandLine(CLI::App& app, int argc, char** argv) {
  try {
    app.parse(argc, argv);
    return std::nullopt;
  } catch (const CLI::ParseError& e) {
    const int rc = app.exit(e);  // prints help, or the error and a hint
    return rc == 0 ? 0 : 2;
  }
}

}  // namespace nbdcsi
