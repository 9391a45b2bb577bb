#include "format/header.h"

#include <gtest/gtest.h>

#include <vector>

namespace trinity_stream_saver {
namespace {

const Dtype kBf16 = dtype_of(DtypeId::BF16);

TEST(TensorEntry, IsCompactJsonInSafetensorsKeyOrder) {
  const std::vector<std::int64_t> shape{4, 8};
  EXPECT_EQ(tensor_entry("w", kBf16, shape, 0, 64),
            R"("w":{"dtype":"BF16","shape":[4,8],"data_offsets":[0,64]})");
}

TEST(TensorEntry, WritesScalarsWithEmptyShape) {
  EXPECT_EQ(tensor_entry("s", kBf16, {}, 64, 66),
            R"("s":{"dtype":"BF16","shape":[],"data_offsets":[64,66]})");
}

TEST(TensorEntry, WritesOffsetsBeyond32Bits) {
  const std::vector<std::int64_t> shape{1};
  EXPECT_EQ(tensor_entry("x", kBf16, shape, 5000000000ULL, 5000000002ULL),
            R"("x":{"dtype":"BF16","shape":[1],"data_offsets":[5000000000,5000000002]})");
}

// Expected strings are what Python prints for json.dumps(name).
TEST(TensorEntry, EscapesNamesAsPythonJsonDumpsDoes) {
  const auto key = [](const std::string& name) {
    const std::string entry = tensor_entry(name, kBf16, {}, 0, 2);
    return entry.substr(0, entry.find(":{"));
  };
  EXPECT_EQ(key("plain.name"), R"("plain.name")");
  EXPECT_EQ(key("a\"b\\c/d"), R"("a\"b\\c/d")");
  EXPECT_EQ(key("\b\f\n\r\t"), R"("\b\f\n\r\t")");
  EXPECT_EQ(key(std::string("\x00\x01\x1f", 3)), R"("\u0000\u0001\u001f")");
  EXPECT_EQ(key("\x7f"), R"("\u007f")");
  EXPECT_EQ(key("caf\xc3\xa9"), R"("caf\u00e9")");           // é
  EXPECT_EQ(key("\xe6\x9d\x83\xe9\x87\x8d"), R"("\u6743\u91cd")");  // 权重
  EXPECT_EQ(key("\xf0\x9f\x98\x80"), R"("\ud83d\ude00")");   // U+1F600
  EXPECT_EQ(key(""), R"("")");
}

TEST(MetadataEntry, KeepsTheCallersOrder) {
  const Metadata metadata{{"format", "pt"}, {"b", "2"}, {"a", "1"}};
  EXPECT_EQ(metadata_entry(metadata),
            R"("__metadata__":{"format":"pt","b":"2","a":"1"})");
}

TEST(MetadataEntry, WritesAnEmptyObjectForNoPairs) {
  EXPECT_EQ(metadata_entry({}), R"("__metadata__":{})");
}

TEST(HeaderJson, StartsAsAnEmptyObject) {
  const HeaderJson json;
  EXPECT_EQ(json.str(), "{}");
  EXPECT_EQ(json.size(), 2u);
}

TEST(HeaderJson, JoinsEntriesWithCommas) {
  HeaderJson json;
  json.append(R"("a":1)");
  json.append(R"("b":2)");
  EXPECT_EQ(json.str(), R"({"a":1,"b":2})");
}

TEST(HeaderJson, KnowsItsSizeBeforeAndAfterEachEntry) {
  HeaderJson json;
  const std::string first = R"("a":{"x":1})";
  const std::string second = R"("bb":2)";
  EXPECT_EQ(json.size_with(first), std::string("{" + first + "}").size());
  json.append(first);
  EXPECT_EQ(json.size(), json.str().size());
  EXPECT_EQ(json.size_with(second), std::string("{" + first + "," + second + "}").size());
  json.append(second);
  EXPECT_EQ(json.size(), json.str().size());
}

TEST(PaddedHeaderSize, RoundsUpToAMultipleOfEight) {
  EXPECT_EQ(padded_header_size(2), 8u);
  EXPECT_EQ(padded_header_size(8), 8u);
  EXPECT_EQ(padded_header_size(9), 16u);
  EXPECT_EQ(padded_header_size(63), 64u);
}

TEST(EncodeHeader, PrefixesLittleEndianLengthAndPadsWithSpaces) {
  const std::string bytes = encode_header("{}", 8);
  EXPECT_EQ(bytes, std::string("\x08\0\0\0\0\0\0\0{}      ", 16));
}

TEST(EncodeHeader, WritesAllEightLengthBytes) {
  const std::string bytes = encode_header("{}", 264);
  EXPECT_EQ(bytes.size(), 8u + 264u);
  EXPECT_EQ(static_cast<unsigned char>(bytes[0]), 264 & 0xff);
  EXPECT_EQ(static_cast<unsigned char>(bytes[1]), 264 >> 8);
  for (int i = 2; i < 8; ++i) EXPECT_EQ(bytes[i], '\0');
}

}  // namespace
}  // namespace trinity_stream_saver
