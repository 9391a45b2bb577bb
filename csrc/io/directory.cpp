#include "io/directory.h"

#include <dirent.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <memory>

#include <trinity_stream_saver/errors.h>

namespace trinity_stream_saver {

void create_directories(const std::string& path) {
  struct stat status {};
  if (::stat(path.c_str(), &status) == 0) {
    if (!S_ISDIR(status.st_mode)) throw OsError(ENOTDIR, path, "use it as the save directory");
    return;
  }
  const std::size_t slash = path.find_last_of('/', path.find_last_not_of('/'));
  if (slash != std::string::npos && slash != 0) create_directories(path.substr(0, slash));
  // 0777 less the umask, as os.makedirs creates it. Another process may
  // have made it in the meantime, which is fine.
  if (::mkdir(path.c_str(), 0777) != 0 && errno != EEXIST) {
    throw OsError(errno, path, "create the save directory");
  }
}

std::vector<std::string> list_directory(const std::string& directory) {
  const std::unique_ptr<DIR, int (*)(DIR*)> stream(::opendir(directory.c_str()), ::closedir);
  if (!stream) throw OsError(errno, directory, "list the directory");
  std::vector<std::string> names;
  for (;;) {
    errno = 0;
    const dirent* entry = ::readdir(stream.get());
    if (entry == nullptr) {
      if (errno != 0) throw OsError(errno, directory, "list the directory");
      return names;
    }
    const std::string name = entry->d_name;
    if (name != "." && name != "..") names.push_back(name);
  }
}

void remove_file(const std::string& path) {
  if (::unlink(path.c_str()) != 0 && errno != ENOENT) {
    throw OsError(errno, path, "remove the file");
  }
}

std::string join_path(const std::string& directory, const std::string& name) {
  if (directory.empty()) return name;
  if (directory.back() == '/') return directory + name;
  return directory + "/" + name;
}

}  // namespace trinity_stream_saver
