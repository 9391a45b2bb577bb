#include "writer/torch_dtype.h"

#include <array>
#include <utility>

namespace trinity_stream_saver {

namespace {

// Mirrors the table of safetensors.torch (the names it writes for each
// torch dtype); test_dtypes.py checks every row against save_file itself.
constexpr std::array<std::pair<c10::ScalarType, DtypeId>, 20> kTorchDtypes{{
    {c10::ScalarType::Bool, DtypeId::BOOL},
    {c10::ScalarType::Byte, DtypeId::U8},
    {c10::ScalarType::Char, DtypeId::I8},
    {c10::ScalarType::Short, DtypeId::I16},
    {c10::ScalarType::UInt16, DtypeId::U16},
    {c10::ScalarType::Int, DtypeId::I32},
    {c10::ScalarType::UInt32, DtypeId::U32},
    {c10::ScalarType::Long, DtypeId::I64},
    {c10::ScalarType::UInt64, DtypeId::U64},
    {c10::ScalarType::Half, DtypeId::F16},
    {c10::ScalarType::BFloat16, DtypeId::BF16},
    {c10::ScalarType::Float, DtypeId::F32},
    {c10::ScalarType::Double, DtypeId::F64},
    {c10::ScalarType::ComplexFloat, DtypeId::C64},
    {c10::ScalarType::Float8_e4m3fn, DtypeId::F8_E4M3},
    {c10::ScalarType::Float8_e4m3fnuz, DtypeId::F8_E4M3FNUZ},
    {c10::ScalarType::Float8_e5m2, DtypeId::F8_E5M2},
    {c10::ScalarType::Float8_e5m2fnuz, DtypeId::F8_E5M2FNUZ},
    {c10::ScalarType::Float8_e8m0fnu, DtypeId::F8_E8M0},
    {c10::ScalarType::Float4_e2m1fn_x2, DtypeId::F4},
}};

}  // namespace

std::optional<Dtype> safetensors_dtype(c10::ScalarType scalar_type) {
  for (const auto& [torch_type, id] : kTorchDtypes) {
    if (torch_type == scalar_type) return dtype_of(id);
  }
  return std::nullopt;
}

}  // namespace trinity_stream_saver
