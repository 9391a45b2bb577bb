#include "format/dtype.h"

#include <climits>

namespace trinity_stream_saver {

std::optional<Dtype> find_dtype(std::string_view name) {
  for (const Dtype& dtype : kDtypes) {
    if (dtype.name == name) return dtype;
  }
  return std::nullopt;
}

std::string supported_dtype_names() {
  std::string names;
  for (const Dtype& dtype : kDtypes) {
    if (!names.empty()) names += ", ";
    names += dtype.name;
  }
  return names;
}

std::optional<std::uint64_t> byte_size(const Dtype& dtype,
                                       std::uint64_t element_count) {
  if (dtype.bits % 8 == 0) {
    std::uint64_t bytes = 0;
    if (__builtin_mul_overflow(element_count, static_cast<std::uint64_t>(dtype.bits / 8),
                               &bytes)) {
      return std::nullopt;
    }
    return bytes;
  }
  // Sub-byte dtypes (F4): several elements share each byte.
  const std::uint64_t per_byte = 8 / static_cast<std::uint64_t>(dtype.bits);
  if (element_count % per_byte != 0) return std::nullopt;
  return element_count / per_byte;
}

std::optional<std::vector<std::int64_t>> header_shape(const Dtype& dtype,
                                                      std::span<const std::int64_t> sizes) {
  std::vector<std::int64_t> shape(sizes.begin(), sizes.end());
  if (dtype.values_per_item == 1) return shape;
  if (shape.empty() || shape.back() > INT64_MAX / dtype.values_per_item) return std::nullopt;
  shape.back() *= dtype.values_per_item;
  return shape;
}

}  // namespace trinity_stream_saver
