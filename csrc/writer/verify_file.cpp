#include "writer/verify_file.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <trinity_stream_saver/errors.h>
#include <trinity_stream_saver/stream_saver.h>

#include "format/file_check.h"
#include "io/file_descriptor.h"
#include "io/posix_io.h"

namespace trinity_stream_saver {

std::optional<std::string> safetensors_file_problem(int fd, const std::string& path) {
  struct stat info {};
  if (::fstat(fd, &info) != 0) throw OsError(errno, path, "inspect the file");
  if (!S_ISREG(info.st_mode)) return std::string("it is not a regular file");
  const auto file_size = static_cast<std::uint64_t>(info.st_size);
  const std::string prefix = read_at(fd, 0, 8, path);
  if (std::optional<std::string> problem = check_header_length(prefix, file_size)) return problem;
  const std::uint64_t length = *decode_header_length(prefix);
  const std::string header = read_at(fd, 8, static_cast<std::size_t>(length), path);
  if (header.size() != length) return std::string("the file was cut short while it was read");
  return check_header(header, file_size);
}

void check_safetensors_file(const std::string& path) {
  const FileDescriptor fd(retry_on_eintr(
      [&] { return ::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC); }));
  if (!fd) throw OsError(errno, path, "open the file to check it");
  if (std::optional<std::string> problem = safetensors_file_problem(fd.get(), path)) {
    throw ValueError("'" + path + "' is not a complete safetensors file: " + *problem + ".");
  }
}

}  // namespace trinity_stream_saver
