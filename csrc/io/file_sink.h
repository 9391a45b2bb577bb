// A new file written through a POSIX descriptor, removed again unless it is
// finished. Modelled on LevelDB's PosixWritableFile: small appends are
// gathered in a buffer, large ones go straight from the caller's memory.
// Knows nothing of torch or Python.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "io/file_descriptor.h"
#include "io/sequential_sink.h"

namespace trinity_stream_saver {

class FileSink final : public SequentialSink {
 public:
  // Appends smaller than this are copied into the buffer so that many small
  // tensors cost one system call, not one each.
  static constexpr std::size_t kBufferBytes = std::size_t{4} << 20;

  // Creates `path` (replacing a stale file of that name), mode 0666 less the
  // umask, as Python's open(path, "wb") does, never through a symbolic link
  // and never into a file another save is writing (see io/temp_file.h).
  // Throws OsError (EBUSY if another save is writing `path`).
  explicit FileSink(std::string path);

  // A sink destroyed before close_and_rename() or close_and_keep() closes
  // and removes its file: a failed save leaves nothing behind. The file is
  // removed while still locked, so that the removal cannot hit the file
  // of a save that starts at the same moment.
  ~FileSink() override;

  FileSink(const FileSink&) = delete;
  FileSink& operator=(const FileSink&) = delete;

  // Makes sure a file of `size` bytes fits, so that a full disk fails now
  // rather than after minutes of writing: preallocates it where that is
  // cheap, and otherwise (tmpfs, where preallocating zero-fills memory that
  // the write then overwrites, or a filesystem that cannot) checks the free
  // space. Throws OsError (ENOSPC, EFBIG).
  void reserve_space(std::uint64_t size);

  // Moves the append position to `offset` (leaving a hole to fill later).
  void seek(std::uint64_t offset);

  void append(const void* data, std::size_t size) override;

  // Appends `size` bytes read only by write(2), never copied in user space:
  // memory that another thread frees meanwhile makes the write fail with
  // EFAULT (an OsError) instead of crashing the process.
  void append_unbuffered(const void* data, std::size_t size);

  // Writes at an absolute offset, after everything appended so far.
  void write_at(std::uint64_t offset, const void* data, std::size_t size);

  // Cuts the file to `size` bytes (after a preallocation that turned out
  // larger than the data).
  void truncate(std::uint64_t size);

  // Closes the file and atomically renames it to `destination`, replacing
  // a regular file or symbolic link there (see check_destination). With
  // `sync`, the data is on disk before the rename and the rename is on disk
  // before this returns. Throws OsError; on failure before the rename the
  // file is removed (when the sink is destroyed) and `destination` is
  // untouched. The lock is held until the rename is done.
  void close_and_rename(const std::string& destination, bool sync);

  // Closes the file and leaves it at path() for the caller to finish
  // (with `sync`, its data is on disk first). Returns the descriptor that
  // holds the lock: a caller that renames the file later itself (a
  // sharded save) keeps it meanwhile, so that no other save takes the
  // finished file for debris; dropping it releases the lock, and
  // finalize() takes the lock again to rename the file.
  FileDescriptor close_and_keep(bool sync);

  const std::string& path() const noexcept { return path_; }

 private:
  void flush();
  void close_or_throw(bool sync);

  const std::string path_;
  FileDescriptor fd_;
  // A duplicate of fd_ that keeps the file's lock (which belongs to the
  // open file, not the descriptor) after fd_ is closed: close() must come
  // before the rename to report deferred write errors, the lock after it.
  FileDescriptor lock_;
  bool finished_ = false;
  std::unique_ptr<char[]> buffer_;  // allocated on the first small append
  std::size_t buffered_ = 0;
};

}  // namespace trinity_stream_saver
