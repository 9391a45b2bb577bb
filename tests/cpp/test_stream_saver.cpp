// The public C++ API, as a LibTorch program calls it.
#include <trinity_stream_saver/stream_saver.h>

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "test_support.h"

namespace trinity_stream_saver {
namespace {

using testing::exists;
using testing::read_file;
using testing::safetensors_file;
using testing::ScratchDir;
using testing::write_file;

using Item = std::pair<std::string, at::Tensor>;

// A TensorSource over `items`, counting how many it handed out.
TensorSource source_of(std::vector<Item> items, std::size_t* handed_out = nullptr) {
  return [items = std::move(items), next = std::size_t{0}, handed_out]() mutable
         -> std::optional<Item> {
    if (next == items.size()) return std::nullopt;
    if (handed_out != nullptr) *handed_out = next + 1;
    return items[next++];
  };
}

std::vector<TensorMeta> meta_of(const std::vector<Item>& items) {
  std::vector<TensorMeta> meta;
  for (const auto& [name, tensor] : items) meta.push_back(tensor_meta(name, tensor));
  return meta;
}

std::vector<Item> sample_items() {
  return {{"a", at::arange(6, at::kShort).reshape({2, 3})},
          {"big", at::arange(1 << 20, at::kFloat)},  // over the overlap inline threshold
          {"t", at::arange(12, at::kDouble).reshape({3, 4}).t()},
          {"b", at::tensor({1.5}, at::kFloat).reshape({})}};
}

TEST(StreamSaver, WritesTheExactFileAndReturnsItsPath) {
  ScratchDir dir;
  const at::Tensor a = at::arange(6, at::kShort).reshape({2, 3});
  const std::vector<Item> items{{"a", a}};
  SaveOptions options;
  options.metadata = Metadata{{"format", "pt"}};
  EXPECT_EQ(save_safetensors_streaming(source_of(items), dir.file("f"), meta_of(items), options),
            dir.file("f"));
  const std::string json =
      R"({"__metadata__":{"format":"pt"},"a":{"dtype":"I16","shape":[2,3],"data_offsets":[0,12]}})";
  const std::size_t reserved = (json.size() + 7) / 8 * 8;
  std::string expected(8, '\0');
  expected[0] = static_cast<char>(reserved);
  expected += json + std::string(reserved - json.size(), ' ');
  expected.append(static_cast<const char*>(a.const_data_ptr()), 12);
  EXPECT_EQ(read_file(dir.file("f")), expected);
  EXPECT_FALSE(exists(dir.file("f.tmp")));
}

TEST(StreamSaver, OverlapWritesTheSameBytesAsInTurn) {
  ScratchDir dir;
  const std::vector<Item> items = sample_items();
  save_safetensors_streaming(source_of(items), dir.file("in_turn"), meta_of(items));
  SaveOptions overlap;
  overlap.overlap = true;
  save_safetensors_streaming(source_of(items), dir.file("overlap"), meta_of(items), overlap);
  EXPECT_EQ(read_file(dir.file("overlap")), read_file(dir.file("in_turn")));
}

TEST(StreamSaver, WithoutRenameLeavesTheTemporaryFileForFinalize) {
  ScratchDir dir;
  const std::vector<Item> items = sample_items();
  SaveOptions options;
  options.rename = false;
  const std::string temp =
      save_safetensors_streaming(source_of(items), dir.file("f"), meta_of(items), options);
  EXPECT_EQ(temp, dir.file("f") + ".tmp");
  EXPECT_FALSE(exists(dir.file("f")));
  const std::string bytes = read_file(temp);
  EXPECT_EQ(finalize(temp, dir.file("f"), /*fsync=*/true), dir.file("f"));
  EXPECT_EQ(read_file(dir.file("f")), bytes);
  EXPECT_FALSE(exists(temp));
}

class StreamSaverFailure : public ::testing::TestWithParam<bool> {};

TEST_P(StreamSaverFailure, ABadTensorIsAValueErrorNamingItAndNothingIsLost) {
  ScratchDir dir;
  write_file(dir.file("f"), "old checkpoint");
  std::vector<Item> items = sample_items();
  const std::vector<TensorMeta> meta = meta_of(items);
  items[2].second = at::zeros({3, 4}, at::kComplexDouble);  // no safetensors dtype
  SaveOptions options;
  options.overlap = GetParam();
  try {
    save_safetensors_streaming(source_of(items), dir.file("f"), meta, options);
    FAIL() << "expected a ValueError";
  } catch (const ValueError& error) {
    EXPECT_NE(std::string(error.what()).find("'t'"), std::string::npos) << error.what();
  }
  EXPECT_EQ(read_file(dir.file("f")), "old checkpoint");
  EXPECT_FALSE(exists(dir.file("f.tmp")));
}

TEST_P(StreamSaverFailure, WhatTheSourceThrowsPropagatesAndNothingIsLost) {
  ScratchDir dir;
  write_file(dir.file("f"), "old checkpoint");
  const std::vector<Item> items = sample_items();
  TensorSource inner = source_of(items);
  std::size_t calls = 0;
  SaveOptions options;
  options.overlap = GetParam();
  EXPECT_THROW(save_safetensors_streaming(
                   [&]() -> std::optional<Item> {
                     if (++calls == 3) throw std::runtime_error("producer failed");
                     return inner();
                   },
                   dir.file("f"), meta_of(items), options),
               std::runtime_error);
  EXPECT_EQ(read_file(dir.file("f")), "old checkpoint");
  EXPECT_FALSE(exists(dir.file("f.tmp")));
}

INSTANTIATE_TEST_SUITE_P(Modes, StreamSaverFailure, ::testing::Values(false, true),
                         [](const auto& info) { return info.param ? "Overlap" : "InTurn"; });

// In turn, poll runs between the chunks of a large tensor (in overlap mode it
// runs while the caller waits for the writer thread, which may not happen).
TEST(StreamSaver, WhatPollThrowsBetweenChunksCancelsTheSave) {
  ScratchDir dir;
  const std::vector<Item> items{{"large", at::zeros({(96 << 20) / 4}, at::kFloat)}};
  SaveOptions options;
  options.poll = [] { throw std::runtime_error("cancelled"); };
  EXPECT_THROW(save_safetensors_streaming(source_of(items), dir.file("f"), meta_of(items), options),
               std::runtime_error);
  EXPECT_FALSE(exists(dir.file("f")));
  EXPECT_FALSE(exists(dir.file("f.tmp")));
}

TEST(StreamSaver, AMissingDirectoryIsAnOsErrorWithErrnoAndPath) {
  ScratchDir dir;
  const std::vector<Item> items = sample_items();
  try {
    save_safetensors_streaming(source_of(items), dir.file("missing/f"), meta_of(items));
    FAIL() << "expected an OsError";
  } catch (const OsError& error) {
    EXPECT_EQ(error.error_number(), ENOENT);
    EXPECT_EQ(error.path(), dir.file("missing/"));
  }
}

TEST(StreamSaver, TensorMetaDescribesATensorAndRefusesDtypesSafetensorsLacks) {
  const TensorMeta meta = tensor_meta("w", at::zeros({2, 3}, at::kBFloat16));
  EXPECT_EQ(meta.name, "w");
  EXPECT_EQ(meta.dtype, "BF16");
  EXPECT_EQ(meta.shape, (std::vector<std::int64_t>{2, 3}));
  EXPECT_THROW(tensor_meta("c", at::zeros({2}, at::kComplexDouble)), ValueError);
}

TEST(StreamSaver, ReleasesEachTensorBeforeAskingForTheNext) {
  ScratchDir dir;
  std::vector<TensorMeta> meta;
  for (int i = 0; i < 4; ++i) meta.push_back({"t" + std::to_string(i), "F32", {1024}});
  c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl> previous{
      c10::intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>()};
  int next = 0;
  bool previous_alive = false;
  save_safetensors_streaming(
      [&]() -> std::optional<Item> {
        if (next > 0 && !previous.expired()) previous_alive = true;
        if (next == 4) return std::nullopt;
        at::Tensor tensor = at::zeros({1024}, at::kFloat);
        previous = tensor.getIntrusivePtr();
        return Item{"t" + std::to_string(next++), std::move(tensor)};
      },
      dir.file("f"), meta);
  EXPECT_FALSE(previous_alive);
}

TEST(StreamSaver, ReservedHeaderSizeAndDataSizeDescribeTheFileASaveWrites) {
  ScratchDir dir;
  const std::vector<Item> items = sample_items();
  const Metadata metadata{{"format", "pt"}};
  SaveOptions options;
  options.metadata = metadata;
  save_safetensors_streaming(source_of(items), dir.file("f"), meta_of(items), options);
  const std::string file = read_file(dir.file("f"));
  std::uint64_t header = 0;
  for (int i = 7; i >= 0; --i) header = (header << 8) | static_cast<unsigned char>(file[i]);
  EXPECT_EQ(reserved_header_size(meta_of(items), metadata), header);
  EXPECT_EQ(data_size(meta_of(items)), file.size() - 8 - header);
  EXPECT_LT(reserved_header_size(meta_of(items)), header);  // without the metadata
}

TEST(StreamSaver, CollectStateDictMetaGivesTheRowsOfStorableTensorsInOrder) {
  std::vector<Item> items = sample_items();
  items.insert(items.begin() + 1, {"complex", at::zeros({2}, at::kComplexDouble)});
  std::size_t handed_out = 0;
  const std::vector<TensorMeta> rows = collect_state_dict_meta(source_of(items, &handed_out));
  EXPECT_EQ(handed_out, items.size());
  ASSERT_EQ(rows.size(), 4u);
  const std::vector<TensorMeta> expected = meta_of(sample_items());
  for (std::size_t i = 0; i < rows.size(); ++i) {
    EXPECT_EQ(rows[i].name, expected[i].name);
    EXPECT_EQ(rows[i].dtype, expected[i].dtype);
    EXPECT_EQ(rows[i].shape, expected[i].shape);
  }
}

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

}  // namespace
}  // namespace trinity_stream_saver
