#include "tools/nbdctl/command_tree.h"

#include <fmt/format.h>

#include "tools/nbdctl/connection.h"

namespace nbdcsi::nbdctl {
namespace {

// The subcommands of `app`, in the order they were added, as "a, b, c".
std::string Children(const CLI::App& app) {
  std::vector<std::string> names;
  for (const CLI::App* s : app.get_subcommands([](const CLI::App*) { return true; })) {
    names.push_back(s->get_name());
  }
  return fmt::format("{}", fmt::join(names, ", "));
}

}  // namespace

Flags Positional(const char* name, std::string* value, const char* help, Flags more) {
  return [name, value, help, more = std::move(more)](CLI::App& c) {
    c.add_option(name, *value, help)->required();
    if (more) more(c);
  };
}

CLI::App& CommandTree::AddTo(const std::vector<std::string>& path, const std::string& help) {
  CLI::App* parent = &root_;
  for (size_t i = 0; i + 1 < path.size(); ++i) parent = parent->get_subcommand(path[i]);
  return *parent->add_subcommand(path.back(), help);
}

void CommandTree::Add(const Group& g) {
  CLI::App& app = AddTo(g.path, g.help);
  if (g.flags) g.flags(app);
  labels_[&app] = g.label;
}

void CommandTree::Add(Command c) {
  CLI::App& app = AddTo(c.path, c.help);
  if (c.flags) c.flags(app);
  commands_.emplace(&app, std::move(c));
}

const Command& CommandTree::Chosen() const {
  const CLI::App* cur = &root_;
  while (!cur->get_subcommands().empty()) cur = cur->get_subcommands().front();
  if (auto it = commands_.find(cur); it != commands_.end()) return it->second;
  if (cur == &root_) {
    throw UsageError{fmt::format("a command is required: {} (see --help)", Children(root_))};
  }
  throw UsageError{
      fmt::format("{}: a subcommand is required: {}", labels_.at(cur), Children(*cur))};
}

}  // namespace nbdcsi::nbdctl
