#include "format/dtype.h"

#include <gtest/gtest.h>

namespace trinity_stream_saver {
namespace {

TEST(Dtype, FindsEveryDtypeByItsHeaderName) {
  for (const Dtype& dtype : supported_dtypes()) {
    const std::optional<Dtype> found = find_dtype(dtype.name);
    ASSERT_TRUE(found.has_value()) << dtype.name;
    EXPECT_EQ(found->bits, dtype.bits);
  }
}

TEST(Dtype, KnowsTheWidthsSafetensorsUses) {
  EXPECT_EQ(find_dtype("BOOL")->bits, 8);
  EXPECT_EQ(find_dtype("BF16")->bits, 16);
  EXPECT_EQ(find_dtype("F32")->bits, 32);
  EXPECT_EQ(find_dtype("C64")->bits, 64);
  EXPECT_EQ(find_dtype("U64")->bits, 64);
  EXPECT_EQ(find_dtype("F8_E8M0")->bits, 8);
  EXPECT_EQ(find_dtype("F4")->bits, 4);
}

TEST(Dtype, RejectsUnknownAndTorchSpelledNames) {
  EXPECT_FALSE(find_dtype("bfloat16").has_value());
  EXPECT_FALSE(find_dtype("bf16").has_value());
  EXPECT_FALSE(find_dtype("C128").has_value());
  EXPECT_FALSE(find_dtype("").has_value());
}

TEST(Dtype, ListsSupportedNamesForErrorMessages) {
  const std::string names = supported_dtype_names();
  EXPECT_EQ(names.rfind("BOOL, U8, I8, ", 0), 0u) << names;
  EXPECT_NE(names.find("BF16"), std::string::npos);
  EXPECT_NE(names.find("F8_E4M3"), std::string::npos);
}

TEST(Dtype, ByteSizeMultipliesElementsByWidth) {
  EXPECT_EQ(byte_size(*find_dtype("BF16"), 6), 12u);
  EXPECT_EQ(byte_size(*find_dtype("F64"), 0), 0u);
  EXPECT_EQ(byte_size(*find_dtype("F4"), 12), 6u);
}

TEST(Dtype, ByteSizeRefusesSubByteCountsThatEndMidByte) {
  EXPECT_FALSE(byte_size(*find_dtype("F4"), 3).has_value());
}

TEST(Dtype, ByteSizeCountsUpTo64BitsAndRefusesMore) {
  EXPECT_EQ(byte_size(*find_dtype("U8"), std::uint64_t{1} << 63), std::uint64_t{1} << 63);
  EXPECT_EQ(byte_size(*find_dtype("F64"), std::uint64_t{1} << 60), std::uint64_t{1} << 63);
  EXPECT_FALSE(byte_size(*find_dtype("F64"), std::uint64_t{1} << 61).has_value());
}

}  // namespace
}  // namespace trinity_stream_saver
