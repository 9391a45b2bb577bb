// The system calls whose failures a save must survive cleanly (write,
// pwrite, fsync, fdatasync, close, rename), called through one table: the
// one seam where tests inject faults, such as short writes and EINTR, ENOSPC,
// EIO from a disk, EXDEV or EACCES from a rename. Production code always
// gets the real calls. Knows POSIX only.
#pragma once

#include <sys/types.h>

#include <cstddef>

namespace trinity_stream_saver {

struct SystemCalls {
  ssize_t (*write)(int fd, const void* data, std::size_t size);
  ssize_t (*pwrite)(int fd, const void* data, std::size_t size, off_t offset);
  int (*fsync)(int fd);
  int (*fdatasync)(int fd);
  int (*close)(int fd);
  int (*rename)(const char* from, const char* to);
};

// The table in use: the real calls unless a test replaced them.
const SystemCalls& system_calls() noexcept;

// For tests: `replacement` is used instead of the real calls until this is
// destroyed. Not for use while a save runs on another thread.
class ScopedSystemCalls final {
 public:
  explicit ScopedSystemCalls(const SystemCalls& replacement) noexcept;
  ~ScopedSystemCalls();
  ScopedSystemCalls(const ScopedSystemCalls&) = delete;
  ScopedSystemCalls& operator=(const ScopedSystemCalls&) = delete;

  // The real calls, for a replacement that fails only some of them.
  static const SystemCalls& real() noexcept;

 private:
  const SystemCalls* previous_;
};

}  // namespace trinity_stream_saver
