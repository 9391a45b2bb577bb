#include "file_sink.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>

#include "errors.h"
#include "posix_io.h"

namespace trinity_stream_saver {

FileSink::FileSink(std::string path) : path_(std::move(path)) {
  do {
    fd_ = ::open(path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0666);
  } while (fd_ < 0 && errno == EINTR);
  if (fd_ < 0) throw OsError(errno, path_, "create the temporary file");
}

FileSink::~FileSink() {
  if (finished_) return;
  if (fd_ >= 0) ::close(fd_);
  ::unlink(path_.c_str());
}

void FileSink::seek(std::uint64_t offset) {
  flush();
  if (::lseek(fd_, static_cast<off_t>(offset), SEEK_SET) < 0) {
    throw OsError(errno, path_, "seek");
  }
}

void FileSink::append(const void* data, std::size_t size) {
  if (size == 0) return;
  if (buffered_ + size <= kBufferBytes && size < kBufferBytes) {
    if (!buffer_) buffer_ = std::make_unique<char[]>(kBufferBytes);
    std::memcpy(buffer_.get() + buffered_, data, size);
    buffered_ += size;
    return;
  }
  flush();
  if (size < kBufferBytes) {
    append(data, size);
    return;
  }
  write_all(fd_, data, size, path_);
}

void FileSink::write_at(std::uint64_t offset, const void* data, std::size_t size) {
  flush();
  pwrite_all(fd_, data, size, offset, path_);
}

void FileSink::flush() {
  if (buffered_ == 0) return;
  // Reset first: if the write throws, the sink is abandoned anyway.
  const std::size_t size = buffered_;
  buffered_ = 0;
  write_all(fd_, buffer_.get(), size, path_);
}

void FileSink::close_or_throw() {
  flush();
  const int fd = fd_;
  fd_ = -1;
  // close() reports deferred write errors on some filesystems (NFS); it must
  // not be retried on EINTR, since the descriptor is gone either way.
  if (::close(fd) != 0 && errno != EINTR) {
    throw OsError(errno, path_, "close");
  }
}

void FileSink::close_and_rename(const std::string& destination) {
  close_or_throw();
  if (::rename(path_.c_str(), destination.c_str()) != 0) {
    throw OsError(errno, destination, "rename the temporary file '" + path_ + "' to it");
  }
  finished_ = true;
}

void FileSink::close_and_keep() {
  close_or_throw();
  finished_ = true;
}

}  // namespace trinity_stream_saver
