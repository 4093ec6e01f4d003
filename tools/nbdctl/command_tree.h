// nbdctl's subcommands as data. Each command is one entry: where it sits, its --help line, the
// flags it takes and the function it runs; each group ("volume", "csi node") is one entry too.
// Adding a command touches one place, and no dispatcher grows an if-chain.
#pragma once

#include <functional>
#include <map>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

namespace nbdcsi::nbdctl {

// A subcommand that does something.
struct Command {
  std::vector<std::string> path;  // {"volume", "create"}
  std::string help;
  std::function<void(CLI::App&)> flags;  // its options, flags and aliases (may be empty)
  std::function<int()> run;              // the exit code; throws UsageError for bad arguments
};

// A subcommand that only holds others. Given without one of them it is a usage error:
// "<label>: a subcommand is required: <its subcommands>".
struct Group {
  std::vector<std::string> path;
  std::string help;
  std::string label;
  std::function<void(CLI::App&)> flags;  // options of the group itself (may be empty)
};

class CommandTree {
 public:
  explicit CommandTree(CLI::App& root) : root_(root) {}

  // In --help order, each parent before its children.
  void Add(const Group& g);
  void Add(Command c);
  // After parsing: the command the command line names. UsageError when it names no command, or
  // a group without one of its subcommands.
  const Command& Chosen() const;

 private:
  CLI::App& AddTo(const std::vector<std::string>& path, const std::string& help);

  CLI::App& root_;
  std::map<const CLI::App*, Command> commands_;
  std::map<const CLI::App*, std::string> labels_;
};

}  // namespace nbdcsi::nbdctl
