// `nbdctl csi`: a CSI client for people (in the spirit of gocsi's csc), to drive
// nbd-csi-controller and nbd-csi-node by hand: identity, controller and node calls with table or
// JSON output (README.md lists the commands and the JSON keys).
#pragma once

#include <memory>
#include <string>

namespace CLI {
class App;
}

namespace nbdcsi::nbdctl {

class CsiCommands {
 public:
  // Adds `csi` and its subcommands to `app`. `output` and `timeout_s` are nbdctl's global -o and
  // --timeout, read when Run() is called; `csi --timeout` (default 60 s: NodeStageVolume may run
  // mkfs) wins over the global one when both are given.
  CsiCommands(CLI::App* app, const std::string* output, const double* timeout_s);
  ~CsiCommands();
  CsiCommands(const CsiCommands&) = delete;
  CsiCommands& operator=(const CsiCommands&) = delete;

  // True when the command line was a `csi` command.
  bool parsed() const;
  // Runs it; returns nbdctl's exit code (0 ok, 1 the plugin refused or was unreachable, 2 usage).
  int Run();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace nbdcsi::nbdctl
