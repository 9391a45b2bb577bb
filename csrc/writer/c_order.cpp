#include "writer/c_order.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "writer/transpose.h"

namespace trinity_stream_saver {

namespace {

// The integer dtype as wide as one element of a tensor (1, 2, 4 or 8 bytes).
c10::ScalarType same_width_integer(std::size_t element_size) {
  switch (element_size) {
    case 1: return c10::ScalarType::Byte;
    case 2: return c10::ScalarType::Short;
    case 4: return c10::ScalarType::Int;
    default: return c10::ScalarType::Long;
  }
}

// A transposed matrix (tensor.t(), or rows of one): what
// transpose_to_row_major copies faster than torch's strided copy.
// Conjugated or negated views need torch's copy, which applies the flag.
bool is_column_major_matrix(const at::Tensor& view) {
  return view.dim() == 2 && view.size(0) > 1 && view.size(1) > 1 && view.stride(0) == 1 &&
         view.stride(1) >= view.size(0) && view.element_size() <= 8 && !view.is_conj() &&
         !view.is_neg();
}

}  // namespace

bool is_c_order(const at::Tensor& tensor) {
  return tensor.is_contiguous() && !tensor.is_conj() && !tensor.is_neg();
}

void for_each_piece(const at::Tensor& view, std::size_t max_bytes,
                    const std::function<void(const at::Tensor&)>& piece) {
  const PlainTensorOps plain;
  const std::size_t size = view.numel() * view.element_size();
  if (size <= max_bytes) {
    piece(view);
    return;
  }
  const std::int64_t rows = view.size(0);
  const std::size_t row_size = size / rows;
  const std::int64_t rows_per_chunk =
      std::max<std::int64_t>(1, static_cast<std::int64_t>(max_bytes / row_size));
  for (std::int64_t row = 0; row < rows; row += rows_per_chunk) {
    const at::Tensor part = view.narrow(0, row, std::min(rows_per_chunk, rows - row));
    if (row_size > max_bytes) {
      for_each_piece(part.select(0, 0), max_bytes, piece);
    } else {
      piece(part);
    }
  }
}

void copy_in_c_order(const at::Tensor& view, void* target) {
  const PlainTensorOps plain;
  const std::int64_t size = view.numel() * view.element_size();
  if (size == 0) return;
  if (is_c_order(view)) {
    std::memcpy(target, view.const_data_ptr(), static_cast<std::size_t>(size));
    return;
  }
  if (is_column_major_matrix(view)) {
    transpose_to_row_major(view.const_data_ptr(), view.size(0), view.size(1), view.stride(1),
                           view.element_size(), target);
    return;
  }
  // Copy as same-width integers: a bit-exact copy that needs no copy kernel
  // for exotic dtypes (float8, float4). Lazily conjugated or negated views
  // need torch's own copy, which applies the conjugation.
  at::Tensor source = view;
  if (!view.is_conj() && !view.is_neg()) {
    source = view.view(same_width_integer(view.element_size()));
  }
  at::Tensor destination =
      at::from_blob(target, source.sizes(), at::TensorOptions().dtype(source.scalar_type()));
  destination.copy_(source);
}

}  // namespace trinity_stream_saver
