// transpose_to_row_major against the definition, element by element: every
// element width, shapes that leave partial tiles on both edges, and column
// strides larger than the row count (rows of a larger transposed matrix).
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <random>
#include <tuple>
#include <vector>

#include "writer/transpose.h"

namespace trinity_stream_saver {
namespace {

template <typename T>
void check_transpose(std::int64_t rows, std::int64_t cols, std::int64_t column_stride) {
  std::mt19937_64 random(static_cast<std::uint64_t>(rows * 1000003 + cols * 31 + column_stride));
  std::vector<T> source(static_cast<std::size_t>(cols * column_stride));
  for (T& value : source) value = static_cast<T>(random());
  // Poisoned, so that an element the copy skips cannot pass by chance.
  std::vector<T> target(static_cast<std::size_t>(rows * cols), static_cast<T>(0x5A5A5A5A5A5A5A5Aull));

  transpose_to_row_major(source.data(), rows, cols, column_stride, sizeof(T), target.data());

  for (std::int64_t r = 0; r < rows; ++r) {
    for (std::int64_t c = 0; c < cols; ++c) {
      ASSERT_EQ(target[r * cols + c], source[r + c * column_stride])
          << "element (" << r << ", " << c << ") of a " << rows << " x " << cols
          << " matrix with column stride " << column_stride << ", width " << sizeof(T);
    }
  }
}

using Shape = std::tuple<std::int64_t, std::int64_t, std::int64_t>;  // rows, cols, stride

class TransposeShapes : public ::testing::TestWithParam<Shape> {};

TEST_P(TransposeShapes, MatchesTheDefinitionForEveryElementWidth) {
  const auto [rows, cols, extra_stride] = GetParam();
  check_transpose<std::uint8_t>(rows, cols, rows + extra_stride);
  check_transpose<std::uint16_t>(rows, cols, rows + extra_stride);
  check_transpose<std::uint32_t>(rows, cols, rows + extra_stride);
  check_transpose<std::uint64_t>(rows, cols, rows + extra_stride);
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, TransposeShapes,
    ::testing::Values(Shape{2, 2, 0}, Shape{1, 7, 0}, Shape{7, 1, 0}, Shape{16, 16, 0},
                      Shape{64, 64, 0}, Shape{128, 128, 0}, Shape{129, 65, 0},
                      Shape{300, 17, 0}, Shape{17, 300, 0}, Shape{255, 257, 0},
                      Shape{100, 70, 28}, Shape{64, 130, 192}, Shape{33, 1000, 1},
                      Shape{257, 1100, 3}));

TEST(Transpose, EmptyMatricesWriteNothing) {
  std::vector<std::uint16_t> source(4, 1);
  std::vector<std::uint16_t> target(4, 7);
  transpose_to_row_major(source.data(), 0, 4, 1, 2, target.data());
  transpose_to_row_major(source.data(), 4, 0, 4, 2, target.data());
  EXPECT_EQ(target, std::vector<std::uint16_t>(4, 7));
}

}  // namespace
}  // namespace trinity_stream_saver
