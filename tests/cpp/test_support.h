// Helpers shared by the C++ tests: a scratch directory, file reading and
// writing, small safetensors files.
#pragma once

#include <filesystem>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <string>

#include <linux/magic.h>
#include <stdlib.h>
#include <sys/statfs.h>

namespace trinity_stream_saver::testing {

// A fresh directory, removed with everything in it when the test ends.
class ScratchDir final {
 public:
  ScratchDir() {
    std::string pattern =
        (std::filesystem::temp_directory_path() / "stream_saver_test_XXXXXX").string();
    if (::mkdtemp(pattern.data()) == nullptr) throw std::runtime_error("mkdtemp failed");
    path_ = pattern;
  }
  ~ScratchDir() {
    std::error_code ignored;
    std::filesystem::remove_all(path_, ignored);
  }
  ScratchDir(const ScratchDir&) = delete;
  ScratchDir& operator=(const ScratchDir&) = delete;

  std::string file(const std::string& name) const { return (path_ / name).string(); }
  std::string path() const { return path_.string(); }

 private:
  std::filesystem::path path_;
};

inline std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot read " + path);
  std::ostringstream out;
  out << in.rdbuf();
  return out.str();
}

inline void write_file(const std::string& path, const std::string& content) {
  std::ofstream(path, std::ios::binary) << content;
}

inline bool exists(const std::string& path) { return std::filesystem::exists(path); }

// Whether `path` is on a filesystem that lives in memory (tmpfs, ramfs),
// where the sink checks free space instead of preallocating: TMPDIR may
// point at one (e.g. /dev/shm).
inline bool in_memory_filesystem(const std::string& path) {
  struct statfs filesystem {};
  return ::statfs(path.c_str(), &filesystem) == 0 &&
         (filesystem.f_type == TMPFS_MAGIC || filesystem.f_type == RAMFS_MAGIC);
}

// A complete safetensors file holding `data` as one U8 tensor named "x".
inline std::string safetensors_file(const std::string& data) {
  std::string json = R"({"x":{"dtype":"U8","shape":[)" + std::to_string(data.size()) +
                     R"(],"data_offsets":[0,)" + std::to_string(data.size()) + "]}}";
  json.resize((json.size() + 7) / 8 * 8, ' ');
  std::string file(8, '\0');
  for (int i = 0; i < 8; ++i) file[i] = static_cast<char>((json.size() >> (8 * i)) & 0xff);
  return file + json + data;
}

}  // namespace trinity_stream_saver::testing
