// logwrites: inspect and replay a dm-log-writes log (see log_writes.h for the format).
//
//   logwrites info LOG                  entry counts by kind, marks, data bytes
//   logwrites list LOG                  one line per entry: INDEX OFFSET SECTOR NR FLAGS MARK
//   logwrites points LOG [--from-mark M]
//       the crash points, one line each: INDEX FLAGS MARK SAME. A point is a FLUSH, FUA or MARK
//       entry; MARK is '-' for the others; SAME is 1 when no write or discard lies between this
//       point and the next one (both images are equal, so checking the later one covers it).
//   logwrites replay LOG TARGET --to N|end [--cursor FILE]
//       applies entries up to N (inclusive) to TARGET (a block device or a regular file) and
//       syncs it. With --cursor, it starts where the previous call stopped and saves where it
//       stopped, so walking through every point replays each entry once.
//   logwrites mark DMNAME TEXT          inserts a mark into a live dm-log-writes device
//
// Exit status: 0, 1 on any error (the message names the entry and byte offset), 2 for usage.
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <iostream>
#include <sstream>

#include <CLI/CLI.hpp>

#include "tools/logwrites/log_writes.h"

using namespace nbdcsi;
using namespace nbdcsi::logwrites;

namespace {

int Fail(const Status& s) {
  std::cerr << "logwrites: " << s.message() << "\n";
  return 1;
}

// Walks every entry; `fn` returns a non-OK status to stop with that error.
template <typename Fn>
Status ForEach(LogReader& r, Fn&& fn) {
  for (;;) {
    auto e = r.Next();
    if (!e.ok()) return e.status();
    if (!e->has_value()) return Status::Ok();
    if (Status s = fn(**e); !s.ok()) return s;
  }
}

int Info(const std::string& log) {
  auto r = LogReader::Open(log);
  if (!r.ok()) return Fail(r.status());
  uint64_t writes = 0, flushes = 0, fuas = 0, discards = 0, marks = 0, bytes = 0;
  Status s = ForEach(**r, [&](const Entry& e) {
    if (e.flags & kFlagMark) ++marks;
    if (e.flags & kFlagFlush) ++flushes;
    if (e.flags & kFlagFua) ++fuas;
    if (e.flags & kFlagDiscard) ++discards;
    if (!(e.flags & (kFlagDiscard | kFlagMark)) && e.nr_sectors > 0) {
      ++writes;
      bytes += e.nr_sectors * (*r)->super().sectorsize;
    }
    return Status::Ok();
  });
  if (!s.ok()) return Fail(s);
  std::printf("entries %llu sectorsize %u writes %llu data_bytes %llu flush %llu fua %llu "
              "discard %llu marks %llu\n",
              static_cast<unsigned long long>((*r)->super().nr_entries), (*r)->super().sectorsize,
              static_cast<unsigned long long>(writes), static_cast<unsigned long long>(bytes),
              static_cast<unsigned long long>(flushes), static_cast<unsigned long long>(fuas),
              static_cast<unsigned long long>(discards), static_cast<unsigned long long>(marks));
  return 0;
}

int List(const std::string& log) {
  auto r = LogReader::Open(log);
  if (!r.ok()) return Fail(r.status());
  Status s = ForEach(**r, [&](const Entry& e) {
    std::printf("%llu %llu %llu %llu %s %s\n", static_cast<unsigned long long>(e.index),
                static_cast<unsigned long long>(e.offset), static_cast<unsigned long long>(e.sector),
                static_cast<unsigned long long>(e.nr_sectors), FlagNames(e.flags).c_str(),
                (e.flags & kFlagMark) ? PrintableMark(e.mark).c_str() : "-");
    return Status::Ok();
  });
  return s.ok() ? 0 : Fail(s);
}

int Points(const std::string& log, const std::string& from_mark) {
  auto r = LogReader::Open(log);
  if (!r.ok()) return Fail(r.status());
  auto pts = CrashPoints(**r, from_mark);
  if (!pts.ok()) return Fail(Error(pts.status().code(), "{}: {}", log, pts.status().message()));
  for (const Point& p : *pts) {
    std::printf("%llu %s %s %d\n", static_cast<unsigned long long>(p.entry.index),
                FlagNames(p.entry.flags).c_str(),
                (p.entry.flags & kFlagMark) ? PrintableMark(p.entry.mark).c_str() : "-",
                p.same_as_next ? 1 : 0);
  }
  return 0;
}

struct Cursor {
  uint64_t index = 0, offset = 0, nr_entries = 0;
  uint32_t sectorsize = 0;
};

StatusOr<std::optional<Cursor>> LoadCursor(const std::string& path) {
  std::ifstream in(path);
  if (!in) {
    if (access(path.c_str(), F_OK) != 0) return std::optional<Cursor>();
    return Error(EIO, "cannot read cursor {}", path);
  }
  Cursor c;
  if (!(in >> c.index >> c.offset >> c.nr_entries >> c.sectorsize)) {
    return Error(EINVAL, "cursor {}: want 'INDEX OFFSET NR_ENTRIES SECTORSIZE'", path);
  }
  return std::optional<Cursor>(c);
}

Status SaveCursor(const std::string& path, const Cursor& c) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::trunc);
    out << c.index << ' ' << c.offset << ' ' << c.nr_entries << ' ' << c.sectorsize << '\n';
    if (!out.flush()) return Error(EIO, "cannot write cursor {}", tmp);
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    return Error(errno, "rename {} to {}: {}", tmp, path, std::strerror(errno));
  }
  return Status::Ok();
}

