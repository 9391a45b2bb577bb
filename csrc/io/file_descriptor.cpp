#include "io/file_descriptor.h"

#include <cerrno>

#include <trinity_stream_saver/errors.h>

#include "io/system_calls.h"

namespace trinity_stream_saver {

void FileDescriptor::reset() noexcept {
  if (fd_ >= 0) system_calls().close(std::exchange(fd_, -1));
}

void FileDescriptor::close_or_throw(const std::string& path) {
  if (fd_ < 0) return;
  if (system_calls().close(std::exchange(fd_, -1)) != 0 && errno != EINTR) {
    throw OsError(errno, path, "close");
  }
}

}  // namespace trinity_stream_saver
