#include "format/file_check.h"

#include <gtest/gtest.h>

#include <string>

#include <trinity_stream_saver/errors.h>
#include <trinity_stream_saver/stream_saver.h>

#include "format/header.h"
#include "test_support.h"

namespace trinity_stream_saver {
namespace {

using testing::ScratchDir;
using testing::write_file;

// What file_check says of a whole file held in memory.
std::optional<std::string> problem_of(const std::string& file) {
  if (std::optional<std::string> problem = check_header_length(file.substr(0, 8), file.size())) {
    return problem;
  }
  const std::uint64_t length = *decode_header_length(file);
  return check_header(std::string_view(file).substr(8, length), file.size());
}

// A file with header `json` (padded as a save pads it) and `data_size` bytes of data.
std::string file_with(const std::string& json, std::size_t data_size) {
  return encode_header(json, padded_header_size(json.size())) + std::string(data_size, 'd');
}

bool mentions(const std::optional<std::string>& problem, const std::string& part) {
  return problem && problem->find(part) != std::string::npos;
}

TEST(FileCheck, AcceptsACompleteFile) {
  const std::string json =
      R"({"__metadata__":{"k":"v"},"b":{"dtype":"F32","shape":[2],"data_offsets":[6,14]},)"
      R"("a":{"dtype":"I16","shape":[3],"data_offsets":[0,6]},)"
      R"("e":{"dtype":"BF16","shape":[0,4],"data_offsets":[14,14]}})";
  EXPECT_EQ(problem_of(file_with(json, 14)), std::nullopt);
}

TEST(FileCheck, CountsF4ShapesInValuesAsTheHeaderWritesThem) {
  // torch shape [2, 3] of float4_e2m1fn_x2: 6 bytes, written as shape [2, 6].
  const std::string json = R"({"p":{"dtype":"F4","shape":[2,6],"data_offsets":[0,6]}})";
  EXPECT_EQ(problem_of(file_with(json, 6)), std::nullopt);
  const std::string packed = R"({"p":{"dtype":"F4","shape":[2,3],"data_offsets":[0,6]}})";
  EXPECT_TRUE(mentions(problem_of(file_with(packed, 6)), "need 3 bytes"));
}

TEST(FileCheck, AFileShorterThanEightBytesHasNoHeaderLength) {
  EXPECT_TRUE(mentions(problem_of("abc"), "fewer than the 8"));
}

TEST(FileCheck, AZeroHeaderLengthIsAFileNeverFinished) {
  EXPECT_TRUE(mentions(problem_of(std::string(64, '\0')), "never finished"));
}

TEST(FileCheck, AHeaderLengthBeyondTheEndOfTheFileIsCutShort) {
  const std::string file = file_with(R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}})", 1);
  EXPECT_TRUE(mentions(problem_of(file.substr(0, 20)), "beyond the end"));
}

TEST(FileCheck, AHeaderLongerThanSafetensorsReadsIsRefused) {
  std::string prefix(8, '\0');
  const std::uint64_t length = kMaxHeaderBytes + 8;
  for (int i = 0; i < 8; ++i) prefix[i] = static_cast<char>((length >> (8 * i)) & 0xff);
  EXPECT_TRUE(mentions(check_header_length(prefix, length * 2), "100000000"));
}

TEST(FileCheck, AHeaderThatIsNotAJsonObjectIsRefused) {
  EXPECT_TRUE(mentions(problem_of(file_with(R"({"a":)", 0)), "not valid JSON"));
  EXPECT_TRUE(mentions(problem_of(file_with("[1,2]", 0)), "not an object"));
  EXPECT_TRUE(mentions(problem_of(file_with(R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}} x)", 1)),
                       "not valid JSON"));
}

TEST(FileCheck, AnEntryWithoutAKnownDtypeShapeOrOffsetsIsRefused) {
  EXPECT_TRUE(mentions(problem_of(file_with(R"({"a":{"dtype":"Q7","shape":[1],"data_offsets":[0,1]}})", 1)),
                       "unknown dtype 'Q7'"));
  EXPECT_TRUE(mentions(problem_of(file_with(R"({"a":{"shape":[1],"data_offsets":[0,1]}})", 1)),
                       "no \"dtype\""));
  EXPECT_TRUE(mentions(problem_of(file_with(R"({"a":{"dtype":"U8","data_offsets":[0,1]}})", 1)),
                       "no \"shape\""));
  EXPECT_TRUE(mentions(problem_of(file_with(R"({"a":{"dtype":"U8","shape":[-1],"data_offsets":[0,1]}})", 1)),
                       "not a size"));
  EXPECT_TRUE(mentions(problem_of(file_with(R"({"a":{"dtype":"U8","shape":[1]}})", 1)),
                       "no \"data_offsets\""));
  EXPECT_TRUE(mentions(problem_of(file_with(R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[0]}})", 1)),
                       "no \"data_offsets\""));
}

TEST(FileCheck, OffsetsThatDoNotMatchTheDtypeAndShapeAreRefused) {
  const std::string json = R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}})";
  EXPECT_TRUE(mentions(problem_of(file_with(json, 4)), "need 8 bytes"));
}

TEST(FileCheck, AGapOrAnOverlapBetweenTensorsIsRefused) {
  const std::string gap = R"({"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},)"
                          R"("b":{"dtype":"U8","shape":[2],"data_offsets":[3,5]}})";
  EXPECT_TRUE(mentions(problem_of(file_with(gap, 5)), "(a gap)"));
  const std::string overlap = R"({"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},)"
                              R"("b":{"dtype":"U8","shape":[2],"data_offsets":[1,3]}})";
  EXPECT_TRUE(mentions(problem_of(file_with(overlap, 3)), "overlap"));
  const std::string late_start = R"({"a":{"dtype":"U8","shape":[2],"data_offsets":[1,3]}})";
  EXPECT_TRUE(mentions(problem_of(file_with(late_start, 3)), "(a gap)"));
}

TEST(FileCheck, DataThatDoesNotEndWithTheLastTensorIsRefused) {
  const std::string json = R"({"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}})";
  EXPECT_TRUE(mentions(problem_of(file_with(json, 3)), "cut short"));
  EXPECT_TRUE(mentions(problem_of(file_with(json, 5)), "extra bytes"));
}

TEST(FileCheck, MetadataMustMapStringsToStrings) {
  EXPECT_TRUE(mentions(problem_of(file_with(R"({"__metadata__":{"k":1}})", 0)), "strings only"));
  EXPECT_TRUE(mentions(problem_of(file_with(R"({"__metadata__":[]})", 0)), "not an object"));
}

TEST(CheckSafetensorsFile, NamesTheFileAndTheProblem) {
  ScratchDir dir;
  write_file(dir.file("cut"), file_with(R"({"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}})", 2));
  try {
    check_safetensors_file(dir.file("cut"));
    FAIL() << "expected ValueError";
  } catch (const ValueError& error) {
    const std::string message = error.what();
    EXPECT_NE(message.find(dir.file("cut")), std::string::npos) << message;
    EXPECT_NE(message.find("cut short"), std::string::npos) << message;
  }
}

TEST(CheckSafetensorsFile, AcceptsACompleteFileAndReportsAMissingOne) {
  ScratchDir dir;
  write_file(dir.file("ok"), testing::safetensors_file("four"));
  EXPECT_NO_THROW(check_safetensors_file(dir.file("ok")));
  EXPECT_THROW(check_safetensors_file(dir.file("missing")), OsError);
}

}  // namespace
}  // namespace trinity_stream_saver
