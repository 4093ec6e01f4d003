// libFuzzer target for opening a pool whose metadata is corrupt or truncated (datapath/pool/load.cpp,
// Pool::Open): the fuzzed bytes are written as one NAME.json in volumes/ or snapshots/ of a real
// pool directory (tmpfs when /dev/shm is there), beside a good volume and a good snapshot, and
// the pool is opened. FUZZ_POOL_BASE=DIR puts it under DIR instead.
//
// Input: 1 byte of layout flags (bit 0: a snapshot's file rather than a volume's; bit 1: no data
// file NAME.img beside it), NAME up to '\n' (a name that cannot be a file name becomes "vol"),
// then the file's bytes. Checked:
//  - the pool opens: one bad file never takes the others down;
//  - the good volume and snapshot are loaded, unchanged;
//  - a file the parser refuses (or whose name breaks the name rules, or whose data file is
//    missing) makes NAME broken: reported by Info, EIO on inspection, its name blocked for
//    Create, its files kept byte for byte (nothing is deleted automatically);
//  - an accepted volume is served with the size its metadata says, unless the file system cannot
//    hold that size (FUZZ_POOL_BASE on ext4): then it is broken like the others;
//  - opening the same directory again gives the same volumes, snapshots and broken set;
//  - deleting a broken object removes its files, and the next open no longer knows it.
#include <fcntl.h>
#include <spdlog/spdlog.h>
#include <stdlib.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>
#include <string>

#include "datapath/pool/metadata.h"
#include "datapath/pool/pool.h"
#include "datapath/pool/rules.h"
#include "test/fuzz/fuzz_check.h"

namespace dp = nbdcsi::datapath;
namespace fs = std::filesystem;
using nbdcsi::fuzz::Bytes;

namespace {

constexpr uint64_t kGoodSize = 8192;

const std::string& Root() {
  // Leaked on purpose: the atexit cleanup below must still find it after static destructors.
  static const std::string& root = *new std::string([] {
    spdlog::set_level(spdlog::level::off);  // every broken file logs an error
    // FUZZ_POOL_BASE puts the pool on another file system (tmpfs takes any sparse size; ext4
    // stops at 16 TiB, xfs at 8 EiB, which changes what opening a bad size does).
    const char* base = getenv("FUZZ_POOL_BASE");
    if (!base) base = access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp";
    std::string tmpl = std::string(base) + "/nbdcsi-fuzz-load-XXXXXX";
    FUZZ_CHECK(mkdtemp(tmpl.data()) != nullptr);
    std::atexit([] {
      std::error_code ec;
      fs::remove_all(Root(), ec);
    });
    return tmpl;
  }());
  return root;
}

void WriteFile(const std::string& path, std::string_view bytes) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  FUZZ_CHECK_MSG(f.good(), path);
}

std::string ReadFile(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::ostringstream s;
  s << f.rdbuf();
  return s.str();
}

void MakeData(const std::string& path, uint64_t size) {
  int fd = open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  FUZZ_CHECK(fd >= 0);
  FUZZ_CHECK(ftruncate(fd, static_cast<off_t>(size)) == 0);
  close(fd);
}

std::unique_ptr<dp::Pool> Open(const std::string& dir) {
  dp::PoolOptions opts;
  opts.dir = dir;
  opts.capacity_bytes = uint64_t{1} << 40;
  opts.disable_reflink = true;  // skips the probe: the same code path on every file system
  auto p = dp::Pool::Open(opts);
  FUZZ_CHECK_MSG(p.ok(), p.status().message());
  return std::move(*p);
}

// What an open pool knows, to compare two opens of one directory.
struct View {
  std::set<std::string> volumes, snapshots, broken;  // broken: Info's "NAME: why" lines
  bool operator==(const View&) const = default;
};

View See(dp::Pool& pool) {
  View v;
  for (const auto& i : pool.List()) v.volumes.insert(i.name + "/" + std::to_string(i.size));
  auto snaps = pool.ListSnapshots();
  FUZZ_CHECK(snaps.ok());
  for (const auto& s : *snaps) v.snapshots.insert(s.name + "/" + s.source_volume);
  for (const auto& b : pool.Info().broken_volumes) v.broken.insert(b);
  return v;
}

