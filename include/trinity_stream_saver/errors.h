// Typed errors of the saver. Each layer throws the one that says whose
// mistake it was; the bindings map them to the matching Python exception
// (TypeError, ValueError, OSError with errno), so a user never sees a bare
// RuntimeError for something they can fix.
#pragma once

#include <stdexcept>
#include <string>

namespace trinity_stream_saver {

// An argument of the wrong kind (not a tensor, not a string, ...).
class TypeError final : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// An argument of the right kind with an unusable value (unsupported dtype,
// duplicate name, tensor on the wrong device, metadata that does not
// describe the tensors, ...).
class ValueError final : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// A failed system call. Keeps errno and the path so that Python can raise
// the matching OSError subclass (FileNotFoundError, PermissionError, ...).
class OsError final : public std::runtime_error {
 public:
  OsError(int error_number, std::string path, const std::string& action);

  int error_number() const noexcept { return error_number_; }
  const std::string& path() const noexcept { return path_; }
  // strerror(errno) followed by what we were doing, without the path
  // (Python's OSError appends the filename itself).
  const std::string& reason() const noexcept { return reason_; }

 private:
  int error_number_;
  std::string path_;
  std::string reason_;
};

}  // namespace trinity_stream_saver
