// A new file written through a POSIX descriptor, removed again unless it is
// finished. Modelled on LevelDB's PosixWritableFile: small appends are
// gathered in a buffer, large ones go straight from the caller's memory.
// Knows nothing of torch or Python.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

namespace trinity_stream_saver {

class FileSink final {
 public:
  // Appends smaller than this are copied into the buffer so that many small
  // tensors cost one system call, not one each.
  static constexpr std::size_t kBufferBytes = std::size_t{4} << 20;

  // Creates `path` (replacing a stale file of that name), mode 0666 less the
  // umask, as Python's open(path, "wb") does. Throws OsError.
  explicit FileSink(std::string path);

  // A sink destroyed before close_and_rename() or close_and_keep() closes
  // and removes its file: a failed save leaves nothing behind.
  ~FileSink();

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

  void append(const void* data, std::size_t size);

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
  // any file there. With `sync`, the data is on disk before the rename and
  // the rename is on disk before this returns. On failure before the
  // rename the file is removed and OsError thrown.
  void close_and_rename(const std::string& destination, bool sync);

  // Closes the file and leaves it at path() for the caller to finish
  // (with `sync`, its data is on disk first).
  void close_and_keep(bool sync);

  const std::string& path() const noexcept { return path_; }

 private:
  void flush();
  void close_or_throw(bool sync);

  const std::string path_;
  int fd_ = -1;
  bool finished_ = false;
  std::unique_ptr<char[]> buffer_;  // allocated on the first small append
  std::size_t buffered_ = 0;
};

}  // namespace trinity_stream_saver
