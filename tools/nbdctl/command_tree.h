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

// Adds a subcommand's options, flags and aliases.
using Flags = std::function<void(CLI::App&)>;

// A subcommand that does something.
struct Command {
  std::vector<std::string> path;  // {"volume", "create"}
  std::string help;
  Flags flags;               // may be empty
  std::function<int()> run;  // the exit code; throws UsageError for bad arguments
};

// A Command that runs obj->fn().
template <typename T>
Command Bound(std::vector<std::string> path, std::string help, Flags flags, T* obj,
              int (T::*fn)()) {
  return Command{std::move(path), std::move(help), std::move(flags),
                 [obj, fn] { return (obj->*fn)(); }};
}

// The required positional argument `name` ("NAME", "VOLUME_ID") into *value, then `more`.
Flags Positional(const char* name, std::string* value, const char* help, Flags more = nullptr);

// A subcommand that only holds others. Given without one of them it is a usage error:
// "<label>: a subcommand is required: <its subcommands>".
struct Group {
  std::vector<std::string> path;
  std::string help;
  std::string label;
  Flags flags;  // options of the group itself (may be empty)
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