// Info lists a broken volume as "NAME: why" and a broken snapshot as "snapshot/NAME: why".
// Why NAME is broken, or "" when it is not. (Names that break the rules may hold ": "
// themselves, so the entry is matched by prefix.)
std::string BrokenWhy(const View& v, const std::string& name, bool snapshot) {
  const std::string prefix = (snapshot ? "snapshot/" : "") + name + ": ";
  for (const auto& b : v.broken) {
    if (b.rfind(prefix, 0) == 0) return b.substr(prefix.size());
  }
  return "";
}
bool Broken(const View& v, const std::string& name, bool snapshot) {
  return !BrokenWhy(v, name, snapshot).empty();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  Bytes in(data, size);
  const uint8_t flags = in.U8();
  const bool snapshot = flags & 1;
  const bool with_data = !(flags & 2);
  std::string name = in.Until('\n');
  if (name.empty() || name == "." || name == ".." || name.size() > 200 ||
      name.find_first_of(std::string("/\0", 2)) != std::string::npos || name == "good") {
    name = "vol";
  }
  const std::string_view text = in.Rest();

  const std::string dir = Root() + "/pool";
  std::error_code ec;
  fs::remove_all(dir, ec);
  fs::create_directories(dir + "/volumes");
  fs::create_directories(dir + "/snapshots");
  const dp::VolumeMeta good{.name = "good", .size = kGoodSize};
  WriteFile(dir + "/volumes/good.json", dp::ToJson(good));
  MakeData(dir + "/volumes/good.img", kGoodSize);
  const dp::SnapshotMeta good_snap{.name = "good", .source_volume = "good", .size = kGoodSize,
                                   .method = "copy", .state = "ready"};
  WriteFile(dir + "/snapshots/good.json", dp::ToJson(good_snap));
  MakeData(dir + "/snapshots/good.img", kGoodSize);

  const std::string sub = snapshot ? "/snapshots/" : "/volumes/";
  const std::string meta_path = dir + sub + name + ".json";
  const std::string data_path = dir + sub + name + ".img";
  WriteFile(meta_path, text);
  if (with_data) MakeData(data_path, 4096);

  const bool name_ok = snapshot ? dp::ValidateSnapshotName(name).ok()
                                : dp::ValidateVolumeName(name).ok();
  bool parsed = false;
  std::string state;
  uint64_t meta_size = 0;
  if (snapshot) {
    auto m = dp::ParseSnapshotMetadata(text, name);
    parsed = m.ok();
    if (parsed) state = m->state;
  } else {
    auto m = dp::ParseVolumeMetadata(text, name);
    parsed = m.ok();
    if (parsed) {
      state = m->state;
      meta_size = m->size;
    }
  }
  // A snapshot still "copying" is abandoned (removed) before its data file is looked at; a volume
  // without its data file is broken whatever its state. A volume whose data file (4096 bytes
  // here) is shorter than its metadata's size was cut outside the pool: broken, unless a copy
  // into it is still to run ("copying").
  const bool short_data =
      !snapshot && parsed && with_data && state != "copying" && meta_size > 4096;
  const bool should_break = !name_ok || !parsed || short_data ||
                            (!with_data && (!snapshot || state != "copying"));

  View first;
  {
    auto pool = Open(dir);
    first = See(*pool);
    FUZZ_CHECK(first.volumes.count("good/" + std::to_string(kGoodSize)));
    FUZZ_CHECK(first.snapshots.count("good/good"));
    auto g = pool->Inspect("good");
    FUZZ_CHECK(g.ok() && g->size == kGoodSize && g->ready);
    // A size the file system cannot hold (ext4: 16 TiB) also fences the volume, and only it.
    const bool too_large = !snapshot && parsed && with_data &&
                           BrokenWhy(first, name, snapshot).find(std::strerror(EFBIG)) !=
                               std::string::npos;
    FUZZ_CHECK_MSG(Broken(first, name, snapshot) == (should_break || too_large), name);
    if (should_break) {
      // Kept as it was, reported, and its name blocked.
      FUZZ_CHECK(ReadFile(meta_path) == text);
      FUZZ_CHECK(fs::exists(data_path) == with_data);
      if (name_ok) {
        if (snapshot) {
          FUZZ_CHECK(pool->InspectSnapshot(name).status().code() == EIO);
          FUZZ_CHECK(pool->CreateSnapshot(name, "good").status().code() == EEXIST);
        } else {
          FUZZ_CHECK(pool->Inspect(name).status().code() == EIO);
          FUZZ_CHECK(pool->Create(name, 4096, {}).status().code() == EEXIST);
        }
      }
    } else if (!snapshot && state == "ready" && !too_large) {
      auto v = pool->Inspect(name);
      FUZZ_CHECK_MSG(v.ok(), v.status().message());
      FUZZ_CHECK(v->size == meta_size);
      FUZZ_CHECK(static_cast<uint64_t>(fs::file_size(data_path)) == meta_size);
    }
  }
  // Background copies (a restore restarted from "good") finish before the second open compares.
  {
    auto pool = Open(dir);
    FUZZ_CHECK(See(*pool) == first);
    if (Broken(first, name, snapshot) && name_ok) {
      const nbdcsi::Status s = snapshot ? pool->DeleteSnapshot(name) : pool->Delete(name);
      FUZZ_CHECK_MSG(s.ok(), s.message());
      FUZZ_CHECK(!fs::exists(meta_path) && !fs::exists(data_path));
    }
  }
  if (Broken(first, name, snapshot) && name_ok) {
    auto pool = Open(dir);
    FUZZ_CHECK(!Broken(See(*pool), name, snapshot));
  }
  return 0;
}
