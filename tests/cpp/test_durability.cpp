#include "io/durability.h"

#include <gtest/gtest.h>

#include <cerrno>
#include <string>

#include <trinity_stream_saver/errors.h>
#include <trinity_stream_saver/stream_saver.h>

#include "test_support.h"

namespace trinity_stream_saver {
namespace {

using testing::exists;
using testing::read_file;
using testing::safetensors_file;
using testing::ScratchDir;
using testing::write_file;

TEST(Finalize, RenamesTheTemporaryFileOverTheDestination) {
  for (const bool sync : {false, true}) {
    ScratchDir dir;
    write_file(dir.file("f"), "old");
    write_file(dir.file("f.tmp"), safetensors_file("new"));
    finalize(dir.file("f.tmp"), dir.file("f"), sync);
    EXPECT_EQ(read_file(dir.file("f")), safetensors_file("new"));
    EXPECT_FALSE(exists(dir.file("f.tmp")));
  }
}

TEST(Finalize, MissingTemporaryFileIsAnOsErrorNamingIt) {
  ScratchDir dir;
  try {
    finalize(dir.file("f.tmp"), dir.file("f"), /*sync=*/true);
    FAIL() << "expected OsError";
  } catch (const OsError& error) {
    EXPECT_EQ(error.error_number(), ENOENT);
    EXPECT_EQ(error.path(), dir.file("f.tmp"));
  }
}

TEST(Finalize, FailedRenameLeavesTheTemporaryFileInPlace) {
  ScratchDir dir;
  write_file(dir.file("f.tmp"), safetensors_file("new"));
  try {
    finalize(dir.file("f.tmp"), dir.file("missing/f"), /*sync=*/true);
    FAIL() << "expected OsError";
  } catch (const OsError& error) {
    EXPECT_EQ(error.error_number(), ENOENT);
    EXPECT_EQ(error.path(), dir.file("missing/f"));
  }
  EXPECT_EQ(read_file(dir.file("f.tmp")), safetensors_file("new"));
}

TEST(SyncParentDirectory, AcceptsPathsWithAndWithoutADirectory) {
  ScratchDir dir;
  EXPECT_NO_THROW(sync_parent_directory(dir.file("anything")));
  EXPECT_NO_THROW(sync_parent_directory("relative_name"));
  EXPECT_NO_THROW(sync_parent_directory("/top_level_name"));
}

TEST(SyncParentDirectory, MissingDirectoryIsAnOsError) {
  ScratchDir dir;
  EXPECT_THROW(sync_parent_directory(dir.file("missing/f")), OsError);
}

}  // namespace
}  // namespace trinity_stream_saver
