#include <trinity_stream_saver/sharded_saver.h>

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "io/file_sink.h"
#include "test_support.h"

namespace trinity_stream_saver {
namespace {

using testing::read_file;
using testing::ScratchDir;
using testing::write_file;

using Items = std::vector<std::pair<std::string, at::Tensor>>;

// Named U8 tensors of the given sizes, each filled with its own number.
Items tensors_of(const std::vector<std::int64_t>& sizes) {
  Items items;
  for (std::size_t i = 0; i < sizes.size(); ++i) {
    items.emplace_back("t" + std::to_string(i), at::full({sizes[i]}, static_cast<int>(i) + 1,
                                                         at::kByte));
  }
  return items;
}

std::vector<TensorMeta> meta_of(const Items& items) {
  std::vector<TensorMeta> meta;
  for (const auto& [name, tensor] : items) meta.push_back(tensor_meta(name, tensor));
  return meta;
}

// Yields `items` in order; throws at item `fail_at` if given.
TensorSource source_of(const Items& items, std::size_t fail_at = SIZE_MAX) {
  return [&items, fail_at, i = std::size_t{0}]() mutable
         -> std::optional<std::pair<std::string, at::Tensor>> {
    if (i == fail_at) throw std::runtime_error("iterator failed");
    if (i == items.size()) return std::nullopt;
    return items[i++];
  };
}

std::map<std::string, std::string> folder(const std::string& directory) {
  std::map<std::string, std::string> files;
  for (const auto& entry : std::filesystem::directory_iterator(directory)) {
    files[entry.path().filename().string()] = read_file(entry.path().string());
  }
  return files;
}

std::set<std::string> names_in(const std::string& directory) {
  std::set<std::string> names;
  for (const auto& [name, content] : folder(directory)) names.insert(name);
  return names;
}

ShardOptions limit(std::uint64_t max_shard_size) {
  ShardOptions options;
  options.max_shard_size = max_shard_size;
  return options;
}

TEST(SaveShardedStreaming, WritesTheShardsOfThePlanAndTheIndex) {
  ScratchDir dir;
  const Items items = tensors_of({6, 11, 3, 6});  // t1 is over the limit
  const std::string index =
      save_sharded_streaming(source_of(items), dir.file("ckpt"), meta_of(items), limit(10));
  EXPECT_EQ(index, dir.file("ckpt") + "/model.safetensors.index.json");
  EXPECT_EQ(names_in(dir.file("ckpt")),
            (std::set<std::string>{"model-00001-of-00003.safetensors",
                                   "model-00002-of-00003.safetensors",
                                   "model-00003-of-00003.safetensors",
                                   "model.safetensors.index.json"}));
  // The tensor over the limit came second but has the first file.
  const std::string first = read_file(dir.file("ckpt/model-00001-of-00003.safetensors"));
  EXPECT_NE(first.find(R"("t1":{"dtype":"U8","shape":[11],"data_offsets":[0,11]})"),
            std::string::npos);
  EXPECT_EQ(first.substr(first.size() - 11), std::string(11, '\2'));
  EXPECT_NE(read_file(index).find(R"("t1": "model-00001-of-00003.safetensors")"),
            std::string::npos);
}

TEST(SaveShardedStreaming, WritesOneFileWithoutIndexWhenEverythingFits) {
  ScratchDir dir;
  const Items items = tensors_of({1, 2});
  const std::string path =
      save_sharded_streaming(source_of(items), dir.file("ckpt"), meta_of(items), limit(10));
  EXPECT_EQ(path, dir.file("ckpt") + "/model.safetensors");
  EXPECT_EQ(names_in(dir.file("ckpt")), (std::set<std::string>{"model.safetensors"}));
}

TEST(SaveShardedStreaming, AFailingSourceLeavesTheFolderAsItWas) {
  const Items items = tensors_of({6, 11, 3, 6});
  for (std::size_t fail_at = 0; fail_at <= items.size(); ++fail_at) {
    ScratchDir dir;
    write_file(dir.file("model.safetensors"), "old single file");
    write_file(dir.file("model-00001-of-00002.safetensors"), "old shard");
    const auto before = folder(dir.file(""));
    EXPECT_THROW(save_sharded_streaming(source_of(items, fail_at), dir.file(""), meta_of(items),
                                        limit(10)),
                 std::runtime_error);
    EXPECT_EQ(folder(dir.file("")), before) << "failed at item " << fail_at;
  }
}

TEST(SaveShardedStreaming, RejectsATensorMissingAtTheEnd) {
  ScratchDir dir;
  const Items items = tensors_of({6, 6});
  const Items fewer(items.begin(), items.begin() + 1);
  EXPECT_THROW(save_sharded_streaming(source_of(fewer), dir.file(""), meta_of(items), limit(10)),
               ValueError);
  EXPECT_TRUE(names_in(dir.file("")).empty());
}

TEST(SaveShardedStreaming, RejectsATensorThatDiffersFromItsRow) {
  ScratchDir dir;
  const Items items = tensors_of({6, 6});
  std::vector<TensorMeta> meta = meta_of(items);
  meta[1].shape = {5};
  EXPECT_THROW(save_sharded_streaming(source_of(items), dir.file(""), meta, limit(10)),
               ValueError);
  EXPECT_TRUE(names_in(dir.file("")).empty());
}

TEST(SaveShardedStreaming, ReSavingWithFewerShardsLeavesExactlyTheNewSet) {
  ScratchDir dir;
  const Items items = tensors_of({6, 6, 6});
  save_sharded_streaming(source_of(items), dir.file(""), meta_of(items), limit(6));
  save_sharded_streaming(source_of(items), dir.file(""), meta_of(items), limit(12));
  EXPECT_EQ(names_in(dir.file("")),
            (std::set<std::string>{"model-00001-of-00002.safetensors",
                                   "model-00002-of-00002.safetensors",
                                   "model.safetensors.index.json"}));
  save_sharded_streaming(source_of(items), dir.file(""), meta_of(items), limit(100));
  EXPECT_EQ(names_in(dir.file("")), (std::set<std::string>{"model.safetensors"}));
}

TEST(ShardedWriter, WritesOnlyItsFilesAndReleasesTheOthersUntilCommit) {
  ScratchDir dir;
  const Items items = tensors_of({6, 6, 6});
  const ShardPlan plan = plan_shards(meta_of(items), 6);
  ShardedWriter writer(dir.file(""), plan, {1}, {});
  writer.write(source_of(items));
  EXPECT_EQ(names_in(dir.file("")),
            (std::set<std::string>{"model-00002-of-00003.safetensors.tmp"}));
  writer.commit();
  EXPECT_EQ(names_in(dir.file("")), (std::set<std::string>{"model-00002-of-00003.safetensors"}));
}

TEST(ShardedWriter, RemovesItsTemporaryFilesWhenDestroyedUncommitted) {
  ScratchDir dir;
  const Items items = tensors_of({6, 6});
  {
    ShardedWriter writer(dir.file(""), plan_shards(meta_of(items), 6), {0, 1}, {});
    writer.write(source_of(items));
    EXPECT_EQ(names_in(dir.file("")),
              (std::set<std::string>{"model-00001-of-00002.safetensors.tmp",
                                     "model-00002-of-00002.safetensors.tmp"}));
  }
  EXPECT_TRUE(names_in(dir.file("")).empty());
}

TEST(ShardedWriter, HoldsItsFinishedFilesUntilCommitSoNoOtherSaveTakesThem) {
  ScratchDir dir;
  const Items items = tensors_of({6, 6});
  ShardedWriter writer(dir.file(""), plan_shards(meta_of(items), 6), {0, 1}, {});
  writer.write(source_of(items));
  // A second save to the same folder must not take a finished shard for
  // the debris of a killed save and replace it.
  try {
    FileSink other(dir.file("model-00001-of-00002.safetensors.tmp"));
    FAIL() << "expected EBUSY";
  } catch (const OsError& error) {
    EXPECT_EQ(error.error_number(), EBUSY);
  }
  EXPECT_EQ(writer.commit().size(), 2u);
  EXPECT_EQ(names_in(dir.file("")), (std::set<std::string>{"model-00001-of-00002.safetensors",
                                                           "model-00002-of-00002.safetensors"}));
}

TEST(ShardedWriter, OverlapWritesTheSameFiles) {
  ScratchDir in_turn, overlapped;
  const Items items = tensors_of({3 << 20, 12 << 20, 3 << 20, 5 << 20});
  ShardOptions options = limit(8 << 20);
  save_sharded_streaming(source_of(items), in_turn.file(""), meta_of(items), options);
  options.overlap = true;
  save_sharded_streaming(source_of(items), overlapped.file(""), meta_of(items), options);
  EXPECT_EQ(folder(in_turn.file("")), folder(overlapped.file("")));
}

}  // namespace
}  // namespace trinity_stream_saver
