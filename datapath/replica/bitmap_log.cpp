#include "datapath/replica/bitmap_log.h"

#include <filesystem>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

namespace nbdcsi::replica {
namespace fs = std::filesystem;

StatusOr<std::unique_ptr<BitmapLog>> BitmapLog::Open(const std::string& dir,
                                                     uint64_t volume_size, uint64_t epoch) {
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) return Error(ec.value(), "out-of-sync log {}: {}", dir, ec.message());
  std::unique_ptr<BitmapLog> log(new BitmapLog(dir, volume_size, epoch));
  const std::string suffix = fmt::format(".e{}.bitmap", epoch);
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    const std::string name = e.path().filename().string();
    if (!name.ends_with(".bitmap")) continue;
    if (!name.ends_with(suffix)) {
      // Another epoch's: it cannot say what the replica misses now.
      fs::remove(e.path(), ec);
      spdlog::info("out-of-sync log {}: removed {} (another epoch)", dir, name);
      continue;
    }
    const std::string node = name.substr(0, name.size() - suffix.size());
    auto b = RegionBitmap::Open(e.path().string(), volume_size);
    if (!b.ok()) {
      // Unreadable: without it the replica gets a full copy, which is always safe.
      spdlog::warn("out-of-sync log {}: {} is unusable ({}); {} will get a full copy", dir, name,
                   b.status().message(), node);
      fs::remove(e.path(), ec);
      continue;
    }
    log->bitmaps_[node] = std::move(*b);
  }
  if (ec) return Error(ec.value(), "out-of-sync log {}: {}", dir, ec.message());
  return log;
}

std::string BitmapLog::PathOf(const std::string& node) const {
  return fmt::format("{}/{}.e{}.bitmap", dir_, node, epoch_);
}

StatusOr<RegionBitmap*> BitmapLog::Get(const std::string& node) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = bitmaps_.find(node);
  if (it != bitmaps_.end()) return it->second.get();
  auto b = RegionBitmap::Create(PathOf(node), volume_size_);
  if (!b.ok()) return b.status();
  RegionBitmap* raw = b->get();
  bitmaps_[node] = std::move(*b);
  return raw;
}

void BitmapLog::MarkOutOfSync(const std::string& node, uint64_t offset, uint64_t length,
                              Done done) {
  auto b = Get(node);
  if (!b.ok()) return done(b.status());
  auto r = (*b)->MarkDurableAsync(offset, length, done);
  if (!r.ok()) return done(r.status());
  if (*r) done(Status::Ok());  // durable already: no callback comes
}

Status BitmapLog::Grow(uint64_t size) {
  std::lock_guard<std::mutex> lock(mu_);
  if (size <= volume_size_) return Status::Ok();
  if (!bitmaps_.empty()) {
    return Error(EBUSY, "the out-of-sync log of {} holds {} replica bitmap(s) of {} bytes; resync "
                 "first", dir_, bitmaps_.size(), volume_size_);
  }
  volume_size_ = size;
  return Status::Ok();
}

RegionBitmap* BitmapLog::Find(const std::string& node) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = bitmaps_.find(node);
  return it == bitmaps_.end() ? nullptr : it->second.get();
}

Status BitmapLog::Forget(const std::string& node) {
  std::unique_ptr<RegionBitmap> b;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = bitmaps_.find(node);
    if (it == bitmaps_.end()) return Status::Ok();
    b = std::move(it->second);
    bitmaps_.erase(it);
  }
  const std::string path = b->path();
  b.reset();
  std::error_code ec;
  fs::remove(path, ec);
  if (ec) return Error(ec.value(), "out-of-sync log: remove {}: {}", path, ec.message());
  return Status::Ok();
}

std::map<std::string, uint64_t> BitmapLog::DirtyBytes() {
  std::lock_guard<std::mutex> lock(mu_);
  std::map<std::string, uint64_t> out;
  for (const auto& [node, b] : bitmaps_) out[node] = b->dirty_bytes();
  return out;
}

}  // namespace nbdcsi::replica