int Replay(const std::string& log, const std::string& target, const std::string& to_arg,
           const std::string& cursor_path) {
  auto r = LogReader::Open(log);
  if (!r.ok()) return Fail(r.status());
  const Super& sup = (*r)->super();
  uint64_t to = 0;
  if (to_arg == "end") {
    if (sup.nr_entries == 0) return 0;
    to = sup.nr_entries - 1;
  } else {
    try {
      size_t pos = 0;
      to = std::stoull(to_arg, &pos);
      if (pos != to_arg.size()) throw std::invalid_argument(to_arg);
    } catch (const std::exception&) {
      std::cerr << "logwrites: --to wants an entry index or 'end', got '" << to_arg << "'\n";
      return 2;
    }
    if (to >= sup.nr_entries) {
      return Fail(Error(EINVAL, "--to {}: the log has {} entries", to, sup.nr_entries));
    }
  }
  if (!cursor_path.empty()) {
    auto c = LoadCursor(cursor_path);
    if (!c.ok()) return Fail(c.status());
    if (c->has_value()) {
      const Cursor& cur = **c;
      if (cur.nr_entries != sup.nr_entries || cur.sectorsize != sup.sectorsize) {
        return Fail(Error(EINVAL, "cursor {} belongs to another log ({} entries, sectorsize {})",
                          cursor_path, cur.nr_entries, cur.sectorsize));
      }
      if (cur.index > to + 1) {
        return Fail(Error(EINVAL,
                          "cursor {} is at entry {}, past --to {}: the target already holds "
                          "later writes (start again with a fresh target and no cursor)",
                          cursor_path, cur.index, to));
      }
      if (Status s = (*r)->Seek(cur.index, cur.offset); !s.ok()) return Fail(s);
    }
  }
  auto t = ReplayTarget::Open(target);
  if (!t.ok()) return Fail(t.status());
  if (Status s = ReplayThrough(**r, **t, to); !s.ok()) return Fail(s);
  if (!cursor_path.empty()) {
    Cursor c{(*r)->next_index(), (*r)->next_offset(), sup.nr_entries, sup.sectorsize};
    if (Status s = SaveCursor(cursor_path, c); !s.ok()) return Fail(s);
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"logwrites: inspect and replay dm-log-writes logs"};
  app.require_subcommand(1);
  std::string log, target, to, cursor, from_mark, dm_name, text;

  auto* info = app.add_subcommand("info", "Entry counts of a log");
  info->add_option("LOG", log, "Log file or device")->required();
  auto* list = app.add_subcommand("list", "Every entry, one per line");
  list->add_option("LOG", log, "Log file or device")->required();
  auto* points = app.add_subcommand("points", "The crash points: FLUSH, FUA and MARK entries");
  points->add_option("LOG", log, "Log file or device")->required();
  points->add_option("--from-mark", from_mark, "Start at the first mark with this text");
  auto* replay = app.add_subcommand("replay", "Replay entries onto a target");
  replay->add_option("LOG", log, "Log file or device")->required();
  replay->add_option("TARGET", target, "Block device or regular file to write")->required();
  replay->add_option("--to", to, "Last entry to apply (inclusive), or 'end'")->required();
  replay->add_option("--cursor", cursor, "Resume from / save to this cursor file");
  auto* mark = app.add_subcommand("mark", "Insert a mark into a live dm-log-writes device");
  mark->add_option("DMNAME", dm_name, "Device-mapper name of the log-writes device")->required();
  mark->add_option("TEXT", text, "Mark text (printable, no blanks)")->required();
  CLI11_PARSE(app, argc, argv);

  if (*info) return Info(log);
  if (*list) return List(log);
  if (*points) return Points(log, from_mark);
  if (*replay) return Replay(log, target, to, cursor);
  if (*mark) {
    Status s = SendMark(dm_name, text);
    return s.ok() ? 0 : Fail(s);
  }
  return 2;
}
