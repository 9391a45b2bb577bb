#include "writer/tensor_writer.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include <trinity_stream_saver/errors.h>
#include "test_support.h"

namespace trinity_stream_saver {
namespace {

using testing::exists;
using testing::in_memory_filesystem;
using testing::read_file;
using testing::ScratchDir;
using testing::write_file;

std::string bytes_of(const at::Tensor& tensor) {
  const at::Tensor contiguous = tensor.contiguous();
  return std::string(static_cast<const char*>(contiguous.const_data_ptr()),
                     contiguous.numel() * contiguous.element_size());
}

// The message of the ValueError that `action` throws, or "" if none.
template <typename Action>
std::string value_error(Action action) {
  try {
    action();
  } catch (const ValueError& error) {
    return error.what();
  }
  return "";
}

bool contains(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

TEST(TensorWriter, WritesTheExactFile) {
  ScratchDir dir;
  const at::Tensor a = at::arange(6, at::kShort).reshape({2, 3});
  const at::Tensor b = at::tensor({1.5}, at::kFloat).reshape({});
  {
    TensorWriter writer(dir.file("f.tmp"), {{"a", "I16", {2, 3}}, {"b", "F32", {}}}, {});
    writer.write("a", a);
    writer.write("b", b);
    writer.close_and_rename(dir.file("f"), /*sync=*/false);
  }
  const std::string json =
      R"({"a":{"dtype":"I16","shape":[2,3],"data_offsets":[0,12]},)"
      R"("b":{"dtype":"F32","shape":[],"data_offsets":[12,16]}})";
  const std::size_t reserved = (json.size() + 7) / 8 * 8;
  std::string expected(8, '\0');
  expected[0] = static_cast<char>(reserved);
  expected += json + std::string(reserved - json.size(), ' ') + bytes_of(a) + bytes_of(b);
  EXPECT_EQ(read_file(dir.file("f")), expected);
  EXPECT_FALSE(exists(dir.file("f.tmp")));
}

TEST(TensorWriter, ReservesTheHeaderTheMetadataDescribes) {
  ScratchDir dir;
  // {"__metadata__":{"k":"v"},"w":{"dtype":"BF16","shape":[4,8],"data_offsets":[0,64]}}
  const std::string json =
      R"({"__metadata__":{"k":"v"},"w":{"dtype":"BF16","shape":[4,8],"data_offsets":[0,64]}})";
  TensorWriter writer(dir.file("f.tmp"), {{"w", "BF16", {4, 8}}}, Metadata{{"k", "v"}});
  EXPECT_EQ(writer.reserved_header_size(), (json.size() + 7) / 8 * 8);
}

TEST(TensorWriter, WritesEmptyMetadataAsAnEmptyObjectAsSafetensorsDoes) {
  ScratchDir dir;
  {
    TensorWriter writer(dir.file("f.tmp"), {}, Metadata{});
    writer.close_and_keep(/*sync=*/false);
  }
  EXPECT_EQ(read_file(dir.file("f.tmp")).substr(8), R"({"__metadata__":{}}     )");
}

TEST(TensorWriter, WritesNoMetadataEntryWithoutMetadata) {
  ScratchDir dir;
  {
    TensorWriter writer(dir.file("f.tmp"), {}, std::nullopt);
    writer.close_and_keep(/*sync=*/false);
  }
  EXPECT_EQ(read_file(dir.file("f.tmp")).substr(8), "{}      ");
}

// On disk; in memory (TMPDIR on a tmpfs) free space is checked instead.
TEST(TensorWriter, PreallocatesTheWholeFileTheMetadataDescribes) {
  ScratchDir dir;
  TensorWriter writer(dir.file("f.tmp"), {{"a", "F32", {1000}}, {"b", "I64", {10}}}, std::nullopt);
  const std::uintmax_t expected =
      in_memory_filesystem(dir.path()) ? 0 : 8 + writer.reserved_header_size() + 4000 + 80;
  EXPECT_EQ(std::filesystem::file_size(dir.file("f.tmp")), expected);
}

TEST(TensorWriter, CutsPreallocatedSpaceThatNoTensorFilled) {
  ScratchDir dir;
  std::uint64_t reserved = 0;
  {
    // The meta describes a larger tensor than the one written.
    TensorWriter writer(dir.file("f.tmp"), {{"a", "F32", {1000}}, {"b", "I64", {1000}}}, std::nullopt);
    writer.write("a", at::ones({1000}));
    writer.write("b", at::ones({10}, at::kLong));
    reserved = writer.reserved_header_size();
    writer.close_and_keep(/*sync=*/false);
  }
  EXPECT_EQ(std::filesystem::file_size(dir.file("f.tmp")), 8 + reserved + 4080);
}

TEST(TensorWriter, RefusesToFinishWithFewerTensorsThanMetaRowsAndNamesTheMissingOnes) {
  ScratchDir dir;
  std::string message;
  {
    TensorWriter writer(dir.file("f.tmp"), {{"a", "F32", {2}}, {"b", "F32", {2}}, {"c", "F32", {2}}},
                        std::nullopt);
    writer.write("a", at::ones({2}));
    message = value_error([&] { writer.close_and_keep(/*sync=*/false); });
  }
  EXPECT_NE(message.find("stopped after 1 tensors, but state_dict_meta lists 3: 2 missing"),
            std::string::npos) << message;
  EXPECT_NE(message.find("'b', 'c'"), std::string::npos) << message;
  EXPECT_FALSE(testing::exists(dir.file("f.tmp")));
}

TEST(TensorWriter, CountsRenamedTensorsAsTheRowsTheyStandFor) {
  ScratchDir dir;
  {
    TensorWriter writer(dir.file("f.tmp"), {{"model.a", "F32", {2}}}, std::nullopt);
    writer.write("a", at::ones({2}));
    writer.close_and_keep(/*sync=*/false);
  }
  EXPECT_TRUE(testing::exists(dir.file("f.tmp")));
}

TEST(TensorWriter, WritesNonContiguousTensorsInCOrder) {
  ScratchDir dir;
  const at::Tensor base = at::arange(24, at::kInt).reshape({2, 3, 4});
  const std::vector<at::Tensor> views{
      base.transpose(0, 2), base.slice(2, 0, 4, 2), at::arange(3, at::kInt).expand({4, 3})};
  std::vector<TensorMeta> meta;
  for (std::size_t i = 0; i < views.size(); ++i) {
    meta.push_back({"v" + std::to_string(i), "I32", views[i].sizes().vec()});
  }
  {
    TensorWriter writer(dir.file("f.tmp"), meta, {});
    for (std::size_t i = 0; i < views.size(); ++i) writer.write(meta[i].name, views[i]);
    writer.close_and_keep(/*sync=*/false);
  }
  const std::string file = read_file(dir.file("f.tmp"));
  std::string data;
  for (const at::Tensor& view : views) data += bytes_of(view);
  EXPECT_EQ(file.substr(file.size() - data.size()), data);
}

TEST(TensorWriter, WritesALargeNonContiguousTensorInBoundedPieces) {
  ScratchDir dir;
  // 80 MiB transposed: more than one staging buffer, rows copied in runs.
  const at::Tensor base = at::randint(0, 255, {1024, 80 * 1024}, at::kByte);
  const at::Tensor view = base.t();
  int chunk_calls = 0;
  {
    TensorWriter writer(dir.file("f.tmp"), {{"t", "U8", view.sizes().vec()}}, {},
                        [&] { ++chunk_calls; });
    writer.write("t", view);
    writer.close_and_keep(/*sync=*/false);
  }
  EXPECT_GE(chunk_calls, 1);
  const std::string file = read_file(dir.file("f.tmp"));
  const std::string data = bytes_of(view);
  EXPECT_TRUE(file.compare(file.size() - data.size(), data.size(), data) == 0);
}

TEST(TensorWriter, CallsBackBetweenChunksOfALargeContiguousTensor) {
  ScratchDir dir;
  const at::Tensor big = at::zeros({static_cast<std::int64_t>(TensorWriter::kChunkBytes) * 2 + 1},
                                   at::kByte);
  int chunk_calls = 0;
  TensorWriter writer(dir.file("f.tmp"), {{"big", "U8", big.sizes().vec()}}, {},
                      [&] { ++chunk_calls; });
  writer.write("big", big);
  EXPECT_EQ(chunk_calls, 2);
}

TEST(TensorWriter, AnExceptionBetweenChunksAbandonsTheFile) {
  ScratchDir dir;
  const at::Tensor big =
      at::zeros({static_cast<std::int64_t>(TensorWriter::kChunkBytes) + 1}, at::kByte);
  struct Interrupted {};
  {
    TensorWriter writer(dir.file("f.tmp"), {{"big", "U8", big.sizes().vec()}}, {},
                        [] { throw Interrupted{}; });
    EXPECT_THROW(writer.write("big", big), Interrupted);
  }
  EXPECT_FALSE(exists(dir.file("f.tmp")));
}

TEST(TensorWriter, DestroyedUnfinishedRemovesItsTemporaryFile) {
  ScratchDir dir;
  write_file(dir.file("f"), "previous checkpoint");
  {
    TensorWriter writer(dir.file("f.tmp"), {{"a", "F32", {2}}}, {});
    writer.write("a", at::ones({2}));
    ASSERT_TRUE(exists(dir.file("f.tmp")));
  }
  EXPECT_FALSE(exists(dir.file("f.tmp")));
  EXPECT_EQ(read_file(dir.file("f")), "previous checkpoint");
}

TEST(TensorWriter, RejectsATensorThatOverflowsTheReservedHeader) {
  ScratchDir dir;
  TensorWriter writer(dir.file("f.tmp"), {{"a", "F32", {1}}}, {});
  writer.write("a", at::ones({1}));
  const std::string message = value_error([&] { writer.write("much_longer_name", at::ones({1})); });
  EXPECT_TRUE(contains(message, "'much_longer_name'")) << message;
  EXPECT_TRUE(contains(message, "does not describe")) << message;
}

TEST(TensorWriter, WritesATensorUnlikeItsRowAsItIsWhileTheHeaderFits) {
  ScratchDir dir;
  // The row says BF16 [4] (8 bytes); the tensor is F32 [2] (8 bytes too):
  // its entry is no longer, so it is written and described as it is.
  const at::Tensor a = at::tensor({1.5f, -2.0f});
  {
    TensorWriter writer(dir.file("f.tmp"), {{"a", "BF16", {4}}}, {});
    writer.write("a", a);
    writer.close_and_rename(dir.file("f"), /*sync=*/false);
  }
  const std::string planned = R"({"a":{"dtype":"BF16","shape":[4],"data_offsets":[0,8]}})";
  const std::string json = R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
  const std::size_t reserved = (planned.size() + 7) / 8 * 8;
  std::string expected(8, '\0');
  expected[0] = static_cast<char>(reserved);
  expected += json + std::string(reserved - json.size(), ' ') + bytes_of(a);
  EXPECT_EQ(read_file(dir.file("f")), expected);
}

TEST(TensorWriter, RejectsATensorUnlikeItsRowWhoseEntryOutgrowsTheReservedHeader) {
  ScratchDir dir;
  TensorWriter writer(dir.file("f.tmp"), {{"a", "BF16", {4}}}, {});
  const at::Tensor large = at::zeros({1}, at::kByte).expand({123456789});
  const std::string message = value_error([&] { writer.write("a", large); });
  EXPECT_TRUE(contains(message, "'a' (U8, shape [123456789]) does not fit in the header "
                                "reserved from state_dict_meta")) << message;
  EXPECT_TRUE(contains(message, "differ from its row in dtype or shape only while the header "
                                "still fits")) << message;
}

TEST(TensorWriter, RejectsDuplicateAndReservedNames) {
  ScratchDir dir;
  TensorWriter writer(dir.file("f.tmp"), {{"a", "F32", {1}}, {"b", "F32", {1}}}, {});
  writer.write("a", at::ones({1}));
  EXPECT_TRUE(contains(value_error([&] { writer.write("a", at::ones({1})); }), "duplicate"));
  EXPECT_TRUE(contains(value_error([&] { writer.write("__metadata__", at::ones({1})); }),
                       "reserved"));
}

TEST(TensorWriter, RejectsUnsupportedTensors) {
  ScratchDir dir;
  TensorWriter writer(dir.file("f.tmp"), {{"a", "F32", {1}}}, {});
  const std::string dtype = value_error([&] { writer.write("c", at::ones({1}, at::kComplexDouble)); });
  EXPECT_TRUE(contains(dtype, "'c'") && contains(dtype, "BF16")) << dtype;
  const std::string device =
      value_error([&] { writer.write("m", at::empty({1}, at::TensorOptions().device(at::kMeta))); });
  EXPECT_TRUE(contains(device, "'m'") && contains(device, "meta") && contains(device, "CPU"))
      << device;
  const std::string sparse = value_error([&] { writer.write("s", at::ones({2, 2}).to_sparse()); });
  EXPECT_TRUE(contains(sparse, "'s'") && contains(sparse, "to_dense")) << sparse;
}

TEST(TensorWriter, RefusesEveryCallAfterAWriteFailedMidway) {
  ScratchDir dir;
  const std::int64_t size = static_cast<std::int64_t>(TensorWriter::kChunkBytes) + 1;
  struct Stop {};
  {
    TensorWriter writer(dir.file("f.tmp"), {{"big", "U8", {size}}, {"small", "U8", {1}}}, {},
                        [] { throw Stop{}; });  // after the first chunk is written
    EXPECT_THROW(writer.write("big", at::zeros({size}, at::kByte)), Stop);
    const std::string refused = value_error([&] { writer.write("small", at::zeros({1}, at::kByte)); });
    EXPECT_TRUE(contains(refused, "incomplete") && contains(refused, "'small'")) << refused;
    EXPECT_TRUE(contains(value_error([&] { writer.close_and_keep(/*sync=*/false); }), "incomplete"));
  }
  EXPECT_FALSE(exists(dir.file("f.tmp")));
}

TEST(TensorWriter, StaysUsableAfterATensorIsRejectedBeforeAnyByteIsWritten) {
  ScratchDir dir;
  {
    TensorWriter writer(dir.file("f.tmp"), {{"a", "F32", {1}}}, {});
    EXPECT_FALSE(value_error([&] { writer.write("a", at::ones({1}, at::kComplexDouble)); }).empty());
    writer.write("a", at::ones({1}));
    writer.close_and_keep(/*sync=*/false);
  }
  EXPECT_TRUE(contains(read_file(dir.file("f.tmp")), R"("a":{"dtype":"F32")"));
}

TEST(TensorWriter, RejectsBadMetadataBeforeCreatingAFile) {
  ScratchDir dir;
  const std::string path = dir.file("f.tmp");
  EXPECT_TRUE(contains(value_error([&] { TensorWriter(path, {{"a", "X9", {1}}}, {}); }), "X9"));
  EXPECT_TRUE(contains(value_error([&] { TensorWriter(path, {{"a", "F32", {-1}}}, {}); }),
                       "negative"));
  EXPECT_TRUE(contains(
      value_error([&] { TensorWriter(path, {{"a", "F32", {1}}, {"a", "F32", {1}}}, {}); }),
      "duplicate"));
  EXPECT_TRUE(contains(value_error([&] { TensorWriter(path, {{"a", "F4", {}}}, {}); }), "0-dim"));
  const std::string huge_name(60'000'000, 'n');
  EXPECT_TRUE(contains(
      value_error([&] { TensorWriter(path, {{huge_name, "F32", {1}}, {huge_name + "2", "F32", {1}}}, {}); }),
      "100000000"));
  EXPECT_FALSE(exists(path));
}

TEST(TensorWriter, WritesFloat4WithTheUnpackedShape) {
  ScratchDir dir;
  const at::Tensor packed = at::zeros({2, 3}, at::kByte).view(at::ScalarType::Float4_e2m1fn_x2);
  {
    TensorWriter writer(dir.file("f.tmp"), {{"p", "F4", {2, 3}}}, {});
    writer.write("p", packed);
    writer.close_and_keep(/*sync=*/false);
  }
  EXPECT_TRUE(contains(read_file(dir.file("f.tmp")),
                       R"("p":{"dtype":"F4","shape":[2,6],"data_offsets":[0,6]})"));
}

}  // namespace
}  // namespace trinity_stream_saver

// ---- In order, to a sequential sink ----

namespace trinity_stream_saver {
namespace {

struct StringSink final : SequentialSink {
  std::string bytes;
  void append(const void* data, std::size_t size) override {
    bytes.append(static_cast<const char*>(data), size);
  }
};

TEST(TensorWriterInOrder, WritesTheSameBytesAsTheFileWriter) {
  ScratchDir dir;
  const at::Tensor a = at::arange(12, at::kFloat).reshape({3, 4});
  const at::Tensor b = at::arange(6, at::kShort).reshape({2, 3}).t();
  const std::vector<TensorMeta> meta{{"a", "F32", {3, 4}}, {"b", "I16", {3, 2}}};
  const Metadata metadata{{"k", "v"}};
  TensorWriter file(dir.file("x.safetensors.tmp"), meta, metadata);
  file.write("a", a);
  file.write("b", b);
  file.close_and_rename(dir.file("x.safetensors"), false);
  StringSink sink;
  TensorWriter in_order(sink, meta, metadata);
  in_order.write("a", a);
  in_order.write("b", b);
  in_order.finish_in_order();
  EXPECT_EQ(sink.bytes, read_file(dir.file("x.safetensors")));
}

TEST(TensorWriterInOrder, RefusesATensorThatDiffersFromItsRowBeforeWritingIt) {
  StringSink sink;
  TensorWriter writer(sink, {{"a", "F32", {4}}, {"b", "F32", {2}}}, std::nullopt);
  writer.write("a", at::zeros({4}));
  const std::size_t before = sink.bytes.size();
  const std::string message = value_error([&] { writer.write("b", at::zeros({3})); });
  EXPECT_TRUE(contains(message, "differs from row 'b'")) << message;
  EXPECT_EQ(sink.bytes.size(), before);
}

TEST(TensorWriterInOrder, RefusesToFinishBeforeEveryRowIsWritten) {
  StringSink sink;
  TensorWriter writer(sink, {{"a", "F32", {4}}, {"b", "F32", {2}}}, std::nullopt);
  writer.write("a", at::zeros({4}));
  const std::string message = value_error([&] { writer.finish_in_order(); });
  EXPECT_TRUE(contains(message, "stopped after 1 tensors")) << message;
}

}  // namespace
}  // namespace trinity_stream_saver
