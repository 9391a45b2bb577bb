// An owned POSIX file descriptor: closed when the owner goes away, so that
// no error path leaks one. Knows POSIX only.
#pragma once

#include <string>
#include <utility>

namespace trinity_stream_saver {

class FileDescriptor final {
 public:
  FileDescriptor() noexcept = default;
  explicit FileDescriptor(int fd) noexcept : fd_(fd) {}
  ~FileDescriptor() { reset(); }

  FileDescriptor(FileDescriptor&& other) noexcept : fd_(std::exchange(other.fd_, -1)) {}
  FileDescriptor& operator=(FileDescriptor&& other) noexcept {
    if (this != &other) {
      reset();
      fd_ = std::exchange(other.fd_, -1);
    }
    return *this;
  }
  FileDescriptor(const FileDescriptor&) = delete;
  FileDescriptor& operator=(const FileDescriptor&) = delete;

  int get() const noexcept { return fd_; }
  explicit operator bool() const noexcept { return fd_ >= 0; }

  // Closes the descriptor, if any, ignoring errors: for paths that are
  // failing already, or descriptors that only read or hold a lock.
  void reset() noexcept;

  // Closes the descriptor and throws OsError naming `path` if close()
  // reports a deferred write error (NFS reports them there). Never retried
  // on EINTR: the descriptor is gone either way.
  void close_or_throw(const std::string& path);

 private:
  int fd_ = -1;
};

}  // namespace trinity_stream_saver
