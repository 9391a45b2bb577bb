#include <trinity_stream_saver/errors.h>

#include <cstring>

namespace trinity_stream_saver {

namespace {

std::string describe(int error_number, const std::string& path,
                     const std::string& action) {
  return std::string(std::strerror(error_number)) + " (while trying to " +
         action + "): '" + path + "'";
}

}  // namespace

OsError::OsError(int error_number, std::string path, const std::string& action)
    : std::runtime_error(describe(error_number, path, action)),
      error_number_(error_number),
      path_(std::move(path)),
      reason_(std::string(std::strerror(error_number)) + " (while trying to " +
              action + ")") {}

}  // namespace trinity_stream_saver
