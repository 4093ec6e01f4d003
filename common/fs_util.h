// Small durable-file helpers shared by the pool and the engine's attachment records.
//
// Every error names the path and the step that failed ("fsync directory D: reason") so the
// caller can return it as is. Durability means fsync of the file and of the directory that
// holds its name: a rename or a new directory entry is not durable until its parent is synced.
#pragma once

#include <cstddef>
#include <string>

#include "common/status.h"

namespace nbdcsi {

// fsync of a directory, which makes creations, renames and unlinks in it durable.
Status FsyncDir(const std::string& dir);

// mkdir -p (mode 0700 for what it creates) that fsyncs the parent of each directory it
// creates. ENOTDIR if a component exists and is not a directory.
Status MkdirP(const std::string& path);

// write(2) until all of `data` is written (short writes and EINTR are retried). `path` is only
// for the error message.
Status WriteAll(int fd, const std::string& data, const std::string& path);

// The whole of a small file. EFBIG (naming the path and the limit) once it exceeds max_bytes:
// a metadata file that large is not what the caller wrote.
StatusOr<std::string> ReadSmallFile(const std::string& path, size_t max_bytes = size_t{1} << 20);

// The temp file WriteFileAtomic uses for dir/name: dir/.name.tmp. Hidden (leading '.') and with
// a ".tmp" suffix, so a directory scan can tell a crash's leftover from a real file.
std::string AtomicTempPath(const std::string& dir, const std::string& name);

// Replaces dir/name with `content` so that after a crash at any point the file holds either the
// old content or the new, never a torn mix: write AtomicTempPath(dir, name), fsync it,
// FaultPoint(fault_tmp), rename it over dir/name, FaultPoint(fault_renamed), fsync dir.
// Empty fault names are skipped. On a failure before the rename the temp file is removed and
// dir/name is untouched. `renamed` (if not null) is set to whether the rename happened, so a
// failing caller knows whether dir/name may already hold the new content (only the final
// directory fsync failed).
Status WriteFileAtomic(const std::string& dir, const std::string& name, const std::string& content,
                       const char* fault_tmp = "", const char* fault_renamed = "",
                       bool* renamed = nullptr);

// A block device that nothing holds exclusively: O_EXCL on a block device fails with EBUSY while a
// mounted file system (or another exclusive opener) holds it, which is exactly when a detach
// would turn into I/O errors. A device that does not exist is not in use. EBUSY names `dev`.
Status CheckBlockDeviceNotInUse(const std::string& dev);

}  // namespace nbdcsi
