#include "torch_dtype.h"

#include <array>

namespace trinity_stream_saver {

namespace {

struct Mapping {
  c10::ScalarType scalar_type;
  std::string_view name;
  int elements_per_item;
};

// Mirrors the table of safetensors.torch (the names it writes for each
// torch dtype); test_dtypes.py checks every row against save_file itself.
constexpr std::array<Mapping, 20> kMappings{{
    {c10::ScalarType::Bool, "BOOL", 1},
    {c10::ScalarType::Byte, "U8", 1},
    {c10::ScalarType::Char, "I8", 1},
    {c10::ScalarType::Short, "I16", 1},
    {c10::ScalarType::UInt16, "U16", 1},
    {c10::ScalarType::Int, "I32", 1},
    {c10::ScalarType::UInt32, "U32", 1},
    {c10::ScalarType::Long, "I64", 1},
    {c10::ScalarType::UInt64, "U64", 1},
    {c10::ScalarType::Half, "F16", 1},
    {c10::ScalarType::BFloat16, "BF16", 1},
    {c10::ScalarType::Float, "F32", 1},
    {c10::ScalarType::Double, "F64", 1},
    {c10::ScalarType::ComplexFloat, "C64", 1},
    {c10::ScalarType::Float8_e4m3fn, "F8_E4M3", 1},
    {c10::ScalarType::Float8_e4m3fnuz, "F8_E4M3FNUZ", 1},
    {c10::ScalarType::Float8_e5m2, "F8_E5M2", 1},
    {c10::ScalarType::Float8_e5m2fnuz, "F8_E5M2FNUZ", 1},
    {c10::ScalarType::Float8_e8m0fnu, "F8_E8M0", 1},
    {c10::ScalarType::Float4_e2m1fn_x2, "F4", 2},
}};

std::optional<TorchDtype> to_torch_dtype(const Mapping& mapping) {
  const std::optional<Dtype> dtype = find_dtype(mapping.name);
  if (!dtype) return std::nullopt;
  return TorchDtype{mapping.scalar_type, *dtype, mapping.elements_per_item};
}

}  // namespace

std::optional<TorchDtype> find_torch_dtype(c10::ScalarType scalar_type) {
  for (const Mapping& mapping : kMappings) {
    if (mapping.scalar_type == scalar_type) return to_torch_dtype(mapping);
  }
  return std::nullopt;
}

std::optional<TorchDtype> find_torch_dtype(std::string_view safetensors_name) {
  for (const Mapping& mapping : kMappings) {
    if (mapping.name == safetensors_name) return to_torch_dtype(mapping);
  }
  return std::nullopt;
}

std::optional<std::vector<std::int64_t>> header_shape(const TorchDtype& dtype,
                                                      c10::IntArrayRef sizes) {
  std::vector<std::int64_t> shape(sizes.begin(), sizes.end());
  if (dtype.elements_per_item == 1) return shape;
  if (shape.empty()) return std::nullopt;
  shape.back() *= dtype.elements_per_item;
  return shape;
}

}  // namespace trinity_stream_saver
