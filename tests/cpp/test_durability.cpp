#include "io/durability.h"

#include <gtest/gtest.h>

#include <cerrno>
#include <string>

#include <trinity_stream_saver/errors.h>

#include "test_support.h"

namespace trinity_stream_saver {
namespace {

using testing::ScratchDir;

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
